"""``explain``: what every BN layer of a network computes on a real batch.

For each BN layer (this package's or torch's) :func:`explain` runs the model
once in training mode on ``example_input`` and records the layer's input
shape, its feature axis, the axes it reduces, how many values feed each mean
and variance, the shapes of gamma and beta, and the numbers themselves: the
batch mean and (biased) variance of every feature, the running estimates,
gamma and beta. The model's running statistics, batch counters and
train/eval modes are restored exactly afterwards, so explaining a model
changes nothing.

:func:`explain_unit` follows one statistic step by step: the ``m`` values that
feed feature ``k`` of one layer, the mean and variance the layer normalizes
them with (in training: this batch's, after which the running statistics
move by ``momentum``; in eval: the stored running statistics, nothing
updated), the normalized values, and gamma and beta applied, next to what
input standardization does (fixed per-pixel statistics of the raw training
set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from batchnorm._shapes import canonical_axis, reduced_axes
from batchnorm.nn.batchnorm import BatchNorm, is_batch_norm

if TYPE_CHECKING:
    from batchnorm.lab.training import TrainConfig

__all__ = [
    "axis_letters",
    "explain",
    "explain_unit",
    "format_table",
    "format_unit",
    "prepare",
    "reduced_axes_text",
]


def _feature_axis(module: nn.Module, ndim: int) -> int:
    axis = module.axis if isinstance(module, BatchNorm) else 1
    return canonical_axis(ndim, axis)


def _vector(value: Tensor | None) -> list[float] | None:
    return None if value is None else value.detach().double().cpu().flatten().tolist()


def _layout(x: Tensor, feature: int) -> str:
    if x.dim() == 4 and feature == 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous" if x.is_contiguous() else "strided"


def _snapshot(model: nn.Module) -> tuple[dict[str, Tensor], dict[nn.Module, bool]]:
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    modes = {module: module.training for module in model.modules()}
    return buffers, modes


def _restore(model: nn.Module, buffers: dict[str, Tensor], modes: dict[nn.Module, bool]) -> None:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    for module, training in modes.items():
        module.training = training


def explain(model: nn.Module, example_input: Tensor, *, mode: str = "train") -> list[dict[str, Any]]:
    """Describe every BN layer of ``model`` on ``example_input``.

    Args:
        model: any torch model with this package's or torch's BN layers.
        example_input: a real batch, as the model takes it.
        mode: ``"train"`` (default) shows the batch statistics training
            would use; ``"eval"`` runs the model as in inference (the layers
            then normalize with their running statistics; the batch
            statistics are still reported for comparison).

    Returns:
        one dict per BN layer, in execution order, with ``name``, ``kind``,
        ``input_shape``, ``layout``, ``feature_axis``, ``reduced_axes``,
        ``num_features``, ``num_statistics``, ``values_per_statistic``,
        ``param_shape``, ``eps``, ``momentum``, ``normalizes_with``
        (``"batch"`` or ``"running"``), ``device`` (where the layer ran),
        and lists (on the CPU, whatever the model's device) ``batch_mean``,
        ``batch_var`` (biased, computed in float64 from the layer's real
        input), ``running_mean``, ``running_var``, ``weight``, ``bias``
        (None where the layer has none).

    The model's buffers and every module's train/eval mode are restored.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"expected mode 'train' or 'eval', got {mode!r}")
    names = {module: name for name, module in model.named_modules()}
    layers = [module for module in model.modules() if is_batch_norm(module)]
    records: list[dict[str, Any]] = []
    buffers, modes = _snapshot(model)

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0]
        feature = _feature_axis(module, x.dim())
        axes = reduced_axes(x.dim(), feature)
        data = x.detach().double()
        running_mean = buffers.get(f"{names[module]}.running_mean" if names[module] else "running_mean")
        running_var = buffers.get(f"{names[module]}.running_var" if names[module] else "running_var")
        uses_batch = module.training or running_mean is None
        weight = getattr(module, "weight", None)
        records.append(
            {
                "name": names[module] or type(module).__name__,
                "kind": type(module).__name__,
                "implementation": "batchnorm" if isinstance(module, BatchNorm) else "torch",
                "input_shape": list(x.shape),
                "layout": _layout(x, feature),
                "feature_axis": feature,
                "reduced_axes": list(axes),
                "num_features": int(x.shape[feature]),
                "num_statistics": 2 * int(x.shape[feature]),
                "values_per_statistic": x.numel() // max(int(x.shape[feature]), 1),
                "param_shape": [int(x.shape[feature])] if weight is not None else None,
                "eps": float(getattr(module, "eps", 0.0)),
                "momentum": getattr(module, "momentum", None),
                "normalizes_with": "batch" if uses_batch else "running",
                "batch_mean": _vector(data.mean(dim=axes)),
                "batch_var": _vector(data.var(dim=axes, correction=0)),
                "running_mean": _vector(running_mean),
                "running_var": _vector(running_var),
                "weight": _vector(weight),
                "bias": _vector(getattr(module, "bias", None)),
                "output_shape": list(output.shape) if isinstance(output, Tensor) else None,
                "device": str(x.device),
            }
        )

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        model.train(mode == "train")
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        _restore(model, buffers, modes)
    return records


def axis_letters(record: dict[str, Any]) -> list[str]:
    """One letter per axis of an explain record's input: ``N, D`` / ``N, L, C`` / ``N, C, L`` / ``N, C, H, W`` / ...

    The same names the ``explain`` table, the report and the pictures use.
    """
    shape = record["input_shape"]
    if len(shape) == 2:
        return ["N", "D"]
    if len(shape) == 3 and record["feature_axis"] == 2:
        return ["N", "L", "C"]
    if len(shape) == 3:
        return ["N", "C", "L"]
    if len(shape) == 4:
        return ["N", "C", "H", "W"]
    if len(shape) == 5:
        return ["N", "C", "D", "H", "W"]
    return [f"d{i}" for i in range(len(shape))]


def reduced_axes_text(record: dict[str, Any]) -> str:
    """The reduced axes as the ``explain`` table writes them, e.g. ``N,H,W``."""
    letters = axis_letters(record)
    return ",".join(letters[axis] for axis in record["reduced_axes"])


def _axes_names(record: dict[str, Any]) -> str:
    return reduced_axes_text(record)


def _summary(values: list[float] | None) -> str:
    if values is None:
        return "-"
    array = np.asarray(values)
    return f"{array.mean():+.3f} [{array.min():+.2f},{array.max():+.2f}]"


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The explain records as a fixed-width text table (one row per BN layer)."""
    header = [
        "layer",
        "kind",
        "input shape",
        "axis",
        "reduced",
        "stats",
        "values/stat",
        "gamma,beta",
        "batch mean: avg [min,max]",
        "batch var: avg [min,max]",
    ]
    rows = [header]
    for record in records:
        shape = "x".join(str(size) for size in record["input_shape"])
        reduced = _axes_names(record)
        rows.append(
            [
                record["name"],
                record["kind"],
                f"({shape})",
                str(record["feature_axis"]),
                reduced,
                f"{record['num_features']}+{record['num_features']}",
                f"{record['values_per_statistic']} = {reduced.replace(',', '*')}",
                f"({record['num_features']},)" if record["param_shape"] else "none",
                _summary(record["batch_mean"]),
                _summary(record["batch_var"]),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _running_update(module: nn.Module, buffers: dict[str, Tensor], prefix: str) -> tuple[float | None, int | None]:
    """The weight of the new batch in the running averages, and the batch counter before this batch."""
    counter = buffers.get(f"{prefix}num_batches_tracked")
    tracked = None if counter is None else int(counter)
    momentum = getattr(module, "momentum", None)
    if momentum is None:  # cumulative average over the batches seen, this one included
        return (1.0 / (tracked + 1) if tracked is not None else None), tracked
    return float(momentum), tracked


def explain_unit(
    model: nn.Module,
    example_input: Tensor,
    layer: str,
    unit: int,
    input_standardization: tuple[Tensor, Tensor] | None = None,
    raw_input: Tensor | None = None,
    *,
    mode: str = "train",
) -> dict[str, Any]:
    """One statistic of one BN layer, computed step by step from the layer's real input.

    In ``mode="train"`` (default) the model runs as in training: the layer
    normalizes feature ``unit`` with the mean and biased variance of the ``m``
    values of this batch, and would then update its running statistics with
    ``momentum`` (``running_mean_after`` / ``running_var_after``, using the
    unbiased variance). In ``mode="eval"`` the model runs as in inference:
    the layer normalizes with its stored ``running_mean`` / ``running_var``
    and updates nothing; the batch mean and variance are still reported, for
    contrast only. (A layer without running statistics uses the batch in
    both modes, as torch does.)

    Returns a dict with ``mode``, ``statistics`` (``"batch"`` or
    ``"running"``: what the layer normalized with), ``statistics_text`` (the
    same in words), the ``values`` (all ``m`` of them) feeding the feature,
    ``mean`` and ``variance`` (the statistics *used*), ``batch_mean``,
    ``batch_variance`` (biased), ``unbiased_variance``, ``running_mean`` and
    ``running_var`` (stored, before this batch; None without them), ``eps``,
    ``inv_std``, the ``normalized`` values, ``gamma``, ``beta`` and the
    ``output`` values, plus ``layer_output`` (what the layer itself returned,
    for comparison). With ``input_standardization`` = (per-pixel mean, std of
    the raw training set) and the ``raw_input`` batch, it also reports how
    the most variable pixel is standardized, for contrast.

    The model may be on any device: the layer's input and output are copied
    to the CPU and every number is computed there, in float64.
    The model's buffers and modes are restored afterwards.

    Raises:
        ValueError: unknown layer name, a layer that is not BN, a unit out of range, or an unknown mode.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"expected mode 'train' or 'eval', got {mode!r}")
    modules = dict(model.named_modules())
    if layer not in modules:
        bn_names = [name for name, module in modules.items() if is_batch_norm(module)]
        raise ValueError(f"no layer named {layer!r}; BN layers are: {', '.join(bn_names) or 'none'}")
    module = modules[layer]
    if not is_batch_norm(module):
        raise ValueError(f"layer {layer!r} is a {type(module).__name__}, not a batch-norm layer")
    captured: dict[str, Tensor] = {}

    def hook(_: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        captured["input"] = inputs[0].detach().cpu()
        captured["output"] = output.detach().cpu()

    buffers, modes = _snapshot(model)
    handle = module.register_forward_hook(hook)
    try:
        model.train(mode == "train")
        with torch.no_grad():
            model(example_input)
    finally:
        handle.remove()
        _restore(model, buffers, modes)
    x = captured["input"]
    feature = _feature_axis(module, x.dim())
    if not 0 <= unit < x.shape[feature]:
        raise ValueError(
            f"unit {unit} is out of range: layer {layer!r} has {x.shape[feature]} features (0..{x.shape[feature] - 1})"
        )
    prefix = f"{layer}." if layer else ""
    stored_mean = buffers.get(f"{prefix}running_mean")
    stored_var = buffers.get(f"{prefix}running_var")
    running_mean = float(stored_mean[unit]) if stored_mean is not None else None
    running_var = float(stored_var[unit]) if stored_var is not None else None
    values = x.select(feature, unit).double().flatten()
    m = values.numel()
    batch_mean = values.sum() / m
    batch_variance = ((values - batch_mean) ** 2).sum() / m
    unbiased = float(batch_variance) * m / (m - 1) if m > 1 else float("nan")
    if mode == "eval" and running_mean is not None and running_var is not None:
        mean, variance = running_mean, running_var
        statistics = "running"
        statistics_text = (
            "eval mode: the layer normalized with its stored running_mean and running_var (estimates from "
            "training); this batch's statistics were not used and nothing was updated"
        )
    else:
        mean, variance = float(batch_mean), float(batch_variance)
        statistics = "batch"
        if mode == "eval":
            statistics_text = (
                "eval mode, but this layer keeps no running statistics: it normalized with this batch's mean "
                f"and biased variance of the {m} values"
            )
        else:
            statistics_text = (
                f"train mode: the layer normalized with this batch's mean and biased variance of the {m} values"
                + ("; its running statistics are updated with momentum" if running_mean is not None else "")
            )
    eps = float(getattr(module, "eps", 1e-5))
    inv_std = 1.0 / math.sqrt(variance + eps)
    normalized = (values - mean) * inv_std
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    gamma = float(weight.detach()[unit]) if weight is not None else 1.0
    beta = float(bias.detach()[unit]) if bias is not None else 0.0
    result: dict[str, Any] = {
        "layer": layer,
        "unit": unit,
        "mode": mode,
        "statistics": statistics,
        "statistics_text": statistics_text,
        "input_shape": list(x.shape),
        "feature_axis": feature,
        "values_per_statistic": m,
        "values": values.tolist(),
        "mean": mean,
        "variance": variance,
        "batch_mean": float(batch_mean),
        "batch_variance": float(batch_variance),
        "unbiased_variance": unbiased,
        "running_mean": running_mean,
        "running_var": running_var,
        "eps": eps,
        "inv_std": inv_std,
        "normalized": normalized.tolist(),
        "gamma": gamma,
        "beta": beta,
        "output": (gamma * normalized + beta).tolist(),
        "layer_output": captured["output"].select(feature, unit).double().flatten().tolist(),
    }
    if mode == "train" and running_mean is not None and running_var is not None:
        weight_new, tracked = _running_update(module, buffers, prefix)
        if weight_new is not None:
            result["momentum"] = weight_new
            result["running_mean_after"] = (1 - weight_new) * running_mean + weight_new * float(batch_mean)
            result["running_var_after"] = (1 - weight_new) * running_var + weight_new * unbiased
        result["num_batches_tracked"] = tracked
    if input_standardization is not None and raw_input is not None:
        pixel_mean, pixel_std = (t.flatten() for t in input_standardization)
        raw = raw_input.flatten(1)
        pixel = int(pixel_std.argmax())  # the most variable pixel: a border pixel is always 0
        result["input_standardization"] = {
            "pixel": pixel,
            "training_mean": float(pixel_mean[pixel]),
            "training_std": float(pixel_std[pixel]),
            "batch_values": raw[:, pixel].double().tolist(),
            "standardized": ((raw[:, pixel].double() - float(pixel_mean[pixel])) / float(pixel_std[pixel])).tolist(),
        }
    return result


def _short(values: list[float], count: int = 8) -> str:
    shown = ", ".join(f"{v:+.4f}" for v in values[:count])
    return f"[{shown}{', ...' if len(values) > count else ''}] ({len(values)} values)"


def format_unit(result: dict[str, Any]) -> str:
    """Human-readable step-by-step text for :func:`explain_unit`'s result, naming the statistics the layer used."""
    shape = result["input_shape"]
    m = result["values_per_statistic"]
    lines = [
        f"layer {result['layer']}, feature {result['unit']}: input shape {tuple(shape)}, feature axis "
        f"{result['feature_axis']}",
        f"statistics used: {result['statistics_text']}.",
        f"1. the values: every entry with index {result['unit']} on axis {result['feature_axis']}: m = {m} values",
        f"   x = {_short(result['values'])}",
    ]
    if result["statistics"] == "running":
        lines += [
            f"2. mean     mu = running_mean[{result['unit']}] = {result['mean']:+.6f}  (stored; this batch's "
            f"mean sum(x) / m = {result['batch_mean']:+.6f} is not used)",
            f"3. variance var = running_var[{result['unit']}] = {result['variance']:.6f}  (stored; this batch's "
            f"variance sum((x - mu_B)^2) / m = {result['batch_variance']:.6f} is not used)",
        ]
    else:
        lines += [
            f"2. mean     mu = sum(x) / m = {result['mean']:+.6f}",
            f"3. variance var = sum((x - mu)^2) / m = {result['variance']:.6f}  (biased; the running estimate "
            f"gets var * m/(m-1) = {result['unbiased_variance']:.6f})",
        ]
    lines += [
        f"4. normalize x_hat = (x - mu) / sqrt(var + eps), eps = {result['eps']:g}, 1/sqrt(var+eps) = "
        f"{result['inv_std']:.6f}",
        f"   x_hat = {_short(result['normalized'])}",
        f"5. scale and shift y = gamma * x_hat + beta, gamma = {result['gamma']:+.6f}, beta = {result['beta']:+.6f}",
        f"   y = {_short(result['output'])}",
        f"   (the layer itself returned {_short(result['layer_output'])})",
    ]
    if "running_mean_after" in result:
        weight = result["momentum"]
        lines += [
            f"6. running statistics updated with momentum {weight:g} (weight of this batch): running_mean "
            f"{result['running_mean']:+.6f} -> {result['running_mean_after']:+.6f}, running_var "
            f"{result['running_var']:.6f} -> {result['running_var_after']:.6f} (unbiased batch variance); "
            "eval mode would normalize with these",
        ]
    elif result["statistics"] == "running":
        lines.append("   nothing was updated: in eval mode the running statistics stay as they are.")
    standardization = result.get("input_standardization")
    if standardization is not None:
        lines += [
            "",
            "Contrast: input standardization (not BN) of raw pixel "
            f"{standardization['pixel']} uses fixed statistics of the raw training set,",
            f"   mean {standardization['training_mean']:.4f} and std {standardization['training_std']:.4f}, "
            "computed once before training and never updated;",
            f"   this batch's pixel values {_short(standardization['batch_values'])}",
            f"   become {_short(standardization['standardized'])}.",
            "   BN instead recomputes mu and var from every mini-batch of this layer's own activations, which",
            "   change as the weights below it learn, and then learns gamma and beta on top.",
        ]
    return "\n".join(lines)


def prepare(
    config: TrainConfig,
    *,
    checkpoint: str | Path | None = None,
    requested_model: dict[str, str] | None = None,
    batch_size: int = 60,
    download: bool = False,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Model, normalized batch, raw batch and the raw training set's per-pixel (mean, std).

    The model is built from ``config`` (architecture, init, seed) and the
    input normalization fit on ``config.data``'s training split; or, with
    ``checkpoint``, both come from the checkpoint, whose architecture must
    match ``requested_model``. The batch is ``batch_size`` training images
    drawn with ``config.seed``. The model and the normalized batch are put
    on ``device`` (default the CPU; a checkpoint is read onto the CPU first,
    whatever device wrote it); the raw batch and the pixel statistics stay on the CPU.
    """
    # Imported here: ``import batchnorm`` loads this module, and needs no data or training code.
    from batchnorm.lab.data import InputNormalizer, load_dataset
    from batchnorm.lab.models import build_model
    from batchnorm.lab.training import check_same_model, model_from_checkpoint, resolve_device

    if checkpoint is not None:
        model, stored, normalizer, _ = model_from_checkpoint(checkpoint)
        check_same_model(requested_model or {}, stored, checkpoint)
        data_name, data_dir = stored.data, stored.data_dir
    else:
        data_name, data_dir = config.data, config.data_dir
    dataset = load_dataset(data_name, data_dir, download=download, seed=config.seed)
    if checkpoint is None:
        torch.manual_seed(config.seed)
        model = build_model(
            config.model,
            config.act,
            config.norm,
            config.placement,
            config.init,
            image_size=dataset.image_size,
            seed=config.seed,
            norm_options=config.norm_options(),
        )
        normalizer = InputNormalizer.fit(config.input_norm, dataset.train_images)
    if batch_size > len(dataset.train_images):
        raise ValueError(f"--batch-size {batch_size} exceeds the {len(dataset.train_images)} training images")
    generator = torch.Generator().manual_seed(config.seed)
    indices = torch.randperm(len(dataset.train_images), generator=generator)[:batch_size]
    raw = dataset.train_images[indices]
    std, mean = torch.std_mean(dataset.train_images, dim=0)
    target = resolve_device(device)
    return model.to(target), normalizer(raw).to(target), raw, (mean, std)
