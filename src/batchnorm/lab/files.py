"""Files written whole or not at all: a temporary file in the same folder, then a rename.

A reader, or a run killed mid-write, never sees half a file: the rename
replaces the old file in one step (POSIX ``rename``; ``os.replace`` on every
platform). The temporary file is hidden (``.NAME.part``) beside the target,
so it is on the same filesystem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_json_atomically", "write_text_atomically"]


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``.NAME.part`` in the same folder, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.part")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def write_json_atomically(path: Path, payload: Any, *, indent: int | None = None, newline: bool = False) -> None:
    """``payload`` as JSON (NaN and infinities written as ``NaN``/``Infinity``), atomically; see the module."""
    write_text_atomically(path, json.dumps(payload, indent=indent, allow_nan=True) + ("\n" if newline else ""))
