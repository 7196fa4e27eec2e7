"""Sending a tracker's scalars and figures to a Lightning Trainer's loggers.

Scalars go to every logger at the step ``self.log`` uses, with each logger's group separator
in place of ``/``; figures go to the loggers that take images: TensorBoard (``add_image``, plus a
custom-scalars layout: one multi-line chart per metric and target, a line per layer), MLflow
(``log_image`` into the run's artifacts) and Weights & Biases (``log_image``). CSV and other
loggers get scalars only. MLflow's keys are :func:`~prh_lightning.tracking.sinks.folder_safe`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from lightning.pytorch import Trainer

from prh_lightning.tracking.sinks import custom_scalars_layout, folder_safe


def log_step(trainer: Trainer) -> int:
    """The step ``LightningModule.log`` writes at (optimiser steps taken before this batch ended)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def separated(scalars: Mapping[str, float], separator: str) -> dict[str, float]:
    """Tags with ``/`` replaced by the logger's group separator."""
    return dict(scalars) if separator == "/" else {tag.replace("/", separator): v for tag, v in scalars.items()}


def log_scalars(trainer: Trainer, scalars: Mapping[str, float], step: int) -> None:
    """Scalars to every logger; MLflow gets :func:`~prh_lightning.tracking.sinks.folder_safe` keys
    (its file store keeps each ``/`` as a folder: ``.../<layer>/calibrated`` is ``.../<layer>.calibrated``)."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            keys = folder_safe(list(scalars))
            logger.log_metrics({keys[tag]: value for tag, value in scalars.items()}, step=step)
        else:
            logger.log_metrics(separated(scalars, getattr(logger, "group_separator", "/")), step=step)


def takes_images(logger: Any) -> bool:
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    return isinstance(logger, (TensorBoardLogger, MLFlowLogger, WandbLogger))


def log_images(trainer: Trainer, images: Mapping[str, np.ndarray], step: int) -> None:
    """``{tag: uint8 [H, W, 3]}`` to every logger that takes images."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for tag, array in images.items():
                logger.experiment.add_image(tag, array, step, dataformats="HWC")
        elif isinstance(logger, MLFlowLogger):
            for tag, array in images.items():
                name = f"{tag.replace('/', '_')}_step{step:08d}.png"
                logger.experiment.log_image(logger.run_id, array, artifact_file=f"alignment/{name}")
        elif isinstance(logger, WandbLogger):
            for tag, array in images.items():
                logger.log_image(key=tag, images=[array], step=step)


class TensorBoardLayouts:
    """Writes the custom-scalars layout to each TensorBoard logger when a new chart appears."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.charts: set[str] = set()

    def update(self, trainer: Trainer, tags: list[str]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        charts = set(custom_scalars_layout(tags, self.prefix).get(self.prefix, {}))
        if not loggers or not charts - self.charts:
            return
        self.charts |= charts
        layout = custom_scalars_layout([f"{self.prefix}/{c}/x" for c in sorted(self.charts)], self.prefix)
        for logger in loggers:
            logger.experiment.add_custom_scalars(layout)
