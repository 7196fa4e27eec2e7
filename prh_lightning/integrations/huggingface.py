"""Alignment tracking inside a Hugging Face ``transformers.Trainer``.

::

    from prh_lightning.integrations.huggingface import AlignmentTrainerCallback
    from prh_lightning.tracking import AlignmentTracker

    tracker = AlignmentTracker(probe=probe_batches, layers="auto", every_n_steps=50)
    trainer = Trainer(model=model, args=args, train_dataset=train)
    AlignmentTrainerCallback.attach(trainer, tracker)     # = trainer.add_callback(...) knowing the trainer
    trainer.train()

The tracker checks at the start of training and every ``every_n_steps`` optimiser steps (the
model in eval mode under ``no_grad``, training flags restored). Scalars go through
``trainer.log`` to every integration the Trainer reports to (TensorBoard, W&B, MLflow, ...)
and to ``trainer.state.log_history``; when the Trainer reports to MLflow, whose file store keeps
each ``/`` of a key as a folder, ``.../<layer>/calibrated`` is logged as ``.../<layer>.calibrated``
(see :func:`~prh_lightning.tracking.sinks.folder_safe`). The tracker's state (history, counters) is kept in
``TrainerState.stateful_callbacks`` and so in each checkpoint's ``trainer_state.json``; the
snapshot features of ``self_initial`` / ``self_previous`` are written next to it as
``alignment_snapshots.safetensors``. Resuming with ``trainer.train(resume_from_checkpoint=...)``
continues the history.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from prh_lightning.tracking.probe import probe_from_loader
from prh_lightning.tracking.sinks import folder_safe
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
    """

    def __init__(self, tracker: AlignmentTracker, trainer: Any = None, probe_seed: int = 0) -> None:
        if not isinstance(tracker, AlignmentTracker):
            raise TypeError(f"AlignmentTrainerCallback needs an AlignmentTracker, got {type(tracker).__name__}")
        self.tracker = tracker
        self.trainer = trainer
        self.probe_seed = probe_seed
        if tracker.every_n_steps is None:
            tracker.every_n_steps = 50

    @classmethod
    def attach(cls, trainer: Any, tracker: AlignmentTracker, **kwargs: Any) -> AlignmentTrainerCallback:
        """Create the callback for ``trainer`` and add it (``trainer.add_callback``)."""
        callback = cls(tracker, trainer=trainer, **kwargs)
        trainer.add_callback(callback)
        return callback

    # -- hooks ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.tracker.probe is None:
            loader = kwargs.get("eval_dataloader") or kwargs.get("train_dataloader")
            if loader is None:
                raise ValueError("AlignmentTrainerCallback: the tracker has no probe and the Trainer gave no data loader")
            self.tracker.set_probe(probe_from_loader(loader, self.tracker.max_probe_samples or 256, self.probe_seed))
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved is not None and self.tracker.last_step is None:  # resuming from a checkpoint
            self._restore(args, state, saved)
        self._check(args, state, model, force=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.tracker.due(state.global_step):
            self._check(args, state, model)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        snapshots = self._snapshot_tensors()
        if os.path.isdir(folder) and snapshots:
            from prh_lightning.representations import Representations

            Representations(snapshots).save(os.path.join(folder, SNAPSHOT_FILE))

    # -- work ----------------------------------------------------------------------------
    def _check(self, args, state, model, force: bool = False) -> None:
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
        else:
            state.log_history.append({**values, "step": step})

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
