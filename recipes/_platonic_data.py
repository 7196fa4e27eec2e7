"""Paired data, feature files and arrays of the ``platonic`` recipe's ``extract`` / ``measure``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from prh_lightning.recipes import _common as common
from prh_lightning.representations import Representations

RecipeError = common.RecipeInputError


def data_source(data: str | None) -> str:
    """The ``--data`` to load: a local folder (checked, ``$PRH_FLICKR_DIR`` / ``../shared`` when None)
    or a hub dataset id such as ``minhuh/prh``."""
    if data is None or Path(data).exists() or data.startswith((".", "/", "~")) or data.count("/") != 1:
        return str(common.resolve_flickr_dir(data))
    return data


def data_record(data, source: str) -> dict:
    """``{"path", "n_items", "sha256"}``: SHA-256 over the captions and decoded pixels, in order."""
    digest = hashlib.sha256()
    for text, image in zip(data.texts, data.images):
        digest.update(text.encode() + b"\0" + image.tobytes())
    return {"path": source, "name": data.name, "n_items": len(data), "sha256": digest.hexdigest()}


def _dataset_dir(out: Path, dataset: str | None) -> Path:
    root = out / "features"
    if dataset is not None:
        if not (root / dataset).is_dir():
            raise RecipeError(f"no features for dataset {dataset!r} under {root}; run prh-lightning extract first")
        return root / dataset
    found = sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
    if len(found) != 1:
        what = "no feature folders" if not found else f"several datasets ({', '.join(p.name for p in found)}); pick one with --dataset"
        raise RecipeError(f"{root}: {what}. Run prh-lightning extract --out {out} first")
    return found[0]


def load_features(folder: Path, pool_language: str = "avg", pool_vision: str = "none") -> tuple[dict, dict]:
    """``(language, vision)``: model name -> :class:`Representations` from one dataset folder.

    Every file must hold the same samples (``n`` and sample ids), else :class:`RecipeError`.
    """
    reps: dict[str, dict[str, Representations]] = {"language": {}, "vision": {}}
    reference: tuple[Path, Representations] | None = None
    for path in sorted(folder.glob("*.safetensors")):
        rep = Representations.load(path)
        modality, pool = rep.metadata.get("modality"), rep.metadata.get("pool")
        if modality not in reps or pool != (pool_language if modality == "language" else pool_vision):
            continue
        if reference is None:
            reference = (path, rep)
        elif rep.n != reference[1].n or rep.sample_ids != reference[1].sample_ids:
            raise RecipeError(
                f"{path.name} holds {rep.n} samples but {reference[0].name} holds {reference[1].n} "
                "(or their sample ids differ): every feature file must come from the same pairs; "
                "re-run extract with the same --data and --n (use --force)"
            )
        reps[modality][rep.metadata.get("model", path.stem)] = rep
    for modality in reps:
        if not reps[modality]:
            raise RecipeError(f"{folder}: no {modality} feature files (pool {pool_language if modality == 'language' else pool_vision}); run extract first")
    return reps["language"], reps["vision"]


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` of a plain numeric array (loads with ``allow_pickle=False``), atomically."""
    import io

    from prh_lightning.reporting import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
