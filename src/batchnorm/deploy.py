r"""Deployment: fold BN into the layer before it, and recompute population statistics ("precise BN").

**Folding.** In eval mode a BN layer is a fixed affine map per feature ``c``,
:math:`y_c = (x_c - \mu_c)\, s_c + \beta_c` with
:math:`s_c = \gamma_c / \sqrt{\sigma^2_c + \epsilon}` (running mean
:math:`\mu`, running variance :math:`\sigma^2`). When ``x`` is the output of a
``Linear`` or convolution, :math:`x_c = W_c * z + b_c`, the two maps compose
into one layer with

.. math::

    W'_c = W_c\, \frac{\gamma_c}{\sqrt{\sigma^2_c + \epsilon}}, \qquad
    b'_c = (b_c - \mu_c)\, \frac{\gamma_c}{\sqrt{\sigma^2_c + \epsilon}} + \beta_c

(:math:`b_c = 0` for a layer without bias, :math:`\gamma = 1, \beta = 0`
without ``affine``), where :math:`W_c` is everything that produces output
feature ``c``: row ``c`` of a ``Linear`` weight ``(out, in)``, filter ``c`` of
a convolution weight ``(out, in/groups, *k)`` (grouped and depthwise alike),
and slice ``[g, :, j]`` of a transposed convolution weight viewed as
``(groups, in/groups, out/groups, *k)`` for ``c = g * out/groups + j``. The BN
layer becomes ``nn.Identity`` and the network does one pass less per layer.
:func:`fold` computes in float64 and rounds once to the layer's dtype.

**Precise BN.** The running statistics of a trained network are exponential
moving averages over the last few hundred batches, taken while the weights
were still moving. :func:`recalibrate` replaces them with the statistics of
the final network pooled exactly over many batches (Wu & Johnson, 2021,
"Rethinking 'Batch' in BatchNorm", section 3).
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from batchnorm import kernels
from batchnorm.nn.batchnorm import BatchNorm
from batchnorm.nn.frozen import FrozenBatchNorm, freeze
from batchnorm.nn.fused import BatchNormAct

__all__ = ["FoldReport", "Folded", "RecalibrationReport", "Skipped", "fold", "freeze", "recalibrate"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# Layers whose forward is exactly ``W * z + b`` with the output features where folding expects them.
_LINEAR_FORWARDS = {nn.Linear.forward}
_CONV_FORWARDS = {
    nn.Conv1d.forward,
    nn.Conv2d.forward,
    nn.Conv3d.forward,
    nn.ConvTranspose1d.forward,
    nn.ConvTranspose2d.forward,
    nn.ConvTranspose3d.forward,
}
# BN classes whose eval forward is known to be the running-statistics affine map (others are probed).
_KNOWN_NORM_FORWARDS = {_BatchNorm.forward, BatchNorm.forward, nn.SyncBatchNorm.forward, FrozenBatchNorm.forward}
# What fold treats as BN: torch's base class (ours, torch's, variants) and the frozen map.
_NORMS = (_BatchNorm, FrozenBatchNorm)
Norm = _BatchNorm | FrozenBatchNorm


# --------------------------------------------------------------------------- fold: the report


@dataclass(frozen=True)
class Folded:
    """One BN layer folded into the layer before it.

    Attributes:
        norm: qualified name of the BN layer (now ``replacement``).
        layer: qualified name of the ``Linear``/convolution that absorbed it.
        replacement: the module that took the BN layer's place: ``Identity``,
            or the activation of a :class:`~batchnorm.nn.fused.BatchNormAct`.
    """

    norm: str
    layer: str
    replacement: str = "Identity"


@dataclass(frozen=True)
class Skipped:
    """One BN layer left in place, and why."""

    norm: str
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold` did.

    Attributes:
        folded: the folded BN layers, in the order the forward pass calls them.
        skipped: the BN layers left in place, each with its reason.
        method: ``"fx"`` when the layer -> BN edges came from a ``torch.fx``
            trace, ``"sequential"`` when tracing failed and only consecutive
            children of ``nn.Sequential`` containers were considered.
        trace_error: why tracing failed (``method == "sequential"``), else None.
    """

    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    method: Literal["fx", "sequential"] = "fx"
    trace_error: str | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BN layer(s), left {len(self.skipped)} (edges found by {self.method})"]
        lines += [f"  folded {item.norm} into {item.layer} (now {item.replacement})" for item in self.folded]
        lines += [f"  left   {item.norm}: {item.reason}" for item in self.skipped]
        if self.trace_error:
            lines.append(f"  (torch.fx could not trace the model: {self.trace_error})")
        return "\n".join(lines)


# --------------------------------------------------------------------------- fold: finding the edges


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with every BN, Linear and convolution kept as one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*_NORMS, nn.Linear, _ConvNd)):
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))


@dataclass
class _Edge:
    layer_name: str
    layer: nn.Linear | _ConvNd
    norm_name: str
    norm: Norm


def _kind(module: nn.Module) -> str:
    return type(module).__name__


def _describe_node(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({_kind(modules[str(node.target)])})"
    if node.op == "call_function":
        return f"the function {getattr(node.target, '__name__', str(node.target))}"
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    if node.op == "placeholder":
        return "the model input"
    return f"{node.op} {node.target}"


def _edges_from_graph(
    model: nn.Module, graph: torch.fx.Graph, modules: dict[str, nn.Module]
) -> tuple[list[_Edge], list[Skipped]]:
    """Layer -> BN edges where the layer's output has no other user and both modules are called once."""
    calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
    edges: list[_Edge] = []
    skipped: list[Skipped] = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        norm = modules[name]
        if not isinstance(norm, _NORMS):
            continue
        source = node.args[0] if node.args else None
        if calls[name] > 1:
            skipped.append(Skipped(name, f"called {calls[name]} times in the forward pass (a shared layer)"))
        elif len(node.args) != 1 or node.kwargs or not isinstance(source, torch.fx.Node):
            skipped.append(Skipped(name, "called with arguments other than one tensor"))
        elif source.op != "call_module" or not isinstance(modules[str(source.target)], (nn.Linear, _ConvNd)):
            skipped.append(Skipped(name, f"follows {_describe_node(source, modules)}, not a Linear or Conv layer"))
        elif calls[str(source.target)] > 1:
            skipped.append(Skipped(name, f"follows {source.target}, which the forward pass calls more than once"))
        elif len(source.users) > 1:
            others = ", ".join(sorted(user.name for user in source.users if user is not node))
            skipped.append(Skipped(name, f"the output of {source.target} is also used by {others}"))
        else:
            layer = modules[str(source.target)]
            assert isinstance(layer, (nn.Linear, _ConvNd))
            edges.append(_Edge(str(source.target), layer, name, norm))
    called = set(calls)
    for name, module in modules.items():
        if isinstance(module, _NORMS) and name not in called and name:
            skipped.append(Skipped(name, "not called in the traced forward pass"))
    return edges, skipped


def _edges_from_sequentials(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[list[_Edge], list[Skipped]]:
    """Consecutive (layer, BN) children of plain ``nn.Sequential`` containers (those that run them in order)."""
    edges: list[_Edge] = []
    skipped: list[Skipped] = []
    placed: set[str] = set()
    for parent_name, parent in modules.items():
        if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
            continue
        children = list(parent.named_children())
        for index, (child_name, child) in enumerate(children):
            if not isinstance(child, _NORMS):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            placed.add(name)
            if index == 0:
                skipped.append(Skipped(name, "first in its Sequential: what runs before it is unknown without a trace"))
                continue
            previous_name, previous = children[index - 1]
            full = f"{parent_name}.{previous_name}" if parent_name else previous_name
            if isinstance(previous, (nn.Linear, _ConvNd)):
                edges.append(_Edge(full, previous, name, child))
            else:
                skipped.append(Skipped(name, f"follows {full} ({_kind(previous)}), not a Linear or Conv layer"))
    for name, module in modules.items():
        if isinstance(module, _NORMS) and name not in placed and name:
            skipped.append(Skipped(name, "not in an nn.Sequential, and the model could not be traced"))
    return edges, skipped


# --------------------------------------------------------------------------- fold: one edge


def _replacement(norm: Norm) -> nn.Module:
    """What takes the folded BN layer's place: the activation of a fused BN + activation, else the identity."""
    activation = norm.activation if isinstance(norm, (BatchNormAct, FrozenBatchNorm)) else None
    if activation == "relu":
        return nn.ReLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(float(getattr(norm, "negative_slope", 0.01)))
    if activation == "sigmoid":
        return nn.Sigmoid()
    if activation == "tanh":
        return nn.Tanh()
    return nn.Identity()


def _affine(norm: Norm) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` in float64 with ``BN_eval(x) = x * scale + shift`` per feature."""
    assert norm.running_mean is not None
    assert norm.running_var is not None
    scale = (norm.running_var.detach().double() + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -norm.running_mean.detach().double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    return scale, shift


def _layer_features(layer: nn.Module) -> tuple[int, tuple[int, ...]]:
    """Output features of ``layer`` and the axes of its output where they may sit (batched input)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, (1, -1)  # (N, D); axis 1 assumes 2-D outputs, as BatchNorm1d after Linear
    assert isinstance(layer, _ConvNd)
    spatial = len(layer.kernel_size)
    return layer.out_channels, (1, -(spatial + 1))


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or parametrize.is_parametrized(module)
        or getattr(module, "_forward_hooks_with_kwargs", None)
    )


def _uninitialized(module: nn.Module) -> bool:
    return any(is_lazy(t) for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])


def _probe_matches(norm: Norm, layer: nn.Module, after: nn.Module) -> bool:
    """Does ``norm`` (eval) compute ``after(x * scale + shift)`` on a random batch? For BN classes we do not know."""
    assert norm.running_mean is not None
    features = norm.num_features
    trailing = () if isinstance(layer, nn.Linear) else (3,) * len(getattr(layer, "kernel_size", (1, 1)))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((4, features, *trailing), generator=generator, dtype=torch.float64)
    x = x.to(dtype=norm.running_mean.dtype, device=norm.running_mean.device)
    state = {key: value.clone() for key, value in norm.state_dict().items()}
    try:
        with torch.no_grad():
            got = norm(x).double()
    except Exception:
        return False
    finally:
        norm.load_state_dict(state)
    scale, shift = _affine(norm)
    shape = (1, features, *trailing)
    expected = after(x.double() * scale.reshape(shape) + shift.reshape(shape))
    tolerance = 1e-10 if x.dtype == torch.float64 else 1e-4
    return bool(torch.allclose(got, expected, rtol=tolerance, atol=tolerance))


def _why_not(edge: _Edge, counts: Counter[int]) -> str | None:
    """Why the edge cannot be folded, or None when it can."""
    layer, norm = edge.layer, edge.norm
    if norm.running_mean is None or norm.running_var is None:
        return (
            "no running statistics (track_running_stats=False): it normalizes with batch statistics in eval "
            "too, so there is no fixed affine map to fold"
        )
    if _uninitialized(layer) or _uninitialized(norm):
        return "has uninitialized (lazy) parameters; run a batch through the model first"
    if counts[id(layer)] > 1 or counts[id(norm)] > 1:
        return f"{edge.layer if counts[id(layer)] > 1 else edge.norm} is registered under more than one name"
    if type(layer).forward not in _LINEAR_FORWARDS | _CONV_FORWARDS:
        return f"{edge.layer} ({_kind(layer)}) overrides forward: its output is not known to be W * z + b"
    if _has_hooks(layer) or _has_hooks(norm):
        return "the layer or the BN has forward hooks or parametrizations that folding cannot see"
    features, axes = _layer_features(layer)
    if norm.num_features != features:
        return f"has {norm.num_features} features but {edge.layer} produces {features}"
    axis = getattr(norm, "axis", 1)
    if axis not in axes:
        where = "last" if isinstance(layer, nn.Linear) else "channel"
        return f"normalizes axis {axis}, not the {where} axis where {edge.layer} ({_kind(layer)}) puts its features"
    known = type(norm).forward in _KNOWN_NORM_FORWARDS or isinstance(norm, BatchNormAct)
    if not known and not _probe_matches(norm, layer, nn.Identity()):
        return f"{_kind(norm)}'s eval output is not the affine map of its running statistics (probed)"
    if not layer.weight.is_floating_point():
        return f"{edge.layer} has a {layer.weight.dtype} weight"
    return None


@torch.no_grad()
def _fold_edge(layer: nn.Linear | _ConvNd, norm: Norm) -> None:
    scale, shift = _affine(norm)
    weight: Tensor = layer.weight
    if isinstance(layer, _ConvNd) and layer.transposed:
        groups = layer.groups
        grouped = weight.double().reshape(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        view = (groups, 1, weight.shape[1]) + (1,) * (weight.dim() - 2)
        new_weight = (grouped * scale.reshape(view)).reshape(weight.shape)
    else:
        new_weight = weight.double() * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    bias: Tensor | None = layer.bias
    new_bias = shift if bias is None else bias.double() * scale + shift
    weight.copy_(new_weight.to(weight.dtype))
    if bias is None:
        layer.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)
    else:
        bias.copy_(new_bias.to(bias.dtype))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _training_modules(model: nn.Module) -> list[str]:
    return [
        name or "the model"
        for name, module in model.named_modules()
        if module.training and (not name or isinstance(module, _BatchNorm))
    ]


# --------------------------------------------------------------------------- fold


@overload
def fold(model: ModuleT, *, inplace: bool = ..., report: Literal[False] = ...) -> ModuleT: ...


@overload
def fold(model: ModuleT, *, inplace: bool = ..., report: Literal[True]) -> tuple[ModuleT, FoldReport]: ...


def fold(model: ModuleT, *, inplace: bool = False, report: bool = False) -> ModuleT | tuple[ModuleT, FoldReport]:
    r"""Fold every BN layer that directly follows a ``Linear`` or convolution into that layer.

    For each folded pair (see the module docstring for the derivation)

    .. math::

        W'_c = W_c\, \frac{\gamma_c}{\sqrt{\sigma^2_c + \epsilon}}, \qquad
        b'_c = (b_c - \mu_c)\, \frac{\gamma_c}{\sqrt{\sigma^2_c + \epsilon}} + \beta_c

    and the BN layer is replaced by ``nn.Identity`` (a fused
    :class:`~batchnorm.nn.fused.BatchNormAct` by its activation). Eval
    outputs equal the original's to rounding (about 1e-7 relative in
    float32). Layers: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (any ``groups``,
    depthwise included, with or without bias) and ``nn.ConvTranspose1d/2d/3d``.
    BN layers: any ``torch.nn.modules.batchnorm._BatchNorm`` (torch's, ours, and
    variants whose eval output is checked on a probe batch to be the affine
    map of their running statistics) and
    :class:`~batchnorm.nn.frozen.FrozenBatchNorm` (its activation, if any, takes
    its place).

    How pairs are found: the model is traced with ``torch.fx`` (BN, Linear and
    conv layers kept as leaves), and a BN layer is folded when its only input
    is the output of a Linear/conv layer that nothing else uses, and each of
    the two is called once. When tracing fails (data-dependent control flow),
    only consecutive children of plain ``nn.Sequential`` containers are
    paired. The module tree is edited in place of a ``GraphModule``, so the
    result keeps the model's class and ``forward``.

    Left in place, with the reason in the report: BN after anything else (an
    activation, pooling, the input, an addition), BN without running
    statistics (``track_running_stats=False``), BN whose ``axis`` is not the
    layer's feature axis (1 or ``-(spatial dims + 1)`` after a conv, -1 or 1
    after a Linear; 1 assumes the usual 2-D ``(N, D)`` output), layers or BN
    with hooks or parametrizations, shared or lazy modules.

    Args:
        model: a network in eval mode.
        inplace: change ``model`` itself (and return it). Default False: the
            model is deep-copied first and left untouched.
        report: also return a :class:`FoldReport`.

    Returns:
        the folded model, or ``(model, report)`` with ``report=True``.

    Raises:
        ValueError: the model, or one of its BN layers, is in training mode
            (BN then normalizes with batch statistics, which no fixed weights
            reproduce).

    Shape:
        - Conv weights ``(C_out, C_in/groups, *k)`` scale along dim 0;
          transposed-conv weights ``(C_in, C_out/groups, *k)`` along dim 1
          within each group; Linear ``(D_out, D_in)`` along dim 0.
          ``gamma, beta, mean, var``: ``(C_out,)``.
    """
    training = _training_modules(model)
    if training:
        raise ValueError(
            "fold needs a model in eval mode (call model.eval() first): in training mode BN normalizes with batch "
            f"statistics, which no fixed weights reproduce; in training mode: {', '.join(training[:4])}"
        )
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    result = FoldReport()
    try:
        graph = _Tracer().trace(target)
    except Exception as error:
        lines = str(error).strip().splitlines()
        result.method = "sequential"
        result.trace_error = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        edges, skipped = _edges_from_sequentials(target, modules)
    else:
        edges, skipped = _edges_from_graph(target, graph, modules)
    counts = Counter(id(m) for _, m in target.named_modules(remove_duplicate=False))
    for edge in edges:
        reason = _why_not(edge, counts)
        if reason is not None:
            skipped.append(Skipped(edge.norm_name, reason))
            continue
        replacement = _replacement(edge.norm)
        _fold_edge(edge.layer, edge.norm)
        _set_submodule(target, edge.norm_name, replacement)
        result.folded.append(Folded(edge.norm_name, edge.layer_name, _kind(replacement)))
    order = {name: index for index, name in enumerate(modules)}
    result.skipped = sorted(skipped, key=lambda item: order.get(item.norm, len(order)))
    return (target, result) if report else target


# --------------------------------------------------------------------------- recalibrate


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate` did.

    Attributes:
        batches: batches run through the model.
        examples: examples in them (the size of each input's first axis).
        layers: qualified BN layer name -> values pooled into each of its statistics.
        skipped: BN layers left unchanged -> why (no running statistics, not reached).
    """

    batches: int = 0
    examples: int = 0
    layers: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _input_of(batch: Any) -> Tensor:
    item = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(item, Tensor):
        raise ValueError(
            "recalibrate expects each batch to be an input tensor or an (input, target) pair, "
            f"got {type(batch).__name__}"
        )
    return item


def _device_of(model: nn.Module) -> torch.device | None:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return None


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    progress: bool = True,
) -> RecalibrationReport:
    r"""Recompute every BN layer's running statistics over ``batches``, pooled exactly ("precise BN").

    The model runs as in training, with frozen weights: BN layers in training
    mode (normalizing each batch with its own statistics, as during
    training, so every layer sees the inputs training gave it), every other
    module in eval mode (dropout off), no gradients, no parameter change.
    A hook on each BN layer takes the per-feature ``(count, mean, M2)`` of
    its input in every batch (:func:`batchnorm.kernels.stats`, accumulated in
    float32, or float64 for float64 inputs) and merges them in float64 with
    Chan's formula (:func:`batchnorm.kernels.merge_stats`):

    .. math::

        m = m_a + m_b,\quad \delta = \mu_b - \mu_a,\quad
        \mu = \mu_a + \delta\, m_b / m,\quad M_2 = M_{2,a} + M_{2,b} + \delta^2 m_a m_b / m

    Afterwards ``running_mean = mu`` and ``running_var = M2 / (m - 1)``, the
    unbiased variance of all ``m`` values each statistic saw (PyTorch's
    convention for ``running_var``): an exact population statistic, not an
    exponential moving average. Batches of different sizes weigh by their
    number of values. Only ``running_mean`` and ``running_var`` change:
    ``num_batches_tracked``, every module's training mode and every BN
    layer's ``momentum`` are restored (momentum is 0 during the passes), and
    on an error the statistics are put back as they were. The model is
    changed in place. :class:`~batchnorm.nn.frozen.FrozenBatchNorm` layers
    are left alone (frozen on purpose) and listed in the report.

    Args:
        model: any network with BN layers (any ``_BatchNorm``: torch's or ours).
        batches: an iterable of input tensors or of ``(input, target, ...)``
            tuples/lists (a ``DataLoader``, a list of tensors); the input is
            moved to the model's device. Every batch needs at least 2 values
            per statistic (BN in training mode needs them).
        max_batches: stop after this many batches (default: all).
        progress: show a progress bar (tqdm, on stderr).

    Returns:
        a :class:`RecalibrationReport`.

    Raises:
        ValueError: ``batches`` is empty, ``max_batches < 1``, a batch that is
            not a tensor or a tuple starting with one, a model without BN
            layers that keep running statistics, or fewer than 2 values per
            statistic in all.

    Shape:
        - each input: whatever ``model`` takes; each BN layer's statistics are
          ``(C,)`` over its feature ``axis`` (``N`` values per batch for dense
          ``(N, C)``, ``N*H*W`` for ``(N, C, H, W)``).
    """
    from tqdm import tqdm

    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches}")
    result = RecalibrationReport()
    targets: dict[str, _BatchNorm] = {}
    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm):
            result.skipped[name] = "FrozenBatchNorm: its statistics are frozen on purpose"
        elif isinstance(module, _BatchNorm):
            if module.running_mean is None or module.running_var is None:
                result.skipped[name] = "no running statistics (track_running_stats=False)"
            else:
                targets[name] = module
    if not targets:
        raise ValueError("recalibrate found no BN layer with running statistics in the model")

    modes = [(module, module.training) for module in model.modules()]
    momenta = {name: norm.momentum for name, norm in targets.items()}
    saved: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
    for name, norm in targets.items():
        assert norm.running_mean is not None
        assert norm.running_var is not None
        tracked = norm.num_batches_tracked
        saved[name] = (
            norm.running_mean.clone(),
            norm.running_var.clone(),
            None if tracked is None else tracked.clone(),
        )
    pooled: dict[str, tuple[int, Tensor, Tensor] | None] = dict.fromkeys(targets)

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            count, mean, m2 = kernels.stats(args[0].detach(), getattr(module, "axis", 1))
            part = (count, mean.double(), m2.double())
            before = pooled[name]
            pooled[name] = part if before is None else kernels.merge_stats(before, part)

        return hook

    handles = [norm.register_forward_pre_hook(hook_for(name)) for name, norm in targets.items()]
    device = _device_of(model)
    total = getattr(batches, "__len__", None)
    length = total() if callable(total) else None
    if max_batches is not None:
        length = max_batches if length is None else min(length, max_batches)
    succeeded = False
    try:
        model.eval()
        for norm in targets.values():
            norm.train()
            norm.momentum = 0.0
        bar = tqdm(
            total=length, desc="recalibrate", unit="batch", disable=not progress, file=sys.stderr, mininterval=0.5
        )
        with torch.no_grad(), bar:
            for batch in batches:
                x = _input_of(batch)
                model(x if device is None else x.to(device))
                result.batches += 1
                result.examples += int(x.shape[0]) if x.dim() else 1
                bar.update(1)
                if max_batches is not None and result.batches >= max_batches:
                    break
        if result.batches == 0:
            raise ValueError("recalibrate needs at least one batch, but the iterable of batches is empty")
        for name, norm in targets.items():
            stats = pooled[name]
            if stats is None:
                result.skipped[name] = "not reached by the forward pass"
                continue
            count, mean, m2 = stats
            if count < 2:
                raise ValueError(f"{name} saw {count} value(s) per statistic in all; an unbiased variance needs 2")
            assert norm.running_mean is not None
            assert norm.running_var is not None
            with torch.no_grad():
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(m2 / (count - 1))
            result.layers[name] = count
        succeeded = True
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.train(mode)
        for name, norm in targets.items():
            norm.momentum = momenta[name]
            running_mean, running_var, tracked = saved[name]
            with torch.no_grad():
                if tracked is not None and norm.num_batches_tracked is not None:
                    norm.num_batches_tracked.copy_(tracked)
                if not succeeded or name in result.skipped:
                    assert norm.running_mean is not None
                    assert norm.running_var is not None
                    norm.running_mean.copy_(running_mean)
                    norm.running_var.copy_(running_var)
    return result
