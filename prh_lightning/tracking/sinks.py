"""Where a tracker's scalars and figures go (no Lightning import).

A sink has ``log_scalars(scalars: {tag: float}, step: int)``; a sink with ``takes_images = True``
also has ``log_images(images: {tag: uint8 [H, W, 3]}, step: int)``. Any callable
``f(scalars, step)`` is a scalar sink (``fabric.log_dict`` fits: ``lambda s, step:
fabric.log_dict(s, step=step)``).

:class:`TensorBoardSink` writes scalars, images and a custom-scalars layout (one multi-line
chart per metric and target, a line per layer) to a ``SummaryWriter``; :class:`MLflowSink` and
:class:`WandbSink` write scalars and images to an MLflow run and a W&B run. :func:`folder_safe`
renames the tags for stores that keep each ``/`` as a folder (MLflow's file store).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import re
import time

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


def custom_scalars_layout(tags: list[str], prefix: str = "alignment", scope: str = "") -> dict[str, dict[str, list]]:
    """TensorBoard custom-scalars layout: one multi-line chart per ``<prefix>/<metric>/<target>``
    holding that target's per-layer tags (summaries such as ``best`` and ``mean`` included).
    ``scope``: what the logger puts before each tag it writes (the Hugging Face Trainer's
    ``"train/"``), so the charts' patterns match the stored tags.

    >>> custom_scalars_layout(["alignment/cka/ref/fc", "alignment/cka/ref/best"])
    {'alignment': {'cka/ref': ['Multiline', ['^alignment/cka/ref/']]}}
    >>> custom_scalars_layout(["alignment/cka/ref/fc"], scope="train/")
    {'alignment': {'cka/ref': ['Multiline', ['^train/alignment/cka/ref/']]}}
    """
    charts: dict[str, list] = {}
    for tag in tags:
        parts = tag.split("/")
        if len(parts) < 4 or parts[0] != prefix:
            continue
        chart = f"{parts[1]}/{parts[2]}"
        charts.setdefault(chart, ["Multiline", [f"^{re.escape(scope)}{prefix}/{chart}/"]])
    return {prefix: charts} if charts else {}


class TensorBoardSink:
    """Scalars, images and the custom-scalars layout to a TensorBoard ``SummaryWriter`` (or a
    log directory, for which one is created). ``scope``: what another writer of the same
    scalars puts before each tag (see :func:`custom_scalars_layout`), for :meth:`update_layout`."""

    takes_images = True

    def __init__(self, writer: Any, prefix: str = "alignment", scope: str = "") -> None:
        if isinstance(writer, str) or hasattr(writer, "__fspath__"):
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(writer))
        self.writer = writer
        self.prefix = prefix
        self.scope = scope
        self._charts: set[str] = set()

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(f"{self.scope}{tag}", value, step)
        self.update_layout(list(scalars))
        self.writer.flush()

    def update_layout(self, tags: list[str]) -> None:
        """Write the custom-scalars layout again when ``tags`` bring a chart it does not have yet."""
        charts = set(custom_scalars_layout(tags, self.prefix).get(self.prefix, {}))
        if charts - self._charts:
            self._charts |= charts
            full = custom_scalars_layout([f"{self.prefix}/{c}/x" for c in sorted(self._charts)], self.prefix, self.scope)
            self.writer.add_custom_scalars(full)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for tag, array in images.items():
            self.writer.add_image(tag, array, step, dataformats="HWC")
        self.writer.flush()


def image_file_name(tag: str, step: int) -> str:
    """The artifact file of image ``tag`` at ``step`` in stores that keep images as files.

    >>> image_file_name("alignment_heatmap/cka/self", 40)
    'alignment_heatmap_cka_self_step00000040.png'
    """
    return f"{tag.replace('/', '_')}_step{step:08d}.png"


class MLflowSink:
    """Scalars (:func:`folder_safe` keys) and images (PNG artifacts under ``alignment/``, see
    :func:`image_file_name`) to the MLflow run ``run_id`` through an ``MlflowClient`` (the
    default client of the current tracking URI when ``client`` is None). Works on a run that
    has already ended, as a Trainer's integration leaves it at the end of training."""

    takes_images = True

    def __init__(self, run_id: str, client: Any = None) -> None:
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
        self.run_id = run_id
        self.client = client

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        keys = folder_safe(list(scalars))
        stamp = int(time.time() * 1000)
        metrics = [Metric(keys[tag], float(value), stamp, step) for tag, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for tag, array in images.items():
            self.client.log_image(self.run_id, array, artifact_file=f"alignment/{image_file_name(tag, step)}")


class WandbSink:
    """Scalars and images to a W&B ``run``: ``run.log({...}, step=step)``, or with
    ``step_metric`` the step as that key's value (the Hugging Face Trainer's
    ``"train/global_step"``, whose integration steps the run by it)."""

    takes_images = True

    def __init__(self, run: Any, step_metric: str | None = None) -> None:
        self.run = run
        self.step_metric = step_metric

    def _log(self, row: dict[str, Any], step: int) -> None:
        if self.step_metric is None:
            self.run.log(row, step=step)
        else:
            self.run.log({**row, self.step_metric: step})

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self._log(dict(scalars), step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        import wandb

        self._log({tag: wandb.Image(array) for tag, array in images.items()}, step)


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
