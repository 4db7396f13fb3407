"""``small-batch``: test accuracy against batch size, BN and its variants (the GroupNorm paper's table, in miniature).

The same ReLU MLP (784-100-100-10, Kaiming init, SGD with momentum 0.9) with
each normalization of ``norms`` (``batch`` BN, ``renorm`` Batch Renorm,
``ghost`` Ghost BN, ``group`` GroupNorm, ``layer`` LayerNorm) in every hidden
layer, trained at every batch size of ``batch_sizes``.

Equal data, not equal steps: every run sees ``epochs`` passes over the
training part (``epochs * (n_train // batch_size)`` steps), so a batch of 2
takes 32x the steps of a batch of 64. The learning rate follows the linear
scaling rule (Goyal et al. 2017): ``lr = base_lr * batch_size /
reference_batch`` (0.1 at 64), so a pass over the data moves the weights by a
comparable amount at every batch size. Variant settings: Ghost BN takes
virtual batches of ``virtual_batch_size`` (default 8: at batches of 8 or
fewer it *is* BN); Batch Renorm relaxes from BN to ``rmax=3, dmax=5`` over the
first quarter of each run (``renorm_warmup_fraction``; the paper relaxes over
tens of thousands of steps, more than these runs have); GroupNorm uses
:func:`batchnorm.lab.models.group_count` groups (5 groups of 20 features on a
width of 100).

Model selection: each run is evaluated on the validation split
``evals_per_run`` times; its final model is the checkpoint with the highest
validation accuracy (the earliest on ties), and only that checkpoint's test
accuracy is measured, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchnorm.lab.data import Dataset, load_dataset
from batchnorm.lab.figures import pyplot
from batchnorm.lab.models import BATCH_STATISTICS_NORMS, NORMS, build_model
from batchnorm.lab.studies.common import (
    BestCheckpoint,
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

__all__ = ["SMALL_BATCH_NORMS", "SmallBatchConfig", "small_batch"]

SMALL_BATCH_NORMS = ("batch", "renorm", "ghost", "group", "layer")
NAMES = {"batch": "BN", "renorm": "Batch Renorm", "ghost": "Ghost BN", "group": "GroupNorm", "layer": "LayerNorm"}
COLORS = {"batch": "#1f77b4", "renorm": "#ff7f0e", "ghost": "#2ca02c", "group": "#9467bd", "layer": "#8c564b"}
BATCH_INDEPENDENT = ("group", "layer")


@dataclass(frozen=True)
class SmallBatchConfig:
    """Settings of ``small-batch`` (see the module docstring)."""

    data: str = "mnist5k"
    hidden: tuple[int, ...] = (100, 100)
    act: str = "relu"
    init: str = "kaiming"
    input_norm: str = "minmax"
    norms: tuple[str, ...] = SMALL_BATCH_NORMS
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    epochs: int = 1
    base_lr: float = 0.1
    reference_batch: int = 64
    momentum: float = 0.9
    virtual_batch_size: int = 8
    renorm_warmup_fraction: float = 0.25
    evals_per_run: int = 6
    seed: int = 0
    seeds: int = 3
    val_fraction: float = 0.1

    def validate(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"--seeds must be a positive integer, got {self.seeds}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be a positive integer, got {self.epochs}")
        if not self.batch_sizes:
            raise ValueError("small-batch needs at least one batch size")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"--batch-sizes has repeated values: {list(self.batch_sizes)}")
        if not self.norms or len(set(self.norms)) != len(self.norms):
            raise ValueError(f"--norms must name each normalization once, got {list(self.norms)}")
        for norm in self.norms:
            if norm not in NORMS:
                raise ValueError(f"unknown norm {norm!r}: expected some of {', '.join(NORMS)}")
            if norm in BATCH_STATISTICS_NORMS and min(self.batch_sizes) < 2:
                raise ValueError(f"--norm {norm} needs batches of at least 2 (BN needs 2 values per statistic)")
        if min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.evals_per_run < 1:
            raise ValueError(f"evals_per_run must be a positive integer, got {self.evals_per_run}")

    def steps(self, n_train: int, batch_size: int) -> int:
        return self.epochs * (n_train // batch_size)

    def train_config(self, dataset: Dataset, n_train: int, norm: str, batch_size: int, seed: int) -> TrainConfig:
        widths = [dataset.input_features, *self.hidden, dataset.num_classes]
        steps = self.steps(n_train, batch_size)
        if steps < 1:
            raise ValueError(f"batch size {batch_size} is larger than the training part ({n_train} examples)")
        config = TrainConfig(
            model="mlp:" + "-".join(str(w) for w in widths),
            act=self.act,
            norm=norm,
            init=self.init,
            data=dataset.name,
            input_norm=self.input_norm,
            lr=self.base_lr * batch_size / self.reference_batch,
            momentum=self.momentum,
            batch_size=batch_size,
            steps=steps,
            eval_every=max(1, steps // self.evals_per_run),
            checkpoint_every=steps,
            seed=seed,
            val_fraction=self.val_fraction,
            virtual_batch_size=self.virtual_batch_size,
            renorm_warmup=round(self.renorm_warmup_fraction * steps),
        )
        config.validate()
        return config


def small_batch(
    config: SmallBatchConfig, out_dir: str | Path, *, dataset: Dataset | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run every (norm, batch size, seed), write ``results.json``, figures and ``report.html``."""
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset if dataset is not None else load_dataset(config.data, seed=config.seed)
    prepared = prepare(data, config.val_fraction, config.input_norm)
    n_train = len(prepared.data.train_images)
    seeds = [config.seed + k for k in range(config.seeds)]
    sizes = sorted(config.batch_sizes)
    planned = [(norm, size, seed) for seed in seeds for norm in config.norms for size in sizes]
    configs = {key: config.train_config(data, n_train, *key) for key in planned}  # all checked before training
    bar = Progress(sum(c.steps for c in configs.values()), "small-batch", progress)
    records: dict[tuple[str, int], list[dict[str, Any]]] = {(n, s): [] for n in config.norms for s in sizes}
    try:
        for key in planned:
            norm, size, seed = key
            run_config = configs[key]
            best = BestCheckpoint()
            result, diverged = run_training(run_config, data, bar, f"{norm} batch={size} seed={seed}", [best])
            record: dict[str, Any] = {
                "seed": seed,
                "steps": run_config.steps,
                "lr": run_config.lr,
                "diverged": diverged,
                "best_step": None,
                "val_accuracy": None,
                "final_val_accuracy": None,
                "test_accuracy": None,
            }
            if result is not None and best.best_state is not None:
                # Selection (validation) is over; the selected checkpoint's test accuracy, once.
                model = build_model(
                    run_config.model,
                    run_config.act,
                    norm,
                    run_config.placement,
                    image_size=data.image_size,
                    norm_options=run_config.norm_options(),
                )
                model.load_state_dict(best.best_state)
                record.update(
                    best_step=best.best_step,
                    val_accuracy=best.best_val,
                    final_val_accuracy=result.final_val_accuracy,
                    test_accuracy=test_accuracy(model, prepared),
                )
            records[(norm, size)].append(record)
    finally:
        bar.close()
    table_data: dict[str, list[dict[str, Any]]] = {}
    for norm in config.norms:
        table_data[norm] = [
            {
                "batch_size": size,
                "steps": records[(norm, size)][0]["steps"],
                "lr": records[(norm, size)][0]["lr"],
                "runs": records[(norm, size)],
                "diverged_seeds": sum(r["diverged"] is not None for r in records[(norm, size)]),
                "test_accuracy": spread(r["test_accuracy"] for r in records[(norm, size)]),
                "val_accuracy": spread(r["val_accuracy"] for r in records[(norm, size)]),
            }
            for size in sizes
        ]
    results: dict[str, Any] = {
        "experiment": "small-batch",
        "config": config_dict(config),
        "dataset": data.description,
        "model": configs[planned[0]].model,
        "n_train": n_train,
        "seeds": seeds,
        "batch_sizes": sizes,
        "norms": list(config.norms),
        "results": table_data,
        "definitions": DEFINITIONS,
    }
    results["findings"] = findings(results)
    write_json(out / "results.json", results)
    write_report(out, results)
    return results


DEFINITIONS = {
    "steps": "epochs * (training examples // batch size): the same number of examples at every batch size",
    "lr": "base_lr * batch_size / reference_batch (linear scaling)",
    "val_accuracy": "validation accuracy of the selected checkpoint (the best of the run's evaluations)",
    "test_accuracy": "test accuracy of the selected checkpoint, evaluated once per run",
    "spread": "mean ± sample std (ddof=1) [min-max] over the seeds",
}


def _mean(results: dict[str, Any], norm: str, size: int) -> float | None:
    for row in results["results"].get(norm, []):
        if row["batch_size"] == size:
            mean = row["test_accuracy"]["mean"]
            return None if mean is None else float(mean)
    return None


def _std(results: dict[str, Any], norm: str, size: int) -> float:
    for row in results["results"].get(norm, []):
        if row["batch_size"] == size:
            return row["test_accuracy"]["std"] or 0.0
    return 0.0


def findings(results: dict[str, Any]) -> list[str]:
    """Plain sentences computed from the numbers (including where they disagree with the literature)."""
    sizes, norms = results["batch_sizes"], results["norms"]
    small, large = sizes[0], sizes[-1]
    lines = []
    at_small = {n: _mean(results, n, small) for n in norms}
    ranked = sorted((v, n) for n, v in at_small.items() if v is not None)
    if ranked:
        lines.append(
            f"At batch {small}: "
            + ", ".join(f"{NAMES.get(n, n)} {v:.3f}" for v, n in reversed(ranked))
            + f" (test accuracy, mean over {len(results['seeds'])} seed(s))."
        )
    drops: dict[str, float] = {}
    if small != large:
        for norm in norms:
            low, high = _mean(results, norm, small), _mean(results, norm, large)
            if low is not None and high is not None:
                drops[norm] = high - low
        if drops:
            lines.append(
                f"Change from batch {large} to batch {small} (points of test accuracy lost; negative: gained): "
                + ", ".join(f"{NAMES.get(n, n)} {d * 100:+.1f}" for n, d in drops.items())
                + "."
            )
    bn_drop = drops.get("batch")
    independent = [drops[n] for n in BATCH_INDEPENDENT if n in drops]
    if bn_drop is not None and independent:
        noise = _std(results, "batch", small) + max(_std(results, n, small) for n in BATCH_INDEPENDENT if n in drops)
        worst = max(independent)
        if bn_drop > worst + noise:
            lines.append(
                f"As in Wu & He (2018), BN degrades at small batches while the batch-independent norms hold up: BN "
                f"loses {bn_drop * 100:.1f} points, GroupNorm/LayerNorm {worst * 100:+.1f} at worst (ResNet-50 on "
                "ImageNet: BN's error 23.6% at 32 images per GPU, 34.7% at 2; GroupNorm 24.1% at both)."
            )
        else:
            lines.append(
                f"Unlike Wu & He (2018), BN's loss from batch {large} to {small} ({bn_drop * 100:.1f} points) is not "
                f"clearly larger than GroupNorm/LayerNorm's (up to {worst * 100:.1f}) given the seed spread "
                f"({noise * 100:.1f} points)."
            )
    if 4 in sizes and "renorm" in norms and "batch" in norms:
        renorm, bn = _mean(results, "renorm", 4), _mean(results, "batch", 4)
        if renorm is not None and bn is not None:
            gain = renorm - bn
            noise = _std(results, "renorm", 4) + _std(results, "batch", 4)
            verdict = (
                "agrees with Ioffe (2017), where Batch Renorm beat BN on micro-batches of 4 (76.5% vs 74.2%)"
                if gain > noise
                else "contradicts Ioffe (2017), where Batch Renorm beat BN on micro-batches of 4 (76.5% vs 74.2%)"
                if gain < -noise
                else "is within the seed spread: no clear gain, where Ioffe (2017) reports 76.5% vs 74.2% on "
                "micro-batches of 4"
            )
            lines.append(f"At batch 4 Batch Renorm is {gain * 100:+.1f} points against BN; this {verdict}.")
    if "ghost" in norms and "batch" in norms:
        vbs = results["config"]["virtual_batch_size"]
        above = [s for s in sizes if s > vbs]
        if above:
            diffs = {s: (_mean(results, "ghost", s) or 0.0) - (_mean(results, "batch", s) or 0.0) for s in above}
            lines.append(
                f"Ghost BN equals BN up to batch {vbs} (one virtual batch); above it, with statistics over {vbs} "
                "examples: " + ", ".join(f"batch {s} {d * 100:+.1f}" for s, d in diffs.items()) + " points against BN."
            )
    diverged = sum(row["diverged_seeds"] for rows in results["results"].values() for row in rows)
    if diverged:
        lines.append(f"{diverged} run(s) diverged and are left out of the statistics.")
    return lines


def _figures(out: Path, results: dict[str, Any]) -> list[tuple[str, str]]:
    plt = pyplot()
    captions = []
    for key, label, name in (
        ("test_accuracy", "test accuracy (selected checkpoint)", "batch_accuracy.png"),
        ("val_accuracy", "validation accuracy (selected checkpoint)", "batch_val_accuracy.png"),
    ):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for norm, rows in results["results"].items():
            error_bars(
                axis,
                [row["batch_size"] for row in rows],
                [row[key] for row in rows],
                NAMES.get(norm, norm),
                COLORS.get(norm),
            )
        axis.set_xscale("log", base=2)
        axis.set_xticks(results["batch_sizes"], [str(s) for s in results["batch_sizes"]])
        axis.set_xlabel("batch size (examples per step, log scale)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        captions.append(name)
    epochs = results["config"]["epochs"]
    return [
        (
            captions[0],
            f"Test accuracy against batch size after {epochs} epoch(s) (equal examples seen), of each run's checkpoint "
            "chosen on validation: mean over seeds, std error bars, min-max band. Ghost BN coincides with BN up to its "
            "virtual batch size (one virtual batch).",
        ),
        (captions[1], "The validation accuracy the selection saw (same runs, same checkpoints)."),
    ]


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [["batch size", "steps", "lr", *[NAMES.get(n, n) for n in results["norms"]]]]
    first = results["results"][results["norms"][0]]
    for index, size in enumerate(results["batch_sizes"]):
        row = [str(size), str(first[index]["steps"]), f"{first[index]['lr']:.4g}"]
        for norm in results["norms"]:
            cell = results["results"][norm][index]
            text = fmt_spread(cell["test_accuracy"])
            row.append(text + (f" ({cell['diverged_seeds']} diverged)" if cell["diverged_seeds"] else ""))
        rows.append(row)
    return rows


def write_report(out: Path, results: dict[str, Any]) -> Path:
    config = results["config"]
    setup = (
        f"The same network ({results['model']}, {config['act']}, init {config['init']}) with each normalization in "
        f"every hidden layer, trained for {config['epochs']} epoch(s) over the {results['n_train']} training examples "
        f"at each batch size (SGD, momentum {config['momentum']:g}, learning rate {config['base_lr']:g} x batch / "
        f"{config['reference_batch']}), seeds {', '.join(str(s) for s in results['seeds'])}. Ghost BN: virtual "
        f"batches of {config['virtual_batch_size']}; Batch Renorm: warm-up over the first "
        f"{config['renorm_warmup_fraction']:g} of each run. Data: {results['dataset']}. Each run's checkpoint is "
        "chosen on the validation split; the table gives its test accuracy, mean ± std [min-max] over seeds."
    )
    return write_page(
        out,
        "small-batch: accuracy against batch size for BN and its variants",
        setup,
        results["findings"],
        table(results),
        _figures(out, results),
        results["definitions"],
        config,
    )
