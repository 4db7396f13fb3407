// PyTorch operators over the C kernels of batchnorm.c, with their autograd in C++.
//
//   batchnorm::train      the fused route's training forward, running-statistics update included;
//                         differentiable (first derivatives by the native backward kernel, i.e.
//                         grad_sums + grad_input in one call; higher ones, and batched gradients, by a
//                         composite of ATen operations); returns (None, -1) for arguments it does not
//                         take as they are, having done nothing
//   batchnorm::inference  the fused route's eval forward; differentiable with respect to the input,
//                         weight and bias (first derivatives by the native eval-backward kernel,
//                         grad_sums and dx = dy * invstd * weight in one pass; higher ones and batched
//                         gradients by ATen operations); None when the arguments do not fit
//   batchnorm::stats, normalize, grad_sums, grad_input
//                         the four primitives of batchnorm.kernels (no autograd), None when declined
//
// The kernels read an input whose memory is a dense (B, C, S) block (contiguous, or features
// innermost with the other axes dense) and per-feature tensors that are contiguous (C,) CPU
// tensors of the accumulation dtype (float32; float64 for float64 inputs). Every operator checks
// that itself (cheaply, in C++) and declines otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <tuple>
#include <vector>

extern "C" {
int bn_forward(int dtype, const void *x, void *y, int64_t B, int64_t C, int64_t S, const void *weight,
               const void *bias, void *mean_out, void *invstd_out, void *var_out, void *running_mean,
               void *running_var, double momentum, int64_t *counter, double eps);
int bn_backward(int dtype, const void *dy, const void *x, void *dx, int64_t B, int64_t C, int64_t S,
                const void *mean, const void *invstd, const void *weight, void *grad_weight, void *grad_bias);
int bn_inference(int dtype, const void *x, void *y, int64_t B, int64_t C, int64_t S, const void *running_mean,
                 const void *running_var, const void *weight, const void *bias, double eps);
int bn_normalize(int dtype, const void *x, void *y, int64_t B, int64_t C, int64_t S, const void *mean,
                 const void *invstd, const void *weight, const void *bias);
int bn_eval_backward(int dtype, const void *dy, const void *x, void *dx, int64_t B, int64_t C, int64_t S,
                     const void *mean, const void *invstd, const void *weight, void *grad_weight, void *grad_bias);
int bn_grad_input(int dtype, const void *dy, const void *x, void *dx, int64_t B, int64_t C, int64_t S,
                  const void *mean, const void *invstd, const void *weight, const void *sum_dy,
                  const void *sum_dy_xhat, double count);
int bn_supports(int dtype);
}

namespace {

using at::Tensor;
using torch::autograd::variable_list;

// The code bn_* take for a dtype, -1 for one they do not know.
int code_or_minus_one(at::ScalarType t) {
    switch (t) {
    case at::kFloat:
        return 0;
    case at::kDouble:
        return 1;
    case at::kBFloat16:
        return 2;
    case at::kHalf:
        return 3;
    default:
        return -1;
    }
}

int dtype_code(const Tensor &x) {
    int code = code_or_minus_one(x.scalar_type());
    TORCH_CHECK(code >= 0, "batchnorm native kernels: unsupported dtype ", x.scalar_type());
    return code;
}

at::ScalarType accumulation(const Tensor &x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_status(int status, const char *what) {
    TORCH_CHECK(status >= 0, "batchnorm native ", what, " kernel failed: ",
                status == -1 ? "unsupported dtype" : "out of memory");
}

const void *data_or_null(const Tensor &t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void *mutable_or_null(const Tensor &t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

struct Sizes {
    int64_t batches, features, positions;
};

// PyTorch sets the OpenMP thread count of each thread lazily, on its first parallel operation;
// asking for it does that, so the kernels' OpenMP regions follow torch.set_num_threads in any
// thread (a new Python thread would otherwise get the OpenMP default, every core).
void follow_torch_threads() { at::get_num_threads(); }

Sizes unpack(at::IntArrayRef sizes, const Tensor &x) {
    TORCH_CHECK(sizes.size() == 3, "batchnorm native kernels: sizes must be [B, C, S]");
    TORCH_CHECK(x.device().is_cpu(), "batchnorm native kernels: CPU tensors only");
    TORCH_CHECK(sizes[0] * sizes[1] * sizes[2] == x.numel(), "batchnorm native kernels: sizes do not match the input");
    follow_torch_threads();
    return {sizes[0], sizes[1], sizes[2]};
}

// dy in x's memory layout (empty_like keeps the strides of a dense tensor).
Tensor like_input(const Tensor &dy, const Tensor &x) {
    if (dy.strides() == x.strides()) return dy;
    return at::empty_like(x).copy_(dy);
}

// Forward; `stats` rows: mean, inv_std (and var when it has 3 rows).
bool run_forward(const Tensor &x, const Tensor &y, const Sizes &s, const Tensor &weight, const Tensor &bias,
                 const Tensor &stats, const Tensor &running_mean, const Tensor &running_var, double momentum,
                 const Tensor &counter, double eps) {
    char *base = static_cast<char *>(stats.mutable_data_ptr());
    int64_t step = s.features * static_cast<int64_t>(stats.element_size());
    int status = bn_forward(dtype_code(x), x.const_data_ptr(), y.mutable_data_ptr(), s.batches, s.features,
                            s.positions, data_or_null(weight), data_or_null(bias), base, base + step,
                            stats.size(0) > 2 ? base + 2 * step : nullptr, mutable_or_null(running_mean),
                            mutable_or_null(running_var), momentum,
                            counter.defined() ? counter.mutable_data_ptr<int64_t>() : nullptr, eps);
    check_status(status, "forward");
    return status == 0;
}

std::tuple<Tensor, Tensor, Tensor> run_backward(const Tensor &dy, const Tensor &x, const Sizes &s,
                                                const Tensor &stats, const Tensor &weight, bool need_input) {
    Tensor grad = like_input(dy, x);
    Tensor dx = need_input ? at::empty_like(x) : Tensor();
    Tensor dweight = at::empty({s.features}, stats.options()), dbias = at::empty({s.features}, stats.options());
    char *base = static_cast<char *>(stats.mutable_data_ptr());
    int64_t step = s.features * static_cast<int64_t>(stats.element_size());
    int status = bn_backward(dtype_code(x), grad.const_data_ptr(), x.const_data_ptr(), mutable_or_null(dx),
                             s.batches, s.features, s.positions, base, base + step, data_or_null(weight),
                             dweight.mutable_data_ptr(), dbias.mutable_data_ptr());
    check_status(status, "backward");
    return {dx, dweight, dbias};
}

// The axes a statistic pools over (every axis but `feature`), and the shape that broadcasts a (C,) vector
// along `feature`.
struct Axes {
    std::vector<int64_t> reduced, broadcast;
};

Axes axes_of(const Tensor &x, int64_t feature) {
    Axes a{{}, std::vector<int64_t>(x.dim(), 1)};
    for (int64_t d = 0; d < x.dim(); d++)
        if (d != feature) a.reduced.push_back(d);
    a.broadcast[feature] = x.size(feature);
    return a;
}

// What a backward node keeps besides its saved tensors.
struct Meta {
    bool has_weight = false, has_bias = false;
    at::ScalarType bias_dtype = at::kFloat;
    int64_t feature = 1;
    Sizes sizes{0, 0, 0};
    double eps = 0.0;
};

Meta meta_of(const Tensor &w, const Tensor &b, int64_t feature, const Sizes &s, double eps) {
    Meta m;
    m.has_weight = w.defined();
    m.has_bias = b.defined();
    if (b.defined()) m.bias_dtype = b.scalar_type();
    m.feature = feature;
    m.sizes = s;
    m.eps = eps;
    return m;
}

// Which gradients a node's backward owes, in the order of its next edges (input, weight, bias; an
// absent weight or bias has an empty edge and is never owed).
struct Needs {
    bool input, weight, bias;
};

Needs needs_of(const torch::autograd::Node &node) {
    return {node.task_should_compute_output(0), node.task_should_compute_output(1),
            node.task_should_compute_output(2)};
}

// The gradients as differentiable ATen operations (create_graph=True): statistics recomputed from x.
std::tuple<Tensor, Tensor, Tensor> composite_backward(const Tensor &dy, const Tensor &x, int64_t feature,
                                                      const Tensor &weight, double eps, bool need_input) {
    auto acc = accumulation(x);
    auto [dims, broadcast] = axes_of(x, feature);
    int64_t features = x.size(feature);
    double count = static_cast<double>(x.numel() / features);
    Tensor xa = x.to(acc), g = dy.to(acc);
    auto [var, mean] = at::var_mean(xa, dims, at::Scalar(0), true);
    Tensor inv_std = at::rsqrt(var + eps);
    Tensor x_hat = (xa - mean) * inv_std;
    Tensor sum_dy = g.sum(dims, true);
    Tensor sum_dy_x_hat = (g * x_hat).sum(dims, true);
    Tensor dx;
    if (need_input) {
        Tensor gain = weight.defined() ? inv_std * weight.to(acc).view(broadcast) : inv_std;
        dx = (gain * (g - sum_dy / count - x_hat * (sum_dy_x_hat / count))).to(x.scalar_type());
    }
    return {dx, sum_dy_x_hat.view({features}), sum_dy.view({features})};
}

bool plain_tensor(const Tensor &t);

// The weight and bias gradients a node returns: undefined where not needed, else in the parameter's dtype.
void parameter_gradients(const Meta &m, const Tensor &weight, const Needs &needs, Tensor &dweight, Tensor &dbias) {
    if (!needs.weight || !dweight.defined()) {
        dweight = Tensor();
    } else if (dweight.scalar_type() != weight.scalar_type()) {
        dweight = dweight.to(weight.scalar_type());
    }
    if (!needs.bias || !dbias.defined()) {
        dbias = Tensor();
    } else if (dbias.scalar_type() != m.bias_dtype) {
        dbias = dbias.to(m.bias_dtype);
    }
}

// A new backward node, owned the way this PyTorch's autograd owns nodes (c10::intrusive_ptr since
// PyTorch 2.13, std::shared_ptr before).
template <class N> auto new_node() {
    if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
        return c10::make_intrusive<N>();
    } else {
        return std::shared_ptr<N>(new N());
    }
}

// Connects a node to x, weight and bias (the three gradients its backward returns) and makes it y's grad_fn.
template <class P>
void attach(const P &node, const Tensor &y, const Tensor &x, const Tensor &w, const Tensor &b) {
    node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
    torch::autograd::set_history(y, node);
}

// The backward of a training call (one derivation: reference.py's batch_norm_backward). First derivatives
// by the native kernels (grad_sums and grad_input in one call); with create_graph=True, or a batched dy
// (is_grads_batched, torch.func), differentiable ATen operations. A plain torch::autograd::Node rather than a
// torch::autograd::Function: the same graph, engine checks and saved-tensor version checks, a third of
// the forward's bookkeeping (measured: benchmarks/README.md, dense 60x100).
struct TrainBackward : public torch::autograd::Node {
    torch::autograd::SavedVariable x_, weight_;
    Tensor stats_; // (2, C): mean, invstd; no autograd history
    Meta meta_;

    std::string name() const override { return "BatchNormTrainBackward"; }

    void release_variables() override {
        x_.reset_data();
        weight_.reset_data();
        stats_.reset();
    }

    variable_list apply(variable_list &&grads) override {
        Tensor x = x_.unpack(), weight = weight_.unpack();
        const Tensor &dy = grads[0];
        Needs needs = needs_of(*this);
        Tensor dx, dweight, dbias;
        if (dy.defined()) {
            if (at::GradMode::is_enabled() || !plain_tensor(dy)) {
                std::tie(dx, dweight, dbias) =
                    composite_backward(dy, x, meta_.feature, weight, meta_.eps, needs.input);
            } else {
                std::tie(dx, dweight, dbias) = run_backward(dy, x, meta_.sizes, stats_, weight, needs.input);
            }
        }
        parameter_gradients(meta_, weight, needs, dweight, dbias);
        return {needs.input ? dx : Tensor(), dweight, dbias};
    }
};

// Eval with a gradient (fine-tuning with frozen statistics, evaluation outside no_grad): y = x_hat * weight + bias
// with x_hat = (x - running_mean) * invstd, invstd = 1 / sqrt(running_var + eps), all per feature and constant.
// Backward (reference.py's batch_norm_inference differentiated): dx = dy * invstd * weight,
// dweight = sum(dy * x_hat), dbias = sum(dy), by bn_eval_backward (one pass over dy and x for float32 and
// bfloat16 on AVX2). The running statistics get no gradient, as in torch's op.
struct EvalBackward : public torch::autograd::Node {
    torch::autograd::SavedVariable x_, weight_, mean_; // mean_: running_mean, version-checked as in torch's op
    Tensor invstd_;                                     // (C,), from running_var at the forward
    Meta meta_;

    std::string name() const override { return "BatchNormEvalBackward"; }

    void release_variables() override {
        x_.reset_data();
        weight_.reset_data();
        mean_.reset_data();
        invstd_.reset();
    }

    variable_list apply(variable_list &&grads) override {
        Tensor x = x_.unpack(), weight = weight_.unpack(), mean = mean_.unpack();
        const Tensor &dy = grads[0];
        Needs needs = needs_of(*this);
        Tensor dx, dweight, dbias;
        if (dy.defined()) {
            if (at::GradMode::is_enabled() || !plain_tensor(dy)) {
                // create_graph=True or a batched dy: differentiable ATen operations.
                auto [dims, broadcast] = axes_of(x, meta_.feature);
                auto acc = invstd_.scalar_type();
                Tensor g = dy.to(acc), inv = invstd_.view(broadcast);
                if (needs.input) {
                    Tensor gain = weight.defined() ? inv * weight.to(acc).view(broadcast) : inv;
                    dx = (g * gain).to(x.scalar_type());
                }
                if (needs.weight) dweight = (g * ((x.to(acc) - mean.view(broadcast)) * inv)).sum(dims);
                if (needs.bias) dbias = g.sum(dims);
            } else {
                const Sizes &s = meta_.sizes;
                Tensor grad = like_input(dy, x);
                bool sums = needs.weight || needs.bias;
                if (sums) {
                    dweight = at::empty({s.features}, invstd_.options());
                    dbias = at::empty({s.features}, invstd_.options());
                }
                if (needs.input) dx = at::empty_like(x);
                int status = bn_eval_backward(dtype_code(x), grad.const_data_ptr(), x.const_data_ptr(),
                                              mutable_or_null(dx), s.batches, s.features, s.positions,
                                              mean.const_data_ptr(), invstd_.const_data_ptr(), data_or_null(weight),
                                              mutable_or_null(dweight), mutable_or_null(dbias));
                check_status(status, "eval backward");
            }
        }
        parameter_gradients(meta_, weight, needs, dweight, dbias);
        return {needs.input ? dx : Tensor(), dweight, dbias};
    }
};

// invstd as bn_inference forms it: in double, then rounded to the accumulation dtype.
Tensor inference_invstd(const Tensor &running_var, double eps) {
    int64_t features = running_var.numel();
    Tensor invstd = at::empty({features}, running_var.options());
    if (invstd.scalar_type() == at::kDouble) {
        const double *v = running_var.const_data_ptr<double>();
        double *out = invstd.mutable_data_ptr<double>();
        for (int64_t c = 0; c < features; c++) out[c] = 1.0 / std::sqrt(v[c] + eps);
    } else {
        const float *v = running_var.const_data_ptr<float>();
        float *out = invstd.mutable_data_ptr<float>();
        for (int64_t c = 0; c < features; c++) out[c] = static_cast<float>(1.0 / std::sqrt((double)v[c] + eps));
    }
    return invstd;
}


bool supported(const Tensor &x) {
    int code = code_or_minus_one(x.scalar_type());
    return code >= 0 && bn_supports(code);
}

// A tensor whose memory the kernels may read: real storage, not a functorch wrapper (torch.func
// transforms), no forward-mode tangent (which a kernel would drop); the general path serves those.
bool plain_tensor(const Tensor &t) {
    if (!t.defined()) return true;
    auto keys = t.key_set();
    return t.has_storage() && !keys.has(c10::DispatchKey::FuncTorchGradWrapper) &&
           !keys.has(c10::DispatchKey::FuncTorchBatched) && !t._fw_grad(0).defined();
}

Tensor value_or_undefined(const std::optional<Tensor> &t) { return t.has_value() ? *t : Tensor(); }

// The (B, C, S) block of x's memory with features at `axis`, when the kernels can take x as it is:
// a CPU tensor of a supported dtype, non-empty, contiguous or with the features innermost and every
// other axis dense (channels-last, (N, L, C) sequences). Returns false otherwise.
bool dense_block(const Tensor &x, int64_t axis, int64_t &feature, Sizes &s) {
    if (!x.defined() || !x.device().is_cpu() || !supported(x) || !plain_tensor(x)) return false;
    int64_t dims = x.dim();
    if (dims == 0 || axis < -dims || axis >= dims) return false;
    feature = axis < 0 ? axis + dims : axis;
    int64_t numel = x.numel(), features = x.size(feature);
    if (numel == 0) return false;
    if (x.is_contiguous()) {
        int64_t blocks = 1;
        for (int64_t d = 0; d < feature; d++) blocks *= x.size(d);
        s = {blocks, features, numel / (blocks * features)};
        return true;
    }
    if (features > 1 && x.stride(feature) != 1) return false;
    int64_t expected = features;
    for (int64_t d = dims - 1; d >= 0; d--) {
        if (d == feature || x.size(d) == 1) continue;
        if (x.stride(d) != expected) return false;
        expected *= x.size(d);
    }
    s = {numel / features, features, 1};
    return true;
}

// None, or a contiguous (C,) CPU tensor of the accumulation dtype.
bool plain_vector(const std::optional<Tensor> &v, at::ScalarType acc, int64_t features) {
    if (!v.has_value() || !v->defined()) return true;
    return v->scalar_type() == acc && v->dim() == 1 && v->size(0) == features && v->device().is_cpu() &&
           v->is_contiguous() && plain_tensor(*v);
}

bool needs_grad(const Tensor &x, const Tensor &w, const Tensor &b) {
    return at::GradMode::is_enabled() &&
           (x.requires_grad() || (w.defined() && w.requires_grad()) || (b.defined() && b.requires_grad()));
}

// Training with the running-statistics update. Status: 0 done, 1 done but a statistic was not finite
// (buffers and counter unchanged), -1 not taken (arguments the kernels do not take as they are:
// the caller's general path handles them; nothing was done and the output is None).
std::tuple<std::optional<Tensor>, int64_t> train(const Tensor &x, const std::optional<Tensor> &weight,
                                                 const std::optional<Tensor> &bias,
                                                 const std::optional<Tensor> &running_mean,
                                                 const std::optional<Tensor> &running_var,
                                                 const std::optional<Tensor> &counter, int64_t axis,
                                                 double momentum, double eps) {
    int64_t feature;
    Sizes s;
    if (!dense_block(x, axis, feature, s) || s.batches * s.positions <= 1 || !(eps > 0)) return {std::nullopt, -1};
    follow_torch_threads();
    auto acc = accumulation(x);
    if (!plain_vector(weight, acc, s.features) || !plain_vector(bias, acc, s.features) ||
        !plain_vector(running_mean, acc, s.features) || !plain_vector(running_var, acc, s.features))
        return {std::nullopt, -1};
    Tensor w = value_or_undefined(weight), b = value_or_undefined(bias);
    Tensor rm = value_or_undefined(running_mean), rv = value_or_undefined(running_var);
    Tensor n = value_or_undefined(counter);
    if (rm.defined() != rv.defined() || (rm.defined() && (rm.requires_grad() || rv.requires_grad())))
        return {std::nullopt, -1};
    if (n.defined() && !(n.scalar_type() == at::kLong && n.numel() == 1 && n.device().is_cpu()))
        return {std::nullopt, -1};
    bool cumulative = momentum < 0;
    if (rm.defined() && ((cumulative && !n.defined()) || (!cumulative && !(momentum <= 1.0))))
        return {std::nullopt, -1};
    Tensor y = at::empty_like(x);
    Tensor stats = at::empty({2, s.features}, x.options().dtype(acc));
    bool finite = run_forward(x, y, s, w, b, stats, rm, rv, momentum, n, eps);
    if (needs_grad(x, w, b)) {
        auto node = new_node<TrainBackward>();
        node->x_ = torch::autograd::SavedVariable(x, false);
        node->weight_ = torch::autograd::SavedVariable(w, false);
        node->stats_ = stats;
        node->meta_ = meta_of(w, b, feature, s, eps);
        attach(node, y, x, w, b);
    }
    return {y, finite ? 0 : 1};
}

// Eval; None when not taken (see train). Differentiable (Eval) when a gradient is needed.
std::optional<Tensor> inference(const Tensor &x, const Tensor &running_mean, const Tensor &running_var,
                                const std::optional<Tensor> &weight, const std::optional<Tensor> &bias, int64_t axis,
                                double eps) {
    int64_t feature;
    Sizes s;
    if (!dense_block(x, axis, feature, s) || !(eps > 0)) return std::nullopt;
    follow_torch_threads();
    auto acc = accumulation(x);
    if (!plain_vector(weight, acc, s.features) || !plain_vector(bias, acc, s.features) ||
        !plain_vector(running_mean, acc, s.features) || !plain_vector(running_var, acc, s.features))
        return std::nullopt;
    Tensor w = value_or_undefined(weight), b = value_or_undefined(bias);
    bool differentiable = needs_grad(x, w, b);
    if (differentiable && (running_mean.requires_grad() || running_var.requires_grad())) return std::nullopt;
    Tensor y = at::empty_like(x);
    int status = bn_inference(dtype_code(x), x.const_data_ptr(), y.mutable_data_ptr(), s.batches, s.features,
                              s.positions, running_mean.const_data_ptr(), running_var.const_data_ptr(),
                              data_or_null(w), data_or_null(b), eps);
    check_status(status, "inference");
    if (differentiable) {
        auto node = new_node<EvalBackward>();
        node->x_ = torch::autograd::SavedVariable(x, false);
        node->weight_ = torch::autograd::SavedVariable(w, false);
        node->mean_ = torch::autograd::SavedVariable(running_mean, false);
        node->invstd_ = inference_invstd(running_var, eps);
        node->meta_ = meta_of(w, b, feature, s, eps);
        attach(node, y, x, w, b);
    }
    return y;
}

// --- the four primitives (batchnorm.kernels): None when the kernels do not take the arguments as they are ---

// Per-feature (mean, biased var) as a (2, C) tensor of the accumulation dtype.
std::optional<Tensor> stats(const Tensor &x, int64_t axis) {
    int64_t feature;
    Sizes s;
    if (!dense_block(x, axis, feature, s)) return std::nullopt;
    follow_torch_threads();
    Tensor out = at::empty({2, s.features}, x.options().dtype(accumulation(x)));
    char *base = static_cast<char *>(out.mutable_data_ptr());
    int64_t step = s.features * static_cast<int64_t>(out.element_size());
    int status = bn_forward(dtype_code(x), x.const_data_ptr(), nullptr, s.batches, s.features, s.positions, nullptr,
                            nullptr, base, nullptr, base + step, nullptr, nullptr, 0.0, nullptr, 1.0);
    check_status(status, "stats");
    return out;
}

std::optional<Tensor> normalize(const Tensor &x, const Tensor &mean, const Tensor &invstd,
                                const std::optional<Tensor> &weight, const std::optional<Tensor> &bias, int64_t axis) {
    int64_t feature;
    Sizes s;
    if (!dense_block(x, axis, feature, s)) return std::nullopt;
    auto acc = accumulation(x);
    if (!plain_vector(mean, acc, s.features) || !plain_vector(invstd, acc, s.features) ||
        !plain_vector(weight, acc, s.features) || !plain_vector(bias, acc, s.features))
        return std::nullopt;
    follow_torch_threads();
    Tensor y = at::empty_like(x);
    int status = bn_normalize(dtype_code(x), x.const_data_ptr(), y.mutable_data_ptr(), s.batches, s.features,
                              s.positions, mean.const_data_ptr(), invstd.const_data_ptr(),
                              data_or_null(value_or_undefined(weight)), data_or_null(value_or_undefined(bias)));
    check_status(status, "normalize");
    return y;
}

// dy of x's dtype, a plain CPU tensor of x's shape (copied into x's layout when its strides differ).
bool plain_gradient(const Tensor &dy, const Tensor &x) {
    return dy.defined() && dy.device().is_cpu() && dy.scalar_type() == x.scalar_type() && dy.sizes() == x.sizes() &&
           plain_tensor(dy);
}

// (sum(dy), sum(dy * x_hat)) as a (2, C) tensor of the accumulation dtype.
std::optional<Tensor> grad_sums(const Tensor &dy, const Tensor &x, const Tensor &mean, const Tensor &invstd,
                                int64_t axis) {
    int64_t feature;
    Sizes s;
    if (!dense_block(x, axis, feature, s) || !plain_gradient(dy, x)) return std::nullopt;
    auto acc = accumulation(x);
    if (!plain_vector(mean, acc, s.features) || !plain_vector(invstd, acc, s.features)) return std::nullopt;
    follow_torch_threads();
    Tensor grad = like_input(dy, x);
    Tensor out = at::empty({2, s.features}, x.options().dtype(acc));
    char *base = static_cast<char *>(out.mutable_data_ptr());
    int64_t step = s.features * static_cast<int64_t>(out.element_size());
    // bn_backward without dx: grad_weight = sum(dy * x_hat), grad_bias = sum(dy).
    int status = bn_backward(dtype_code(x), grad.const_data_ptr(), x.const_data_ptr(), nullptr, s.batches,
                             s.features, s.positions, mean.const_data_ptr(), invstd.const_data_ptr(), nullptr,
                             base + step, base);
    check_status(status, "grad_sums");
    return out;
}

std::optional<Tensor> grad_input(const Tensor &dy, const Tensor &x, const Tensor &mean, const Tensor &invstd,
                                 const std::optional<Tensor> &weight, const Tensor &sum_dy, const Tensor &sum_dy_xhat,
                                 double count, int64_t axis) {
    int64_t feature;
    Sizes s;
    if (!dense_block(x, axis, feature, s) || !plain_gradient(dy, x) || !(count > 0)) return std::nullopt;
    auto acc = accumulation(x);
    if (!plain_vector(mean, acc, s.features) || !plain_vector(invstd, acc, s.features) ||
        !plain_vector(weight, acc, s.features) || !plain_vector(sum_dy, acc, s.features) ||
        !plain_vector(sum_dy_xhat, acc, s.features))
        return std::nullopt;
    follow_torch_threads();
    Tensor grad = like_input(dy, x);
    Tensor dx = at::empty_like(x);
    int status = bn_grad_input(dtype_code(x), grad.const_data_ptr(), x.const_data_ptr(), dx.mutable_data_ptr(),
                               s.batches, s.features, s.positions, mean.const_data_ptr(), invstd.const_data_ptr(),
                               data_or_null(value_or_undefined(weight)), sum_dy.const_data_ptr(),
                               sum_dy_xhat.const_data_ptr(), count);
    check_status(status, "grad_input");
    return dx;
}

bool supports(int64_t dtype) { return dtype >= 0 && dtype <= 3 && bn_supports(static_cast<int>(dtype)); }

} // namespace

TORCH_LIBRARY(batchnorm, m) {
    m.def("supports(int dtype) -> bool");
    m.def("train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
          "Tensor(c!)? counter, int axis, float momentum, float eps) -> (Tensor?, int)");
    m.def("inference(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, int axis, "
          "float eps) -> Tensor?");
    m.def("stats(Tensor x, int axis) -> Tensor?");
    m.def("normalize(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, int axis) -> Tensor?");
    m.def("grad_sums(Tensor dy, Tensor x, Tensor mean, Tensor invstd, int axis) -> Tensor?");
    m.def("grad_input(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor sum_dy, "
          "Tensor sum_dy_xhat, float count, int axis) -> Tensor?");
}

TORCH_LIBRARY_IMPL(batchnorm, CompositeImplicitAutograd, m) {
    m.impl("train", train);
    m.impl("inference", inference);
    m.impl("supports", supports);
    m.impl("stats", stats);
    m.impl("normalize", normalize);
    m.impl("grad_sums", grad_sums);
    m.impl("grad_input", grad_input);
}

#ifdef BATCHNORM_PYTHON
// The same functions as a Python extension module (pybind11, built when Python's headers are at hand):
// batchnorm.native calls these directly, whose argument conversion costs about 3 us a call where
// torch.ops' schema-driven parsing costs about 7 us (a 60x100 eval call, measured on an AMD EPYC).
// The torch.ops.batchnorm operators above stay registered (the dispatcher, torch.library users).
#include <torch/extension.h>

PYBIND11_MODULE(batchnorm_native, m) {
    using release = pybind11::call_guard<pybind11::gil_scoped_release>;
    m.def("train", &train, release());
    m.def("inference", &inference, release());
    m.def("stats", &stats, release());
    m.def("normalize", &normalize, release());
    m.def("grad_sums", &grad_sums, release());
    m.def("grad_input", &grad_input, release());
}
#endif
