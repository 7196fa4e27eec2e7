"""Writing a recipe's outputs: ``summary.json``, ``report.md`` and ``figures/*.png``,
each written atomically (a temporary file in the same folder, then a rename)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """Tensors and numpy values to lists/floats; non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (see :func:`to_jsonable`)."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


class Report:
    """A markdown report built section by section; figures are linked by relative path.

    >>> report = Report("Fashion-MNIST alignment")
    >>> report.section("RSA", "FashionCNN vs MiniLM: 0.35 (p = 0.01).", figure="figures/rsa.png")
    >>> report.write(out / "report.md")
    """

    def __init__(self, title: str, intro: str = "") -> None:
        self._parts = [f"# {title}\n"]
        if intro:
            self._parts.append(intro.strip() + "\n")

    def section(self, heading: str, text: str, figure: str | None = None, table: str | None = None) -> None:
        part = [f"## {heading}\n"]
        if figure:
            part.append(f"![{heading}]({figure})\n")
        if table:
            part.append(table.strip() + "\n")
        part.append(text.strip() + "\n")
        self._parts.append("\n".join(part))

    def text(self) -> str:
        return "\n".join(self._parts)

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.text())


def markdown_table(header: list[str], rows: list[list[Any]], floatfmt: str = ".3f") -> str:
    """A small markdown table; floats formatted with ``floatfmt``."""

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
