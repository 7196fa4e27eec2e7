"""Bounded per-tag history of a tracker's scalars, ``{tag: [(step, value), ...]}``.

A run of millions of steps must not grow memory or checkpoints without bound: past
``max_points`` points a tag's older half is thinned (every other point dropped), so recent
checks stay dense, the first check is kept and the span covered stays the whole run.

>>> history = History(max_points=4)
>>> for step in range(6):
...     history.append(step, {"a": float(step)})
>>> [s for s, _ in history["a"]]
[0, 3, 4, 5]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class History(Mapping):
    """``tag -> [(step, value)]``, at most ``max_points`` points per tag (``None``: unbounded)."""

    def __init__(self, max_points: int | None = 1000) -> None:
        if max_points is not None and (isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 4):
            raise ValueError(f"max_history must be an int >= 4 or None, got {max_points!r}")
        self.max_points = max_points
        self._data: dict[str, list[tuple[int, float]]] = {}

    def append(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            points = self._data.setdefault(tag, [])
            points.append((int(step), float(value)))
            if self.max_points is not None and len(points) > self.max_points:
                half = len(points) // 2
                points[:half] = points[:half:2]

    def __getitem__(self, tag: str) -> list[tuple[int, float]]:
        return self._data[tag]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def state_dict(self) -> dict[str, Any]:
        return {"max_points": self.max_points, "tags": {t: [list(p) for p in pts] for t, pts in self._data.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the points (thinned again if this history's bound is smaller)."""
        tags = state["tags"] if "tags" in state else state  # older checkpoints: the bare mapping
        self._data = {}
        for tag, points in tags.items():
            for step, value in points:
                self.append(int(step), {tag: float(value)})
