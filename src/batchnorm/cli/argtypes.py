"""argparse types for the command line, and :class:`UsageError`.

Named ``argtypes`` rather than ``types``: no module of the package shares a
standard-library module's name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "UsageError",
    "argument_type",
    "comma_separated",
    "fraction",
    "non_negative_float",
    "positive_float",
    "positive_int",
]

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
