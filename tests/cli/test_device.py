"""``--device auto|cpu|cuda|cuda:N`` of train, compare, tune, explain and bench.

The argtype resolves ``auto`` when the command is read (CUDA when
``torch.cuda.is_available()``, else the CPU) and refuses a GPU that is not
there with one line and exit code 2. Runs record where they trained
(``"device"`` in ``metrics.jsonl``, the checkpoint, ``results.json`` and
``tune.json``); checkpoints load onto the CPU whatever device wrote them, and a
run may resume on another device. On a machine without a GPU the tiny CPU
runs below are what runs; the CUDA tests skip cleanly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from batchnorm.cli import VERBS
from batchnorm.cli.argtypes import device
from batchnorm.lab.training import load_checkpoint, model_from_checkpoint, resolve_device
from helpers import run_cli

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")
without_cuda = pytest.mark.skipif(CUDA, reason="CUDA is available here: --device cuda is valid")

SMALL = ["--data", "synthetic", "--model", "mlp:64-16-10", "--no-progress"]
DEVICE_VERBS = ("train", "compare", "tune", "explain", "bench")
# Where ``--device auto`` trains on this machine, as runs record it.
AUTO = str(resolve_device("cuda")) if CUDA else "cpu"


def _metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the argtype


def test_argtype_resolves_auto_and_accepts_cpu() -> None:
    assert device("auto") == ("cuda" if CUDA else "cpu")
    assert device("cpu") == "cpu"
    assert device("CPU") == "cpu"


@pytest.mark.parametrize("text", ["bogus", "gpu", "tpu", "", "cpu:0", "cuda:", "cuda:-1", "cuda:x", "cuda:0:1"])
def test_argtype_refuses_other_names(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected auto, cpu, cuda or cuda:N"):
        device(text)


@without_cuda
@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:1"])
def test_argtype_refuses_cuda_without_a_gpu(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="CUDA is not available here"):
        device(text)


def test_argtype_refuses_a_cuda_index_beyond_the_device_count() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="'cuda:4096'"):
        device("cuda:4096")


@requires_cuda
def test_argtype_accepts_cuda_when_there_is_one() -> None:
    assert device("cuda") == "cuda"
    assert device("cuda:0") == "cuda:0"
    count = torch.cuda.device_count()
    with pytest.raises(argparse.ArgumentTypeError, match=f"there is no CUDA device {count}"):
        device(f"cuda:{count}")


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("verb", DEVICE_VERBS)
def test_help_explains_device(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert verb in VERBS
    code, out, _ = run_cli([verb, "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for mention in ("--device", "auto", "cpu", "cuda:N", "torch.cuda.is_available()"):
        assert mention in text, f"{verb} --help does not mention {mention!r}"


@without_cuda
@pytest.mark.parametrize("verb", DEVICE_VERBS)
def test_cuda_without_a_gpu_is_one_line_and_exit_2(
    verb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    extra = ["--grid", "lr=1"] if verb == "tune" else []
    code, out, err = run_cli([verb, *extra, "--device", "cuda"], capsys)
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        f"batchnorm {verb}: error: argument --device: 'cuda': CUDA is not available here "
        "(torch.cuda.is_available() is False); use --device cpu or auto"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", DEVICE_VERBS)
def test_bogus_device_is_exit_2(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli([verb, "--device", "bogus"], capsys)
    assert code == 2
    assert out == ""
    assert "argument --device: expected auto, cpu, cuda or cuda:N, got 'bogus'" in err


@pytest.mark.parametrize(("given", "recorded"), [("cpu", "cpu"), ("auto", AUTO)])
def test_train_records_its_device(
    given: str, recorded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        ["train", *SMALL, "--steps", "6", "--eval-every", "3", "--device", given, "--out", str(out)], capsys
    )
    assert code == 0, err
    assert f"on {recorded}," in stdout
    lines = _metrics(out)
    assert [line["step"] for line in lines] == [3, 6]
    assert all(line["device"] == recorded for line in lines)
    assert load_checkpoint(out / "checkpoint.pt")["device"] == recorded


def test_train_checkpoint_loads_onto_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(["train", *SMALL, "--steps", "4", "--eval-every", "2", "--out", str(out)], capsys)
    assert code == 0, err
    for target in (None, "cpu"):
        model, config, normalizer, payload = model_from_checkpoint(out / "checkpoint.pt", device=target)
        assert config.model == "mlp:64-16-10"
        assert {tensor.device.type for tensor in [*model.parameters(), *model.buffers()]} == {"cpu"}
        assert normalizer.shift.device.type == "cpu"
        assert not model.training
        with torch.no_grad():
            assert model(torch.zeros(2, 64)).shape == (2, 10)
        assert payload["step"] == 4


def test_resume_on_another_device_is_announced_not_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint that says it was written on a GPU resumes on the CPU (the device is not part of the run)."""
    out = tmp_path / "run"
    base = ["train", *SMALL, "--eval-every", "2", "--out", str(out)]
    code, _, err = run_cli([*base, "--steps", "4", "--device", "cpu"], capsys)
    assert code == 0, err
    checkpoint = out / "checkpoint.pt"
    payload = load_checkpoint(checkpoint)
    payload["device"] = "cuda:0"
    torch.save(payload, checkpoint)
    code, stdout, err = run_cli([*base, "--steps", "8", "--device", "cpu", "--resume", str(checkpoint)], capsys)
    assert code == 0, err
    assert "resuming on cpu (checkpoint written on cuda:0)" in stdout
    assert [line["step"] for line in _metrics(out)] == [2, 4, 6, 8]
    assert load_checkpoint(checkpoint)["device"] == "cpu"


@pytest.mark.parametrize(("given", "recorded"), [("cpu", "cpu"), ("auto", AUTO)])
def test_compare_records_its_device(
    given: str, recorded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "compare"
    argv = ["compare", *SMALL, "--steps", "6", "--eval-every", "3", "--device", given, "--out", str(out)]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert f"on {recorded};" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == recorded
    assert {label: run["device"] for label, run in results["runs"].items()} == {"bn": recorded, "no_bn": recorded}
    for label in ("bn", "no_bn"):
        assert all(line["device"] == recorded for line in _metrics(out / label))
    assert results["explain"]
    assert all(record["device"] == recorded for record in results["explain"])


@pytest.mark.parametrize(("given", "recorded"), [("cpu", "cpu"), ("auto", AUTO)])
def test_tune_records_its_device(given: str, recorded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tune"
    argv = ["tune", *SMALL, "--grid", "lr=0.1,1", "--trial-steps", "4", "--steps", "6", "--eval-every", "2"]
    code, stdout, err = run_cli([*argv, "--device", given, "--out", str(out)], capsys)
    assert code == 0, err
    assert f"per trial on {recorded}" in stdout
    results = json.loads((out / "tune.json").read_text())
    assert results["device"] == recorded
    complete = [trial for trial in results["trials"] if trial["state"] == "complete"]
    assert len(complete) == 2
    assert all(trial["device"] == recorded for trial in complete)
    assert results["final"]["device"] == recorded
    assert all(line["device"] == recorded for line in _metrics(out / "final"))


@pytest.mark.parametrize(("given", "recorded"), [("cpu", "cpu"), ("auto", AUTO)])
def test_explain_runs_on_its_device(given: str, recorded: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--data", "synthetic", "--model", "mlp:64-16-16-10", "--batch-size", "20", "--device", given]
    code, stdout, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    records = json.loads(stdout)
    assert [record["name"] for record in records] == ["bn1", "bn2"]
    assert all(record["device"] == recorded for record in records)
    assert all(isinstance(value, float) for record in records for value in record["batch_mean"])
    code, stdout, err = run_cli([*argv, "--layer", "bn2", "--unit", "3"], capsys)
    assert code == 0, err
    assert "layer bn2, feature 3" in stdout


# --------------------------------------------------------------------------- on a GPU


@requires_cuda
def test_train_on_cuda_then_resume_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    base = ["train", *SMALL, "--eval-every", "2", "--out", str(out)]
    code, _, err = run_cli([*base, "--steps", "4", "--device", "cuda"], capsys)
    assert code == 0, err
    checkpoint = out / "checkpoint.pt"
    written_on = load_checkpoint(checkpoint)["device"]
    assert written_on.startswith("cuda:")
    model, _, _, _ = model_from_checkpoint(checkpoint)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    code, stdout, err = run_cli([*base, "--steps", "8", "--device", "cpu", "--resume", str(checkpoint)], capsys)
    assert code == 0, err
    assert f"resuming on cpu (checkpoint written on {written_on})" in stdout
    assert [line["device"] for line in _metrics(out)] == [written_on, written_on, "cpu", "cpu"]
    assert load_checkpoint(checkpoint)["device"] == "cpu"
    model, _, _, _ = model_from_checkpoint(checkpoint, device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}


@requires_cuda
def test_train_on_cpu_then_resume_on_cuda_matches_the_metrics_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    base = ["train", *SMALL, "--eval-every", "2", "--out", str(out)]
    assert run_cli([*base, "--steps", "4", "--device", "cpu"], capsys)[0] == 0
    code, _, err = run_cli(
        [*base, "--steps", "8", "--device", "cuda:0", "--resume", str(out / "checkpoint.pt")], capsys
    )
    assert code == 0, err
    lines = _metrics(out)
    assert [line["step"] for line in lines] == [2, 4, 6, 8]
    assert [line["device"] for line in lines] == ["cpu", "cpu", "cuda:0", "cuda:0"]


@requires_cuda
def test_explain_and_compare_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--data", "synthetic", "--model", "mlp:64-16-10", "--batch-size", "20", "--device", "cuda"]
    code, stdout, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)[0]["device"].startswith("cuda")
    out = tmp_path / "compare"
    argv = ["compare", *SMALL, "--steps", "4", "--eval-every", "2", "--device", "cuda", "--out", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["device"].startswith("cuda")
