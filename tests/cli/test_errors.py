"""Every bad command-line input of every verb: exit code 2, one line on stderr, no traceback, nothing written.

Each case runs ``batchnorm.cli.main(argv)`` in-process from inside a fresh
temporary folder (so default output folders such as ``runs/train`` land
there too). ``{tmp}`` in an argument is that folder, which holds a regular
file ``{file}`` and an empty folder ``{dir}``. After the call the folder must
hold exactly what it held before, byte for byte: no output folder, no
half-written file, the existing file untouched. Nothing may reach stdout
either: every check runs before any work (no benchmark table, no training).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from batchnorm.cli import VERBS, main
from batchnorm.cli.argtypes import MAX_PARAMETERS

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: --device cuda is valid")
LINUX_PROC = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc").is_dir(), reason="needs Linux's /proc (never writable)"
)
SYNTHETIC = ["--data", "synthetic", "--model", "mlp:64-8-10", "--no-progress"]

# (id, argv, a piece of the one-line message); {tmp}, {file} and {dir} are filled in per test.
CASES: list[tuple[str, list[str], str]] = [
    # ---- train: output folder
    ("train-out-is-a-file", ["train", *SYNTHETIC, "--out", "{file}"], "argument --out: {file} is a file, not a folder"),
    ("train-out-under-a-file", ["train", *SYNTHETIC, "--out", "{file}/x"], "{file} is a file, not a folder"),
    ("train-out-under-etc-passwd-style", ["train", "--out", "{file}/a/b/c"], "{file} is a file, not a folder"),
    ("train-out-empty", ["train", "--out", ""], "argument --out: expected a folder name"),
    # ---- train: optimizer values
    ("train-lr-1e300", ["train", "--lr", "1e300"], "argument --lr: expected a number > 0 and <= 1e+06, got '1e300'"),
    ("train-lr-inf", ["train", "--lr", "inf"], "argument --lr"),
    ("train-lr-negative", ["train", "--lr=-0.1"], "argument --lr"),
    ("train-lr-text", ["train", "--lr", "fast"], "argument --lr"),
    ("train-momentum-2", ["train", "--momentum", "2"], "argument --momentum: expected a number >= 0 and < 1"),
    ("train-momentum-1", ["train", "--momentum", "1"], "argument --momentum: expected a number >= 0 and < 1"),
    ("train-momentum-nan", ["train", "--momentum", "nan"], "argument --momentum: expected a number >= 0 and < 1"),
    ("train-momentum-negative", ["train", "--momentum=-0.5"], "argument --momentum: expected a number >= 0 and < 1"),
    ("train-weight-decay-1e300", ["train", "--weight-decay", "1e300"], "argument --weight-decay: expected a number"),
    ("train-weight-decay-negative", ["train", "--weight-decay=-1"], "argument --weight-decay"),
    ("train-weight-decay-nan", ["train", "--weight-decay", "nan"], "argument --weight-decay"),
    # ---- train: counts, seeds, threads
    ("train-batch-size-0", ["train", "--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    ("train-batch-size-float", ["train", "--batch-size", "6.5"], "argument --batch-size"),
    ("train-steps-0", ["train", "--steps", "0"], "argument --steps: expected a positive integer"),
    ("train-steps-negative", ["train", "--steps=-10"], "argument --steps"),
    ("train-eval-every-0", ["train", "--eval-every", "0"], "argument --eval-every"),
    ("train-checkpoint-every-0", ["train", "--checkpoint-every", "0"], "argument --checkpoint-every"),
    ("train-seed-negative", ["train", "--seed=-1"], "argument --seed: expected an integer from 0 to 2147483647"),
    ("train-seed-huge", ["train", "--seed", "9" * 30], "argument --seed: expected an integer from 0 to 2147483647"),
    ("train-threads-0", ["train", "--threads", "0"], "argument --threads"),
    ("train-threads-text", ["train", "--threads", "all"], "argument --threads"),
    ("train-threads-overflow", ["train", "--threads", "100000000000"], "argument --threads"),
    ("train-init-std-overflow", ["train", "--init", "normal:1e300"], "at most 100"),
    ("train-init-std-nan", ["train", "--init", "normal:nan"], "standard deviation"),
    # ---- train: --device (the same argtype in compare, tune, explain and bench)
    ("train-device-bogus", ["train", "--device", "bogus"], "argument --device: expected auto, cpu, cuda or cuda:N"),
    ("train-device-cuda-no-index", ["train", "--device", "cuda:"], "argument --device: expected auto, cpu, cuda"),
    ("train-device-index-beyond", ["train", "--device", "cuda:4096"], "argument --device: 'cuda:4096': "),
    # ---- train: model, normalization variants, validation split
    (
        "train-model-too-many-parameters",
        ["train", "--model", "mlp:784-100000000-10"],
        f"argument --model: 7.99e+10 parameters, more than the limit of {MAX_PARAMETERS:.0e}",
    ),
    (
        "train-model-batch-too-big-for-memory",
        ["train", *SYNTHETIC, "--model", "mlp:64-1000000-10", "--batch-size", "10000000"],
        "with --batch-size 10000000: about",
    ),
    ("train-model-unknown-kind", ["train", "--model", "resnet:50"], "argument --model: unknown model spec"),
    ("train-model-zero-width", ["train", "--model", "mlp:784-0-10"], "widths must be positive"),
    ("train-rmax-1e300", ["train", "--rmax", "1e300"], "argument --rmax: expected a number <= 1e+06"),
    ("train-rmax-below-1", ["train", *SYNTHETIC, "--rmax", "0.5"], "--rmax must be a finite number >= 1"),
    ("train-dmax-inf", ["train", "--dmax", "inf"], "argument --dmax"),
    ("train-groups-0", ["train", "--groups", "0"], "argument --groups"),
    ("train-virtual-batch-0", ["train", "--virtual-batch-size", "0"], "argument --virtual-batch-size"),
    ("train-val-fraction-0.9", ["train", "--val-fraction", "0.9"], "argument --val-fraction"),
    ("train-init-bad", ["train", *SYNTHETIC, "--init", "normal:-1"], "the standard deviation must be positive"),
    # ---- compare
    ("compare-out-is-a-file", ["compare", "--out", "{file}"], "argument --out: {file} is a file, not a folder"),
    ("compare-out-under-a-file", ["compare", "--out", "{file}/run"], "{file} is a file, not a folder"),
    ("compare-lr-1e300", ["compare", "--lr", "1e300"], "argument --lr: expected a number > 0 and <= 1e+06"),
    ("compare-momentum-1.5", ["compare", "--momentum", "1.5"], "argument --momentum"),
    ("compare-seeds-0", ["compare", "--seeds", "0"], "argument --seeds: expected a positive integer"),
    ("compare-seeds-huge", ["compare", "--seeds", "10" * 10], "argument --seeds: expected a positive integer <= 1000"),
    ("compare-model-huge", ["compare", "--model", "cnn:1-100000-100000-10"], "argument --model: 9e+10 parameters"),
    ("compare-device-gpu", ["compare", "--device", "gpu"], "argument --device: expected auto, cpu, cuda or cuda:N"),
    # ---- explain (its --html is another change's; these are the shared model options and its own counts)
    (
        "explain-model-313-gb",
        ["explain", "--model", "mlp:784-100000000-10"],
        "argument --model: 7.99e+10 parameters, more than the limit of 1e+09",
    ),
    ("explain-model-bad-width", ["explain", "--model", "mlp:784-x-10"], "width 'x' is not an integer"),
    ("explain-batch-size-0", ["explain", "--batch-size", "0"], "argument --batch-size"),
    (
        "explain-unit-out-of-range",
        ["explain", *SYNTHETIC[:4], "--layer", "bn1", "--unit", "99"],
        "unit 99 is out of range",
    ),
    ("explain-rmax-1e300", ["explain", "--rmax", "1e300"], "argument --rmax"),
    ("explain-seed-negative", ["explain", "--seed", "-1"], "argument --seed"),
    ("explain-device-mps", ["explain", "--device", "mps"], "argument --device: expected auto, cpu, cuda or cuda:N"),
    # ---- tune
    ("tune-out-under-a-file", ["tune", "--grid", "lr=0.1", "--out", "{file}/x"], "{file} is a file, not a folder"),
    ("tune-out-is-a-file", ["tune", "--grid", "lr=0.1", "--out", "{file}"], "{file} is a file, not a folder"),
    ("tune-storage-unknown-scheme", ["tune", "--grid", "lr=0.1", "--storage", "bogus://x"], "argument --storage"),
    ("tune-storage-no-url", ["tune", "--grid", "lr=0.1", "--storage", "study.db"], "argument --storage"),
    ("tune-grid-momentum-2", ["tune", *SYNTHETIC, "--grid", "momentum=0,2"], "--grid momentum: expected numbers >= 0"),
    ("tune-grid-lr-1e300", ["tune", *SYNTHETIC, "--grid", "lr=1e300"], "--grid lr: expected numbers <= 1e+06"),
    ("tune-grid-empty-value", ["tune", *SYNTHETIC, "--grid", "lr=0.1,"], "empty value"),
    ("tune-grid-unknown-option", ["tune", *SYNTHETIC, "--grid", "speed=1"], "unknown option 'speed'"),
    ("tune-no-grid", ["tune", *SYNTHETIC], "give at least one --grid"),
    ("tune-jobs-0", ["tune", "--jobs", "0"], "argument --jobs"),
    ("tune-trial-steps-0", ["tune", "--trial-steps", "0"], "argument --trial-steps"),
    ("tune-momentum-2", ["tune", "--momentum", "2"], "argument --momentum"),
    ("tune-device-bogus", ["tune", "--grid", "lr=1", "--device", "bogus"], "argument --device: expected auto, cpu"),
    # ---- report
    ("report-missing-folder", ["report", "{tmp}/nothing"], "argument run_dir: {tmp}/nothing does not exist"),
    ("report-a-file", ["report", "{file}"], "argument run_dir: {file} is a file, not a folder"),
    ("report-wrong-folder", ["report", "{dir}"], "results.json does not exist"),
    ("report-no-folder", ["report"], "the following arguments are required: run_dir"),
    # ---- bench: everything refused before the first timing
    ("bench-json-missing-folder", ["bench", "--json", "/nonexistent-dir/x.json"], "/nonexistent-dir does not exist"),
    ("bench-json-under-a-file", ["bench", "--json", "{file}/x.json"], "the folder {file} is a file, not a folder"),
    ("bench-json-a-folder", ["bench", "--json", "{dir}"], "argument --json: {dir} is a folder; give a file name"),
    ("bench-out-is-a-file", ["bench", "--out", "{file}"], "argument --out: {file} is a file, not a folder"),
    ("bench-shape-too-big", ["bench", "--shapes", "dense:100000x100000000"], "more than half of this machine's memory"),
    ("bench-shape-zero", ["bench", "--shapes", "dense:0x4"], "argument --shapes: expected positive sizes"),
    ("bench-shape-bad-layout", ["bench", "--shapes", "nhwc:1x2x3x4"], "argument --shapes: expected a layout"),
    ("bench-block-ms-0", ["bench", "--block-ms", "0"], "argument --block-ms: expected a number of milliseconds > 0"),
    ("bench-block-ms-nan", ["bench", "--block-ms", "nan"], "argument --block-ms"),
    ("bench-device-unknown", ["bench", "--device", "tpu"], "argument --device: expected auto, cpu, cuda or cuda:N"),
    ("bench-device-negative-index", ["bench", "--device", "cuda:-1"], "argument --device: expected auto, cpu, cuda"),
    ("bench-device-index-beyond", ["bench", "--device", "cuda:4096"], "argument --device: 'cuda:4096': "),
    ("bench-repeats-0", ["bench", "--repeats", "0"], "argument --repeats"),
    ("bench-dtype-unknown", ["bench", "--dtype", "int8"], "argument --dtype"),
    # ---- fold and recalibrate: the output is checked before the checkpoint is read
    ("fold-out-under-a-file", ["fold", "{tmp}/c.pt", "--out", "{file}/x.pt2"], "the folder {file} is a file"),
    ("fold-out-exists", ["fold", "{tmp}/c.pt", "--out", "{file}"], "exists; pass --force to overwrite it"),
    ("fold-out-a-folder", ["fold", "{tmp}/c.pt", "--out", "{dir}"], "is a folder; give a file name"),
    (
        "fold-out-missing-folder",
        ["fold", "{tmp}/c.pt", "--out", "{tmp}/no/x.pt2"],
        "the folder {tmp}/no does not exist",
    ),
    ("fold-missing-checkpoint", ["fold", "{tmp}/c.pt", "--out", "{tmp}/x.pt2"], "does not exist"),
    ("fold-tolerance-0", ["fold", "{tmp}/c.pt", "--tolerance", "0"], "argument --tolerance"),
    ("recalibrate-out-under-a-file", ["recalibrate", "{tmp}/c.pt", "--out", "{file}/x.pt"], "is a file, not a folder"),
    ("recalibrate-out-exists", ["recalibrate", "{tmp}/c.pt", "--out", "{file}"], "exists; pass --force"),
    ("recalibrate-seed-negative", ["recalibrate", "{tmp}/c.pt", "--seed=-4"], "argument --seed"),
    ("recalibrate-batch-size-0", ["recalibrate", "{tmp}/c.pt", "--batch-size", "0"], "argument --batch-size"),
    ("recalibrate-batches-0", ["recalibrate", "{tmp}/c.pt", "--batches", "0"], "argument --batches"),
    # ---- experiment
    ("experiment-out-is-a-file", ["experiment", "lr-sweep", "--out", "{file}"], "{file} is a file, not a folder"),
    ("experiment-lrs-1e300", ["experiment", "lr-sweep", "--lrs", "0.1,1e300"], "argument --lrs: expected a number"),
    ("experiment-seeds-0", ["experiment", "lr-sweep", "--seeds", "0"], "argument --seeds"),
    ("experiment-threshold-1", ["experiment", "lr-sweep", "--threshold", "1"], "argument --threshold"),
    ("experiment-seed-negative", ["experiment", "lr-sweep", "--seed=-1"], "argument --seed"),
    ("experiment-unknown", ["experiment", "everything"], "argument NAME: invalid choice"),
    # ---- no verb of that name
    ("unknown-verb", ["frobnicate"], "invalid choice: 'frobnicate'"),
]

# Where torch.cuda.is_available() is False (skipped where a GPU makes --device cuda valid).
NO_CUDA_MESSAGE = "argument --device: 'cuda': CUDA is not available here (torch.cuda.is_available() is False)"
NO_CUDA_CASES: list[tuple[str, list[str], str]] = [
    ("train-device-cuda-unavailable", ["train", *SYNTHETIC, "--device", "cuda"], NO_CUDA_MESSAGE),
    ("train-device-cuda-0-unavailable", ["train", "--device", "cuda:0"], "argument --device: 'cuda:0': CUDA is not"),
    ("compare-device-cuda-unavailable", ["compare", "--device", "cuda"], NO_CUDA_MESSAGE),
    ("tune-device-cuda-unavailable", ["tune", "--grid", "lr=1", "--device", "cuda"], NO_CUDA_MESSAGE),
    ("explain-device-cuda-unavailable", ["explain", "--device", "cuda"], NO_CUDA_MESSAGE),
    ("bench-device-cuda-unavailable", ["bench", "--device", "cuda"], NO_CUDA_MESSAGE),
]

PROC_CASES: list[tuple[str, list[str], str]] = [
    ("train-out-unwritable", ["train", "--out", "/proc/batchnorm-test/run"], "the folder /proc is not writable"),
    ("compare-out-unwritable", ["compare", "--out", "/proc/batchnorm-test"], "the folder /proc is not writable"),
    ("tune-out-unwritable", ["tune", "--grid", "lr=1", "--out", "/proc/x/y"], "the folder /proc is not writable"),
    ("report-unwritable", ["report", "/proc"], "the folder /proc is not writable"),
    ("bench-json-unwritable", ["bench", "--json", "/proc/bench.json"], "the folder /proc is not writable"),
    ("fold-out-unwritable", ["fold", "{tmp}/c.pt", "--out", "/proc/x.pt2"], "the folder /proc is not writable"),
    (
        "experiment-out-unwritable",
        ["experiment", "small-batch", "--out", "/proc/e"],
        "the folder /proc is not writable",
    ),
]

ALL_CASES = (
    [pytest.param(argv, message, id=name) for name, argv, message in CASES]
    + [pytest.param(argv, message, id=name, marks=LINUX_PROC) for name, argv, message in PROC_CASES]
    + [pytest.param(argv, message, id=name, marks=NO_CUDA) for name, argv, message in NO_CUDA_CASES]
)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: file contents, or None for a folder."""
    return {str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None) for path in root.rglob("*")}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "file.txt").write_text("keep me\n")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BATCHNORM_DEBUG", raising=False)
    return tmp_path


def _fill(text: str, tmp: Path) -> str:
    return text.format(tmp=tmp, file=tmp / "file.txt", dir=tmp / "empty")


def test_every_verb_has_bad_input_cases() -> None:
    covered = {argv[0] for _, argv, _ in CASES}
    assert set(VERBS) <= covered, f"verbs without bad-input cases: {sorted(set(VERBS) - covered)}"
    every = CASES + PROC_CASES + NO_CUDA_CASES
    assert len({name for name, _, _ in every}) == len(every), "duplicate case ids"


@pytest.mark.parametrize(("argv", "message"), ALL_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    argv: list[str], message: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(workdir)
    code = main([_fill(arg, workdir) for arg in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].strip(), err
    assert lines[0].startswith("batchnorm"), err
    assert _fill(message, workdir) in lines[0]
    assert out == "", f"work started before the error: {out!r}"
    assert _snapshot(workdir) == before, "the failed command created or changed files"
    assert not Path("/nonexistent-dir").exists()
    assert not Path("/proc/batchnorm-test").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a 0o500 folder anyway")
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--out", "{locked}/run"],
        ["compare", "--out", "{locked}/run"],
        ["tune", "--grid", "lr=1", "--out", "{locked}"],
        ["bench", "--json", "{locked}/bench.json"],
        ["report", "{locked}"],
        ["experiment", "lr-sweep", "--out", "{locked}/e"],
    ],
    ids=["train", "compare", "tune", "bench", "report", "experiment"],
)
def test_read_only_folder_is_refused(argv: list[str], workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main([arg.format(locked=locked) for arg in argv])
        out, err = capsys.readouterr()
        assert code == 2, (out, err)
        assert len(err.splitlines()) == 1, err
        assert f"the folder {locked} is not writable" in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
