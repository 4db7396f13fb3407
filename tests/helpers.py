"""Helpers shared by the command-line tests."""

from __future__ import annotations

import pytest

from batchnorm.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``batchnorm.cli.main(argv)`` in-process: exit code, stdout, stderr."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
