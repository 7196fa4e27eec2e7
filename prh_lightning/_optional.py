"""Optional dependencies: import them where they are used, with an error that names the extra.

The core install (``pip install prh-lightning``) holds what taps, representations, the
functional metrics, the metric classes and the callbacks need. Everything else is an extra:

=========  ====================================================  ==============================
extra      packages                                              used by
=========  ====================================================  ==============================
hf         transformers, sentence-transformers                   Hugging Face model loaders
vision     torchvision, timm, pillow                             vision model loaders, images
plot       matplotlib, tensorboard                               figures, TensorBoard images
stats      scipy                                                 Kendall's tau in RSA
faiss      faiss-cpu                                             approximate neighbours (knn_backend="faiss")
recipes    umap-learn, scikit-learn, datasets (+ the above)      the recipes
=========  ====================================================  ==============================

>>> require("math").sqrt(4.0)
2.0
>>> extra_for("sklearn")
'recipes'
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: top-level module -> (distribution on PyPI, extra of prh-lightning that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "transformers": ("transformers", "hf"),
    "sentence_transformers": ("sentence-transformers", "hf"),
    "torchvision": ("torchvision", "vision"),
    "timm": ("timm", "vision"),
    "PIL": ("pillow", "vision"),
    "matplotlib": ("matplotlib", "plot"),
    "tensorboard": ("tensorboard", "plot"),
    "scipy": ("scipy", "stats"),
    "faiss": ("faiss-cpu", "faiss"),
    "umap": ("umap-learn", "recipes"),
    "sklearn": ("scikit-learn", "recipes"),
    "datasets": ("datasets", "recipes"),
}


class MissingOptionalDependency(ModuleNotFoundError):
    """An optional package is not installed; the message names the ``pip install`` that adds it.

    A subclass of ``ModuleNotFoundError`` (and so of ``ImportError``): code that already
    catches those keeps working.
    """


def extra_for(module: str) -> str | None:
    """The extra that installs top-level ``module`` (``"sklearn"`` -> ``"recipes"``), or None."""
    entry = OPTIONAL.get(module.split(".")[0])
    return None if entry is None else entry[1]


def require(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import ``module`` (dotted names allowed), or raise :class:`MissingOptionalDependency`
    saying which extra installs it.

    Args:
        module: what to import, e.g. ``"umap"`` or ``"scipy.stats"``.
        extra: the prh-lightning extra to name; default: looked up in :data:`OPTIONAL`.
        purpose: what needs it, for the message (e.g. ``"the UMAP figure"``).

    Only the absence of ``module`` itself (or of a parent package) is translated; a module
    that is installed but fails to import, or misses one of *its* dependencies, raises its
    own error with its own traceback.

    >>> require("no_such_module_xyz", extra="recipes")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    prh_lightning._optional.MissingOptionalDependency: no_such_module_xyz is needed ... pip install 'prh-lightning[recipes]'
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        parts = module.split(".")
        ours = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if err.name not in ours:
            raise
        top = parts[0]
        distribution, default_extra = OPTIONAL.get(top, (top, None))
        extra = extra or default_extra
        needed = f"{purpose} needs {module}" if purpose else f"{module} is needed"
        how = f"pip install 'prh-lightning[{extra}]'" if extra else f"pip install {distribution}"
        raise MissingOptionalDependency(
            f"{needed} but the optional package {distribution!r} is not installed; {how}", name=err.name
        ) from err
