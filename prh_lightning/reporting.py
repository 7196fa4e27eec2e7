"""Writing a recipe's outputs: ``summary.json``, ``report.md`` and ``figures/*.png``.

Each file is written atomically with the user's umask (see :func:`prh_lightning._files.atomic_write`):
the old file or the complete new one, never half a file; an ``OSError`` naming the file when the
disk is full or the folder is not writable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prh_lightning._files import atomic_write_bytes
from prh_lightning._optional import require

__all__ = ["Report", "atomic_write_bytes", "atomic_write_text", "markdown_table", "save_figure", "to_jsonable", "write_json"]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically, with the user's umask.

    >>> import tempfile
    >>> atomic_write_text(Path(tempfile.mkdtemp()) / "note.md", "# Results").read_text()
    '# Results'
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """Tensors and numpy values to lists/floats; non-finite floats to None (JSON has no NaN).

    >>> to_jsonable({"cka": torch.tensor([0.5, float("nan")]), "n": np.int64(3), "out": Path("runs")})
    {'cka': [0.5, None], 'n': 3, 'out': 'runs'}
    """
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
    """Atomically write ``obj`` as indented JSON (see :func:`to_jsonable`).

    >>> import json, tempfile
    >>> path = write_json(Path(tempfile.mkdtemp()) / "summary.json", {"score": float("inf")})
    >>> json.loads(path.read_text())
    {'score': None}
    """
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it (needs the ``plot`` extra)."""
    import io

    plt = require("matplotlib.pyplot", purpose="save_figure")

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


class Report:
    """A markdown report built section by section; figures are linked by relative path.

    >>> report = Report("Fashion-MNIST alignment")
    >>> report.section("RSA", "FashionCNN vs MiniLM: 0.35 (p = 0.01).", figure="figures/rsa.png")
    >>> print(report.text())
    # Fashion-MNIST alignment
    <BLANKLINE>
    ## RSA
    <BLANKLINE>
    ![RSA](figures/rsa.png)
    <BLANKLINE>
    FashionCNN vs MiniLM: 0.35 (p = 0.01).
    <BLANKLINE>
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
    """A small markdown table; floats formatted with ``floatfmt``.

    >>> print(markdown_table(["layer", "CKA"], [["conv1", 0.51234], ["fc", 0.9]]))
    | layer | CKA |
    |---|---|
    | conv1 | 0.512 |
    | fc | 0.900 |
    """

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
