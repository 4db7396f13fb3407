"""argparse types for the command line, and :class:`UsageError`.

Named ``argtypes`` rather than ``types``: no module of the package shares a
standard-library module's name.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "DEVICE_HELP",
    "MAX_PARAMETERS",
    "MAX_RATE",
    "MAX_SEED",
    "MAX_THREADS",
    "UsageError",
    "argument_type",
    "at_most",
    "check_model_size",
    "check_output_dir",
    "check_output_file",
    "comma_separated",
    "device",
    "existing_dir",
    "fraction",
    "learning_rate",
    "memory_limit_bytes",
    "model_spec",
    "momentum",
    "non_negative_float",
    "output_dir",
    "output_file",
    "positive_float",
    "positive_int",
    "seed",
    "seed_count",
    "storage_url",
    "threads",
    "weight_decay",
]

# Documented limits of the command line (README "Reliability"; each message names its option and range).
MAX_RATE = 1e6  # --lr, --weight-decay: far beyond any useful value, far below float32's overflow (3.4e38)
MAX_SEED = 2**31 - 1  # --seed: leaves room for seed + K (compare --seeds K) within numpy's and torch's seeds
MAX_THREADS = 1024  # --threads
MAX_SEEDS = 1000  # --seeds K of compare and experiment
MAX_RENORM_LIMIT = 1e6  # --rmax, --dmax (1e300 overflows float32 in torch)
MAX_PARAMETERS = 10**9  # --model: parameters of the network (about 16 GB to train in float32 with SGD momentum)
IMAGE_SIDE = 28  # the largest built-in images (MNIST): the activation estimate of a cnn spec

T = TypeVar("T")


class UsageError(Exception):
    """A user mistake: printed as one line on stderr, exit code 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 0.5] (a share of the training split)."""
    value = non_negative_float(text)
    if value > 0.5:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 0.5, got {text!r}")
    return value


def argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a library parser: its ``ValueError`` message becomes argparse's error, word for word."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def comma_separated(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """argparse type: a comma-separated list, each non-empty part passed through ``convert``."""

    def parse(text: str) -> list[Any]:
        return [convert(part.strip()) for part in text.split(",") if part.strip()]

    return parse


# --------------------------------------------------------------------------- numbers in a range


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def learning_rate(text: str) -> float:
    """argparse type: a learning rate, > 0 and <= :data:`MAX_RATE` (1e6; 1e300 overflows float32 in torch)."""
    value = positive_float(text)
    if value > MAX_RATE:
        raise argparse.ArgumentTypeError(f"expected a number > 0 and <= {MAX_RATE:g}, got {text!r}")
    return value


def weight_decay(text: str) -> float:
    """argparse type: an L2 penalty, >= 0 and <= :data:`MAX_RATE` (1e6)."""
    value = non_negative_float(text)
    if value > MAX_RATE:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 and <= {MAX_RATE:g}, got {text!r}")
    return value


def momentum(text: str) -> float:
    """argparse type: SGD momentum, in [0, 1) (1 or more never forgets a gradient and grows without bound)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 and < 1 (SGD momentum), got {text!r}")
    return value


def _integer_between(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {text!r}")
    return value


def at_most(convert: Callable[[str], float], high: float) -> Callable[[str], float]:
    """argparse type: ``convert``, then refuse a value above ``high`` (``convert``'s own checks and messages first)."""

    def parse(text: str) -> float:
        value = convert(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"expected a number <= {high:g}, got {text!r}")
        return value

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def seed_count(text: str) -> int:
    """argparse type: how many seeds, 1 to :data:`MAX_SEEDS`."""
    value = positive_int(text)
    if value > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"expected a positive integer <= {MAX_SEEDS}, got {text!r}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed, 0 to :data:`MAX_SEED` (2**31 - 1)."""
    return _integer_between(text, 0, MAX_SEED)


def threads(text: str) -> int:
    """argparse type: CPU threads, 1 to :data:`MAX_THREADS`."""
    return _integer_between(text, 1, MAX_THREADS)


DEVICE_HELP = (
    "where the network and the data live: auto (default: CUDA when torch.cuda.is_available(), else the CPU), "
    "cpu, cuda (the current CUDA device) or cuda:N (device N of torch.cuda.device_count()); resolved when "
    "the command is read, so a missing GPU is an error before any work"
)


def device(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, resolved now to ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    ``auto`` is ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``.
    ``cuda`` without a usable GPU, and ``cuda:N`` with N at or beyond
    ``torch.cuda.device_count()``, are refused with one line.
    """
    import torch

    name = text.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index_text = name.partition(":")
    valid = (kind == "cpu" and not colon) or (
        kind == "cuda" and (not colon or (index_text.isascii() and index_text.isdigit()))
    )
    if not valid:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if kind == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: CUDA is not available here (torch.cuda.is_available() is False); use --device cpu or auto"
        )
    if not colon:
        return "cuda"
    index, count = int(index_text), torch.cuda.device_count()
    if index >= count:
        raise argparse.ArgumentTypeError(
            f"{text!r}: there is no CUDA device {index}; this machine has {count} (cuda:0 to cuda:{count - 1})"
        )
    return f"cuda:{index}"


STORAGE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")


def storage_url(text: str) -> str:
    """argparse type: an Optuna database URL, ``SCHEME[+DRIVER]://...`` with a scheme SQLAlchemy knows."""
    scheme, separator, rest = text.partition("://")
    if not separator or not rest or scheme.partition("+")[0].lower() not in STORAGE_SCHEMES:
        raise argparse.ArgumentTypeError(
            f"expected a database URL like postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///FILE "
            f"(schemes: {', '.join(STORAGE_SCHEMES)})"
        )
    return text


# --------------------------------------------------------------------------- sizes that fit in memory


def memory_limit_bytes() -> int:
    """Half of this machine's physical memory (16 GiB when the system does not say)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        total = 32 * 2**30
    return int(total) // 2 if total > 0 else 16 * 2**30


def _spec_footprint(kind: str, widths: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, activation values per example) of a parsed model spec (an estimate for the memory check)."""
    if kind == "mlp":
        parameters = sum((width_in + 1) * width_out for width_in, width_out in itertools.pairwise(widths))
        parameters += 4 * sum(widths[1:-1])  # gamma, beta and the running statistics
        return parameters, widths[0] + 3 * sum(widths[1:-1]) + widths[-1]
    channels, classes = widths[:-1], widths[-1]
    parameters = sum(9 * c_in * c_out + 5 * c_out for c_in, c_out in itertools.pairwise(channels))
    parameters += (channels[-1] + 1) * classes
    activations, side = channels[0] * IMAGE_SIDE**2, IMAGE_SIDE
    for width in channels[1:]:
        activations += 3 * width * side * side
        side = max(1, side // 2)
    return parameters, activations + classes


def check_model_size(text: str, batch_size: int = 1) -> None:
    """``ValueError`` when the spec ``text`` trained on ``batch_size`` examples would not fit in memory.

    Refused: more than :data:`MAX_PARAMETERS` parameters, or an estimated
    footprint (weights, gradients and momentum in float32, and the forward
    and backward activations of one batch) above half of the physical memory.
    """
    from batchnorm.lab.models import parse_spec

    spec = parse_spec(text)
    if spec.kind == "file":
        return  # the user's own network: its size is what their factory builds
    parameters, activations = _spec_footprint(spec.kind, spec.widths)
    if parameters > MAX_PARAMETERS:
        raise ValueError(
            f"--model {text}: {parameters:.3g} parameters, more than the limit of {MAX_PARAMETERS:.0e}; "
            "use smaller widths"
        )
    needed, limit = 4 * (4 * parameters + 4 * batch_size * activations), memory_limit_bytes()
    if needed > limit:
        raise ValueError(
            f"--model {text} with --batch-size {batch_size}: about {needed / 2**30:.1f} GiB to train, more than "
            f"half of this machine's memory ({limit / 2**30:.1f} GiB); use smaller widths or batches"
        )


def model_spec(text: str) -> str:
    """argparse type: a model spec that parses and fits in memory (one example); returns the text unchanged."""
    try:
        check_model_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--model {text}: ")) from None
    return text


# --------------------------------------------------------------------------- output paths


def _probe_writable(folder: Path) -> bool:
    """Whether a file can be created in the existing ``folder`` (tried for real: ``os.access`` says yes to root)."""
    try:
        probe = tempfile.mkdtemp(prefix=".batchnorm-write-check-", dir=folder)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def check_output_dir(path: Path, option: str = "--out") -> None:
    """``UsageError`` unless ``path`` is a folder the verb can create (parents included) or write into.

    Checked before any work: an existing file, a path under a file, and a
    folder that cannot be written (permissions, read-only file system) are
    refused. Nothing is created.
    """
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is a file, not a folder")
    if not _probe_writable(existing):
        raise UsageError(f"{option} {path}: the folder {existing} is not writable")


def check_output_file(path: Path, option: str = "--out", *, force: bool = True) -> None:
    """``UsageError`` unless ``path`` can be written: its folder exists and is writable, and it is not a folder.

    With ``force=False`` an existing file is refused too. Nothing is created.
    """
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    if path.exists() and not force:
        raise UsageError(f"{option} {path} exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist"
        raise UsageError(f"{option} {path}: the folder {parent} {what}")
    if not _probe_writable(parent):
        raise UsageError(f"{option} {path}: the folder {parent} is not writable")


def _strip_option(error: UsageError, option: str) -> str:
    return str(error).removeprefix(f"{option} ")


def output_dir(text: str) -> str:
    """argparse type: an output folder (see :func:`check_output_dir`); returns the text unchanged."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder name, got an empty string")
    try:
        check_output_dir(Path(text), "")
    except UsageError as error:
        raise argparse.ArgumentTypeError(_strip_option(error, "")) from None
    return text


def output_file(text: str) -> Path:
    """argparse type: an output file that may be overwritten, in an existing writable folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a file name, got an empty string")
    try:
        check_output_file(Path(text), "")
    except UsageError as error:
        raise argparse.ArgumentTypeError(_strip_option(error, "")) from None
    return Path(text)


def existing_dir(text: str) -> str:
    """argparse type: an existing, writable folder (a run folder that a verb reads and writes into)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    if not _probe_writable(path):
        raise argparse.ArgumentTypeError(f"the folder {text} is not writable")
    return text
