"""Every kind of report page rendered by headless Chromium: it renders, is not blank, logs nothing to the console.

Pages: ``train`` (written at the end of the run), ``compare``, ``tune`` and an
experiment (``lr-sweep``), each also rebuilt by ``batchnorm report DIR``.
Chromium prints every console message (errors, failed loads, uncaught
exceptions) as a ``CONSOLE`` line with ``--enable-logging=stderr --v=0``; a
page must produce none. Skipped when the Debian package ``chromium`` is not
installed.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from batchnorm.lab.data import load_dataset
from batchnorm.lab.experiments import COMPARE_DEFAULTS, compare
from batchnorm.lab.studies import run_experiment
from helpers import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package `chromium`) is not installed"),
]
SMALL = ["--data", "synthetic", "--model", "mlp:64-32-32-10", "--no-progress"]


def _chromium(page: Path, *options: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        *options,
        page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def check_page(page: Path, screenshot: Path) -> None:
    """The page's DOM renders, the screenshot has content (many colours), and the console stays silent."""
    dumped = _chromium(page, "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert "<table" in dumped.stdout
    assert "<figcaption" in dumped.stdout
    console = [line for line in dumped.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    shot = _chromium(page, f"--screenshot={screenshot}", "--window-size=1200,2400")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert not [line for line in shot.stderr.splitlines() if "CONSOLE" in line]
    with Image.open(screenshot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None
    assert len(colors) > 50, f"{screenshot} looks blank ({len(colors)} colours)"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pages")
    synthetic = load_dataset("synthetic")
    tiny = dataclasses.replace(
        COMPARE_DEFAULTS,
        model="mlp:64-32-32-10",
        data="synthetic",
        act="relu",
        init="normal:0.1",
        input_norm="standardize",
        batch_size=50,
        steps=60,
        eval_every=20,
        checkpoint_every=60,
    )
    compare(tiny, root / "compare", progress=False)
    run_experiment(
        "lr-sweep",
        root / "experiment",
        dataset=synthetic,
        progress=False,
        lrs=(0.5, 1e5),
        steps=20,
        eval_every=10,
        seeds=2,
        hidden=(16,),
        threshold=0.0,
    )
    return {"compare": root / "compare", "experiment": root / "experiment", "root": root}


def test_train_writes_plots_and_a_page_that_renders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "train"
    code, stdout, err = run_cli(["train", *SMALL, "--steps", "60", "--eval-every", "20", "--out", str(out)], capsys)
    assert code == 0, err
    assert "report.html" in stdout
    assert (out / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_page(out / "report.html", tmp_path / "train.png")
    (out / "report.html").unlink()
    code, stdout, err = run_cli(["report", str(out)], capsys)
    assert code == 0, err
    assert "train report" in stdout
    check_page(out / "report.html", tmp_path / "train-rebuilt.png")


def test_tune_page_renders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tune"
    argv = ["tune", "--data", "synthetic", "--model", "mlp:64-32-10", "--no-progress", "--out", str(out)]
    code, _, err = run_cli([*argv, "--grid", "lr=0.01,1", "--trial-steps", "30", "--steps", "30"], capsys)
    assert code == 0, err
    check_page(out / "report.html", tmp_path / "tune.png")
    (out / "report.html").unlink()
    code, stdout, err = run_cli(["report", str(out)], capsys)
    assert code == 0, err
    assert "tune report" in stdout
    check_page(out / "report.html", tmp_path / "tune-rebuilt.png")


@pytest.mark.parametrize("kind", ["compare", "experiment"])
def test_compare_and_experiment_pages_render_and_rebuild(
    folders: dict[str, Path], kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = folders[kind]
    check_page(out / "report.html", folders["root"] / f"{kind}.png")
    (out / "report.html").unlink()
    code, stdout, err = run_cli(["report", str(out)], capsys)
    assert code == 0, err
    assert f"{kind} report" in stdout
    check_page(out / "report.html", folders["root"] / f"{kind}-rebuilt.png")
