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

Several seeds (``seeds=K``, ``--seeds K``, default 1): each arm is trained
with the seeds ``seed, seed+1, ..., seed+K-1`` (each seed sets the init and
the batch order; the data split and the validation split are fixed). The
table, ``results.json`` (``summary[arm]["over_seeds"]``) and the accuracy
figure then give, per quantity, the mean over the seeds, the sample standard
deviation (``ddof=1``; none for one seed) and the min and max; a diverged
seed counts as diverged and is left out of the statistics of the others
(``n`` says how many entered). ``runs[arm]`` stays the first seed's full
record (percentiles and per-layer statistics are drawn for it);
``seed_runs[arm]`` lists every seed's curves. The first seed's files are in
``OUT/bn`` and ``OUT/no_bn``, the others in ``OUT/bn_seedS``.

Resuming: every finished run leaves ``record.json`` next to its checkpoint;
running ``compare`` again into the same ``--out`` reuses each run whose
settings are identical (so ``--seeds 3`` after ``--seeds 1`` trains only the
new seeds). A run cut short (Ctrl-C, a kill, a power cut) continues from its
own checkpoint, written after every evaluation with the recorder's
statistics in it (:meth:`LayerRecorder.state_dict`), so an interrupted
compare run again with the same options ends with the same weights, curves
and ``results.json`` numbers as an uninterrupted one. Delete the folder to
train everything again.

The normalized arm is ``--norm`` (default ``batch``; any of the variants, e.g.
``group``); the other arm is always ``none``. Results keep the keys ``bn`` and
``no_bn`` for the two arms.

Steadiness of the percentiles is measured as their *drift*: the range each
of the 15th, 50th and 85th percentile curves covers over the run (max - min),
summed and divided by the mean spread (85th - 15th). A distribution that
keeps its place and width scores low; one whose median wanders and whose
tails spread out scores high.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from batchnorm.lab.data import Dataset, InputNormalizer, load_dataset, split_validation
from batchnorm.lab.explain import explain
from batchnorm.lab.files import write_json_atomically
from batchnorm.lab.report import write_report
from batchnorm.lab.training import (
    CheckpointError,
    DivergenceError,
    TrainConfig,
    TrainResult,
    load_checkpoint,
    model_from_checkpoint,
    resolve_device,
    train,
)

__all__ = ["COMPARE_DEFAULTS", "LayerRecorder", "compare", "percentile_steadiness", "spread"]

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
        pre = torch.cat([values[:, self.unit].flatten() for values in self.probed]).double().cpu().numpy()
        self.percentile_steps.append(step)
        for p in PERCENTILES:
            self.percentiles[str(p)].append(float(np.percentile(pre, p)))

    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far (saved in each checkpoint, so that a resumed run records the same)."""
        return self.as_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.percentile_steps = list(state["percentile_steps"])
        self.percentiles = {key: list(values) for key, values in state["percentiles"].items()}
        self.layer_steps = list(state["layer_steps"])
        self.layers = {
            name: {key: list(values) for key, values in stats.items()} for name, stats in state["layers"].items()
        }
        self.weights = {name: list(values) for name, values in state["weight_grad_to_data"].items()}

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


RECORD_FILE = "record.json"


def _run_settings(config: TrainConfig | dict[str, Any]) -> Any:
    """A run's settings as they read back from JSON, without the checkpoint interval (it changes no result)."""
    settings = dict(dataclasses.asdict(config) if isinstance(config, TrainConfig) else config)
    settings.pop("checkpoint_every", None)
    return json.loads(json.dumps(settings))


def _reuse(
    config: TrainConfig, folder: Path, device: torch.device | None = None
) -> tuple[dict[str, Any], nn.Module | None] | None:
    """The record (and trained model, on ``device``) of a finished run of exactly ``config`` in ``folder``, or None.

    The device is not compared: a run finished on another device is reused.
    """
    path = folder / RECORD_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("config"), dict)
        or _run_settings(saved["config"]) != _run_settings(config)
    ):
        return None
    record = saved.get("record")
    if not isinstance(record, dict):
        return None
    model = None
    if not record.get("diverged"):
        try:
            model = model_from_checkpoint(folder / "checkpoint.pt", device=device)[0]
        except CheckpointError:
            return None
    return record, model


def _run_one(
    config: TrainConfig,
    dataset: Dataset,
    probe: Tensor,
    out: Path,
    label: str,
    progress: bool,
    device: torch.device | None = None,
) -> tuple[dict[str, Any], TrainResult | None]:
    recorders: list[LayerRecorder] = []

    def attach(model: nn.Module) -> nn.Module:
        recorders.append(LayerRecorder(model, probe, every=config.eval_every, batch_size=config.batch_size))
        return model

    record: dict[str, Any] = {"diverged": None, "device": str(device or "cpu")}
    result = None
    resume = _resumable(config, out / label)
    try:
        result = train(
            config,
            out / label,
            resume=resume,
            dataset=dataset,
            callbacks=recorders,  # filled by `attach` once the model exists
            progress=progress,
            description=label,
            model_override=attach,
            device=device,
        )
        record.update(
            steps=result.steps,
            test_accuracy=result.test_accuracy,
            test_loss=result.test_loss,
            val_accuracy=result.val_accuracy,
            val_loss=result.val_loss,
            train_loss=result.train_loss,
            seconds=result.seconds,
        )
    except DivergenceError as error:
        record["diverged"] = str(error)
        for key in ("steps", "test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_loss"):
            record[key] = []
    if recorders:
        record.update(recorders[0].as_dict())
    folder = out / label
    folder.mkdir(parents=True, exist_ok=True)
    saved = {"config": dataclasses.asdict(config), "record": record}
    write_json_atomically(folder / RECORD_FILE, saved)
    return record, result


def _resumable(config: TrainConfig, folder: Path) -> Path | None:
    """The checkpoint of an unfinished run of exactly ``config`` in ``folder`` (with its recorder state), or None."""
    path = folder / "checkpoint.pt"
    if not path.is_file():
        return None
    try:
        payload = load_checkpoint(path)
    except CheckpointError:
        return None  # unreadable: the run starts over and overwrites it
    stored = payload.get("config")
    if not isinstance(stored, dict) or _run_settings(stored) != _run_settings(config):
        return None
    if int(payload.get("step", 0)) > 0 and not payload.get("callbacks"):
        return None  # written before checkpoints held the recorder's statistics: they would be incomplete
    return path


SEED_KEYS = ("steps", "test_accuracy", "val_accuracy", "train_loss", "diverged", "seconds")
ARM_NAMES = {
    "batch": "BN",
    "renorm": "Batch Renorm",
    "ghost": "Ghost BN",
    "frozen": "frozen BN",
    "group": "GroupNorm",
    "layer": "LayerNorm",
}


def compare(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    seeds: int = 1,
    progress: bool = True,
    figures: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train ``config`` with its normalization (``config.norm``) and without, write ``results.json``, figures
    and ``report.html``.

    The two networks share the spec, init (same seed, same generator), data,
    batches and optimizer settings; they differ only in ``norm``. With
    ``seeds`` K > 1 each arm runs with seeds ``config.seed`` to
    ``config.seed + K - 1`` (see the module docstring). Every run trains on
    ``device`` (default the CPU; recorded as ``"device"`` in ``results.json``
    and in each run's record); it is not part of a run's settings, so a
    finished or interrupted run is reused or resumed on any device.

    Returns:
        the content of ``results.json``.

    Raises:
        ValueError: invalid settings, ``config.norm == "none"`` or ``seeds < 1``.
    """
    config.validate()
    # A checkpoint after every evaluation: an interrupted compare continues from there.
    config = dataclasses.replace(config, checkpoint_every=config.eval_every)
    if config.norm == "none":
        raise ValueError("compare trains --norm against none: choose a normalization for --norm (default batch)")
    if seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {seeds}")
    run_device = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(config.data, config.data_dir, seed=config.seed)
    # The probe and the explained batch are normalized as the runs normalize their inputs: fit on the
    # training examples they train on (the training split without its validation part).
    carved = split_validation(dataset, config.val_fraction)
    training_part = carved.train_images
    validation = (
        f"{len(carved.val_labels)} examples ({config.val_fraction:g} of each class) held out of the training split, "
        f"{len(training_part)} left for training"
        if carved.val_labels is not None
        else "none (--val-fraction 0)"
    )
    normalizer = InputNormalizer.fit(config.input_norm, training_part)
    probe = normalizer(dataset.test_images[:1000]).to(run_device)
    seed_list = [config.seed + offset for offset in range(seeds)]
    arms = {"bn": config.norm, "no_bn": "none"}
    runs: dict[str, Any] = {}
    seed_runs: dict[str, list[dict[str, Any]]] = {label: [] for label in arms}
    models: dict[str, nn.Module] = {}
    reused = 0
    for seed in seed_list:
        for label, norm in arms.items():
            run_config = dataclasses.replace(config, norm=norm, seed=seed)
            folder = label if seed == config.seed else f"{label}_seed{seed}"
            previous = _reuse(run_config, out / folder, run_device)
            model: nn.Module | None
            if previous is not None:
                record, model = previous
                reused += 1
            else:
                record, result = _run_one(run_config, dataset, probe, out, folder, progress, run_device)
                model = result.model if result is not None else None
            if seed == config.seed:
                runs[label] = record
                if model is not None:
                    models[label] = model
            slim = {key: record.get(key) for key in SEED_KEYS}
            slim["seed"] = seed
            slim["percentile_steadiness"] = (
                percentile_steadiness(record["percentiles"]) if record.get("percentiles") else None
            )
            seed_runs[label].append(slim)
    explanation: list[dict[str, Any]] = []
    if "bn" in models:
        batch = normalizer(training_part[: config.batch_size])
        explanation = explain(models["bn"], batch.to(run_device))
    summary = _summarize(runs, config)
    for label, records in seed_runs.items():
        summary[label]["over_seeds"] = _over_seeds(records, summary["checkpoints"])
    results = {
        "arms": arms,
        "arm_names": {label: ARM_NAMES.get(norm, norm) for label, norm in arms.items()},
        "seeds": seed_list,
        "seed_runs": seed_runs,
        "reused_runs": reused,
        "runs": runs,
        "config": dataclasses.asdict(config),
        "device": str(run_device),
        "dataset": dataset.description,
        "validation": validation,
        "summary": summary,
        "explain": explanation,
        "definitions": {
            "percentile_steadiness": "sum over the 15/50/85th percentile curves of (max - min) over the run, "
            "divided by the mean (85th - 15th) spread; lower is steadier",
            "saturated_pct": "sigmoid |z| > 4, tanh |a| > 0.97, ReLU a == 0",
            "grad_std": "std of dLoss/d(activation output) on the recorded training step",
            "weight_grad_to_data": "std(weight.grad) / std(weight) of each Linear/Conv layer",
            "over_seeds": "per quantity over the seeds that did not diverge: mean, sample std (ddof=1, none "
            "for one seed), min, max, n",
            "val_accuracy": "accuracy on the validation split held out of the training split (--val-fraction)",
        },
    }
    write_json_atomically(out / "results.json", results)
    if figures:
        write_report(out, results)
    return results


def spread(values: Iterable[float | int | None]) -> dict[str, Any]:
    """Mean, sample std (``ddof=1``; None for fewer than 2), min, max and count of the values that are not None."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    array = np.asarray(finite, dtype=float)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else None,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": len(finite),
    }


def _over_seeds(records: list[dict[str, Any]], checkpoints: list[int]) -> dict[str, Any]:
    finished = [record for record in records if not record.get("diverged") and record.get("test_accuracy")]

    def final(key: str) -> list[float | int | None]:
        return [record[key][-1] if record.get(key) else None for record in finished]

    return {
        "seeds": [record["seed"] for record in records],
        "diverged": sum(1 for record in records if record.get("diverged")),
        "final_accuracy": spread(final("test_accuracy")),
        "final_val_accuracy": spread(final("val_accuracy")),
        "accuracy_at": {str(s): spread([_accuracy_at(record, s) for record in finished]) for s in checkpoints},
        "steps_to_90pct": spread([_steps_to(record, 0.90) for record in finished]),
        "percentile_steadiness": spread([record.get("percentile_steadiness") for record in finished]),
    }


def _summarize(runs: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    checkpoints = [s for s in (250, 500, 1000, 2000, 5000, 10000, 20000, 50000) if s <= config.steps]
    summary: dict[str, Any] = {"checkpoints": checkpoints}
    for label, run in runs.items():
        summary[label] = {
            "diverged": run.get("diverged"),
            "accuracy_at": {str(s): _accuracy_at(run, s) for s in checkpoints},
            "final_accuracy": run["test_accuracy"][-1] if run["test_accuracy"] else None,
            "final_val_accuracy": run["val_accuracy"][-1] if run.get("val_accuracy") else None,
            "steps_to_90pct": _steps_to(run, 0.90),
            "percentile_steadiness": percentile_steadiness(run["percentiles"]) if run.get("percentiles") else None,
            "seconds": run.get("seconds"),
        }
    return summary
