"""Paired image-caption data for vision-language alignment.

Two sources, both through Hugging Face ``datasets``:

- a local image folder with a ``metadata.csv`` (``file_name,text``), read with the
  ``imagefolder`` builder (offline; the default is the folder in the environment variable
  ``PRH_FLICKR_DIR``, e.g. Flickr8k-1024);
- a hub dataset, by default the paper's ``minhuh/prh`` at revision ``wit_1024`` (online).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from prh_lightning._optional import require

PRH_DATASET = "minhuh/prh"
PRH_SUBSET = "wit_1024"
FLICKR_ENV = "PRH_FLICKR_DIR"


class PairedDataError(ValueError):
    """The paired data cannot be loaded or has no image/text columns; the message says why."""


@dataclass
class PairedData:
    """``n`` image-caption pairs: ``images[i]`` (PIL) is described by ``texts[i]``.

    >>> PairedData("minhuh/prh:wit_1024", images=[None, None], texts=["a dog", "a cat"], sample_ids=["0", "1"]).slug
    'minhuh-prh-wit_1024_n2'
    """

    name: str
    images: list
    texts: list[str]
    sample_ids: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def slug(self) -> str:
        """File-system name of this dataset and sample count, e.g. ``flickr8k-1024_n256``."""
        return f"{slugify(self.name)}_n{len(self)}"


def slugify(name: str) -> str:
    """``"minhuh/prh:wit_1024"`` -> ``"minhuh-prh-wit_1024"``: safe in a file name.

    >>> slugify("minhuh/prh:wit_1024")
    'minhuh-prh-wit_1024'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def default_flickr_dir() -> Path | None:
    """The folder named by ``$PRH_FLICKR_DIR``, or None when the variable is unset or empty.

    The library assumes no data location; a command line may fall back to a folder of its own.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"PRH_FLICKR_DIR": "/data/flickr8k-1024"}):
    ...     default_flickr_dir()
    PosixPath('/data/flickr8k-1024')
    >>> with mock.patch.dict(os.environ, {"PRH_FLICKR_DIR": ""}):
    ...     default_flickr_dir() is None
    True
    """
    env = os.environ.get(FLICKR_ENV)
    return Path(env) if env else None


def load_paired(source: str | os.PathLike | None = None, subset: str | None = PRH_SUBSET,
                max_samples: int | None = None, split: str = "train") -> PairedData:
    """Load ``max_samples`` (first ones; all if None) image-caption pairs.

    Args:
        source: an image folder (``metadata.csv`` with a ``text`` column), a hub dataset id
            (``"minhuh/prh"``), or None for :func:`default_flickr_dir` (``$PRH_FLICKR_DIR``).
        subset: the hub dataset's revision, as in the paper (``wit_1024``); ignored for folders.

    Needs the ``recipes`` extra (Hugging Face ``datasets``). Raises :class:`PairedDataError`
    when the data cannot be read or found.
    """
    if source is None:
        source = default_flickr_dir()
        if source is None or not source.is_dir():
            where = f"{FLICKR_ENV} is not set" if source is None else f"{FLICKR_ENV}={source} is not a folder"
            raise PairedDataError(
                f"no paired data: {where}. Set {FLICKR_ENV} to an image folder with a metadata.csv "
                f"(file_name,text), pass such a folder, or pass a hub dataset such as {PRH_DATASET} (needs internet)"
            )
    if Path(source).is_dir():
        ds, name = _load_folder(Path(source), split), Path(source).name
    else:
        ds, name = _load_hub(str(source), subset, split), f"{source}:{subset}" if subset else str(source)
    return _to_pairs(ds, name, max_samples)


def _load_folder(folder: Path, split: str):
    datasets = require("datasets", purpose="load_paired")
    if not (folder / "metadata.csv").is_file() and not (folder / "metadata.jsonl").is_file():
        raise PairedDataError(f"{folder} has no metadata.csv: add one with the columns file_name,text")
    try:
        return datasets.load_dataset("imagefolder", data_dir=str(folder), split=split)
    except (OSError, ValueError) as err:  # unreadable files, a malformed metadata.csv, no such split
        raise PairedDataError(f"could not read the image folder {folder} ({type(err).__name__}: {err})") from err


def _load_hub(dataset_id: str, subset: str | None, split: str):
    datasets = require("datasets", purpose="load_paired")
    from prh_lightning.models.pretrained import unavailable_errors

    try:
        return datasets.load_dataset(dataset_id, revision=subset, split=split)
    except unavailable_errors() as err:  # offline, no such dataset or revision (DatasetNotFoundError is one)
        raise PairedDataError(
            f"could not load {dataset_id!r} (revision {subset!r}) from the Hugging Face hub "
            f"({type(err).__name__}: {err}). It needs internet; offline, pass an image folder with a "
            f"metadata.csv (file_name,text), e.g. a copy of Flickr8k-1024"
        ) from err


def _to_pairs(ds, name: str, max_samples: int | None) -> PairedData:
    columns = set(ds.column_names)
    missing = [c for c in ("image", "text") if c not in columns]
    if missing:
        raise PairedDataError(
            f"dataset {name!r} has no {' and no '.join(repr(c) for c in missing)} column (columns: "
            f"{sorted(columns)}); paired data needs images and a 'text' caption column "
            "(for an image folder: metadata.csv with file_name,text)"
        )
    n = len(ds) if max_samples is None else min(max_samples, len(ds))
    if max_samples is not None and max_samples <= 0:
        raise PairedDataError(f"max_samples must be positive, got {max_samples}")
    rows = ds.select(range(n))
    # some datasets (WIT in minhuh/prh) store several captions per image: use the first
    texts = [str(t[0] if isinstance(t, (list, tuple)) else t) for t in rows["text"]]
    images = [im.convert("RGB") for im in rows["image"]]
    return PairedData(name=name, images=images, texts=texts, sample_ids=[str(i) for i in range(n)])
