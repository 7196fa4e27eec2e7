"""Framework-free alignment tracking: :class:`AlignmentTracker` owns the probe, references,
metrics, schedule, bounded history, checkpoint state and logging sinks, and imports no training
framework. Front ends: :class:`prh_lightning.callbacks.AlignmentMonitor` (Lightning),
:class:`prh_lightning.integrations.huggingface.AlignmentTrainerCallback` (Hugging Face
``Trainer``), and plain loops or Lightning Fabric calling :meth:`AlignmentTracker.step`.
"""

from prh_lightning.tracking.failures import Failures
from prh_lightning.tracking.history import History
from prh_lightning.tracking.probe import ForwardError, Probe, call_model, make_probe
from prh_lightning.tracking.references import Reference
from prh_lightning.tracking.sinks import CallableSink, MemorySink, TensorBoardSink
from prh_lightning.tracking.tracker import AlignmentTracker

__all__ = [
    "AlignmentTracker",
    "CallableSink",
    "Failures",
    "ForwardError",
    "History",
    "MemorySink",
    "Probe",
    "Reference",
    "TensorBoardSink",
    "call_model",
    "make_probe",
]
