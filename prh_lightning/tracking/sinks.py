"""Where a tracker's scalars and figures go (no Lightning import).

A sink has ``log_scalars(scalars: {tag: float}, step: int)``; a sink with ``takes_images = True``
also has ``log_images(images: {tag: uint8 [H, W, 3]}, step: int)``. Any callable
``f(scalars, step)`` is a scalar sink (``fabric.log_dict`` fits: ``lambda s, step:
fabric.log_dict(s, step=step)``).

:class:`TensorBoardSink` writes scalars, images and a custom-scalars layout (one multi-line
chart per metric and target, a line per layer) to a ``SummaryWriter``. :func:`folder_safe`
renames the tags for stores that keep each ``/`` as a folder (MLflow's file store).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


class CallableSink:
    """Scalars to ``fn(scalars, step)``."""

    takes_images = False

    def __init__(self, fn: Callable[[dict[str, float], int], Any]) -> None:
        self.fn = fn

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.fn(scalars, step)


class MemorySink:
    """Keeps every ``(step, scalars)`` and ``(step, {tag: image})`` it is given (tests, notebooks)."""

    takes_images = True

    def __init__(self) -> None:
        self.scalars: list[tuple[int, dict[str, float]]] = []
        self.images: list[tuple[int, dict[str, np.ndarray]]] = []

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.scalars.append((step, dict(scalars)))

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.images.append((step, dict(images)))


def custom_scalars_layout(tags: list[str], prefix: str = "alignment") -> dict[str, dict[str, list]]:
    """TensorBoard custom-scalars layout: one multi-line chart per ``<prefix>/<metric>/<target>``
    holding that target's per-layer tags (summaries such as ``best`` and ``mean`` included).

    >>> custom_scalars_layout(["alignment/cka/ref/fc", "alignment/cka/ref/best"])
    {'alignment': {'cka/ref': ['Multiline', ['^alignment/cka/ref/']]}}
    """
    charts: dict[str, list] = {}
    for tag in tags:
        parts = tag.split("/")
        if len(parts) < 4 or parts[0] != prefix:
            continue
        chart = f"{parts[1]}/{parts[2]}"
        charts.setdefault(chart, ["Multiline", [f"^{prefix}/{chart}/"]])
    return {prefix: charts} if charts else {}


class TensorBoardSink:
    """Scalars, images and the custom-scalars layout to a TensorBoard ``SummaryWriter`` (or a
    log directory, for which one is created)."""

    takes_images = True

    def __init__(self, writer: Any, prefix: str = "alignment") -> None:
        if isinstance(writer, str) or hasattr(writer, "__fspath__"):
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(writer))
        self.writer = writer
        self.prefix = prefix
        self._charts: set[str] = set()

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self._update_layout(scalars)
        self.writer.flush()

    def _update_layout(self, scalars: Mapping[str, float]) -> None:
        layout = custom_scalars_layout(list(scalars), self.prefix)
        charts = set(layout.get(self.prefix, {}))
        if charts - self._charts:  # written again only when a new chart appears
            self._charts |= charts
            full = custom_scalars_layout(
                [f"{self.prefix}/{c}/x" for c in sorted(self._charts)], self.prefix
            )
            self.writer.add_custom_scalars(full)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for tag, array in images.items():
            self.writer.add_image(tag, array, step, dataformats="HWC")
        self.writer.flush()


def folder_safe(tags: list[str]) -> dict[str, str]:
    """``{tag: key}`` for a store that keeps each ``/`` of a key as a folder (MLflow's local file
    store): such a store cannot hold a key that is also the folder of another key, as
    ``.../<layer>`` and ``.../<layer>/calibrated`` are. A tag whose parent is itself one of
    ``tags`` gets its last ``/`` written as ``.``; every other tag is kept.

    >>> folder_safe(["alignment/cka/ref/fc", "alignment/cka/ref/fc/calibrated", "alignment/cka/ref/calibrated"])
    {'alignment/cka/ref/fc': 'alignment/cka/ref/fc', 'alignment/cka/ref/fc/calibrated': 'alignment/cka/ref/fc.calibrated', 'alignment/cka/ref/calibrated': 'alignment/cka/ref/calibrated'}
    """
    present = set(tags)
    out = {}
    for tag in tags:
        parent, sep, leaf = tag.rpartition("/")
        out[tag] = f"{parent}.{leaf}" if sep and parent in present else tag
    return out


def as_sink(sink: Any) -> Any:
    """``sink`` itself when it has ``log_scalars``, else a :class:`CallableSink` around a callable."""
    if hasattr(sink, "log_scalars"):
        return sink
    if callable(sink):
        return CallableSink(sink)
    raise TypeError(f"a sink needs log_scalars(scalars, step) or must be a callable f(scalars, step); got {type(sink).__name__}")
