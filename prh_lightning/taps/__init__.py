"""Forward-hook taps that record reduced per-layer features: :class:`LayerTaps`."""

from prh_lightning.taps.compiled import eager, is_compiled, unwrap_compiled
from prh_lightning.taps.layer_taps import LayerTaps, TapBudgetExceeded
from prh_lightning.taps.reduction import REDUCE_MODES
from prh_lightning.taps.selection import TapTarget, default_leaves, resolve_layers

__all__ = [
    "LayerTaps",
    "TapBudgetExceeded",
    "TapTarget",
    "REDUCE_MODES",
    "default_leaves",
    "eager",
    "is_compiled",
    "resolve_layers",
    "unwrap_compiled",
]
