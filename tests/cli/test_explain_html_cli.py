"""``batchnorm explain --html FILE``: the page next to the table, from a model spec or a checkpoint; bad paths.

Shapes and counts are checked against sizes written out here; a checkpoint's
running statistics against the checkpoint file itself.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from batchnorm.cli import main
from helpers import run_cli

SYNTHETIC_CNN = ["--data", "synthetic", "--model", "cnn:1-4-8-10", "--batch-size", "20"]
SYNTHETIC_MLP = ["--data", "synthetic", "--model", "mlp:64-32-16-10"]


def _figures(path: Path) -> list[ET.Element]:
    root = ET.fromstring(path.read_text().split("\n", 1)[1])
    return [element for element in root.iter("figure") if element.get("class") == "bn-layer"]


def _svg_text(figure: ET.Element) -> str:
    return " | ".join("".join(text.itertext()) for text in figure.iter("text"))


def _count(figure: ET.Element) -> str | None:
    return next(el.text for el in figure.iter("strong") if el.get("class") == "count")


def _value(figure: ET.Element, field: str) -> float:
    return next(float(el.get("data-value", "nan")) for el in figure.iter("td") if el.get("data-field") == field)


def test_html_of_a_cnn_spec_next_to_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "explain.html"
    code, out, err = run_cli(["explain", *SYNTHETIC_CNN, "--html", str(page)], capsys)
    assert code == 0, err
    assert "2 BN layer(s)" in out  # the table is still printed
    assert out.strip().splitlines()[-1].startswith(f"wrote {page}")
    first, second = _figures(page)
    for label in ("N=20 (reduced)", "C=4 (feature axis)", "H=8 (reduced)", "W=8 (reduced)"):
        assert label in _svg_text(first)
    for label in ("N=20 (reduced)", "C=8 (feature axis)", "H=4 (reduced)", "W=4 (reduced)"):
        assert label in _svg_text(second)
    assert _count(first) == f"20 x 8 x 8 = {20 * 8 * 8:,} values -> 1 mean, 1 variance"
    assert _count(second) == f"20 x 4 x 4 = {20 * 4 * 4:,} values -> 1 mean, 1 variance"
    assert [el.text for el in first.iter("strong") if el.get("class") == "reduced-axes"] == ["N,H,W"]


def test_html_with_json_keeps_stdout_pure_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    page = tmp_path / "explain.html"
    code, out, err = run_cli(["explain", *SYNTHETIC_MLP, "--json", "--html", str(page)], capsys)
    assert code == 0, err
    records = json.loads(out)
    figures = _figures(page)
    assert [figure.get("data-layer") for figure in figures] == [record["name"] for record in records]
    assert "N=60 (reduced)" in _svg_text(figures[0])
    assert "D=32 (feature axis" in _svg_text(figures[0])


def test_html_highlights_the_step_view_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "explain.html"
    argv = ["explain", *SYNTHETIC_MLP, "--layer", "bn2", "--unit", "3", "--html", str(page)]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "layer bn2, feature 3" in out
    _, second = _figures(page)
    highlighted = {rect.get("data-feature") for rect in second.iter("rect") if rect.get("class") == "cell hl"}
    assert highlighted == {"3"}


def test_html_overwrites_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "explain.html"
    page.write_text("an older page")
    assert run_cli(["explain", *SYNTHETIC_MLP, "--html", str(page)], capsys)[0] == 0
    assert page.read_text().startswith("<!DOCTYPE html>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("explain-html-checkpoint")
    argv = ["train", *SYNTHETIC_MLP, "--steps", "30", "--eval-every", "30", "--batch-size", "30", "--lr", "0.1"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    return out / "checkpoint.pt"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_html_of_a_checkpoint_shows_its_running_statistics(
    checkpoint: Path, tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "explain.html"
    argv = ["explain", "--checkpoint", str(checkpoint), "--html", str(page), "--layer", "bn1", "--unit", "5"]
    code, _, err = run_cli([*argv, *(["--eval"] if mode == "eval" else [])], capsys)
    assert code == 0, err
    state = torch.load(checkpoint, weights_only=True)["model"]
    first, second = _figures(page)
    assert _value(first, "running_mean") == float(state["bn1.running_mean"][5])
    assert _value(first, "running_var") == float(state["bn1.running_var"][5])
    assert _value(second, "running_mean") == float(state["bn2.running_mean"][0])
    assert _value(first, "weight") == float(state["bn1.weight"][5])
    used = [h.text for figure in (first, second) for h in figure.iter("h4") if "used in this run" in (h.text or "")]
    expected = "Eval: running statistics" if mode == "eval" else "Training: batch statistics"
    assert used == [f"{expected} - used in this run"] * 2


@pytest.mark.parametrize(
    ("target", "message"),
    [
        pytest.param("{dir}", "is a directory", id="directory"),
        pytest.param("{dir}/missing/page.html", "does not exist", id="missing-parent"),
        pytest.param("{dir}/file.txt/page.html", "is not a folder", id="parent-is-a-file"),
    ],
)
def test_bad_html_paths_exit_2_with_one_line_before_any_work(
    tmp_path: Path, target: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file.txt").write_text("x")
    import batchnorm.cli.explain as verb

    def no_work(*_: object, **__: object) -> None:
        raise AssertionError("the path must be checked before the model is built")

    monkeypatch.setattr(verb, "prepare", no_work)
    code, out, err = run_cli(["explain", *SYNTHETIC_MLP, "--html", target.format(dir=tmp_path)], capsys)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_unwritable_folder_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(["explain", *SYNTHETIC_MLP, "--html", str(locked / "page.html")], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "is not writable" in err


def test_unwritable_place_exits_2_with_one_line_even_as_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The permission answer is the operating system's; here it says no (root would otherwise always write)."""
    import batchnorm.lab.explain_html as pictures

    monkeypatch.setattr(pictures.os, "access", lambda *_args, **_kwargs: False)
    code, out, err = run_cli(["explain", *SYNTHETIC_MLP, "--html", str(tmp_path / "page.html")], capsys)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert f"the folder {tmp_path} is not writable" in err
    existing = tmp_path / "old.html"
    existing.write_text("x")
    code, _, err = run_cli(["explain", *SYNTHETIC_MLP, "--html", str(existing)], capsys)
    assert code == 2
    assert "the file is not writable" in err
