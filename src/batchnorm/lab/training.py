"""Training: SGD on a spec'd network, checkpoints, exact resume, and a divergence guard.

``batchnorm train`` (:mod:`batchnorm.cli.train`) reads top to bottom as
:func:`train`: load the data, fit the input normalization on the training
split, build the network, then run ``steps`` SGD steps (``torch.optim.SGD`` with learning rate, momentum and
weight decay) on shuffled mini-batches, evaluating every ``eval_every`` steps.

The training split is first cut in two (:func:`batchnorm.lab.data.split_validation`,
``val_fraction``, default 0.1, stratified and fixed): the batches come from
the rest only, the input normalization is fit on the rest only, and every
evaluation reports the validation split, on which ``tune`` selects. The test
split is evaluated every ``eval_every`` steps too (``test_eval="every"``, the
curves of ``train`` and ``compare``), or only at the last step
(``"final"``: ``tune``'s full run reports it once), or never (``"never"``:
``tune``'s trials, which must not see it).

Files written into ``--out``:

* ``metrics.jsonl``: one JSON line per evaluation (step, train loss since the
  last evaluation, validation loss and accuracy, test loss and accuracy when
  the test split was evaluated, steps/s);
* ``checkpoint.pt``: model, optimizer, sampler and guard state plus the
  config (with ``val_fraction``), the input normalization and the last
  evaluation's metrics (``last_eval``, with the validation accuracy), written atomically (temporary file, then
  rename) every ``checkpoint_every`` steps and at the end; always read with
  ``torch.load(..., weights_only=True)``.

``--resume CKPT`` continues exactly where the checkpoint stopped: the same
batches in the same order, the same optimizer state, the same partial
training-loss sum, evaluation history and callback state (see
:class:`StepCallback`), so a run killed at any moment and resumed ends with
bit-identical weights and metrics to an uninterrupted run. Stale temporary
files of a save cut short by a kill are removed when a run starts.

Changed settings on resume (``overrides``): the optimizer's learning rate,
momentum and weight decay, the evaluation and checkpoint intervals and the
guard are applied from the next step on, each announced in one line
(:func:`resume_changes`: ``resuming with lr 0.1 (checkpoint had 0.5)``).
Everything that defines the data, the batches or the network (model, data,
seed, batch size, init, input normalization, validation split, norm
parameters) is refused with a :class:`CheckpointError`: a resumed run keeps
them. A checkpoint already at (or past) ``steps`` trains nothing: the result
has ``nothing_to_do`` set and the history stored in the checkpoint.

Ctrl-C (SIGINT) during the training loop finishes the current step, saves a
checkpoint of that state (atomically) and raises :class:`TrainingInterrupted`
(a ``KeyboardInterrupt``) naming the step and the checkpoint; a second Ctrl-C
stops at once, keeping the previous checkpoint.
A checkpoint written before the validation split existed (its config has no
``val_fraction``) resumes with ``val_fraction=0``: it keeps training on the
whole training split it started on, and reports no validation metrics.

The divergence guard stops a run whose loss is not finite, whose smoothed
loss rises far above its best, or whose weight norm leaves its recent history
by a large factor. The last good checkpoint is kept, ``metrics.jsonl`` keeps
every evaluation made before and gains one last line with the step, the mean
training loss since the last evaluation and the reason (``"diverged"``), and
the command exits with code 3.

Device (``device``, ``--device``): the network, the data tensors (training,
validation and test images and labels), the input normalization and every
evaluation live on it; the batch sampler's generator stays on the CPU, so a
run draws the same batches on any device. Each ``metrics.jsonl`` line and the
checkpoint record the device (``"device": "cpu"``). The device is not part of
the run's settings: checkpoints are saved as they are and always loaded onto
the CPU first (``map_location="cpu"``), then moved, so a run may resume on
another device than it started on. A distributed run uses each rank's own
device (:mod:`batchnorm.lab.distributed`).

Threads: one by default (see ``--threads``). On these small networks a
second thread gains little, and under contention from another process
OpenMP spin-waiting made two-thread steps 4x to 200x slower.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchnorm.functional import check_nonfinite
from batchnorm.lab.data import (
    DATASETS,
    DEFAULT_VAL_FRACTION,
    INPUT_NORMS,
    Dataset,
    InputNormalizer,
    load_dataset,
    split_validation,
)
from batchnorm.lab.distributed import Distributed
from batchnorm.lab.files import write_text_atomically
from batchnorm.lab.models import (
    ACTIVATIONS,
    BATCH_STATISTICS_NORMS,
    DEFAULT_DMAX,
    DEFAULT_GROUPS,
    DEFAULT_RENORM_WARMUP,
    DEFAULT_RMAX,
    DEFAULT_VIRTUAL_BATCH_SIZE,
    NORMS,
    PLACEMENTS,
    NormOptions,
    build_model,
    parse_init,
    parse_spec,
)

__all__ = [
    "CheckpointError",
    "DivergenceError",
    "DivergenceGuard",
    "RESUME_CHANGEABLE",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "check_same_model",
    "config_from_checkpoint",
    "evaluate",
    "load_checkpoint",
    "model_from_checkpoint",
    "resolve_device",
    "resume_changes",
    "train",
]

CHECKPOINT_FORMAT = "batchnorm-checkpoint"
CHECKPOINT_VERSION = 1
EXIT_DIVERGED = 3
TEST_EVALS = ("every", "final", "never")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a :class:`torch.device` (None is the CPU; a bare ``cuda`` gets the current CUDA device's index).

    Raises:
        ValueError: CUDA asked for but not available, or an index beyond the device count.
    """
    resolved = torch.device("cpu" if device is None else device)
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise ValueError(f"device {resolved}: CUDA is not available here (torch.cuda.is_available() is False)")
    index: int | None = resolved.index  # None for a bare "cuda" (torch's stubs say int)
    if index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {resolved}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


class DivergenceError(RuntimeError):
    """Training diverged; the message says why and where the last good checkpoint is."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another model."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; says at which step and where the last checkpoint is.

    Attributes:
        step: the last step completed.
        checkpoint: the checkpoint file (None when the run writes none).
        checkpoint_step: the step that checkpoint holds (None without one).
        run: the run's description (``train``, ``bn``, ``final``, ...).
    """

    def __init__(self, step: int, checkpoint: Path | None, checkpoint_step: int | None, run: str = "train") -> None:
        super().__init__(step, checkpoint, checkpoint_step, run)
        self.step = step
        self.checkpoint = checkpoint
        self.checkpoint_step = checkpoint_step
        self.run = run

    def __str__(self) -> str:
        where = (
            f"last checkpoint {self.checkpoint} (step {self.checkpoint_step})"
            if self.checkpoint is not None
            else "this run writes no checkpoint"
        )
        return f"interrupted at step {self.step}; {where}"


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint."""

    model: str = "mlp:784-100-100-100-10"
    act: str = "sigmoid"
    norm: str = "batch"
    placement: str = "before"
    init: str = "default"
    data: str = "mnist5k"
    data_dir: str | None = None
    input_norm: str = "minmax"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 60
    steps: int = 2000
    eval_every: int = 250
    checkpoint_every: int = 500
    seed: int = 0
    guard: bool = True
    guard_loss_factor: float = 4.0
    guard_norm_factor: float = 100.0
    val_fraction: float = DEFAULT_VAL_FRACTION
    groups: int = DEFAULT_GROUPS
    virtual_batch_size: int = DEFAULT_VIRTUAL_BATCH_SIZE
    rmax: float = DEFAULT_RMAX
    dmax: float = DEFAULT_DMAX
    renorm_warmup: int = DEFAULT_RENORM_WARMUP

    def norm_options(self) -> NormOptions:
        """The parameters of the normalization variants, as :func:`build_model` takes them."""
        return NormOptions(
            groups=self.groups,
            virtual_batch_size=self.virtual_batch_size,
            rmax=self.rmax,
            dmax=self.dmax,
            renorm_warmup=self.renorm_warmup,
        )

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message for any out-of-range setting."""
        parse_spec(self.model)
        parse_init(self.init)
        for option, value, allowed in (
            ("--act", self.act, ACTIVATIONS),
            ("--norm", self.norm, NORMS),
            ("--placement", self.placement, PLACEMENTS),
            ("--data", self.data, DATASETS),
            ("--input-norm", self.input_norm, INPUT_NORMS),
        ):
            if value not in allowed:
                raise ValueError(f"{option}: expected one of {', '.join(allowed)}, got {value!r}")
        for option, number in (("--lr", self.lr), ("--momentum", self.momentum), ("--weight-decay", self.weight_decay)):
            if not (math.isfinite(number) and number >= 0):
                raise ValueError(f"{option} must be a finite number >= 0, got {number}")
        if not (math.isfinite(self.val_fraction) and 0.0 <= self.val_fraction <= 0.5):
            raise ValueError(f"--val-fraction must be between 0 and 0.5, got {self.val_fraction}")
        if self.groups < 1:
            raise ValueError(f"--groups must be a positive integer, got {self.groups}")
        if not (math.isfinite(self.rmax) and self.rmax >= 1):
            raise ValueError(f"--rmax must be a finite number >= 1, got {self.rmax}")
        if not (math.isfinite(self.dmax) and self.dmax >= 0):
            raise ValueError(f"--dmax must be a finite number >= 0, got {self.dmax}")
        if self.renorm_warmup < 0:
            raise ValueError(f"--renorm-warmup must be an integer >= 0, got {self.renorm_warmup}")
        if self.virtual_batch_size < 1:
            raise ValueError(f"--virtual-batch-size must be a positive integer, got {self.virtual_batch_size}")
        if self.lr == 0:
            raise ValueError("--lr must be > 0, got 0")
        for option, integer in (
            ("--batch-size", self.batch_size),
            ("--steps", self.steps),
            ("--eval-every", self.eval_every),
            ("--checkpoint-every", self.checkpoint_every),
        ):
            if integer < 1:
                raise ValueError(f"{option} must be a positive integer, got {integer}")
        if self.norm in BATCH_STATISTICS_NORMS and self.batch_size < 2:
            raise ValueError(
                f"--batch-size must be at least 2 with --norm {self.norm} (BN needs 2 values per statistic)"
            )
        if self.norm == "ghost" and parse_spec(self.model).kind == "mlp":
            size, remainder = self.virtual_batch_size, self.batch_size % self.virtual_batch_size
            if size < 2 or (remainder == 1 and self.batch_size > size):
                raise ValueError(
                    f"--virtual-batch-size {size} with --batch-size {self.batch_size} leaves a virtual batch of "
                    "one example (a dense layer's BN needs 2 values per statistic)"
                )

    def model_identity(self) -> dict[str, str]:
        """The fields that define the architecture (a checkpoint must match them)."""
        return {"model": str(parse_spec(self.model)), "act": self.act, "norm": self.norm, "placement": self.placement}


class StepCallback(Protocol):
    """Optional hooks into the training loop (used by the experiments to record statistics).

    A callback that also has ``state_dict()`` (plain lists, dicts and
    numbers) and ``load_state_dict(state)`` has its state saved in every
    checkpoint and restored on resume, so that what it records is the same as
    in an uninterrupted run.
    """

    def before_step(self, step: int, model: nn.Module) -> None: ...

    def after_step(self, step: int, model: nn.Module, loss: float) -> None: ...

    def on_eval(self, step: int, model: nn.Module, metrics: dict[str, float]) -> None: ...


@dataclass
class TrainResult:
    """What a run produced: the evaluation history and where its files are."""

    config: TrainConfig
    steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    test_steps: list[int] = field(default_factory=list)
    final_step: int = 0
    seconds: float = 0.0  # training time of the whole run, summed over resumed sessions
    checkpoint: Path | None = None
    model: nn.Module | None = None
    nothing_to_do: bool = False
    resumed_from: int | None = None
    device: str = "cpu"  # where this session trained (``cuda:0``, ...)

    @property
    def final_accuracy(self) -> float:
        """The last test accuracy (NaN when the test split was not evaluated)."""
        return self.test_accuracy[-1] if self.test_accuracy else float("nan")

    @property
    def final_val_accuracy(self) -> float:
        """The last validation accuracy (NaN without a validation split)."""
        return self.val_accuracy[-1] if self.val_accuracy else float("nan")


class DivergenceGuard:
    """Stops a run that is blowing up.

    Trips when (a) a loss is NaN or infinite; (b) the exponential moving
    average of the loss (weight 0.1 on the newest step) exceeds
    ``loss_factor`` times its best value plus 1 (the +1 keeps a late-training
    loss of 0.02 rising to 0.1 from counting); (c) the global L2 norm of the
    parameters, checked every 10 steps, is not finite or exceeds
    ``norm_factor`` times the median of its last 20 checks.
    """

    def __init__(self, loss_factor: float = 4.0, norm_factor: float = 100.0) -> None:
        self.loss_factor = loss_factor
        self.norm_factor = norm_factor
        self.smoothed: float | None = None
        self.best: float = math.inf
        self.norms: list[float] = []

    def check_loss(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise DivergenceError(f"training diverged at step {step}: the loss is {loss}")
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        self.best = min(self.best, self.smoothed)
        limit = self.loss_factor * self.best + 1.0
        if self.smoothed > limit:
            raise DivergenceError(
                f"training diverged at step {step}: the smoothed loss {self.smoothed:.4g} is far above its best "
                f"{self.best:.4g} (limit {limit:.4g})"
            )

    def check_weights(self, step: int, model: nn.Module) -> None:
        with torch.no_grad():
            norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))
        if not math.isfinite(norm):
            raise DivergenceError(f"training diverged at step {step}: the weight norm is {norm}")
        if len(self.norms) >= 3:
            typical = sorted(self.norms)[len(self.norms) // 2]
            if norm > self.norm_factor * typical:
                raise DivergenceError(
                    f"training diverged at step {step}: the weight norm {norm:.4g} is more than "
                    f"{self.norm_factor:g}x its recent median {typical:.4g}"
                )
        self.norms = [*self.norms[-19:], norm]

    def state_dict(self) -> dict[str, Any]:
        return {"smoothed": self.smoothed, "best": self.best, "norms": list(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.smoothed = state["smoothed"]
        self.best = state["best"]
        self.norms = list(state["norms"])


class BatchSampler:
    """Shuffled mini-batches of a fixed size; the last incomplete batch of an epoch is dropped.

    Dropping it means every batch has ``batch_size`` examples (a leftover batch
    of one would give BN a single value per statistic). The state (generator,
    current permutation, position) is saved in checkpoints for exact resume.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if batch_size > num_examples:
            raise ValueError(f"--batch-size {batch_size} is larger than the training split ({num_examples} examples)")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.permutation = torch.randperm(num_examples, generator=self.generator)
        self.position = 0

    def next(self) -> Tensor:
        if self.position + self.batch_size > self.num_examples:
            self.permutation = torch.randperm(self.num_examples, generator=self.generator)
            self.position = 0
        indices = self.permutation[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "permutation": self.permutation, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.permutation = state["permutation"]
        self.position = int(state["position"])


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, chunk: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(images), chunk):
        logits = model(images[start : start + chunk])
        target = labels[start : start + chunk]
        total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return total_loss / len(images), correct / len(images)


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check that it is ours.

    Raises:
        CheckpointError: missing, unreadable, corrupted, or not a batchnorm checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch's own message suggests weights_only=False, which would run arbitrary code: not repeated here.
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a batchnorm checkpoint ({type(error).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a batchnorm checkpoint")
    return payload


def config_from_checkpoint(payload: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` stored in a checkpoint read by :func:`load_checkpoint` (unknown fields ignored).

    A checkpoint from before the validation split (no ``val_fraction`` in its
    config) trained on the whole training split: it gets ``val_fraction=0``.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    stored = dict(payload["config"])
    stored.setdefault("val_fraction", 0.0)
    return TrainConfig(**{k: v for k, v in stored.items() if k in known})


def model_from_checkpoint(
    path: str | Path, device: str | torch.device | None = None
) -> tuple[nn.Module, TrainConfig, InputNormalizer, dict[str, Any]]:
    """Rebuild the trained model (in eval mode), its config and input normalization from a checkpoint.

    The checkpoint is read onto the CPU whatever device wrote it; the model is
    then moved to ``device`` (default: it stays on the CPU). The input
    normalization and the returned payload stay on the CPU.
    """
    payload = load_checkpoint(path)
    config = config_from_checkpoint(payload)
    image_size = int(payload.get("image_size", 28))
    model = build_model(
        config.model,
        config.act,
        config.norm,
        config.placement,
        "default",
        image_size=image_size,
        norm_options=config.norm_options(),
    )
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not match its recorded model {config.model}: {error}") from None
    if device is not None:
        model.to(resolve_device(device))
    model.eval()
    return model, config, InputNormalizer.from_state_dict(payload["normalizer"]), payload


def check_same_model(requested: dict[str, str], stored: TrainConfig, path: str | Path) -> None:
    """Raise :class:`CheckpointError` if a checkpoint's architecture differs from the requested fields."""
    theirs = stored.model_identity()
    mine = dict(requested)
    if "model" in mine:
        mine["model"] = str(parse_spec(mine["model"]))
    differences = [f"{key} {theirs[key]} (requested {value})" for key, value in mine.items() if theirs[key] != value]
    if differences:
        raise CheckpointError(f"checkpoint {path} is of another model: {', '.join(differences)}")


# Settings a resumed run may change (applied from the next step on); every other difference is refused.
RESUME_CHANGEABLE = ("lr", "momentum", "weight_decay", "eval_every", "checkpoint_every", "guard")
HISTORY_KEYS = ("steps", "train_loss", "val_loss", "val_accuracy", "test_steps", "test_accuracy", "test_loss")


def _option(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def resume_changes(stored: TrainConfig, overrides: Mapping[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The checkpoint's config with ``overrides`` applied, and one line per changed setting.

    ``overrides`` maps :class:`TrainConfig` fields to the values the caller
    asked for explicitly (``steps`` is ignored here: it is always the new
    total). Fields in :data:`RESUME_CHANGEABLE` are applied and announced
    (``resuming with lr 0.1 (checkpoint had 0.5)``); any other field that
    differs from the checkpoint's is refused.

    Raises:
        CheckpointError: a field outside :data:`RESUME_CHANGEABLE` differs, or an unknown field.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    changes: dict[str, Any] = {}
    notes: list[str] = []
    for name, value in overrides.items():
        if name == "steps":
            continue
        if name not in known:
            raise CheckpointError(f"unknown setting {name!r}")
        before = getattr(stored, name)
        if name == "model":
            same = str(parse_spec(value)) == str(parse_spec(before))
        else:
            same = value == before
        if same:
            continue
        if name not in RESUME_CHANGEABLE:
            raise CheckpointError(
                f"{_option(name)} {_shown(value)} differs from the checkpoint's {_shown(before)}: a resumed run keeps "
                "its data, batches and network; leave the option out to resume, or start a new run in another --out"
            )
        changes[name] = value
        if name == "guard":
            notes.append(
                f"resuming with the divergence guard {'on' if value else 'off'} (checkpoint had it "
                f"{'on' if before else 'off'})"
            )
        else:
            notes.append(f"resuming with {name.replace('_', ' ')} {_shown(value)} (checkpoint had {_shown(before)})")
    return dataclasses.replace(stored, **changes), notes


def _prepare_metrics(path: Path, resume_step: int | None) -> None:
    """Start ``metrics.jsonl`` afresh, or on resume keep only lines up to the checkpoint's step (atomically)."""
    if resume_step is None or not path.exists():
        write_text_atomically(path, "")
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            if entry["step"] <= resume_step and "diverged" not in entry:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary files left by a save that a kill cut short (the real files are never partial)."""
    for pattern in (".checkpoint.pt.*", ".metrics.jsonl.part"):
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)


class _DeferredInterrupt:
    """SIGINT sets a flag that the loop checks after each step; a second SIGINT raises at once.

    ``signals`` may add SIGTERM (distributed runs: torchrun stops its workers
    with SIGTERM, also after forwarding a Ctrl-C); only a repeat of a signal
    already received raises at once. Only in the main thread (where Python
    delivers signals); elsewhere the default ``KeyboardInterrupt`` behaviour stays.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT,)) -> None:
        self.requested = False
        self._signals = signals
        self._received: set[int] = set()
        self._previous: dict[int, Any] = {}
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum in self._received:
            raise KeyboardInterrupt
        self._received.add(signum)
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        try:
            for number in self._signals:
                self._previous[number] = signal.signal(number, self._handle)
            self._installed = True
        except ValueError:  # not the main thread
            self._installed = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            for number, previous in self._previous.items():
                signal.signal(number, previous)


def train(
    config: TrainConfig,
    out_dir: str | Path | None,
    *,
    resume: str | Path | None = None,
    requested_model: dict[str, str] | None = None,
    dataset: Dataset | None = None,
    callbacks: Sequence[StepCallback] = (),
    progress: bool = True,
    description: str = "train",
    model_override: Callable[[nn.Module], nn.Module] | None = None,
    test_eval: str = "every",
    overrides: Mapping[str, Any] | None = None,
    distributed: Distributed | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Run (or resume) one training run; see the module docstring.

    Args:
        config: the run's settings (validated here).
        out_dir: folder for ``metrics.jsonl`` and ``checkpoint.pt``; None
            writes nothing (used by experiments that keep results in memory).
        resume: a checkpoint to continue from; its config is used, except
            ``steps`` (the new total) and ``overrides``.
        requested_model: architecture fields the caller asked for
            explicitly (``model``, ``act``, ``norm``, ``placement``); a resumed
            checkpoint must match them.
        dataset: an already loaded dataset (must match ``config.data``),
            without a validation split: it is carved here with
            ``config.val_fraction``.
        callbacks: :class:`StepCallback` objects.
        progress: show a progress bar on stderr.
        model_override: applied to the freshly built model (e.g. swap BN
            implementations) before training.
        test_eval: when the test split is evaluated: ``"every"``
            evaluation, only the ``"final"`` one, or ``"never"``.
        overrides: on resume, settings the caller asked for explicitly
            (:func:`resume_changes`: optimizer and interval settings are
            applied, others must equal the checkpoint's).
        distributed: this process's place in a data-parallel run
            (:mod:`batchnorm.lab.distributed`): BN synchronized, DDP, this
            rank's slice of each global batch; only rank 0 evaluates, shows
            progress and writes ``out_dir``.
        device: where the model, the data tensors, the input normalization
            and the evaluations live (default the CPU; see the module
            docstring); ignored with ``distributed``, whose ``device`` is used.
            Not part of the config: a checkpoint from one device resumes on another.

    Raises:
        ValueError: invalid settings or data; :class:`CheckpointError`.
        DivergenceError: the guard tripped (last good checkpoint kept).
        TrainingInterrupted: Ctrl-C; the state after the last finished step was checkpointed.
    """
    from tqdm import tqdm

    if test_eval not in TEST_EVALS:
        raise ValueError(f"test_eval must be one of {', '.join(TEST_EVALS)}, got {test_eval!r}")
    run_device = distributed.device if distributed is not None else resolve_device(device)
    payload: dict[str, Any] | None = None
    if resume is not None:
        payload = load_checkpoint(resume)
        stored = config_from_checkpoint(payload)
        check_same_model(requested_model or {}, stored, resume)
        config, _ = resume_changes(dataclasses.replace(stored, steps=config.steps), overrides or {})
    config.validate()
    data = dataset if dataset is not None else load_dataset(config.data, config.data_dir, seed=config.seed)
    data = split_validation(data, config.val_fraction)
    spec = parse_spec(config.model)
    if spec.kind == "mlp" and spec.widths[0] != data.input_features:
        raise ValueError(
            f"model spec {config.model} expects {spec.widths[0]} input values but {data.name} images have "
            f"{data.input_features} ({data.image_size}x{data.image_size})"
        )
    if spec.kind == "cnn" and spec.widths[0] != data.train_images.shape[1]:
        raise ValueError(
            f"model spec {config.model} expects {spec.widths[0]} input channels, data has {data.train_images.shape[1]}"
        )
    # A factory's outputs are checked by a forward pass (lab.models.check_forward) instead.
    if spec.kind != "file" and spec.widths[-1] < data.num_classes:
        raise ValueError(
            f"model spec {config.model} has {spec.widths[-1]} outputs but {data.name} has {data.num_classes} classes"
        )

    torch.manual_seed(config.seed)
    model: nn.Module = build_model(
        spec,
        config.act,
        config.norm,
        config.placement,
        config.init,
        image_size=data.image_size,
        seed=config.seed,
        norm_options=config.norm_options(),
    )
    if model_override is not None:
        model = model_override(model)
    model.to(run_device)  # before the optimizer: its state (and a resumed one) follows the parameters' device
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    sampler = BatchSampler(len(data.train_images), config.batch_size, config.seed)
    guard = DivergenceGuard(config.guard_loss_factor, config.guard_norm_factor)
    start_step = 0
    running_loss, running_count = 0.0, 0
    previous_seconds = 0.0
    result = TrainResult(config=config, model=model, device=str(run_device))
    if payload is not None:
        normalizer = InputNormalizer.from_state_dict(payload["normalizer"])
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        for group in optimizer.param_groups:  # the settings of this config (changed ones applied)
            group.update(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        sampler.load_state_dict(payload["sampler"])
        guard.load_state_dict(payload["guard"])
        start_step = int(payload["step"])
        result.resumed_from = start_step
        # Older checkpoints lack these: the training loss of the first evaluation then covers fewer steps.
        running_loss, running_count = payload.get("running", (0.0, 0))
        previous_seconds = float(payload.get("seconds", 0.0))
        for key, values in (payload.get("history") or {}).items():
            if key in HISTORY_KEYS:
                getattr(result, key).extend(values)
        for callback, state in zip(callbacks, payload.get("callbacks") or []):
            if state is not None and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(state)
    else:
        normalizer = InputNormalizer.fit(config.input_norm, data.train_images)
    # The data moves to the device and is normalized there; ``normalizer`` itself stays on the CPU (checkpoints).
    normalize = normalizer.to(run_device)

    def on_device(images: Tensor) -> Tensor:
        return normalize(images.to(run_device))

    train_images, test_images = on_device(data.train_images), on_device(data.test_images)
    train_labels, test_labels = data.train_labels.to(run_device), data.test_labels.to(run_device)
    val_images = on_device(data.val_images) if data.val_images is not None else None
    val_labels = data.val_labels.to(run_device) if data.val_labels is not None else None
    last_eval: dict[str, Any] | None = payload.get("last_eval") if payload is not None else None
    forward = model
    if distributed is not None:
        model, forward = distributed.wrap(model, optimizer)
        result.model = model
        if not distributed.is_main:  # rank 0 alone evaluates, shows progress and writes files
            out_dir, progress, test_eval, val_images = None, False, "never", None

    out = Path(out_dir) if out_dir is not None else None
    checkpoint_path = out / "checkpoint.pt" if out is not None else None
    metrics_path = out / "metrics.jsonl" if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        assert metrics_path is not None
        _prepare_metrics(metrics_path, start_step if payload is not None else None)
    result.checkpoint = checkpoint_path
    started = time.perf_counter()

    def save(step: int) -> None:
        if checkpoint_path is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": dataclasses.asdict(config),
            "image_size": data.image_size,
            "step": step,
            "device": str(run_device),  # where it was written; loading always maps to the CPU first
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(),
            "guard": guard.state_dict(),
            "normalizer": normalizer.state_dict(),
            "last_eval": last_eval,
            "running": [running_loss, running_count],
            "seconds": previous_seconds + time.perf_counter() - started,
            "history": {key: list(getattr(result, key)) for key in HISTORY_KEYS},
            "callbacks": [callback.state_dict() if hasattr(callback, "state_dict") else None for callback in callbacks],
        }
        _atomic_save(state, checkpoint_path)

    if payload is None:
        save(0)
    elif start_step >= config.steps:
        # A finished run (or one past the requested --steps): nothing to train.
        result.nothing_to_do = True
        result.final_step = start_step
        if not result.steps and last_eval:  # a checkpoint from before the history was stored
            for key, target in (("val_accuracy", result.val_accuracy), ("test_accuracy", result.test_accuracy)):
                if last_eval.get(key) is not None:
                    target.append(last_eval[key])
        result.seconds = previous_seconds
        return result
    model.train()
    bar = tqdm(
        total=config.steps,
        initial=start_step,
        desc=description,
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    last_good = start_step
    step = start_step
    interrupt = _DeferredInterrupt((signal.SIGINT,) if distributed is None else (signal.SIGINT, signal.SIGTERM))
    stop_agreed = False

    def write_metrics(line: dict[str, Any]) -> None:
        if metrics_path is not None:
            with metrics_path.open("a") as stream:
                stream.write(json.dumps(line) + "\n")

    try:
        interrupt.__enter__()
        for step in range(start_step + 1, config.steps + 1):
            indices = sampler.next()
            for callback in callbacks:
                callback.before_step(step, model)
            if distributed is None:
                logits = model(train_images[indices])
                loss = F.cross_entropy(logits, train_labels[indices])
            else:
                local = distributed.shard(indices)
                loss = distributed.local_loss(forward(train_images[local]), train_labels[local], len(indices), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if distributed is None:
                loss_value = float(loss.detach())
                # A non-finite batch that a device skipped without a host check (CUDA) raises here, as it
                # would have in the forward on the CPU; reading the loss has synchronized already.
                check_nonfinite()
            else:  # the global batch's mean loss (NaN if any rank's is) and any rank's stop request
                loss_value, stop_agreed = distributed.agree_step(loss, len(indices), interrupt.requested)
            if config.guard:
                guard.check_loss(step, loss_value)
            optimizer.step()
            if config.guard and step % 10 == 0:
                if distributed is None:
                    guard.check_weights(step, model)
                else:
                    distributed.agreed(
                        functools.partial(guard.check_weights, step, model),
                        DivergenceError,
                        f"training diverged at step {step}: another rank's weight check tripped",
                    )
            for callback in callbacks:
                callback.after_step(step, model, loss_value)
            running_loss += loss_value
            running_count += 1
            bar.update(1)
            if step % config.eval_every == 0 or step == config.steps:
                metrics: dict[str, Any] = {"step": step, "train_loss": running_loss / running_count}
                shown = {"loss": f"{metrics['train_loss']:.3f}"}
                if val_images is not None and val_labels is not None:
                    val_loss, val_accuracy = evaluate(model, val_images, val_labels)
                    metrics.update(val_loss=val_loss, val_accuracy=val_accuracy)
                    result.val_loss.append(val_loss)
                    result.val_accuracy.append(val_accuracy)
                    shown["val"] = f"{val_accuracy:.3f}"
                if test_eval == "every" or (test_eval == "final" and step == config.steps):
                    test_loss, test_accuracy = evaluate(model, test_images, test_labels)
                    metrics.update(test_loss=test_loss, test_accuracy=test_accuracy)
                    result.test_steps.append(step)
                    result.test_accuracy.append(test_accuracy)
                    result.test_loss.append(test_loss)
                    shown["test"] = f"{test_accuracy:.3f}"
                elapsed = time.perf_counter() - started
                metrics["steps_per_s"] = (step - start_step) / elapsed if elapsed > 0 else 0.0
                metrics["device"] = str(run_device)
                last_eval = dict(metrics)
                running_loss, running_count = 0.0, 0
                result.steps.append(step)
                result.train_loss.append(metrics["train_loss"])
                bar.set_postfix(shown)
                write_metrics(metrics)
                for callback in callbacks:
                    callback.on_eval(step, model, metrics)
            if step % config.checkpoint_every == 0 or step == config.steps:
                save(step)
                last_good = step
            if interrupt.requested if distributed is None else stop_agreed:
                if last_good != step:
                    save(step)
                    last_good = step
                raise TrainingInterrupted(
                    step, checkpoint_path, last_good if checkpoint_path is not None else None, description
                )
    except DivergenceError as error:
        where = f"; last good checkpoint: {checkpoint_path} (step {last_good})" if checkpoint_path else ""
        message = f"{error}{where}"
        write_metrics(
            {
                "step": step,
                "train_loss": running_loss / running_count if running_count else None,
                "diverged": message,
            }
        )
        raise DivergenceError(message) from None
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step: the previous checkpoint stays
        raise TrainingInterrupted(
            step - 1 if step > start_step else start_step,
            checkpoint_path,
            last_good if checkpoint_path is not None else None,
            description,
        ) from None
    finally:
        interrupt.__exit__()
        bar.close()
    result.final_step = config.steps
    result.seconds = previous_seconds + time.perf_counter() - started
    return result
