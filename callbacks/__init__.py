"""Lightning callbacks (``prh_lightning.callbacks``), one file per callback.

- :class:`AlignmentMonitor`: layer x layer alignment of the model being trained against
  reference models, itself (within-model) and its earlier snapshots, logged while it trains
  (a thin shell over the framework-free :class:`prh_lightning.tracking.AlignmentTracker`).
- :class:`Reference`: a reference model and how to feed it the probe (its own inputs, layers).
- :class:`RepresentationRecorder`: save per-layer features as ``Representations`` files
  during validation, test, predict, or on a fixed probe during training.
"""

from prh_lightning.callbacks.alignment_monitor import AlignmentMonitor, Reference
from prh_lightning.callbacks.representation_recorder import RepresentationRecorder

__all__ = ["AlignmentMonitor", "Reference", "RepresentationRecorder"]
