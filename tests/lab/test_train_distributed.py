"""``batchnorm train --distributed``: 2 processes over gloo on loopback against the single-process run.

The reference is independent of the code under test: the plain one-process
``batchnorm train`` with the same (global) batch size, whose BN is an
ordinary layer and whose loss is the batch mean. The distributed run (BN
converted to SyncBatchNorm, DDP, each rank a slice of every batch) must end
with the same weights and running statistics (1e-6, float32) and the same
metrics.

Each rank is a process forked from a fork server that imported torch and
batchnorm once, with torchrun's environment variables set (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), running ``batchnorm.cli.main`` exactly as
``torchrun ... -m batchnorm train --distributed`` would; each rank runs in a
folder of its own with a relative ``--out``, so what a rank writes shows.
Every launch runs under a deadline and kills what is left: nothing can hang.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from batchnorm.cli import main
from batchnorm.lab.distributed import ENV_VARS, NAN_HOOK_ENV

DEADLINE_S = 90.0
WORLD = 2
STEPS = 20
COMMON = [
    "train",
    "--data",
    "synthetic",
    "--model",
    "mlp:64-16-16-10",
    "--lr",
    "0.2",
    "--eval-every",
    "5",
    "--checkpoint-every",
    "10",
    "--no-progress",
]


def _context() -> Any:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["torch", "torch.distributed", "batchnorm.cli.train", "batchnorm.lab.report", "tqdm", "matplotlib.pyplot"]
    )
    return context


def _rank(argv: list[str], env: dict[str, str], folder: str) -> None:
    """One rank: torchrun's environment, its own folder, ``batchnorm ARGV``; exits with its exit code."""
    code = 1
    try:
        os.environ.update(env)
        os.chdir(folder)
        with open("stdout.txt", "w") as out, open("stderr.txt", "w") as err:
            sys.stdout, sys.stderr = out, err
            try:
                code = main(argv)
            finally:
                out.flush()
                err.flush()
    except BaseException:
        Path(folder, "error.txt").write_text(traceback.format_exc())
    finally:
        os._exit(code)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(root: Path, argv: list[str], extra_env: dict[str, str] | None = None) -> list[int | None]:
    """Run ``batchnorm ARGV`` as WORLD ranks in ``root/rank{r}``; their exit codes (None: killed at the deadline)."""
    port = str(_free_port())
    context = _context()
    processes = []
    for rank in range(WORLD):
        folder = root / f"rank{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "GLOO_SOCKET_IFNAME": "lo" if Path("/sys/class/net/lo").exists() else "",
            **(extra_env or {}),
        }
        if not env["GLOO_SOCKET_IFNAME"]:
            del env["GLOO_SOCKET_IFNAME"]
        processes.append(context.Process(target=_rank, args=(argv, env, str(folder)), daemon=True))
    for process in processes:
        process.start()
    deadline = time.monotonic() + DEADLINE_S
    codes: list[int | None] = []
    try:
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
            codes.append(process.exitcode)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
    for rank in range(WORLD):
        error = root / f"rank{rank}" / "error.txt"
        assert not error.exists(), error.read_text()
    return codes


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")} - {"stdout.txt", "stderr.txt"}


def _metrics(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line.pop("steps_per_s", None)
    return lines


def _assert_same_run(distributed_out: Path, single_out: Path) -> None:
    ours = torch.load(distributed_out / "checkpoint.pt", weights_only=True)
    reference = torch.load(single_out / "checkpoint.pt", weights_only=True)
    assert ours["step"] == reference["step"] == STEPS
    assert ours["model"].keys() == reference["model"].keys()
    assert any("running_var" in key for key in reference["model"])
    for key, value in reference["model"].items():
        # float32: summation order differs (slices, Chan's merge); a few ulps, e.g. 1.4e-6 on a running mean of 0.73
        torch.testing.assert_close(ours["model"][key], value, atol=1e-6, rtol=1e-5, msg=key)
    for mine, theirs in zip(_metrics(distributed_out / "metrics.jsonl"), _metrics(single_out / "metrics.jsonl")):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert len(_metrics(distributed_out / "metrics.jsonl")) == STEPS // 5


def _single(root: Path, batch: str, steps: int = STEPS) -> Path:
    out = root / "single"
    assert main([*COMMON, "--batch-size", batch, "--steps", str(steps), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    ("batch", "buffers"),
    [("30", []), ("25", ["--no-broadcast-buffers"])],
    ids=["even-slices,broadcast-buffers", "uneven-slices-13-12,no-broadcast-buffers"],
)
def test_a_distributed_run_equals_the_single_process_run(tmp_path: Path, batch: str, buffers: list[str]) -> None:
    codes = launch(tmp_path, [*COMMON, "--distributed", *buffers, "--batch-size", batch, "--steps", str(STEPS)])
    assert codes == [0, 0]
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    assert _files(rank1) == set()  # only rank 0 writes
    assert (rank1 / "stdout.txt").read_text() == ""
    assert "done: 20 steps" in (rank0 / "stdout.txt").read_text()
    assert {"runs/train/checkpoint.pt", "runs/train/metrics.jsonl"} <= _files(rank0)
    _assert_same_run(rank0 / "runs/train", _single(tmp_path, batch))


def test_a_resumed_distributed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert launch(first, [*COMMON, "--distributed", "--batch-size", "26", "--steps", "10"]) == [0, 0]
    checkpoint = first / "rank0" / "runs/train/checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["step"] == 10
    second = tmp_path / "second"
    (second / "rank0" / "runs").mkdir(parents=True)
    # rank 0 continues in the first run's folder (metrics.jsonl kept up to step 10); both ranks read one checkpoint
    (second / "rank0" / "runs" / "train").symlink_to(first / "rank0" / "runs" / "train")
    codes = launch(second, [*COMMON, "--distributed", "--resume", str(checkpoint), "--steps", str(STEPS)])
    assert codes == [0, 0]
    assert _files(second / "rank1") == set()
    _assert_same_run(first / "rank0" / "runs/train", _single(tmp_path, "26"))


def test_a_nan_on_one_rank_stops_every_rank_with_exit_3(tmp_path: Path) -> None:
    codes = launch(
        tmp_path, [*COMMON, "--distributed", "--batch-size", "30", "--steps", str(STEPS)], {NAN_HOOK_ENV: "1:7"}
    )
    assert codes == [3, 3]
    assert _files(tmp_path / "rank1") == set()
    assert (tmp_path / "rank1" / "stderr.txt").read_text() == ""
    message = (tmp_path / "rank0" / "stderr.txt").read_text()
    assert "training diverged at step 7: the loss is nan" in message
    out = tmp_path / "rank0" / "runs/train"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 7]
    assert "diverged" in lines[-1]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 0  # the last good checkpoint


def test_distributed_without_torchrun_is_a_one_line_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert main([*COMMON, "--distributed", "--steps", "2", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "torchrun --nproc-per-node K -m batchnorm train --distributed" in error
    assert not (tmp_path / "out").exists()
