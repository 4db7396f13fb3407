"""The explain pictures (:mod:`batchnorm.lab.explain_html`) against independent numbers, and in headless Chromium.

Shapes, counts and statistics on the page are checked against the BN
layer's real input captured with a forward hook on a copy of the model and
reduced with ``torch.var_mean`` in float64, and against the layer's own
buffers; the page is parsed as XML.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm.lab.explain import format_table
from batchnorm.lab.explain_html import (
    check_output_file,
    explain_page,
    explain_section,
    layer_figure,
    write_explain_page,
)
from batchnorm.lab.report import write_report


def _randomize(model: nn.Module) -> None:
    """Non-trivial gamma, beta and running statistics, so that no number is trivially 0 or 1."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if bn.is_batch_norm(module):
                size = module.weight.shape
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) - 0.5)
                module.running_mean.copy_(torch.randn(size, generator=generator))
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)


class _Tokens(nn.Module):
    """``(N, L, C_in)`` -> Linear -> BN over the last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 10)
        self.norm = bn.BatchNorm(10, axis=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed(x))


def _conv() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), bn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 14 * 14, 20), nn.BatchNorm1d(20),
    )  # fmt: skip
    return model, torch.randn(60, 1, 28, 28)


def _tokens() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _Tokens(), torch.randn(5, 9, 3)


# name -> (shape labels, reduced axes as the table writes them, sizes of the reduced axes)
CONV_EXPECTED = {
    "1": (["N=60", "C=16", "H=28", "W=28"], "N,H,W", [60, 28, 28]),
    "4": (["N=60", "C=32", "H=14", "W=14"], "N,H,W", [60, 14, 14]),
    "8": (["N=60", "D=20"], "N", [60]),
}
TOKENS_EXPECTED = {"norm": (["N=5", "L=9", "C=10"], "N,L", [5, 9])}


def _capture(model: nn.Module, x: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
    """Each BN layer's input (float64) from a forward pass of a deep copy."""
    twin = copy.deepcopy(model)
    twin.train(train)
    captured: dict[str, torch.Tensor] = {}
    for name, module in twin.named_modules():
        if bn.is_batch_norm(module):

            def hook(_: nn.Module, args: tuple[torch.Tensor, ...], *, key: str = name) -> None:
                captured[key] = args[0].detach().double()

            module.register_forward_pre_hook(hook)
    with torch.no_grad():
        twin(x)
    return captured


def _figures(page: str) -> list[ET.Element]:
    root = ET.fromstring(page.split("\n", 1)[1])  # after <!DOCTYPE html>
    return [element for element in root.iter("figure") if element.get("class") == "bn-layer"]


def _svg_texts(figure: ET.Element) -> list[str]:
    svg = figure.find("svg")
    assert svg is not None
    return ["".join(text.itertext()) for text in svg.iter("text")]


def _cell(figure: ET.Element, field: str) -> list[float]:
    return [
        float(element.get("data-value", "nan")) for element in figure.iter("td") if element.get("data-field") == field
    ]


@pytest.mark.parametrize(
    ("factory", "expected", "highlight"),
    [
        pytest.param(_conv, CONV_EXPECTED, {"1": 0, "4": 7, "8": 13}, id="conv-and-dense"),
        pytest.param(_tokens, TOKENS_EXPECTED, {"norm": 4}, id="sequence-axis-minus-1"),
    ],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_page_draws_every_bn_layer_with_shapes_counts_and_torch_statistics(
    factory: Any, expected: dict[str, Any], highlight: dict[str, int], mode: str
) -> None:
    model, x = factory()
    _randomize(model)
    records = bn.explain(model, x, mode=mode)
    page = explain_page(records, highlight=highlight)
    figures = _figures(page)
    inputs = _capture(model, x, train=mode == "train")
    modules = dict(model.named_modules())
    table = format_table(records).splitlines()[2:]

    assert [figure.get("data-layer") for figure in figures] == list(expected)
    for figure, row in zip(figures, table):
        name = figure.get("data-layer")
        assert name is not None
        labels, reduced, sizes = expected[name]
        module, captured = modules[name], inputs[name]
        feature = highlight[name]
        texts = " | ".join(_svg_texts(figure))
        for label in labels:
            assert label in texts, (label, texts)
        feature_axis = module.axis % captured.dim() if isinstance(module, bn.BatchNorm) else 1
        letters = {1: "C", 2: "C"} if captured.dim() > 2 else {1: "D"}
        assert f"{letters[feature_axis]}={captured.shape[feature_axis]} (feature axis" in texts
        # Reduced axes exactly as the table's "reduced" column writes them.
        strong = [el for el in figure.iter("strong") if el.get("class") == "reduced-axes"]
        assert [el.text for el in strong] == [reduced]
        assert f"  {reduced}  " in row
        # Values per statistic: the product of the reduced sizes, computed here.
        count = 1
        for size in sizes:
            count *= size
        assert count == captured.numel() // captured.shape[feature_axis]
        product = " x ".join(map(str, sizes))
        expected_count = f"{product} = {count:,}" if len(sizes) > 1 else f"{count:,}"
        [count_text] = [el.text for el in figure.iter("strong") if el.get("class") == "count"]
        assert count_text == f"{expected_count} values -> 1 mean, 1 variance"
        # The highlighted cells are the chosen feature, and only it.
        highlighted = {rect.get("data-feature") for rect in figure.iter("rect") if rect.get("class") == "cell hl"}
        assert highlighted <= {str(feature)}
        # Numbers of the highlighted feature: torch's float64 batch statistics of the real input, and the buffers.
        reduce = [axis for axis in range(captured.dim()) if axis != feature_axis]
        var, mean = torch.var_mean(captured, dim=reduce, correction=0)
        assert _cell(figure, "batch_mean") == pytest.approx([float(mean[feature])], rel=1e-12, abs=1e-15)
        assert _cell(figure, "batch_var") == pytest.approx([float(var[feature])], rel=1e-12)
        assert _cell(figure, "running_mean") == [float(module.running_mean[feature])]
        assert _cell(figure, "running_var") == [float(module.running_var[feature])]
        assert _cell(figure, "weight") == [float(module.weight.detach()[feature])] * 2
        assert _cell(figure, "bias") == [float(module.bias.detach()[feature])] * 2
        # Which statistics the layer used in this run is marked on the matching box.
        used = [h.text or "" for h in figure.iter("h4") if "used in this run" in (h.text or "")]
        assert used == [("Training: batch statistics" if mode == "train" else "Eval: running statistics")
                        + " - used in this run"]  # fmt: skip
        gamma = [p for p in figure.iter("li") if "gamma, beta" in "".join(p.itertext())]
        assert "".join(gamma[0].itertext()) == f"gamma, beta: ({module.weight.numel()},) each"


def test_page_has_no_external_urls_and_parses_as_xml() -> None:
    model, x = _conv()
    page = explain_page(bn.explain(model, x))
    root = ET.fromstring(page.split("\n", 1)[1])
    for element in root.iter():
        for attribute in ("src", "href", "xlink:href", "action"):
            assert "http" not in (element.get(attribute) or "")
    assert "http" not in page
    for tag in ("link", "img", "iframe", "object", "embed"):
        assert not root.findall(f".//{tag}"), tag
    assert all(script.get("src") is None for script in root.iter("script"))
    # The slider is hidden until the script shows it: without JavaScript nothing dead is visible.
    sliders = [p for p in root.iter("p") if p.get("class") == "slider"]
    assert len(sliders) == 3
    assert all(p.get("hidden") == "hidden" for p in sliders)


def test_section_without_bn_layers_and_bad_feature() -> None:
    assert "no batch-norm layer" in explain_section([])
    [record] = bn.explain(nn.BatchNorm1d(3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="feature 3 is out of range: layer 'BatchNorm1d' has 3 features"):
        layer_figure(record, 3)


def test_generic_layout_and_5d_input_are_drawn() -> None:
    records = bn.explain(nn.BatchNorm3d(5), torch.randn(3, 5, 4, 6, 6))
    records += bn.explain(bn.BatchNorm(4, axis=-1), torch.randn(2, 3, 3, 4))  # channels-last: a generic drawing
    figures = _figures(explain_page(records))
    assert len(figures) == 2
    texts = " | ".join(_svg_texts(figures[0]))
    for label in ("N=3", "C=5", "D=4", "H=6", "W=6"):
        assert label in texts
    [count_text] = [el.text for el in figures[0].iter("strong") if el.get("class") == "count"]
    assert count_text == f"3 x 4 x 6 x 6 = {3 * 4 * 6 * 6:,} values -> 1 mean, 1 variance"
    assert "(feature axis)" in " | ".join(_svg_texts(figures[1]))


def test_output_file_checks(tmp_path: Path) -> None:
    existing = tmp_path / "old.html"
    existing.write_text("old")
    assert check_output_file(existing) == existing
    [record] = bn.explain(nn.BatchNorm1d(3), torch.randn(4, 3))
    write_explain_page(existing, [record])
    assert existing.read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError, match="is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        check_output_file(tmp_path / "missing" / "page.html")
    with pytest.raises(ValueError, match="is not a folder"):
        check_output_file(existing / "page.html")


@pytest.mark.filterwarnings("ignore:No artists with labels found:UserWarning")  # empty runs: empty legends
def test_compare_report_contains_the_pictures(tmp_path: Path) -> None:
    model, x = _conv()
    records = bn.explain(model, x)
    path = write_report(tmp_path, {"runs": {}, "explain": records})
    page = path.read_text()
    section = re.search(r'<section class="bn-explain">.*?</section>', page, re.S)
    assert section is not None
    root = ET.fromstring(section.group(0))
    figures = [el for el in root.iter("figure") if el.get("class") == "bn-layer"]
    assert [figure.get("data-layer") for figure in figures] == ["1", "4", "8"]
    assert "60 x 28 x 28 = 47,040 values -> 1 mean, 1 variance" in "".join(root.itertext())
    # A results file without explain records (or with old ones) still gives a report.
    assert 'class="bn-explain"' not in write_report(tmp_path / "bare", {"runs": {}}).read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package `chromium`)")
def test_page_renders_in_headless_chromium_and_the_script_runs(tmp_path: Path) -> None:
    from PIL import Image

    assert CHROMIUM is not None
    model, x = _conv()
    page = write_explain_page(tmp_path / "explain.html", bn.explain(model, x))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--user-data-dir=" + str(tmp_path)]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with Image.open(shot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None
    assert len(colors) > 10, "the screenshot is blank"
    assert any(rgb == (0xF2, 0x8E, 0x2B) for _, rgb in colors), "the highlighted feature (orange) is not drawn"
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    # The script ran: it un-hid every slider.
    assert dom.count('class="slider"') == 3
    assert 'class="slider" hidden' not in dom
