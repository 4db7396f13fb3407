"""Hypothesis fuzzing of the text parsers behind the command line: any string gives a value or one clear error.

The model-spec parser (``--model``, with the size check), the tune grid
parser (``--grid``) and the bench shape parser (``--shapes``) either return
a valid value or raise ``ValueError`` (argparse's ``ArgumentTypeError`` for
the argparse types) with a one-line, non-empty message; never another
exception. Strings are drawn both from all of Unicode and from the parsers'
own alphabet, so that most of them get past the first checks.
"""

from __future__ import annotations

import argparse
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from batchnorm.cli.argtypes import MAX_PARAMETERS, check_model_size, model_spec
from batchnorm.cli.bench import parse_shape
from batchnorm.lab.bench import LAYOUTS
from batchnorm.lab.models import parse_spec
from batchnorm.lab.tune import GRID_OPTIONS, option_name, parse_grid

FUZZ = settings(max_examples=200, deadline=None)

SPEC_TEXT = st.one_of(
    st.text(),
    st.text(alphabet="mlpcnMLP:-0123456789 x+_.e", max_size=30),
    st.builds(
        lambda kind, widths, sep: f"{kind}:{sep.join(widths)}",
        st.sampled_from(["mlp", "cnn", "MLP", "rnn", ""]),
        st.lists(st.from_regex(r"-?[0-9]{1,12}|x|", fullmatch=True), max_size=6),
        st.sampled_from(["-", "--", ",", " - "]),
    ),
)

GRID_NAMES = [*GRID_OPTIONS, *(option_name(name) for name in GRID_OPTIONS), "--lr", "speed", ""]
GRID_VALUE = st.one_of(
    st.text(max_size=8),
    st.from_regex(r"-?[0-9]{0,3}(\.[0-9]{0,3})?(e-?[0-9]{1,3})?", fullmatch=True),
    st.sampled_from(["nan", "inf", "-inf", "1e300", "batch", "none", "relu", "normal:0.01", "normal:-1", "kaiming"]),
)
GRID_TEXT = st.one_of(
    st.text(),
    st.builds(
        lambda name, sep, values: f"{name}{sep}{','.join(values)}",
        st.sampled_from(GRID_NAMES),
        st.sampled_from(["=", "", "==", " = "]),
        st.lists(GRID_VALUE, max_size=4),
    ),
)

SHAPE_TEXT = st.one_of(
    st.text(),
    st.builds(
        lambda layout, dims: f"{layout}{'x'.join(dims)}",
        st.sampled_from([f"{layout}:" for layout in LAYOUTS] + ["", "nhwc:", ":", "dense::"]),
        st.lists(st.from_regex(r"-?[0-9]{1,12}| ?|X", fullmatch=True), max_size=5),
    ),
)


def _clear(error: BaseException, mentions: str = "") -> None:
    message = str(error)
    assert message.strip(), f"{type(error).__name__} without a message"
    assert "\n" not in message, f"a message of several lines: {message!r}"
    assert mentions in message


@FUZZ
@given(SPEC_TEXT)
@example("mlp:784-100000000-10")
@example("cnn:1-" + "9" * 5000 + "-10")
@example("mlp:\x00-1")
def test_model_spec_parser_gives_a_spec_or_a_value_error(text: str) -> None:
    try:
        spec = parse_spec(text)
    except ValueError as error:
        _clear(error)
        return
    assert spec.kind in ("mlp", "cnn")
    assert len(spec.widths) >= (2 if spec.kind == "mlp" else 3)
    assert all(width >= 1 for width in spec.widths)
    assert parse_spec(str(spec)) == spec
    try:
        check_model_size(text)
    except ValueError as error:
        _clear(error, mentions="--model")


@FUZZ
@given(SPEC_TEXT)
@example("mlp:784-100000000-10")
def test_model_option_type_gives_the_text_or_an_argparse_error(text: str) -> None:
    try:
        assert model_spec(text) == text
    except argparse.ArgumentTypeError as error:
        _clear(error)


def test_model_size_limit_is_the_parameter_count() -> None:
    check_model_size("mlp:784-100-100-100-10")
    with pytest.raises(ValueError, match=re.escape(f"more than the limit of {MAX_PARAMETERS:.0e}")):
        check_model_size("mlp:784-100000000-10")


@FUZZ
@given(st.lists(GRID_TEXT, max_size=3))
@example(["momentum=0.5,1"])
@example(["lr=1e300"])
@example(["lr=nan"])
@example(["init=normal:nan,normal:inf"])
def test_grid_parser_gives_a_grid_or_a_value_error(texts: list[str]) -> None:
    try:
        grid = parse_grid(texts)
    except ValueError as error:
        _clear(error)
        return
    assert grid
    assert set(grid) <= set(GRID_OPTIONS)
    for name, values in grid.items():
        assert values
        assert len(values) == len(set(map(str, values)))
        if name == "momentum":
            assert all(0 <= float(v) < 1 for v in values)
        if name in ("lr", "weight_decay"):
            assert all(0 <= float(v) <= 1e6 for v in values)


@FUZZ
@given(SHAPE_TEXT)
@example("dense:100000x100000000")
@example("nchw:1x1x1x" + "9" * 5000)
@example("32x64x56x56")
def test_shape_parser_gives_a_case_or_a_value_error(text: str) -> None:
    try:
        case = parse_shape(text)
    except ValueError as error:
        _clear(error)
        return
    assert case.layout in LAYOUTS
    assert case.shape
    assert all(size >= 1 for size in case.shape)
    assert len(case.shape) == {"dense": 2, "sequence": 3}.get(case.layout, 4)
