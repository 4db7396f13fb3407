"""Matplotlib for the lab's figures, set up in one place: the off-screen backend and PNGs embedded in HTML."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

__all__ = ["embed_png", "pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use: matplotlib is slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def embed_png(path: Path) -> str:
    """An ``<img>`` tag carrying the PNG at ``path`` inline (base64), so the page needs no other file."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
