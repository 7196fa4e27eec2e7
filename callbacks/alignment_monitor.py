"""`AlignmentMonitor`: the Lightning front end of :class:`~prh_lightning.tracking.AlignmentTracker`.

::

    monitor = AlignmentMonitor()                       # probe: 256 validation samples, checks at validation end
    monitor = AlignmentMonitor(references={"minilm": Reference("minilm", class_names=CLASS_NAMES)})
    Trainer(callbacks=[monitor], logger=TensorBoardLogger("runs")).fit(model, dm)

The tracker owns the probe, references, metrics, history and checkpoint state; this callback
decides when to check (train start, validation end, every N steps, ``trainer.validate()`` /
``trainer.test()``), runs the probe under the Trainer's precision, puts the scalars in
``trainer.callback_metrics`` (so ``EarlyStopping`` / ``ModelCheckpoint`` can monitor them) and
sends them to the loggers (:mod:`._logging`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from prh_lightning.callbacks import _logging
from prh_lightning.tracking.handoff import Handoff
from prh_lightning.tracking.probe import check_layer_selection, probe_from_loader
from prh_lightning.tracking.references import Reference
from prh_lightning.tracking.tracker import AlignmentTracker

__all__ = ["AlignmentMonitor", "Reference"]

PROBE_SOURCES = ("val", "train")
STAGES = ("fit", "validate", "test")


class AlignmentMonitor(Callback):
    """Log layer x layer representational alignment of the model being trained, on a fixed probe.

    Every argument has a default and takes plain values, so ``LightningCLI`` can configure it
    from YAML (``trainer.callbacks: [{class_path: prh_lightning.callbacks.AlignmentMonitor}]``).

    Args:
        probe: ``"val"`` (default: ``max_probe_samples`` samples of the validation data, or of the
            training data when there is none), ``"train"``, or fixed data: a DataLoader, a tensor
            ``[n, ...]``, a tuple of tensors such as ``(x, y)`` or a dict of tensors. Samples are
            drawn with ``probe_seed``, stratified when the dataset exposes ``targets``.
        references: ``{name: spec}``: an ``nn.Module``, a :class:`Reference`, a registered model
            name (``"minilm"``), ``{"class_path": ..., "init_args": ...}``, ``{"model": "minilm",
            "class_names": [...]}``, a callable of the probe inputs or precomputed features.
        metrics: names from ``prh_lightning.functional.METRICS``.
        layers, reduce: layers of the trained model to tap and their pooling (``LayerTaps``).
            Default ``"auto"``: the model family's layers (the blocks' hidden states of a Hugging
            Face transformer, the stages of a torchvision / timm network; see
            :func:`prh_lightning.families.default_layers`), else every leaf module that computes
            something in eval mode (``"*"``).
        every_n_train_steps: check every N optimiser steps. ``None`` (default): at validation
            end, or every ``default_every_n_train_steps`` steps when the run has no validation
            loop (a warning says so).
        check_on_validation_end: check after each validation run of ``fit`` (sanity check excluded).
        stages: which Trainer entry points check: ``"fit"``, ``"validate"`` (at the end of
            ``trainer.validate()``) and ``"test"`` (at the end of ``trainer.test()``).
        max_probe_samples: most probe rows kept.
        probe_seed: seed of the probe draw from ``"val"`` / ``"train"``.
        k: neighbours for k-NN metrics.
        metric_kwargs: extra keyword arguments per metric, ``{"cka": {"kernel": "rbf"}}``.
        within_model: compute the ``self`` matrix; snapshots: ``self_initial`` / ``self_previous``.
        log_images: ``True``: heatmaps at validation / test ends and at the end of training,
            per-layer curves at the end of training; an int ``m``: heatmaps at every m-th check;
            ``False``: none. Images go to TensorBoard, MLflow and W&B loggers.
        batch_size: probe rows per forward call.
        forward_fn: ``forward_fn(pl_module, batch)`` runs the model on a probe batch (a slice of
            the batches your loader yields); default: the batch handed over as ``forward``'s
            signature asks (see :func:`prh_lightning.tracking.probe.call_model`).
        on_error: ``"warn"`` (default; failures are warned about once and recorded as NaN,
            training goes on) or ``"raise"``.
        max_history: most points kept per scalar tag (older ones thinned), ``None``: unbounded.
        default_every_n_train_steps: the step interval chosen when the run has no validation loop.
        prefix: first part of every tag (also the checkpoint state key).
        calibration: permutations ``K`` of the live permutation null against each reference
            (default 20; ``0`` or ``None``: off): logs ``alignment/<metric>/<ref>/chance``,
            ``.../threshold``, ``.../calibrated`` and ``.../<layer>/calibrated``; the curves show
            the chance band. See :mod:`prh_lightning.tracking.chance`.
        calibration_seed: seed of the ``K`` permutations (drawn once for the run;
            ``monitor.permutations`` holds them).
        calibration_alpha: null quantile of ``threshold``.
        calibration_max_memory: a budget (bytes, or ``"512MB"``, ``"4GB"``, ``"2GiB"``) for the
            working memory of the chance levels: the layers' preparation and the CKA null's tables
            (default 1 GiB); ``None``: each metric's ``max_memory`` in ``metric_kwargs``, else the
            defaults.
        heatmap_scores: ``"raw"`` (default) or ``"calibrated"`` reference heatmaps.
        distributed_probe: under DDP, ``"shard"`` (default: each rank runs its share of the
            probe rows, rank 0 gathers them) or ``"rank0"`` (rank 0 runs the whole probe). Rank
            0 alone computes references, matrices and chance levels; every rank gets the same
            scalars in ``trainer.callback_metrics`` and ``monitor.history``.

    Under ``strategy="ddp_spawn"`` (or ``"ddp_fork"``) rank 0 hands the monitor's history, layer
    names and last matrices back to the launching process as JSON at the end of each run, so
    ``monitor.history`` is filled there too (the feature snapshots are not handed back:
    ``self_initial`` restarts in a later run of the same monitor).
    """

    def __init__(
        self,
        probe: Any = "val",
        references: Mapping[str, Any] | None = None,
        metrics: Sequence[str] = ("cka", "mutual_knn"),
        layers: Any = "auto",
        reduce: Any = "mean",
        every_n_train_steps: int | None = None,
        check_on_validation_end: bool = True,
        stages: Sequence[str] = STAGES,
        max_probe_samples: int | None = 256,
        probe_seed: int = 0,
        k: int = 10,
        metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        within_model: bool = True,
        snapshots: bool = True,
        log_images: bool | int = True,
        batch_size: int = 64,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        on_error: str = "warn",
        max_history: int | None = 1000,
        default_every_n_train_steps: int = 50,
        prefix: str = "alignment",
        calibration: int | None = 20,
        calibration_seed: int = 0,
        calibration_alpha: float = 0.05,
        calibration_max_memory: int | str | None = None,
        heatmap_scores: str = "raw",
        distributed_probe: str = "shard",
    ) -> None:
        if every_n_train_steps is None and not check_on_validation_end:
            raise ValueError(
                "AlignmentMonitor would never check: set every_n_train_steps=N or check_on_validation_end=True"
            )
        if not isinstance(log_images, int) or log_images < 0:  # bool is an int
            raise ValueError(f"log_images must be True, False or a positive int (every m-th check), got {log_images!r}")
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {STAGES}")
        if isinstance(probe, str) and probe not in PROBE_SOURCES:
            raise TypeError(f"probe must be 'val', 'train', a DataLoader, a tensor or a tuple / dict of tensors, got {probe!r}")
        if isinstance(default_every_n_train_steps, bool) or not isinstance(default_every_n_train_steps, int) or default_every_n_train_steps <= 0:
            raise ValueError(f"default_every_n_train_steps must be a positive int, got {default_every_n_train_steps!r}")
        if isinstance(probe_seed, bool) or not isinstance(probe_seed, int) or probe_seed < 0:
            raise ValueError(f"probe_seed must be a non-negative int, got {probe_seed!r}")
        if every_n_train_steps is not None and (
            isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps <= 0
        ):
            raise ValueError(f"every_n_train_steps must be a positive int or None, got {every_n_train_steps!r}")
        self.tracker = AlignmentTracker(
            probe=None if isinstance(probe, str) else probe,
            references=references, metrics=metrics, layers=layers, reduce=reduce,
            every_n_steps=every_n_train_steps, max_probe_samples=max_probe_samples, k=k,
            metric_kwargs=metric_kwargs, within_model=within_model, snapshots=snapshots, batch_size=batch_size,
            forward_fn=forward_fn, on_error=on_error, max_history=max_history, prefix=prefix,
            calibration=calibration, calibration_seed=calibration_seed, calibration_alpha=calibration_alpha,
            calibration_max_memory=calibration_max_memory,
            heatmap_scores=heatmap_scores, distributed_probe=distributed_probe,
        )
        self.tracker.failures.owner = "AlignmentMonitor"
        self.probe_source = probe if isinstance(probe, str) else None
        self.probe_seed = probe_seed
        self.every_n_train_steps = every_n_train_steps
        self.check_on_validation_end = check_on_validation_end
        self.stages = tuple(stages)
        self.log_images = log_images
        self.default_every_n_train_steps = default_every_n_train_steps
        self._layouts = _logging.TensorBoardLayouts(prefix)
        self._imaged_step: int | None = None
        self._handoff = Handoff()  # worker processes of ddp_spawn hand the tracker's state back through it

    # -- what the tracker holds --------------------------------------------------------
    @property
    def history(self):
        """``{tag: [(trainer.global_step, value)]}`` of every check (bounded, see ``max_history``)."""
        self._receive()
        return self.tracker.history

    @property
    def last_matrices(self) -> dict[str, torch.Tensor]:
        self._receive()
        return self.tracker.last_matrices

    @property
    def model_layers(self) -> list[str]:
        self._receive()
        return self.tracker.model_layers

    @property
    def reference_layers(self) -> dict[str, list[str]]:
        self._receive()
        return self.tracker.reference_layers

    def _receive(self) -> None:
        """What the workers of a spawned run handed back (launching process), once."""
        if not self._handoff.in_worker:
            self._handoff.receive(self.tracker)

    @property
    def permutations(self) -> torch.Tensor | None:
        """``LongTensor[K, n]`` of the live calibration (see ``AlignmentTracker.permutations``)."""
        return self.tracker.permutations

    @property
    def probe(self):
        return self.tracker.probe

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.tracker.prefix)

    # -- set-up --------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # a spawned worker starts from what an earlier spawned run of this monitor handed back
        self._handoff.receive(self.tracker)
        if not trainer.loggers:
            rank_zero_warn(
                "AlignmentMonitor: the Trainer has no logger, so alignment scalars only reach "
                "trainer.callback_metrics and monitor.history; pass Trainer(logger=TensorBoardLogger('runs')) to see them"
            )
        check_layer_selection(pl_module, self.tracker.layers)

    def _ensure_probe(self, trainer: Trainer, stage: str) -> None:
        if self.tracker.probe is None:
            self.tracker.set_probe(self._probe_loader(trainer, stage))
        # Every rank must hold the same probe; rank 0's copy wins (a collective every rank joins).
        if trainer.world_size > 1 and not getattr(self, "_broadcast", False):
            self.tracker.probe = trainer.strategy.broadcast(self.tracker.probe, src=0)
            self._broadcast = True

    def _probe_loader(self, trainer: Trainer, stage: str):
        """The probe drawn from the data this run has: validation (or test) data for ``"val"``, else training data."""
        size = self.tracker.max_probe_samples or 256
        candidates = []
        if self.probe_source == "val":
            candidates.append(("validation", trainer.val_dataloaders))
            if stage == "test":
                candidates.insert(0, ("test", trainer.test_dataloaders))
        if stage == "fit":
            candidates.append(("training", trainer.train_dataloader))
        for what, loaders in candidates:
            loader = _first_loader(loaders)
            if loader is not None:
                if self.probe_source == "val" and what == "training":
                    rank_zero_warn(
                        "AlignmentMonitor: probe='val' but this run has no validation data; the probe is "
                        f"{size} training samples instead (pass probe=<DataLoader or tensors> to choose)"
                    )
                return probe_from_loader(loader, size, self.probe_seed)
        raise ValueError(
            f"AlignmentMonitor: probe={self.probe_source!r} but the Trainer has no such data in this "
            f"{stage!r} run; pass probe=<DataLoader, tensor or tuple of tensors>"
        )

    # -- triggers --------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "fit" not in self.stages:
            return
        self._ensure_probe(trainer, "fit")
        if self.every_n_train_steps is None and not trainer.enable_validation:
            self.tracker.every_n_steps = self.default_every_n_train_steps
            rank_zero_warn(
                "AlignmentMonitor: this run has no validation loop, so alignment is checked every "
                f"{self.default_every_n_train_steps} training steps (set every_n_train_steps= to choose)"
            )
        elif self.every_n_train_steps is None:
            self.tracker.every_n_steps = None
        self._check(trainer, pl_module, images=False)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if "fit" in self.stages and self.tracker.due(trainer.global_step):
            self._check(trainer, pl_module, images=False)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and self.check_on_validation_end and "fit" in self.stages:
            self._check(trainer, pl_module, images=True)
        elif trainer.state.fn == "validate" and "validate" in self.stages:
            self._ensure_probe(trainer, "validate")
            self._check(trainer, pl_module, images=True)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "test" in self.stages:
            self._ensure_probe(trainer, "test")
            self._check(trainer, pl_module, images=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.log_images or not trainer.is_global_zero or self.tracker.last_step is None:
            return
        heatmaps = self._imaged_step != self.tracker.last_step and self.tracker.last_step > 0
        self._log_figures(trainer, heatmaps=heatmaps, curves=True)

    # -- one check -------------------------------------------------------------------------
    def _check(self, trainer: Trainer, pl_module: LightningModule, images: bool) -> None:
        tracker = self.tracker
        step = trainer.global_step
        if tracker.last_step is not None and step <= tracker.last_step:  # already checked at this step
            if images and self.log_images is True and step == tracker.last_step and self._imaged_step != step:
                if trainer.is_global_zero and step > 0:  # e.g. validation right after a step check
                    self._log_figures(trainer, heatmaps=True, curves=False)
            return
        values = tracker.check(pl_module, step, context=trainer.precision_plugin.forward_context, log=False)
        # available to EarlyStopping / ModelCheckpoint; under DDP rank 0 computes them and every rank
        # gets the same values (see AlignmentTracker(distributed_probe=...))
        trainer.callback_metrics.update({tag: torch.tensor(v) for tag, v in values.items()})
        if not trainer.is_global_zero or not trainer.loggers:
            return
        with self._logger_failures("logging the scalars"):
            _logging.log_scalars(trainer, values, _logging.log_step(trainer))
            self._layouts.update(trainer, list(values))
        m = self.log_images
        due = (m is True and images) or (not isinstance(m, bool) and m > 0 and (tracker.n_checks - 1) % m == 0)
        if due and step > 0:
            self._log_figures(trainer, heatmaps=True, curves=False)

    def _log_figures(self, trainer: Trainer, heatmaps: bool, curves: bool) -> None:
        if not any(_logging.takes_images(lg) for lg in trainer.loggers):
            return
        from prh_lightning.plotting import figure_to_array

        with self._logger_failures("drawing or logging the figures"):
            figures = self.tracker.figures(heatmaps=heatmaps, curves=curves)
            images = {tag: figure_to_array(fig) for tag, fig in figures.items()}
            _logging.log_images(trainer, images, _logging.log_step(trainer))
        if heatmaps:
            self._imaged_step = self.tracker.last_step

    @contextlib.contextmanager
    def _logger_failures(self, what: str) -> Iterator[None]:
        """A logger or plotting error is reported like any other failure (a warning once, training
        goes on; raised with ``on_error="raise"``): a full disk or a logger's own limits must not
        end a multi-day run."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - reported through the tracker's failure policy
            self.tracker.failures.report(what, err)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # in a spawned worker: hand the state back to the launching process
            self._handoff.send(self.tracker)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._receive()
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)


def _first_loader(loaders: Any) -> Any:
    """The first DataLoader of what ``trainer.*_dataloaders`` holds (one, a list or a dict)."""
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders
