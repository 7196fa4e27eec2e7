"""`Representations`: per-layer features of one model on one set of samples.

An ordered mapping ``layer name -> Tensor[n, d]`` (every layer has the same ``n``, row
``i`` is sample ``i``), with optional sample ids, labels and free JSON metadata. Saved as
one safetensors file whose header carries the JSON; loading never unpickles.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prh_lightning._files import atomic_write

FORMAT = "prh-lightning/representations"
FORMAT_VERSION = 1
_LAYER_PREFIX = "layer/"
_LABELS_KEY = "labels"


class Representations(Mapping[str, torch.Tensor]):
    """Ordered ``{layer: Tensor[n, d]}`` for ``n`` samples.

    Args:
        features: layer name -> ``[n, d]`` tensor, in layer order.
        sample_ids: optional ``n`` ids (str or int), e.g. dataset indices.
        labels: optional ``[n]`` integer tensor (class labels).
        metadata: free JSON-serialisable dict (model name, dataset, pooling, ...).

    >>> reps = Representations({"conv1": torch.randn(5, 8), "fc": torch.randn(5, 3)}, labels=[0, 1, 0, 1, 2])
    >>> reps
    Representations(n=5, {conv1: (8,), fc: (3,)})
    >>> reps.layers, reps["fc"].shape
    (['conv1', 'fc'], torch.Size([5, 3]))
    """

    def __init__(
        self,
        features: Mapping[str, torch.Tensor],
        sample_ids: Sequence[str | int] | None = None,
        labels: torch.Tensor | Sequence[int] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if len(features) == 0:
            raise ValueError("Representations needs at least one layer; got an empty mapping")
        feats: dict[str, torch.Tensor] = {}
        n = None
        for name, value in features.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"layer names must be non-empty strings, got {name!r}")
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"layer {name!r}: expected a torch.Tensor, got {type(value).__name__}")
            if value.ndim != 2:
                raise ValueError(
                    f"layer {name!r}: expected a [n, d] tensor, got shape {tuple(value.shape)}; "
                    "reduce or flatten it first"
                )
            if n is None:
                n = value.shape[0]
            elif value.shape[0] != n:
                raise ValueError(
                    f"layer {name!r} has {value.shape[0]} samples but earlier layers have {n}; "
                    "every layer must hold the same samples"
                )
            feats[name] = value
        self._features = feats
        self.n: int = int(n)
        self.sample_ids = None if sample_ids is None else list(sample_ids)
        if self.sample_ids is not None and len(self.sample_ids) != self.n:
            raise ValueError(f"got {len(self.sample_ids)} sample_ids for {self.n} samples")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.ndim != 1 or labels.shape[0] != self.n:
                raise ValueError(f"labels must have shape [{self.n}], got {tuple(labels.shape)}")
        self.labels = labels
        self.metadata: dict[str, Any] = dict(metadata or {})

    # -- mapping protocol ------------------------------------------------------------
    def __getitem__(self, layer: str) -> torch.Tensor:
        try:
            return self._features[layer]
        except KeyError:
            raise KeyError(f"no layer {layer!r}; layers are {self.layers}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._features)

    def __len__(self) -> int:
        return len(self._features)

    def __repr__(self) -> str:
        dims = ", ".join(f"{k}: {tuple(v.shape[1:])}" for k, v in list(self._features.items())[:4])
        more = "" if len(self) <= 4 else f", ... ({len(self)} layers)"
        return f"Representations(n={self.n}, {{{dims}{more}}})"

    @property
    def layers(self) -> list[str]:
        """Layer names in order."""
        return list(self._features)

    # -- derived views ---------------------------------------------------------------
    def _like(self, features: Mapping[str, torch.Tensor], index: torch.Tensor | None = None) -> Representations:
        ids, labels = self.sample_ids, self.labels
        if index is not None:
            ids = None if ids is None else [ids[i] for i in index.tolist()]
            labels = None if labels is None else labels[index]
        return Representations(features, sample_ids=ids, labels=labels, metadata=self.metadata)

    def select(self, layers: Sequence[str]) -> Representations:
        """The given layers only, in the given order.

        >>> Representations({"a": torch.zeros(2, 1), "b": torch.ones(2, 4)}).select(["b"]).layers
        ['b']
        """
        return self._like({name: self[name] for name in layers})

    def subset(self, index: torch.Tensor | Sequence[int]) -> Representations:
        """The samples at ``index`` (``[m]`` ints or a ``[n]`` bool mask), for every layer.

        >>> reps = Representations({"a": torch.arange(6.0).reshape(3, 2)}, sample_ids=["x", "y", "z"])
        >>> part = reps.subset([2, 0])
        >>> part.sample_ids, part["a"].tolist()
        (['z', 'x'], [[4.0, 5.0], [0.0, 1.0]])
        """
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return self._like({k: v[index] for k, v in self._features.items()}, index=index)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Representations:
        """A copy with every layer moved to ``device`` / cast to ``dtype``.

        >>> Representations({"a": torch.zeros(2, 2)}).to(dtype=torch.float64)["a"].dtype
        torch.float64
        """
        return self._like({k: v.to(device=device, dtype=dtype) for k, v in self._features.items()})

    # -- storage -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file atomically, with the user's umask; returns its path.

        The file is written in a temporary folder next to ``path`` and then renamed, so
        ``path`` is the old file or the complete new one; a save killed midway leaves a
        ``.<name>.*.prh-tmp`` folder that the next save of ``path`` removes. Raises ``OSError``
        naming ``path`` when it cannot be written (disk full, no permission).

        >>> import tempfile
        >>> path = Representations({"a": torch.ones(3, 2)}, metadata={"model": "toy"}).save(
        ...     Path(tempfile.mkdtemp()) / "toy.safetensors")
        >>> Representations.load(path).metadata
        {'model': 'toy'}
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        named = {_LAYER_PREFIX + k: v for k, v in self._features.items()}
        if self.labels is not None:
            named[_LABELS_KEY] = self.labels
        tensors = _unshared_cpu_tensors(named)
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "n": self.n,
            "layers": self.layers,
            "sample_ids": self.sample_ids,
            "metadata": self.metadata,
        }
        try:
            header_json = json.dumps(header)
        except TypeError as err:
            raise TypeError(f"metadata and sample_ids must be JSON-serialisable: {err}") from None
        atomic_write(path, lambda tmp: _save_safetensors(tensors, tmp, {"prh_lightning": header_json}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Representations:
        """Read a file written by :meth:`save`, validating its header against its tensors.

        Never unpickles; a file that is not a complete :meth:`save` output raises ``ValueError``.

        >>> import tempfile
        >>> bad = Path(tempfile.mkdtemp()) / "bad.safetensors"
        >>> _ = bad.write_bytes(b"not a safetensors file")
        >>> Representations.load(bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...bad.safetensors is not a readable safetensors file (corrupted or truncated?): ...
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no representations file at {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                raw = (f.metadata() or {}).get("prh_lightning")
                keys = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path} is not a readable safetensors file (corrupted or truncated?): {err}") from None
        if raw is None:
            raise ValueError(f"{path} is a safetensors file but was not written by Representations.save")
        try:
            header = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: corrupted metadata header: {err}") from None
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported format {header.get('format')!r} version {header.get('version')!r}")
        layers = header.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"{path}: the header lists no layers")
        expected = {_LAYER_PREFIX + name for name in layers}
        present = {k for k in keys if k.startswith(_LAYER_PREFIX)}
        if expected != present:
            raise ValueError(
                f"{path}: header and tensors disagree: missing {sorted(expected - present)}, "
                f"unexpected {sorted(present - expected)}"
            )
        features = {name: tensors[_LAYER_PREFIX + name] for name in layers}
        n = header.get("n")
        for name, value in features.items():
            if value.ndim != 2 or value.shape[0] != n:
                raise ValueError(f"{path}: layer {name!r} has shape {tuple(value.shape)}, header says n={n}")
        try:
            return cls(
                features,
                sample_ids=header.get("sample_ids"),
                labels=tensors.get(_LABELS_KEY),
                metadata=header.get("metadata"),
            )
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: inconsistent contents: {err}") from None


def _save_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``, with its I/O errors (disk full, ...) as ``OSError``."""
    try:
        save_file(tensors, str(file), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"(?:os error |code: )(\d+)", str(err))
        if code is None:
            raise OSError(f"safetensors could not write the file: {err}") from err
        number = int(code.group(1))
        raise OSError(number, os.strerror(number)) from err


def _unshared_cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies where needed, so no two tensors share memory (safetensors refuses that)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out
