"""Atomic writes: the whole new content or the old one, never a part; no temporary file left."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from batchnorm.lab.files import write_json_atomically, write_text_atomically


def test_text_replaces_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    write_text_atomically(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_json_keeps_nan_and_the_requested_format(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json_atomically(path, {"a": [1.0, math.nan]}, indent=2, newline=True)
    text = path.read_text()
    assert text == json.dumps({"a": [1.0, math.nan]}, indent=2) + "\n"
    assert math.isnan(json.loads(text)["a"][1])


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "tune.json"
    path.write_text('{"old": true}')
    with pytest.raises(TypeError):
        write_json_atomically(path, {"not serializable": object()})
    assert path.read_text() == '{"old": true}'
