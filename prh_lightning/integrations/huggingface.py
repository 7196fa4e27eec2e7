"""Alignment tracking inside a Hugging Face ``transformers.Trainer``.

::

    from prh_lightning.integrations.huggingface import AlignmentTrainerCallback
    from prh_lightning.tracking import AlignmentTracker

    tracker = AlignmentTracker(probe=probe_batches, layers="auto", every_n_steps=50)
    trainer = Trainer(model=model, args=args, train_dataset=train)
    AlignmentTrainerCallback.attach(trainer, tracker)     # = trainer.add_callback(...) knowing the trainer
    trainer.train()

The tracker checks at the start of training, every ``every_n_steps`` optimiser steps and after
each evaluation (the model in eval mode under ``no_grad``, training flags restored). Scalars go
through ``trainer.log`` to every integration the Trainer reports to (TensorBoard, W&B, MLflow,
...) and to ``trainer.state.log_history``; when the Trainer reports to MLflow, whose file store
keeps each ``/`` of a key as a folder, ``.../<layer>/calibrated`` is logged as
``.../<layer>.calibrated`` (see :func:`~prh_lightning.tracking.sinks.folder_safe`).

Figures go where the Lightning monitor sends them, at the same moments (``log_images=True``:
heatmaps after each evaluation and at the end of training, per-layer curves at the end of
training; an int ``m``: heatmaps at every m-th check): to the Trainer's TensorBoard event files
(its ``TensorBoardCallback`` writer, plus a custom-scalars layout: one multi-line chart per
metric and target, a line per layer, over the Trainer's ``train/`` tags), to its MLflow run (PNG
artifacts under ``alignment/``) and to its W&B run, for the integrations ``report_to`` named.
Finding those integrations needs the trainer (:meth:`AlignmentTrainerCallback.attach`). The tracker's state (history, counters) is kept in
``TrainerState.stateful_callbacks`` and so in each checkpoint's ``trainer_state.json``; the
snapshot features of ``self_initial`` / ``self_previous`` are written next to it as
``alignment_snapshots.safetensors``. Resuming with ``trainer.train(resume_from_checkpoint=...)``
continues the history.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from transformers import TrainerCallback

from prh_lightning.tracking.probe import probe_from_loader
from prh_lightning.tracking.sinks import MLflowSink, TensorBoardSink, WandbSink, folder_safe
from prh_lightning.tracking.tracker import AlignmentTracker

STATE_KEY = "prh_lightning.AlignmentTracker"
SNAPSHOT_FILE = "alignment_snapshots.safetensors"


class AlignmentTrainerCallback(TrainerCallback):
    """A ``TrainerCallback`` that runs an :class:`AlignmentTracker`.

    Args:
        tracker: the tracker (probe, references, metrics, ``every_n_steps``). Without a probe,
            ``tracker.max_probe_samples`` samples of the evaluation data (else the training data)
            are drawn with ``probe_seed``.
        trainer: the ``transformers.Trainer`` whose ``log`` carries the scalars (set by
            :meth:`attach`); without it they are only appended to ``state.log_history``.
        probe_seed: seed of the probe draw when the tracker has no probe.
        log_images: ``True`` (default): heatmaps after each evaluation and at the end of
            training, per-layer curves at the end of training; an int ``m``: heatmaps at every
            m-th check; ``False``: none (as ``AlignmentMonitor(log_images=...)``).
        check_on_evaluate: also check after each evaluation (``Trainer.evaluate`` inside or
            outside ``train``), as the Lightning monitor does at validation end.

    Under ``torch.distributed`` every process must run the callback; only the main process logs.
    """

    def __init__(
        self,
        tracker: AlignmentTracker,
        trainer: Any = None,
        probe_seed: int = 0,
        log_images: bool | int = True,
        check_on_evaluate: bool = True,
    ) -> None:
        if not isinstance(tracker, AlignmentTracker):
            raise TypeError(f"AlignmentTrainerCallback needs an AlignmentTracker, got {type(tracker).__name__}")
        if not isinstance(log_images, int) or log_images < 0:  # bool is an int
            raise ValueError(f"log_images must be True, False or a positive int (every m-th check), got {log_images!r}")
        self.tracker = tracker
        self.trainer = trainer
        self.probe_seed = probe_seed
        self.log_images = log_images
        self.check_on_evaluate = check_on_evaluate
        if tracker.every_n_steps is None:
            tracker.every_n_steps = 50
        self._imaged_step: int | None = None
        self._tensorboard: tuple[Any, TensorBoardSink] | None = None  # (the writer it wraps, the sink)
        self._own_writer: Any = None  # opened when the Trainer's TensorBoard writer is already closed
        self._mlflow_run: str | None = None

    @classmethod
    def attach(cls, trainer: Any, tracker: AlignmentTracker, **kwargs: Any) -> AlignmentTrainerCallback:
        """Create the callback for ``trainer`` and add it (``trainer.add_callback``)."""
        callback = cls(tracker, trainer=trainer, **kwargs)
        trainer.add_callback(callback)
        return callback

    # -- hooks ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._ensure_probe(kwargs.get("eval_dataloader") or kwargs.get("train_dataloader"))
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved is not None and self.tracker.last_step is None:  # resuming from a checkpoint
            self._restore(args, state, saved)
        self._check(args, state, model, force=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.tracker.due(state.global_step):
            self._check(args, state, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not self.check_on_evaluate:
            return
        self._ensure_probe(kwargs.get("eval_dataloader") or kwargs.get("train_dataloader"))
        step = state.global_step
        if self.tracker.last_step is None or step > self.tracker.last_step:
            self._check(args, state, model, force=True, evaluated=True)
        elif self.log_images is True and step == self.tracker.last_step and self._imaged_step != step and step > 0:
            if state.is_world_process_zero:  # e.g. an evaluation right after a step check
                self._log_figures(heatmaps=True, curves=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.log_images and state.is_world_process_zero and self.tracker.last_step is not None:
            last = self.tracker.last_step
            self._log_figures(heatmaps=self._imaged_step != last and last > 0, curves=True)
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None
        self._tensorboard = None

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        snapshots = self._snapshot_tensors()
        if os.path.isdir(folder) and snapshots:
            from prh_lightning.representations import Representations

            Representations(snapshots).save(os.path.join(folder, SNAPSHOT_FILE))

    # -- work ----------------------------------------------------------------------------
    def _ensure_probe(self, loader: Any) -> None:
        if self.tracker.probe is not None:
            return
        if loader is None:
            raise ValueError("AlignmentTrainerCallback: the tracker has no probe and the Trainer gave no data loader")
        self.tracker.set_probe(probe_from_loader(loader, self.tracker.max_probe_samples or 256, self.probe_seed))

    def _check(self, args, state, model, force: bool = False, evaluated: bool = False) -> None:
        step = state.global_step
        if model is None or (not force and not self.tracker.due(step)):
            return
        values = self.tracker.check(model, step, log=False)
        if not values:
            return
        state.stateful_callbacks[STATE_KEY] = self._json_state()
        if not state.is_world_process_zero:
            return
        self.tracker.log_scalars(values, step)
        if self.trainer is not None:
            self.trainer.log(self._trainer_keys(values))
            with self._logger_failures("writing the TensorBoard layout"):
                tensorboard = self._tensorboard_sink()
                if tensorboard is not None:
                    tensorboard.update_layout(list(values))
        else:
            state.log_history.append({**values, "step": step})
        m = self.log_images
        due = (m is True and evaluated) or (not isinstance(m, bool) and m > 0 and (self.tracker.n_checks - 1) % m == 0)
        if due and step > 0:
            self._log_figures(heatmaps=True, curves=False)

    # -- figures -------------------------------------------------------------------------
    def _log_figures(self, heatmaps: bool, curves: bool) -> None:
        """Render the tracker's figures once and send them to every image logger of the Trainer
        (and to the tracker's own image sinks), at the last check's step."""
        step = self.tracker.last_step
        with self._logger_failures("drawing or logging the figures"):
            sinks = self._figure_sinks() + [s for s in self.tracker.sinks if getattr(s, "takes_images", False)]
            if sinks and (heatmaps or curves):
                from prh_lightning.plotting import figure_to_array

                figures = self.tracker.figures(heatmaps=heatmaps, curves=curves)
                images = {tag: figure_to_array(fig) for tag, fig in figures.items()}
                for sink in sinks:
                    sink.log_images(images, step)
        if heatmaps:
            self._imaged_step = step

    def _figure_sinks(self) -> list[Any]:
        """Image sinks for the Trainer's TensorBoard, MLflow and W&B integrations (those it has)."""
        sinks: list[Any] = []
        tensorboard = self._tensorboard_sink()
        if tensorboard is not None:
            sinks.append(tensorboard)
        run = self._mlflow_run_id()
        if run is not None:
            sinks.append(MLflowSink(run))
        wandb_run = self._wandb_run()
        if wandb_run is not None:
            sinks.append(WandbSink(wandb_run, step_metric="train/global_step"))
        return sinks

    def _integration(self, name: str) -> Any:
        """The Trainer's integration callback of class ``name`` (``None`` without a trainer or it)."""
        if self.trainer is None:
            return None
        return next((cb for cb in self.trainer.callback_handler.callbacks if type(cb).__name__ == name), None)

    def _tensorboard_sink(self) -> TensorBoardSink | None:
        """A sink on the Trainer's TensorBoard writer; once the integration has closed it (its
        ``on_train_end`` runs first), on a writer of ours in the same ``logging_dir``."""
        callback = self._integration("TensorBoardCallback")
        if callback is None:
            return None
        writer = getattr(callback, "tb_writer", None) or self._own_writer
        if writer is None and getattr(callback, "logging_dir", None):
            from torch.utils.tensorboard import SummaryWriter

            writer = self._own_writer = SummaryWriter(log_dir=callback.logging_dir)
        if writer is None:
            return None
        if self._tensorboard is None or self._tensorboard[0] is not writer:  # a new event file: layout again
            self._tensorboard = (writer, TensorBoardSink(writer, prefix=self.tracker.prefix, scope="train/"))
        return self._tensorboard[1]

    def _mlflow_run_id(self) -> str | None:
        """The MLflow integration's run (remembered: it ends the run before this callback's
        ``on_train_end``). Read through MLflow's public ``mlflow.active_run()``, the run the
        integration started, not through the integration's private attributes."""
        if self._integration("MLflowCallback") is None:
            return None
        import mlflow  # installed: the Trainer attached its MLflow integration

        active = mlflow.active_run()
        if active is not None:
            self._mlflow_run = active.info.run_id
        return self._mlflow_run

    def _wandb_run(self) -> Any:
        """The W&B integration's run: ``wandb.run`` (public), once the integration has started it."""
        if self._integration("WandbCallback") is None:
            return None
        import wandb

        return wandb.run

    @contextlib.contextmanager
    def _logger_failures(self, what: str) -> Iterator[None]:
        """A logger or plotting error is reported like any other failure (warned about once,
        training goes on; raised with ``on_error="raise"``)."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - reported through the tracker's failure policy
            self.tracker.failures.report(what, err)

    def _trainer_keys(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` with :func:`folder_safe` keys when an MLflow integration is attached."""
        from transformers.integrations import MLflowCallback

        if not any(isinstance(cb, MLflowCallback) for cb in self.trainer.callback_handler.callbacks):
            return dict(values)
        keys = folder_safe(list(values))
        return {keys[tag]: value for tag, value in values.items()}

    def _json_state(self) -> dict[str, Any]:
        state = self.tracker.state_dict()
        state.pop("initial")
        state.pop("previous")
        return state

    def _snapshot_tensors(self) -> dict[str, Any]:
        state = self.tracker.state_dict()
        out = {}
        for which in ("initial", "previous"):
            for layer, value in (state[which] or {}).items():
                out[f"{which}::{layer}"] = value
        return out

    def _restore(self, args, state, saved: dict[str, Any]) -> None:
        import warnings

        snapshots = {"initial": None, "previous": None}
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", SNAPSHOT_FILE)
        if os.path.exists(path):
            from prh_lightning.representations import Representations

            reps = Representations.load(path)
            for key in reps.layers:
                which, layer = key.split("::", 1)
                snapshots[which] = {**(snapshots[which] or {}), layer: reps[key]}
        else:
            warnings.warn(
                f"AlignmentTrainerCallback: no {SNAPSHOT_FILE} in the checkpoint folder, so self_initial and "
                "self_previous restart from the resumed weights (the history is kept)",
                UserWarning,
                stacklevel=2,
            )
        self.tracker.load_state_dict({**saved, **snapshots})
