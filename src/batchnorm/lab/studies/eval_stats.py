"""``eval-stats``: which statistics BN should use at test time, at training batches of 4 and 60.

The paper's network (784-100-100-100-10, sigmoid, BN before each
nonlinearity, init ``normal:0.1``, plain SGD) is trained at each batch size
of ``batch_sizes`` for the same number of ``steps`` (the comparison is
between statistics *within* a batch size, not across them). The last
``checkpoints`` evaluations of each run (every ``eval_every`` steps) are kept,
for every seed, and each checkpoint is evaluated four ways:

* ``ema``: the running statistics training kept (PyTorch's exponential moving
  average, momentum 0.1: about the last 10 batches) -- ``model.eval()``;
* ``precise``: population statistics recomputed by
  :func:`batchnorm.deploy.recalibrate` ("precise BN", Wu & Johnson 2021) over
  the whole training part, exactly pooled, fed in shuffled batches of the
  training batch size (so every layer sees the inputs training gave it);
* ``test_batch``: BN in training mode on the evaluated split, cut into
  batches of the training batch size, shuffled once (each batch normalized by its own
  statistics, as in training; a last batch of one example joins the one
  before);
* ``whole_split``: BN in training mode on the whole evaluated split as one
  batch (400 validation or 1,000 test examples): batch statistics from a large
  batch, close to the population's.

The spread is over all kept checkpoints of all seeds (``checkpoints x
seeds`` values). Every checkpoint and method is a final model: its test
accuracy is measured once. Model selection: per batch size, the method with
the highest mean *validation* accuracy is the one a practitioner would
deploy; its test accuracy is reported as the selected result.

``stats_gap`` measures how far the EMA statistics are from the precise ones,
averaged over the BN layers and their features: ``|mean_ema - mean_precise| /
sqrt(var_precise)`` and ``|log(var_ema / var_precise)|``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.deploy import recalibrate
from batchnorm.lab.data import Dataset, load_dataset
from batchnorm.lab.figures import pyplot
from batchnorm.lab.models import build_model
from batchnorm.lab.studies.common import (
    BestCheckpoint,
    Progress,
    config_dict,
    fmt_spread,
    prepare,
    run_training,
    spread,
    write_json,
    write_page,
)
from batchnorm.lab.training import TrainConfig, evaluate

__all__ = ["METHODS", "EvalStatsConfig", "eval_stats", "precise_model", "train_mode_accuracy"]

METHODS = ("ema", "precise", "test_batch", "whole_split")
NAMES = {
    "ema": "EMA running statistics",
    "precise": "precise BN (recalibrated)",
    "test_batch": "batch statistics, evaluation batches of the training size",
    "whole_split": "batch statistics of the whole split",
}
SHORT = {"ema": "EMA", "precise": "precise", "test_batch": "test-batch", "whole_split": "whole split"}
COLORS = {"ema": "#d62728", "precise": "#1f77b4", "test_batch": "#2ca02c", "whole_split": "#9467bd"}


@dataclass(frozen=True)
class EvalStatsConfig:
    """Settings of ``eval-stats`` (see the module docstring)."""

    data: str = "mnist5k"
    hidden: tuple[int, ...] = (100, 100, 100)
    act: str = "sigmoid"
    init: str = "normal:0.1"
    input_norm: str = "minmax"
    batch_sizes: tuple[int, ...] = (4, 60)
    lr: float = 0.5
    momentum: float = 0.0
    steps: int = 2000
    eval_every: int = 100
    checkpoints: int = 5
    seed: int = 0
    seeds: int = 3
    val_fraction: float = 0.1

    def validate(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"--seeds must be a positive integer, got {self.seeds}")
        if not self.batch_sizes or min(self.batch_sizes) < 2:
            raise ValueError(f"--batch-sizes must be integers >= 2 (BN needs 2 values), got {list(self.batch_sizes)}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"--batch-sizes has repeated values: {list(self.batch_sizes)}")
        if self.checkpoints < 1:
            raise ValueError(f"--checkpoints must be a positive integer, got {self.checkpoints}")
        if self.steps < self.eval_every * self.checkpoints:
            raise ValueError(
                f"--steps {self.steps} is too short for {self.checkpoints} checkpoints every {self.eval_every} steps"
            )

    def train_config(self, dataset: Dataset, batch_size: int, seed: int) -> TrainConfig:
        widths = [dataset.input_features, *self.hidden, dataset.num_classes]
        config = TrainConfig(
            model="mlp:" + "-".join(str(w) for w in widths),
            act=self.act,
            norm="batch",
            init=self.init,
            data=dataset.name,
            input_norm=self.input_norm,
            lr=self.lr,
            momentum=self.momentum,
            batch_size=batch_size,
            steps=self.steps,
            eval_every=self.eval_every,
            checkpoint_every=self.steps,
            seed=seed,
            val_fraction=self.val_fraction,
        )
        config.validate()
        return config


def _chunks(count: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches; a last batch of one joins the one before."""
    bounds = [(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], count)]
    return bounds


@torch.no_grad()
def train_mode_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int, seed: int = 0) -> float:
    """Accuracy with BN in training mode (each batch normalized by its own statistics); ``model`` is not changed.

    The split is shuffled first (fixed ``seed``): the stored splits are sorted by class, and a batch of one
    class would be normalized by that class's statistics, which no training batch ever was.
    """
    probe = copy.deepcopy(model)
    probe.train()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    correct = 0
    for start, stop in _chunks(len(images), batch_size):
        correct += int((probe(images[start:stop]).argmax(dim=1) == labels[start:stop]).sum())
    return correct / len(images)


def precise_model(model: nn.Module, train_images: Tensor, batch_size: int, seed: int) -> nn.Module:
    """A copy of ``model`` whose BN running statistics are recomputed by :func:`batchnorm.deploy.recalibrate`.

    The training part is fed once, in a shuffled order (``seed``), in batches of ``batch_size``.
    """
    copied = copy.deepcopy(model)
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
    shuffled = train_images[order]
    batches = [shuffled[start:stop] for start, stop in _chunks(len(shuffled), batch_size)]
    recalibrate(copied, batches, progress=False)
    copied.eval()
    return copied


def stats_gap(ema: nn.Module, precise: nn.Module) -> dict[str, float]:
    """Mean over BN layers and features of ``|dmean| / sqrt(var_precise)`` and ``|log(var_ema / var_precise)|``."""
    means, variances = [], []
    for (_, a), (_, b) in zip(ema.named_modules(), precise.named_modules()):
        if isinstance(a, _BatchNorm) and isinstance(b, _BatchNorm):
            assert a.running_mean is not None
            assert a.running_var is not None
            assert b.running_mean is not None
            assert b.running_var is not None
            scale = b.running_var.double().clamp_min(1e-12).sqrt()
            means.append(float(((a.running_mean.double() - b.running_mean.double()).abs() / scale).mean()))
            ratio = a.running_var.double().clamp_min(1e-12) / b.running_var.double().clamp_min(1e-12)
            variances.append(float(ratio.log().abs().mean()))
    return {
        "mean_shift_in_std": sum(means) / len(means) if means else math.nan,
        "abs_log_var_ratio": sum(variances) / len(variances) if variances else math.nan,
    }


def _evaluate_all(
    model: nn.Module, precise: nn.Module, images: Tensor, labels: Tensor, batch_size: int
) -> dict[str, float]:
    """Accuracy of each method on one split (``precise``: the recalibrated copy of ``model``)."""
    methods: dict[str, Callable[[], float]] = {
        "ema": lambda: evaluate(model, images, labels)[1],
        "precise": lambda: evaluate(precise, images, labels)[1],
        "test_batch": lambda: train_mode_accuracy(model, images, labels, batch_size),
        "whole_split": lambda: train_mode_accuracy(model, images, labels, len(images)),
    }
    return {name: method() for name, method in methods.items()}


def eval_stats(
    config: EvalStatsConfig, out_dir: str | Path, *, dataset: Dataset | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train, evaluate each kept checkpoint four ways, write ``results.json``, figures and ``report.html``."""
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset if dataset is not None else load_dataset(config.data, seed=config.seed)
    prepared = prepare(data, config.val_fraction, config.input_norm)
    seeds = [config.seed + k for k in range(config.seeds)]
    sizes = sorted(config.batch_sizes)
    planned = [(size, seed) for seed in seeds for size in sizes]
    configs = {key: config.train_config(data, *key) for key in planned}
    bar = Progress(len(planned) * config.steps, "eval-stats", progress)
    checkpoints: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
    diverged: dict[int, list[str]] = {size: [] for size in sizes}
    try:
        for size, seed in planned:
            run_config = configs[(size, seed)]
            keeper = BestCheckpoint(keep_last=config.checkpoints)
            result, why = run_training(run_config, data, bar, f"batch={size} seed={seed}", [keeper])
            if result is None:
                diverged[size].append(f"seed {seed}: {why}")
                continue
            for step, state in keeper.recent:
                model = build_model(run_config.model, run_config.act, "batch", image_size=data.image_size)
                model.load_state_dict(state)
                model.eval()
                precise = precise_model(model, prepared.train_images, size, seed)
                val = _evaluate_all(model, precise, prepared.val_images, prepared.val_labels, size)
                test = _evaluate_all(model, precise, prepared.test_images, prepared.test_labels, size)
                gap = stats_gap(model, precise)
                checkpoints[size].append({"seed": seed, "step": step, "val": val, "test": test, "stats_gap": gap})
    finally:
        bar.close()
    summary: dict[str, Any] = {}
    for size in sizes:
        rows = checkpoints[size]
        per_method = {
            method: {
                "val_accuracy": spread(row["val"][method] for row in rows),
                "test_accuracy": spread(row["test"][method] for row in rows),
            }
            for method in METHODS
        }
        candidates = [m for m in METHODS if per_method[m]["val_accuracy"]["mean"] is not None]
        selected = max(candidates, key=lambda m: per_method[m]["val_accuracy"]["mean"], default=None)
        summary[str(size)] = {
            "methods": per_method,
            "selected": selected,
            "selected_test_accuracy": per_method[selected]["test_accuracy"] if selected else spread([]),
            "precise_minus_ema": spread(row["test"]["precise"] - row["test"]["ema"] for row in rows),
            "precise_wins": sum(row["test"]["precise"] > row["test"]["ema"] for row in rows),
            "ema_wins": sum(row["test"]["precise"] < row["test"]["ema"] for row in rows),
            "stats_gap": {
                key: spread(row["stats_gap"][key] for row in rows) for key in ("mean_shift_in_std", "abs_log_var_ratio")
            },
            "checkpoints": len(rows),
            "diverged": diverged[size],
        }
    results: dict[str, Any] = {
        "experiment": "eval-stats",
        "config": config_dict(config),
        "dataset": data.description,
        "model": configs[planned[0]].model,
        "seeds": seeds,
        "batch_sizes": sizes,
        "methods": {m: NAMES[m] for m in METHODS},
        "checkpoints": {str(size): checkpoints[size] for size in sizes},
        "summary": summary,
        "definitions": DEFINITIONS,
    }
    results["findings"] = findings(results)
    write_json(out / "results.json", results)
    write_report(out, results)
    return results


DEFINITIONS = {
    "ema": NAMES["ema"] + ": model.eval() with the running statistics training kept (momentum 0.1)",
    "precise": NAMES["precise"] + ": batchnorm.deploy.recalibrate over the training part, exactly pooled",
    "test_batch": NAMES["test_batch"] + ": BN in training mode, each evaluation batch normalized by itself",
    "whole_split": NAMES["whole_split"] + ": BN in training mode on the whole split as one batch",
    "spread": "mean ± sample std (ddof=1) [min-max] over the last checkpoints of every seed",
    "selected": "the method with the highest mean validation accuracy at that batch size (never test)",
    "precise_minus_ema": "per checkpoint, precise minus EMA test accuracy (paired); a difference is called clear "
    "when |mean| > 2 std / sqrt(n)",
    "stats_gap": "EMA vs precise statistics: |mean_ema - mean_precise| / sqrt(var_precise) and "
    "|log(var_ema / var_precise)|, averaged over features and BN layers",
}


def _test_mean(results: dict[str, Any], size: int, method: str) -> float | None:
    value = results["summary"][str(size)]["methods"][method]["test_accuracy"]["mean"]
    return None if value is None else float(value)


def _clear(paired: dict[str, Any]) -> bool:
    """A paired mean difference larger than twice its standard error."""
    mean, std, n = paired.get("mean"), paired.get("std"), int(paired.get("n", 0))
    if mean is None or std is None or n < 2:
        return False
    if std == 0:
        return bool(mean != 0)
    return bool(abs(float(mean)) > 2 * float(std) / math.sqrt(n))


def findings(results: dict[str, Any]) -> list[str]:
    """Plain sentences computed from the numbers (including where they disagree with Wu & Johnson 2021)."""
    lines = []
    sizes = results["batch_sizes"]
    gains: dict[int, float] = {}
    clears: dict[int, bool] = {}
    inconsistency: dict[int, float] = {}
    for size in sizes:
        item = results["summary"][str(size)]
        methods = item["methods"]
        if item["selected"] is None:
            lines.append(f"Batch {size}: every run diverged; nothing to compare.")
            continue
        parts = ", ".join(f"{SHORT[m]} {fmt_spread(methods[m]['test_accuracy'])}" for m in METHODS)
        lines.append(f"Batch {size}, test accuracy over {item['checkpoints']} checkpoints: {parts}.")
        ema, precise = _test_mean(results, size, "ema"), _test_mean(results, size, "precise")
        if ema is not None and precise is not None:
            gains[size] = precise - ema
            ema_std = methods["ema"]["test_accuracy"]["std"]
            precise_std = methods["precise"]["test_accuracy"]["std"]
            steadier = ""
            if ema_std is not None and precise_std is not None:
                word = (
                    "about the same as"
                    if round(precise_std, 3) == round(ema_std, 3)
                    else "smaller than"
                    if precise_std < ema_std
                    else "larger than"
                )
                steadier = (
                    f"; its spread across checkpoints is {word} the EMA's (std {precise_std:.3f} vs {ema_std:.3f})"
                )
            paired = item["precise_minus_ema"]
            clear = _clear(paired)
            lines.append(
                f"Batch {size}: precise BN is {(precise - ema) * 100:+.1f} points against the EMA statistics "
                f"(paired per checkpoint: better in {item['precise_wins']}, worse in {item['ema_wins']} of "
                f"{paired['n']}; {'a clear' if clear else 'no clear'} difference){steadier}; "
                f"the EMA means sit {item['stats_gap']['mean_shift_in_std']['mean']:.3f} population std from the "
                f"precise ones and their variances differ by a factor of "
                f"{math.exp(item['stats_gap']['abs_log_var_ratio']['mean']):.2f} on average."
            )
            clears[size] = clear
        lines.append(
            f"Batch {size}: chosen on validation: {NAMES[item['selected']]}, test accuracy "
            f"{fmt_spread(item['selected_test_accuracy'])}."
        )
        batch_stats, whole = _test_mean(results, size, "test_batch"), _test_mean(results, size, "whole_split")
        if batch_stats is not None and precise is not None:
            inconsistency[size] = batch_stats - precise
            lines.append(
                f"Batch {size}: normalizing each test batch of {size} by itself is "
                f"{(batch_stats - precise) * 100:+.1f} "
                f"points against population statistics (whole test split as one batch: "
                f"{((whole or 0.0) - precise) * 100:+.1f})."
            )
    if len(inconsistency) >= 2:
        small, large = min(inconsistency), max(inconsistency)
        listed = f"batch {small}: {inconsistency[small] * 100:+.1f}, batch {large}: {inconsistency[large] * 100:+.1f}"
        if inconsistency[small] < inconsistency[large]:
            lines.append(
                "Agrees with Wu & Johnson (2021) that the inconsistency between batch and population statistics grows "
                f"as the batch shrinks: using batch statistics instead of population ones costs {listed} points."
            )
        else:
            lines.append(
                "Unlike Wu & Johnson (2021), using batch instead of population statistics does not cost more at the "
                f"small batch ({listed} points)."
            )
    if len(gains) >= 2:
        small, large = min(gains), max(gains)
        listed = ", ".join(f"batch {s}: {g * 100:+.1f}" for s, g in gains.items())
        if not any(clears.values()):
            lines.append(
                "Wu & Johnson (2021) found precise statistics better than the EMA, and more so at small batches; "
                f"here the difference is not clear at any batch size ({listed} points), so this small network does "
                "not reproduce it."
            )
        elif gains[small] > 0 and gains[small] > gains[large] and clears.get(small):
            lines.append(
                f"Agrees with Wu & Johnson (2021): precise statistics help more at batch {small} "
                f"({gains[small] * 100:+.1f} points) than at batch {large} ({gains[large] * 100:+.1f}); the EMA's "
                "train/test inconsistency grows as the batch shrinks."
            )
        elif all(g <= 0 for g in gains.values()):
            lines.append(
                "Contradicts Wu & Johnson (2021) here: precise statistics did not beat the EMA at any batch size "
                f"({', '.join(f'batch {s}: {g * 100:+.1f}' for s, g in gains.items())} points)."
            )
        else:
            lines.append(
                f"Partly unlike Wu & Johnson (2021): the gain of precise over EMA statistics is not larger at the "
                f"small batch ({', '.join(f'batch {s}: {g * 100:+.1f}' for s, g in gains.items())} points)."
            )
    return lines


def _figures(out: Path, results: dict[str, Any]) -> list[tuple[str, str]]:
    plt = pyplot()
    sizes = results["batch_sizes"]
    figure, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(METHODS)
    for index, method in enumerate(METHODS):
        xs, means, stds, lows, highs = [], [], [], [], []
        for position, size in enumerate(sizes):
            stats = results["summary"][str(size)]["methods"][method]["test_accuracy"]
            if stats["mean"] is None:
                continue
            xs.append(position + (index - (len(METHODS) - 1) / 2) * width)
            means.append(stats["mean"])
            stds.append(stats["std"] or 0.0)
            lows.append(stats["min"])
            highs.append(stats["max"])
        axis.bar(xs, means, width=width, yerr=stds, capsize=3, color=COLORS[method], label=NAMES[method], alpha=0.85)
        axis.vlines(xs, lows, highs, color="#333", linewidth=1)
    axis.set_xticks(range(len(sizes)), [f"training batch {s}" for s in sizes])
    lows_all = [
        results["summary"][str(s)]["methods"][m]["test_accuracy"]["min"]
        for s in sizes
        for m in METHODS
        if results["summary"][str(s)]["methods"][m]["test_accuracy"]["min"] is not None
    ]
    axis.set_ylim(max(0.0, min(lows_all, default=0.0) - 0.05), 1.0)
    axis.set_ylabel("test accuracy")
    axis.set_xlabel("training batch size")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "eval_stats.png", dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), sharey=True, squeeze=False)
    for axis, size in zip(axes[0], sizes):
        rows = results["checkpoints"][str(size)]
        for method in METHODS:
            for seed in results["seeds"]:
                points = [(row["step"], row["test"][method]) for row in rows if row["seed"] == seed]
                if points:
                    axis.plot(
                        [p[0] for p in points],
                        [p[1] for p in points],
                        marker="o",
                        color=COLORS[method],
                        alpha=0.8,
                        label=NAMES[method] if seed == results["seeds"][0] else None,
                    )
        axis.set_title(f"training batch {size}")
        axis.set_xlabel("training step of the checkpoint")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "eval_stats_checkpoints.png", dpi=110)
    plt.close(figure)
    return [
        (
            "eval_stats.png",
            "Test accuracy of each way of getting BN's test-time statistics, at each training batch size: mean over "
            "the kept checkpoints of all seeds, std error bars, black lines min-max.",
        ),
        (
            "eval_stats_checkpoints.png",
            "The same per checkpoint (one line per seed and method): how much each method moves from one "
            "checkpoint to the next.",
        ),
    ]


def table(results: dict[str, Any]) -> list[list[str]]:
    sizes = results["batch_sizes"]
    rows = [["statistics at test time", *[f"batch {s}: test accuracy" for s in sizes]]]
    for method in METHODS:
        rows.append(
            [
                NAMES[method],
                *[fmt_spread(results["summary"][str(s)]["methods"][method]["test_accuracy"]) for s in sizes],
            ]
        )
    rows.append(
        [
            "precise - EMA, paired per checkpoint",
            *[fmt_spread(results["summary"][str(s)]["precise_minus_ema"]) for s in sizes],
        ]
    )
    rows.append(["chosen on validation", *[str(results["summary"][str(s)]["selected"]) for s in sizes]])
    rows.append(
        [
            "EMA mean shift (population std)",
            *[fmt_spread(results["summary"][str(s)]["stats_gap"]["mean_shift_in_std"]) for s in sizes],
        ]
    )
    rows.append(
        [
            "EMA |log var ratio|",
            *[fmt_spread(results["summary"][str(s)]["stats_gap"]["abs_log_var_ratio"]) for s in sizes],
        ]
    )
    return rows


def write_report(out: Path, results: dict[str, Any]) -> Path:
    config = results["config"]
    setup = (
        f"The network {results['model']} ({config['act']}, BN before each nonlinearity, init {config['init']}) "
        f"trained for {config['steps']} steps of SGD (lr {config['lr']:g}, momentum {config['momentum']:g}) at each "
        f"training batch size, seeds {', '.join(str(s) for s in results['seeds'])}; the last {config['checkpoints']} "
        f"checkpoints (every {config['eval_every']} steps) of each run are each evaluated with four sources of BN "
        f"statistics. Data: {results['dataset']}. Spread: over all kept checkpoints of all seeds."
    )
    return write_page(
        out,
        "eval-stats: EMA vs precise vs test-batch statistics",
        setup,
        results["findings"],
        table(results),
        _figures(out, results),
        results["definitions"],
        config,
    )
