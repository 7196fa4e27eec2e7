"""Handing a tracker's state from a spawned worker back to the process that launched it.

Launchers that start fresh worker processes (Lightning's ``strategy="ddp_spawn"`` /
``"ddp_fork"``, ``torch.multiprocessing.spawn``) return only what they were written to
return (Lightning: the weights and ``callback_metrics``); the tracker object in the launching
process never sees the checks its copies ran. A :class:`Handoff` created with the tracker's
owner names a private file: rank 0 of the workers writes the tracker's state there as JSON
(atomically) at the end of each run, and the launching process reads it back the next time it
looks at the tracker (and deletes it). JSON only: nothing is unpickled. The file is also
removed when the owner is garbage collected or the launching process exits.

>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
>>> tracker = AlignmentTracker(probe=torch.rand(8, 3), metrics=("cka",), snapshots=False, calibration=0)
>>> _ = tracker.check(model, step=0)
>>> copy = AlignmentTracker(probe=torch.rand(8, 3), metrics=("cka",), snapshots=False, calibration=0)
>>> restore(copy, json.loads(json.dumps(portable_state(tracker))))
>>> list(copy.history) == list(tracker.history) != [], copy.last_step, copy.last_matrices["cka/self"].shape
(True, 0, torch.Size([3, 3]))
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
import warnings
import weakref
from typing import Any

import torch

from prh_lightning.tracking.tracker import AlignmentTracker

FORMAT = "prh-lightning tracker handoff"
VERSION = 1


def portable_state(tracker: AlignmentTracker) -> dict[str, Any]:
    """The tracker's :meth:`~AlignmentTracker.state_dict` as plain JSON values, without the
    feature snapshots (``self_initial`` / ``self_previous`` restart after a hand-off), plus the
    last check's matrices (for figures)."""
    state = tracker.state_dict()
    state.pop("initial", None)
    state.pop("previous", None)
    matrices = {key: m.detach().cpu().double().tolist() for key, m in tracker.last_matrices.items()}
    return {"format": FORMAT, "version": VERSION, "state": state, "last_matrices": matrices}


def restore(tracker: AlignmentTracker, data: dict[str, Any]) -> None:
    """Load a :func:`portable_state` into ``tracker`` (history, counters, layer names, last matrices)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"not a {FORMAT!r} version {VERSION} file")
    tracker.load_state_dict({**data["state"], "initial": None, "previous": None})
    tracker.last_matrices = {key: torch.tensor(m, dtype=torch.float32) for key, m in data["last_matrices"].items()}


class Handoff:
    """A private file that worker processes write a tracker's state to and the launching
    process (the one that created this object) reads it back from."""

    def __init__(self) -> None:
        self.path = os.path.join(tempfile.gettempdir(), f"prh-lightning-handoff-{uuid.uuid4().hex}.json")
        self.home_pid = os.getpid()
        weakref.finalize(self, _remove, self.path, self.home_pid)

    @property
    def in_worker(self) -> bool:
        """Whether this process is not the one that created the hand-off (a spawned / forked worker)."""
        return os.getpid() != self.home_pid

    def send(self, tracker: AlignmentTracker) -> None:
        """In a worker: write the tracker's state (atomically: a temporary file, then a rename).
        In the launching process itself: nothing to hand over."""
        if not self.in_worker:
            return
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".prh-handoff-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(portable_state(tracker), f)
            os.replace(tmp, self.path)
        except BaseException:
            _remove(tmp, os.getpid())
            raise

    def receive(self, tracker: AlignmentTracker) -> bool:
        """Load the state a worker wrote, if any (the launching process then deletes the file);
        ``True`` when something was loaded. A damaged file is a warning, not an error."""
        try:
            with open(self.path) as f:
                data = json.load(f)
            restore(tracker, data)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as err:
            warnings.warn(
                f"{tracker.failures.owner}: could not read the state the worker processes handed back from "
                f"{self.path} ({type(err).__name__}: {err}); the history of the spawned run is missing here",
                UserWarning,
                stacklevel=3,
            )
            data = None
        if not self.in_worker:
            _remove(self.path, self.home_pid)
        return data is not None


def _remove(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
