"""Named experiments; ``compare`` is the main job.

``batchnorm compare`` repeats the MNIST experiment of Ioffe & Szegedy (2015,
Section 4.1, Figure 1) on real digits that ship with the package's
dependencies: a 784-100-100-100-10 network with sigmoid units, trained with
and without BN (BN before each nonlinearity), from the *same* small Gaussian
init, seed and mini-batches of 60, and records

* test accuracy over training (Figure 1a);
* the 15th, 50th and 85th percentiles of the input to one sigmoid of the last
  hidden layer, over 1,000 test images fed in training-mode batches of 60, over training
  (Figure 1b, c);
* per hidden layer, over training: mean and std of the activations, the
  percentage of saturated units, the std of the gradient reaching the layer's
  output and the weights' gradient-to-data ratio (how "gradients become very
  small or very large" without BN).

Steadiness of the percentiles is measured as their *drift*: the range each
of the 15th, 50th and 85th percentile curves covers over the run (max - min),
summed and divided by the mean spread (85th - 15th). A distribution that
keeps its place and width scores low; one whose median wanders and whose
tails spread out scores high.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from batchnorm.lab.data import Dataset, InputNormalizer, load_dataset
from batchnorm.lab.explain import explain
from batchnorm.lab.report import write_report
from batchnorm.lab.training import DivergenceError, TrainConfig, TrainResult, train

__all__ = ["COMPARE_DEFAULTS", "LayerRecorder", "compare", "percentile_steadiness"]

COMPARE_DEFAULTS = TrainConfig(
    model="mlp:784-100-100-100-10",
    act="sigmoid",
    norm="batch",
    placement="before",
    init="normal:0.01",
    data="mnist5k",
    input_norm="minmax",
    lr=0.5,
    momentum=0.0,
    weight_decay=0.0,
    batch_size=60,
    steps=20000,
    eval_every=200,
    checkpoint_every=20000,
    seed=0,
)
PERCENTILES = (15, 50, 85)


def _saturated(activation: nn.Module, pre: Tensor, post: Tensor) -> float:
    """Percent of units in a flat region: sigmoid |z| > 4, tanh |a| > 0.97, ReLU a == 0."""
    if isinstance(activation, nn.Sigmoid):
        mask = pre.abs() > 4.0
    elif isinstance(activation, nn.Tanh):
        mask = post.abs() > 0.97
    else:
        mask = post == 0
    return 100.0 * float(mask.float().mean())


class LayerRecorder:
    """Records activation, gradient and percentile statistics of each hidden layer during training.

    Hooks sit on the nonlinearities (``act1``, ``act2``, ...). On recording
    steps (every ``every`` steps) the training step's own forward and
    backward are measured; at each evaluation the percentiles of one unit's
    pre-activation are taken over ``probe``, fed in mini-batches of
    ``batch_size`` in training mode as training would see them (buffers are
    restored, so this changes nothing in the run).
    """

    def __init__(self, model: nn.Module, probe: Tensor, every: int, batch_size: int, unit: int = 0) -> None:
        self.activations = [(name, module) for name, module in model.named_modules() if name.startswith("act")]
        if not self.activations:
            raise ValueError("the model has no activation layers to record")
        self.linears = [
            (name, module) for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))
        ]
        if len(probe) < batch_size:
            raise ValueError(f"the probe set ({len(probe)} examples) is smaller than one batch ({batch_size})")
        self.probe = probe
        self.batch_size = batch_size
        self.every = every
        self.unit = unit
        self.recording = False
        self.probing = False
        self.probed: list[Tensor] = []
        self.pending: dict[str, dict[str, float]] = {}
        self.layers: dict[str, dict[str, list[float]]] = {
            name: {"mean": [], "std": [], "saturated_pct": [], "grad_std": []} for name, _ in self.activations
        }
        self.layer_steps: list[int] = []
        self.weights: dict[str, list[float]] = {name: [] for name, _ in self.linears}
        self.percentile_steps: list[int] = []
        self.percentiles: dict[str, list[float]] = {str(p): [] for p in PERCENTILES}
        last_name, last_module = self.activations[-1]
        self.last_layer = last_name
        for name, module in self.activations:
            module.register_forward_hook(self._hook(name, module, module is last_module))

    def _hook(self, name: str, activation: nn.Module, is_last: bool) -> Any:
        def hook(_: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self.probing and is_last:
                self.probed.append(inputs[0].detach())
            if not self.recording:
                return
            pre, post = inputs[0].detach(), output.detach()
            self.pending[name] = {
                "mean": float(post.mean()),
                "std": float(post.std()),
                "saturated_pct": _saturated(activation, pre, post),
            }
            if output.requires_grad:

                def grad_hook(grad: Tensor) -> None:
                    self.pending[name]["grad_std"] = float(grad.std())

                output.register_hook(grad_hook)  # type: ignore[no-untyped-call]

        return hook

    def before_step(self, step: int, model: nn.Module) -> None:
        self.recording = step == 1 or step % self.every == 0
        self.pending = {}

    def after_step(self, step: int, model: nn.Module, loss: float) -> None:
        if not self.recording:
            return
        self.recording = False
        self.layer_steps.append(step)
        for name, stats in self.layers.items():
            for key, values in stats.items():
                values.append(self.pending.get(name, {}).get(key, float("nan")))
        for name, module in self.linears:
            weight = module.weight
            ratio = float(weight.grad.std() / weight.detach().std()) if weight.grad is not None else float("nan")
            self.weights[name].append(ratio)

    @torch.no_grad()
    def on_eval(self, step: int, model: nn.Module, metrics: dict[str, float]) -> None:
        # The distribution training sees: training-mode forward passes over
        # mini-batches of the probe set (BN uses batch statistics), with every
        # buffer restored afterwards so the run itself is unaffected.
        buffers = [buffer.clone() for buffer in model.buffers()]
        was_training = model.training
        model.train()
        self.probing, self.probed = True, []
        try:
            for start in range(0, len(self.probe) - self.batch_size + 1, self.batch_size):
                model(self.probe[start : start + self.batch_size])
        finally:
            self.probing = False
            model.train(was_training)
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        pre = torch.cat([values[:, self.unit].flatten() for values in self.probed]).double().numpy()
        self.percentile_steps.append(step)
        for p in PERCENTILES:
            self.percentiles[str(p)].append(float(np.percentile(pre, p)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "percentile_steps": self.percentile_steps,
            "percentiles": self.percentiles,
            "percentile_unit": {"layer": self.last_layer, "unit": self.unit},
            "layer_steps": self.layer_steps,
            "layers": self.layers,
            "weight_grad_to_data": self.weights,
        }


def percentile_steadiness(percentiles: dict[str, list[float]]) -> float:
    """Percentile drift (see the module docstring); lower is steadier.

    For each of the 15th, 50th and 85th percentile curves, the range it covers
    over the run (max - min); the three ranges are summed and divided by the
    mean spread (85th - 15th), so the measure does not depend on the scale of
    the pre-activations.
    """
    curves = [np.asarray(percentiles[str(p)], dtype=float) for p in PERCENTILES]
    if len(curves[0]) < 2:
        return float("nan")
    movement = sum(float(curve.max() - curve.min()) for curve in curves)
    spread = float(np.mean(curves[-1] - curves[0]))
    return movement / spread if spread > 0 else float("inf")


def _accuracy_at(result: dict[str, Any], step: int) -> float | None:
    steps = result["steps"]
    candidates = [i for i, s in enumerate(steps) if s <= step]
    return result["test_accuracy"][candidates[-1]] if candidates else None


def _steps_to(result: dict[str, Any], threshold: float) -> int | None:
    for step, accuracy in zip(result["steps"], result["test_accuracy"]):
        if accuracy >= threshold:
            return int(step)
    return None


def _run_one(
    config: TrainConfig, dataset: Dataset, probe: Tensor, out: Path, label: str, progress: bool
) -> tuple[dict[str, Any], TrainResult | None]:
    recorders: list[LayerRecorder] = []

    def attach(model: nn.Module) -> nn.Module:
        recorders.append(LayerRecorder(model, probe, every=config.eval_every, batch_size=config.batch_size))
        return model

    record: dict[str, Any] = {"diverged": None}
    result = None
    try:
        result = train(
            config,
            out / label,
            dataset=dataset,
            callbacks=recorders,  # filled by `attach` once the model exists
            progress=progress,
            description=label,
            model_override=attach,
        )
        record.update(
            steps=result.steps,
            test_accuracy=result.test_accuracy,
            test_loss=result.test_loss,
            train_loss=result.train_loss,
            seconds=result.seconds,
        )
    except DivergenceError as error:
        record["diverged"] = str(error)
        for key in ("steps", "test_accuracy", "test_loss", "train_loss"):
            record[key] = []
    if recorders:
        record.update(recorders[0].as_dict())
    return record, result


def compare(config: TrainConfig, out_dir: str | Path, *, progress: bool = True, figures: bool = True) -> dict[str, Any]:
    """Train ``config`` with BN and without, write ``results.json``, figures and ``report.html``.

    The two networks share the spec, init (same seed, same generator), data,
    batches and optimizer settings; they differ only in ``norm``.

    Returns:
        the content of ``results.json``.
    """
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(config.data, config.data_dir, seed=config.seed)
    normalizer = InputNormalizer.fit(config.input_norm, dataset.train_images)
    probe = normalizer(dataset.test_images[:1000])
    runs: dict[str, Any] = {}
    models: dict[str, nn.Module] = {}
    for label, norm in (("bn", "batch"), ("no_bn", "none")):
        run_config = dataclasses.replace(config, norm=norm)
        runs[label], result = _run_one(run_config, dataset, probe, out, label, progress)
        if result is not None and result.model is not None:
            models[label] = result.model
    explanation: list[dict[str, Any]] = []
    if "bn" in models:
        batch = normalizer(dataset.train_images[: config.batch_size])
        explanation = explain(models["bn"], batch)
    summary = _summarize(runs, config)
    results = {
        "runs": runs,
        "config": dataclasses.asdict(config),
        "dataset": dataset.description,
        "summary": summary,
        "explain": explanation,
        "definitions": {
            "percentile_steadiness": "sum over the 15/50/85th percentile curves of (max - min) over the run, "
            "divided by the mean (85th - 15th) spread; lower is steadier",
            "saturated_pct": "sigmoid |z| > 4, tanh |a| > 0.97, ReLU a == 0",
            "grad_std": "std of dLoss/d(activation output) on the recorded training step",
            "weight_grad_to_data": "std(weight.grad) / std(weight) of each Linear/Conv layer",
        },
    }
    path = out / "results.json"
    temporary = path.with_suffix(".json.part")
    temporary.write_text(json.dumps(results, allow_nan=True))
    temporary.replace(path)
    if figures:
        write_report(out, results)
    return results


def _summarize(runs: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    checkpoints = [s for s in (250, 500, 1000, 2000, 5000, 10000, 20000, 50000) if s <= config.steps]
    summary: dict[str, Any] = {"checkpoints": checkpoints}
    for label, run in runs.items():
        summary[label] = {
            "diverged": run.get("diverged"),
            "accuracy_at": {str(s): _accuracy_at(run, s) for s in checkpoints},
            "final_accuracy": run["test_accuracy"][-1] if run["test_accuracy"] else None,
            "steps_to_90pct": _steps_to(run, 0.90),
            "percentile_steadiness": percentile_steadiness(run["percentiles"]) if run.get("percentiles") else None,
            "seconds": run.get("seconds"),
        }
    return summary
