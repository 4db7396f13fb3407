"""``lr-sweep``: the largest stable learning rate with and without BN (Ioffe & Szegedy's BN-x5/BN-x30, in miniature).

The same sigmoid MLP (the paper's 784-100-100-100-10 on 28x28 digits), the
same small Gaussian init (``normal:0.1``), seeds and mini-batches of 60, plain
SGD (no momentum), trained for ``steps`` steps at every learning rate of a
log grid (factor about 3.16, half a decade), with BN before each nonlinearity
(``batch``) and without (``none``).

A run is *stable* when the training divergence guard did not stop it
(non-finite or exploding loss or weights, see
:class:`~batchnorm.lab.training.DivergenceGuard`) **and** its final
validation accuracy is above ``threshold`` (default 0.5, five times chance:
a run that survives but is stuck near chance is not usable). A learning rate
is stable for an arm when every seed is stable there; the *largest stable
learning rate* is the largest such grid point (a lower bound when it is the
largest tried). The *best learning rate* of an arm is the grid point with
the highest mean final validation accuracy among its stable ones; its runs
(one per seed) are the arm's final models and the only ones whose test
accuracy is computed, once each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from batchnorm.lab.data import Dataset, load_dataset
from batchnorm.lab.figures import pyplot
from batchnorm.lab.studies.common import (
    Progress,
    config_dict,
    error_bars,
    fmt_spread,
    prepare,
    run_training,
    spread,
    test_accuracy,
    write_json,
    write_page,
)
from batchnorm.lab.training import TrainConfig

__all__ = ["LrSweepConfig", "lr_sweep"]

ARM_NAMES = {"batch": "with BN", "none": "without BN"}
COLORS = {"batch": "#1f77b4", "none": "#d62728"}


@dataclass(frozen=True)
class LrSweepConfig:
    """Settings of ``lr-sweep`` (see the module docstring)."""

    data: str = "mnist5k"
    hidden: tuple[int, ...] = (100, 100, 100)
    act: str = "sigmoid"
    init: str = "normal:0.1"
    input_norm: str = "minmax"
    lrs: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
    norms: tuple[str, ...] = ("batch", "none")
    momentum: float = 0.0
    batch_size: int = 60
    steps: int = 1000
    eval_every: int = 250
    threshold: float = 0.5
    seed: int = 0
    seeds: int = 3
    val_fraction: float = 0.1

    def validate(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"--seeds must be a positive integer, got {self.seeds}")
        if not self.lrs or any(not (lr > 0) for lr in self.lrs):
            raise ValueError(f"--lrs must be positive numbers, got {list(self.lrs)}")
        if len(set(self.lrs)) != len(self.lrs):
            raise ValueError(f"--lrs has repeated values: {list(self.lrs)}")
        if not (0.0 <= self.threshold < 1.0):
            raise ValueError(f"--threshold must be >= 0 and < 1, got {self.threshold}")
        if not self.norms:
            raise ValueError("lr-sweep needs at least one norm")

    def train_config(self, dataset: Dataset, norm: str, lr: float, seed: int) -> TrainConfig:
        widths = [dataset.input_features, *self.hidden, dataset.num_classes]
        config = TrainConfig(
            model="mlp:" + "-".join(str(w) for w in widths),
            act=self.act,
            norm=norm,
            init=self.init,
            data=dataset.name,
            input_norm=self.input_norm,
            lr=lr,
            momentum=self.momentum,
            batch_size=self.batch_size,
            steps=self.steps,
            eval_every=min(self.eval_every, self.steps),
            checkpoint_every=self.steps,
            seed=seed,
            val_fraction=self.val_fraction,
        )
        config.validate()
        return config


@dataclass
class _Cell:
    runs: list[dict[str, Any]] = field(default_factory=list)
    models: list[nn.Module | None] = field(default_factory=list)


def lr_sweep(
    config: LrSweepConfig, out_dir: str | Path, *, dataset: Dataset | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the sweep, write ``results.json``, ``lr_accuracy.png``, ``lr_loss.png`` and ``report.html``.

    Returns:
        the content of ``results.json``.
    """
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset if dataset is not None else load_dataset(config.data, seed=config.seed)
    prepared = prepare(data, config.val_fraction, config.input_norm)
    seeds = [config.seed + k for k in range(config.seeds)]
    lrs = sorted(config.lrs)
    planned = [(norm, lr, seed) for seed in seeds for norm in config.norms for lr in lrs]
    for norm, lr, seed in planned[:1]:
        config.train_config(data, norm, lr, seed)  # fail early on settings that do not fit the data
    bar = Progress(len(planned) * config.steps, "lr-sweep", progress)
    cells: dict[tuple[str, float], _Cell] = {(norm, lr): _Cell() for norm in config.norms for lr in lrs}
    try:
        for norm, lr, seed in planned:
            run_config = config.train_config(data, norm, lr, seed)
            result, diverged = run_training(run_config, data, bar, f"{norm} lr={lr:g} seed={seed}")
            record: dict[str, Any] = {"seed": seed, "diverged": diverged}
            if result is not None:
                record.update(
                    steps=result.steps,
                    val_accuracy=result.val_accuracy,
                    train_loss=result.train_loss,
                    final_val_accuracy=result.final_val_accuracy,
                    final_train_loss=result.train_loss[-1],
                )
            else:
                record.update(steps=[], val_accuracy=[], train_loss=[], final_val_accuracy=None, final_train_loss=None)
            record["stable"] = bool(
                diverged is None
                and record["final_val_accuracy"] is not None
                and record["final_val_accuracy"] > config.threshold
            )
            cells[(norm, lr)].runs.append(record)
            cells[(norm, lr)].models.append(result.model if result is not None else None)
    finally:
        bar.close()

    # Selection: validation only. Test accuracy afterwards, once per selected run.
    grid: dict[str, list[dict[str, Any]]] = {}
    arms: dict[str, dict[str, Any]] = {}
    for norm in config.norms:
        rows = []
        for lr in lrs:
            runs = cells[(norm, lr)].runs
            rows.append(
                {
                    "lr": lr,
                    "runs": runs,
                    "stable_seeds": sum(run["stable"] for run in runs),
                    "diverged_seeds": sum(run["diverged"] is not None for run in runs),
                    "stable": all(run["stable"] for run in runs),
                    "val_accuracy": spread(run["final_val_accuracy"] for run in runs),
                    "train_loss": spread(run["final_train_loss"] for run in runs),
                }
            )
        grid[norm] = rows
        stable = [row for row in rows if row["stable"]]
        largest = max((row["lr"] for row in stable), default=None)
        best = max(stable, key=lambda row: (row["val_accuracy"]["mean"], -row["lr"]), default=None)
        arms[norm] = {
            "name": ARM_NAMES.get(norm, norm),
            "largest_stable_lr": largest,
            "largest_is_grid_max": largest is not None and largest == lrs[-1],
            "smallest_unstable_above": min(
                (row["lr"] for row in rows if largest is not None and row["lr"] > largest), default=None
            ),
            "best_lr": best["lr"] if best is not None else None,
            "best_val_accuracy": best["val_accuracy"] if best is not None else spread([]),
        }
    for norm, arm in arms.items():
        if arm["best_lr"] is None:
            arm["test_accuracy"] = spread([])
            arm["test_accuracy_per_seed"] = []
            continue
        cell = cells[(norm, arm["best_lr"])]
        per_seed = [test_accuracy(model, prepared) for model in cell.models if model is not None]
        arm["test_accuracy_per_seed"] = per_seed
        arm["test_accuracy"] = spread(per_seed)

    results: dict[str, Any] = {
        "experiment": "lr-sweep",
        "config": config_dict(config),
        "dataset": data.description,
        "model": config.train_config(data, config.norms[0], lrs[0], seeds[0]).model,
        "seeds": seeds,
        "lrs": lrs,
        "grid": grid,
        "arms": arms,
        "headline": _headline(arms),
        "definitions": DEFINITIONS,
    }
    results["findings"] = findings(results)
    write_json(out / "results.json", results)
    write_report(out, results)
    return results


DEFINITIONS = {
    "stable": "the divergence guard did not stop the run and its final validation accuracy is above the threshold; "
    "a learning rate is stable for an arm when every seed is",
    "largest_stable_lr": "the largest grid learning rate stable for the arm (a lower bound when it is the largest "
    "tried)",
    "best_lr": "the stable learning rate with the highest mean final validation accuracy (selection; never test)",
    "test_accuracy": "test accuracy of the best learning rate's final models, one per seed, each evaluated once",
    "spread": "mean ± sample std (ddof=1) [min-max] over the seeds (diverged seeds left out of accuracies)",
}


def _headline(arms: dict[str, Any]) -> dict[str, Any]:
    bn = arms.get("batch", {}).get("largest_stable_lr")
    plain = arms.get("none", {}).get("largest_stable_lr")
    return {
        "largest_stable_lr_bn": bn,
        "largest_stable_lr_no_bn": plain,
        "ratio": bn / plain if bn is not None and plain is not None else None,
    }


def findings(results: dict[str, Any]) -> list[str]:
    """Plain sentences computed from the numbers (including where they disagree with the paper)."""
    arms, head, threshold = results["arms"], results["headline"], results["config"]["threshold"]
    lines = []
    bn, plain, ratio = head["largest_stable_lr_bn"], head["largest_stable_lr_no_bn"], head["ratio"]
    if bn is not None and plain is not None:
        bound = " (at least: the largest rate tried)" if arms["batch"]["largest_is_grid_max"] else ""
        lines.append(
            f"Largest stable learning rate without BN: {plain:g}, with BN: {bn:g}{bound} ({ratio:.3g}x), "
            f"stable meaning no divergence and a final validation accuracy above {threshold:g} for every seed."
        )
        if ratio >= 5:
            lines.append(
                f"This agrees with Ioffe & Szegedy (2015): BN trained at a {ratio:.3g}x larger learning rate; the "
                "paper ran Inception at 5x and 30x while 5x diverged without BN."
            )
        elif ratio > 1:
            lines.append(
                f"BN tolerated a larger learning rate ({ratio:.3g}x), but less than the paper's 5x-30x story on "
                "Inception: on this small MLP the gap is narrower."
            )
        else:
            lines.append(
                f"This contradicts the paper's claim that BN allows much higher learning rates: here BN's largest "
                f"stable rate is {ratio:.3g}x the unnormalized network's."
            )
    elif bn is not None:
        lines.append(f"Without BN no learning rate of the grid was stable; with BN up to {bn:g}.")
    elif plain is not None:
        lines.append(
            f"With BN no learning rate of the grid was stable; without BN up to {plain:g} (contradicts the paper)."
        )
    else:
        lines.append("No learning rate of the grid was stable for either network.")
    for arm in arms.values():
        if arm["best_lr"] is None:
            continue
        name = arm["name"][:1].upper() + arm["name"][1:]
        lines.append(
            f"{name}: the best learning rate on validation is {arm['best_lr']:g} (validation accuracy "
            f"{fmt_spread(arm['best_val_accuracy'])}); its test accuracy, measured once per seed: "
            f"{fmt_spread(arm['test_accuracy'])}."
        )
    bn_best, plain_best = arms.get("batch", {}), arms.get("none", {})
    if (
        bn_best.get("test_accuracy", {}).get("mean") is not None
        and plain_best.get("test_accuracy", {}).get("mean") is not None
    ):
        gap = bn_best["test_accuracy"]["mean"] - plain_best["test_accuracy"]["mean"]
        lines.append(
            f"At each network's own best learning rate, BN is {abs(gap) * 100:.1f} points "
            f"{'more' if gap >= 0 else 'less'} accurate on the test split"
            + (
                " (the paper: BN 0.982 vs 0.972 after 50,000 steps)."
                if gap >= 0
                else ", unlike the paper's MNIST result."
            )
        )
    return lines


def _figures(out: Path, results: dict[str, Any]) -> list[tuple[str, str]]:
    plt = pyplot()
    threshold = results["config"]["threshold"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (norm, rows) in enumerate(results["grid"].items()):
        color = COLORS.get(norm)
        lrs = [row["lr"] for row in rows]
        error_bars(axis, lrs, [row["val_accuracy"] for row in rows], ARM_NAMES.get(norm, norm), color)
        diverged = [row["lr"] for row in rows if row["diverged_seeds"]]
        if diverged:
            axis.scatter(
                diverged,
                [0.02 + 0.04 * index] * len(diverged),
                marker="x",
                color=color,
                label=f"{ARM_NAMES.get(norm, norm)}: a seed diverged",
            )
        largest = results["arms"][norm]["largest_stable_lr"]
        if largest is not None:
            axis.axvline(largest, color=color, linestyle=":", alpha=0.8)
    axis.axhline(threshold, color="#777", linestyle="--", label=f"threshold {threshold:g}")
    axis.set_xscale("log")
    axis.set_ylim(0, 1)
    axis.set_xlabel("learning rate (plain SGD, log scale)")
    axis.set_ylabel("final validation accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "lr_accuracy.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for norm, rows in results["grid"].items():
        error_bars(
            axis,
            [row["lr"] for row in rows],
            [row["train_loss"] for row in rows],
            ARM_NAMES.get(norm, norm),
            COLORS.get(norm),
        )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("learning rate (plain SGD, log scale)")
    axis.set_ylabel("training loss over the last evaluation interval")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "lr_loss.png", dpi=110)
    plt.close(figure)
    steps = results["config"]["steps"]
    return [
        (
            "lr_accuracy.png",
            f"Final validation accuracy after {steps} steps against the learning rate: mean over seeds with std error "
            f"bars and the min-max band; dotted lines mark each network's largest stable learning rate, crosses a "
            f"learning rate where a seed diverged, the dashed line the stability threshold {threshold:g}.",
        ),
        (
            "lr_loss.png",
            "Training loss of the last evaluation interval against the learning rate (mean, std error bars, min-max "
            "band; diverged seeds left out).",
        ),
    ]


def table(results: dict[str, Any]) -> list[list[str]]:
    """Rows: learning rates; per arm, validation accuracy (mean ± std [min-max]) and stable seeds."""
    norms = list(results["grid"])
    seeds = len(results["seeds"])
    header = ["learning rate"]
    for norm in norms:
        name = ARM_NAMES.get(norm, norm)
        header += [f"{name}: final val accuracy", f"{name}: stable seeds"]
    rows = [header]
    for index, lr in enumerate(results["lrs"]):
        row = [f"{lr:g}"]
        for norm in norms:
            cell = results["grid"][norm][index]
            diverged = f", {cell['diverged_seeds']} diverged" if cell["diverged_seeds"] else ""
            row += [fmt_spread(cell["val_accuracy"]), f"{cell['stable_seeds']} of {seeds}{diverged}"]
        rows.append(row)
    for key, title in (("largest_stable_lr", "largest stable lr"), ("best_lr", "best lr (validation)")):
        row = [title]
        for norm in norms:
            value = results["arms"][norm][key]
            row += [f"{value:g}" if value is not None else "none", ""]
        rows.append(row)
    row = ["test accuracy at best lr"]
    for norm in norms:
        row += [fmt_spread(results["arms"][norm]["test_accuracy"]), ""]
    rows.append(row)
    return rows


def write_report(out: Path, results: dict[str, Any]) -> Path:
    config = results["config"]
    setup = (
        f"The same network ({results['model']}, {config['act']}, init {config['init']}) trained with BN before each "
        f"nonlinearity and without, for {config['steps']} steps of plain SGD (momentum {config['momentum']:g}) on "
        f"mini-batches of {config['batch_size']}, at each learning rate of a log grid, with seeds "
        f"{', '.join(str(s) for s in results['seeds'])} (init and batch order). Data: {results['dataset']}; the "
        f"validation split ({config['val_fraction']:g} of the training split) chooses, the test split is "
        "evaluated once per selected run."
    )
    return write_page(
        out,
        "lr-sweep: how large a learning rate BN tolerates",
        setup,
        results["findings"],
        table(results),
        _figures(out, results),
        results["definitions"],
        config,
    )
