"""prh-lightning: layer-by-layer representational alignment for PyTorch Lightning.

Public API (imported lazily, so ``import prh_lightning`` stays cheap):
``LayerTaps``, ``record_representations``, ``Representations``, ``alignment_matrix``,
``best_alignment``, ``calibrate``, and the sub-packages ``functional``, ``metrics`` and ``callbacks``.

>>> import prh_lightning
>>> prh_lightning.Representations.__module__
'prh_lightning.representations'
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Representations": "prh_lightning.representations",
    "LayerTaps": "prh_lightning.taps",
    "TapBudgetExceeded": "prh_lightning.taps",
    "record_representations": "prh_lightning.recording",
    "alignment_matrix": "prh_lightning.alignment",
    "best_alignment": "prh_lightning.alignment",
    "calibrate": "prh_lightning.calibration",
    "model_cka": "prh_lightning.streaming",
    "alignment_curve": "prh_lightning.curve",
}
_SUBMODULES = {"functional", "metrics", "callbacks", "taps", "alignment", "models", "data", "plotting", "recipes"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
