"""Faults: ``train``, ``compare`` and ``tune`` killed with SIGKILL at random moments, then resumed.

Each verb runs once uninterrupted (the reference), then again into another
folder where it is started, killed with SIGKILL after a random fraction of the
reference's running time (seeded, so every run of the test kills at the same
fractions), started again (``train --resume``; ``compare`` and ``tune`` are
simply the same command), killed again, ... and finally left to finish. The
result must be *bit-identical* to the reference: every tensor of the final
checkpoints (``torch.equal``), every metric line (only the measured speed
``steps_per_s`` differs) and, for ``compare`` and ``tune``, every number of
``results.json`` / ``tune.json`` but wall-clock seconds. After every kill the
files on disk must be readable: the checkpoint loads (written atomically)
and the metric lines are a prefix of the reference's.

The processes are the command line itself (:func:`batchnorm.cli.main`),
forked from a :mod:`multiprocessing` fork server that has imported torch,
Optuna and the package once; a fresh interpreter per start would spend about
4 s of a 2-core machine importing torch, 20 starts per verb. The always-on
test kills each verb 4 times; the ``slow`` one 20 times in a row.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from batchnorm.cli import main

TRAIN = [
    "train", "--data", "synthetic", "--model", "mlp:64-64-64-10", "--input-norm", "standardize",
    "--lr", "0.1", "--momentum", "0.9", "--batch-size", "30", "--seed", "5",
    "--steps", "600", "--eval-every", "25", "--checkpoint-every", "10", "--no-progress",
]  # fmt: skip
COMPARE = [
    "compare", "--data", "synthetic", "--model", "mlp:64-32-32-10", "--init", "normal:0.1",
    "--input-norm", "standardize", "--batch-size", "50", "--steps", "240", "--eval-every", "20", "--no-progress",
]  # fmt: skip
TUNE = [
    "tune", "--data", "synthetic", "--model", "mlp:64-32-10", "--input-norm", "standardize",
    "--grid", "lr=0.05,0.5", "--grid", "momentum=0,0.9", "--trial-steps", "60", "--steps", "200",
    "--eval-every", "20", "--no-progress",
]  # fmt: skip
# Imported once by the fork server: torch._dynamo (torch.optim imports it on first use, 4 s here) and
# matplotlib.pyplot (the reports' figures; the backend is chosen on first use, Agg).
PRELOAD = [
    "torch._dynamo",
    "batchnorm.cli",
    "batchnorm.cli.train",
    "batchnorm.cli.compare",
    "batchnorm.cli.tune",
    "matplotlib.pyplot",
    __name__,
]
JOIN_TIMEOUT = 300.0


def _child(argv: list[str], log: str) -> None:
    """The command line in a forked process, its output appended to ``log``; exits with its exit code."""
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.environ["BATCHNORM_THREADS"] = "1"
    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    # Start the server (its imports take seconds) before any run is timed.
    _run(ctx, ["--version"], tmp_path_factory.mktemp("server") / "version.log")
    return ctx


def _start(context: Any, argv: list[str], log: Path) -> Any:
    process = context.Process(target=_child, args=(argv, str(log)))
    process.start()
    return process


def _run(context: Any, argv: list[str], log: Path) -> float:
    """Run to the end; the seconds it took."""
    started = time.monotonic()
    process = _start(context, argv, log)
    process.join(JOIN_TIMEOUT)
    if process.is_alive():
        process.kill()
        process.join()
        raise AssertionError(f"{argv[0]} did not finish in {JOIN_TIMEOUT} s: {log.read_text()[-2000:]}")
    assert process.exitcode == 0, log.read_text()[-3000:]
    return time.monotonic() - started


def _kill_and_resume(
    context: Any,
    argv_for: Any,
    reference_seconds: float,
    kills: int,
    seed: int,
    log: Path,
    check: Any,
) -> int:
    """``kills`` starts, each SIGKILLed at a random moment (if still running), each followed by ``check()``;
    then one start left to finish. Returns how many kills hit a running process.

    The moment is uniform between 0 and the start-up time plus 3/``kills`` of the rest of the reference's
    time, so that the kills spread over the whole run (start-up, training, writing the results) instead of
    the run finishing after the first few of them.
    """
    rng = random.Random(seed)
    startup = _run(context, ["--version"], log)
    latest = startup + 3.0 * max(reference_seconds - startup, 0.0) / kills
    landed = 0
    for _ in range(kills):
        started = time.monotonic()
        process = _start(context, argv_for(), log)
        process.join(rng.uniform(0.0, latest))
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
            landed += 1
            print(f"killed {argv_for()[0]} after {time.monotonic() - started:.2f} s")
        process.join(JOIN_TIMEOUT)
        assert not process.is_alive()
        assert process.exitcode in (0, -signal.SIGKILL), log.read_text()[-3000:]
        check()
    _run(context, argv_for(), log)
    print(f"{landed} of {kills} kills hit a running process (reference {reference_seconds:.2f} s)")
    return landed


def _metric_lines(path: Path) -> list[dict[str, Any]]:
    """Complete metric lines without the measured speed (a line cut by a kill is left out)."""
    lines = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        entry.pop("steps_per_s", None)
        lines.append(entry)
    return lines


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(first: Any, second: Any, where: str) -> None:
    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor), where
        assert torch.equal(first, second), where
    elif isinstance(first, dict):
        assert isinstance(second, dict), where
        assert first.keys() == second.keys(), where
        for key in first:
            _assert_same_tensors(first[key], second[key], f"{where}.{key}")
    elif isinstance(first, (list, tuple)):
        assert isinstance(second, (list, tuple)), where
        assert len(first) == len(second), where
        for index, (a, b) in enumerate(zip(first, second)):
            _assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert first == second or (first != first and second != second), f"{where}: {first!r} != {second!r}"


def _assert_same_checkpoint(reference: Path, resumed: Path) -> None:
    first, second = _load(reference), _load(resumed)
    assert first["step"] == second["step"]
    for key in ("model", "optimizer", "sampler", "guard", "normalizer", "history", "running", "callbacks"):
        _assert_same_tensors(first[key], second[key], key)


def _assert_no_leftovers(folder: Path) -> None:
    """No temporary file of a save cut short is left behind once a run has finished."""
    assert not [path.name for path in folder.rglob(".checkpoint.pt.*")]


def _check_files(folder: Path, reference_metrics: list[dict[str, Any]]) -> None:
    """After a kill: the checkpoint (if any) loads, the metric lines are a prefix of the reference's."""
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists():
        step = _load(checkpoint)["step"]
        assert 0 <= step <= reference_metrics[-1]["step"]
    lines = _metric_lines(folder / "metrics.jsonl")
    assert lines == reference_metrics[: len(lines)]


def _without_seconds(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _without_seconds(item)
            for key, item in value.items()
            if key not in ("seconds", "search_seconds", "reused_runs", "resumed_from", "number", "best_trial")
        }
    if isinstance(value, list):
        return [_without_seconds(item) for item in value]
    return value


# --------------------------------------------------------------------------- the three verbs


def _train(context: Any, tmp_path: Path, kills: int, seed: int) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    seconds = _run(context, [*TRAIN, "--out", str(whole)], tmp_path / "whole.log")
    reference = _metric_lines(whole / "metrics.jsonl")

    def argv() -> list[str]:
        if (killed / "checkpoint.pt").exists():
            return ["train", "--resume", str(killed / "checkpoint.pt"), "--out", str(killed), "--no-progress"]
        return [*TRAIN, "--out", str(killed)]

    _kill_and_resume(
        context, argv, seconds, kills, seed, tmp_path / "killed.log", lambda: _check_files(killed, reference)
    )
    _assert_same_checkpoint(whole / "checkpoint.pt", killed / "checkpoint.pt")
    assert _metric_lines(killed / "metrics.jsonl") == reference
    _assert_no_leftovers(killed)


def _compare(context: Any, tmp_path: Path, kills: int, seed: int) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    seconds = _run(context, [*COMPARE, "--out", str(whole)], tmp_path / "whole.log")
    references = {arm: _metric_lines(whole / arm / "metrics.jsonl") for arm in ("bn", "no_bn")}

    def check() -> None:
        for arm, reference in references.items():
            _check_files(killed / arm, reference)
        if (killed / "results.json").exists():
            json.loads((killed / "results.json").read_text())

    _kill_and_resume(context, lambda: [*COMPARE, "--out", str(killed)], seconds, kills, seed, tmp_path / "k.log", check)
    for arm, reference in references.items():
        _assert_same_checkpoint(whole / arm / "checkpoint.pt", killed / arm / "checkpoint.pt")
        assert _metric_lines(killed / arm / "metrics.jsonl") == reference
    first = json.loads((whole / "results.json").read_text())
    second = json.loads((killed / "results.json").read_text())
    assert _without_seconds(second) == _without_seconds(first)
    _assert_no_leftovers(killed)


def _tune(context: Any, tmp_path: Path, kills: int, seed: int) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    seconds = _run(context, [*TUNE, "--out", str(whole)], tmp_path / "whole.log")
    reference = _metric_lines(whole / "final" / "metrics.jsonl")

    def check() -> None:
        if (killed / "final").exists():
            _check_files(killed / "final", reference)
        if (killed / "tune.json").exists():
            json.loads((killed / "tune.json").read_text())

    _kill_and_resume(context, lambda: [*TUNE, "--out", str(killed)], seconds, kills, seed, tmp_path / "k.log", check)
    _assert_same_checkpoint(whole / "final" / "checkpoint.pt", killed / "final" / "checkpoint.pt")
    assert _metric_lines(killed / "final" / "metrics.jsonl") == reference
    _assert_no_leftovers(killed)
    first = json.loads((whole / "tune.json").read_text())
    second = json.loads((killed / "tune.json").read_text())

    def finished(results: dict[str, Any]) -> dict[str, Any]:
        """Per grid point, its finished trial (a killed trial's retries have other numbers)."""
        return {
            json.dumps(record["params"], sort_keys=True): _without_seconds(record)
            for record in results["trials"]
            if record["state"] in ("complete", "diverged")
        }

    assert finished(second) == finished(first)
    assert len(finished(second)) == 4
    assert second["best"] == first["best"]
    for key in ("state", "steps", "val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_loss"):
        assert second["final"][key] == first["final"][key], key


VERBS = {"train": _train, "compare": _compare, "tune": _tune}


@pytest.mark.parametrize("verb", list(VERBS))
def test_killed_four_times_and_resumed_ends_bit_identical(context: Any, tmp_path: Path, verb: str) -> None:
    VERBS[verb](context, tmp_path, kills=4, seed=2016)


@pytest.mark.slow
@pytest.mark.parametrize("verb", list(VERBS))
def test_killed_twenty_times_in_a_row_and_resumed_ends_bit_identical(context: Any, tmp_path: Path, verb: str) -> None:
    VERBS[verb](context, tmp_path, kills=20, seed=1234)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_experiment_ctrl_c_says_it_starts_over_with_the_same_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The named experiments keep their runs in memory: Ctrl-C says so and gives the command, in one line."""

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("batchnorm.cli.experiment.run_experiment", interrupted)
    argv = ["experiment", "lr-sweep", "--seeds", "1", "--out", str(tmp_path / "x y")]
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "batchnorm: interrupted; experiment lr-sweep keeps no partial runs, so the same command starts it over: "
        f"batchnorm experiment lr-sweep --seeds 1 --out '{tmp_path / 'x y'}'\n"
    )
