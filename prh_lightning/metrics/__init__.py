"""torchmetrics classes over the functional core: ``update(a, b)`` per batch, ``compute()``.

``CKA`` streams linear CKA exactly (memory independent of ``n``); the others keep a bounded
sample buffer (``max_samples``). All sync across DDP ranks; sample ids (``index=``) let
them drop the duplicates that padding samplers add. ``AlignmentMatrix`` does every layer pair.
"""

from prh_lightning.metrics.alignment_matrix import AlignmentMatrix
from prh_lightning.metrics.buffered import BufferedPairMetric
from prh_lightning.metrics.geometry import RSA, SVCCA
from prh_lightning.metrics.knn import CKNNA, LCSKNN, CycleKNN, EditDistanceKNN, MutualKNN
from prh_lightning.metrics.streaming_cka import CKA, UnbiasedCKA

__all__ = [
    "CKA",
    "CKNNA",
    "LCSKNN",
    "RSA",
    "SVCCA",
    "AlignmentMatrix",
    "BufferedPairMetric",
    "CycleKNN",
    "EditDistanceKNN",
    "MutualKNN",
    "UnbiasedCKA",
]
