"""`AlignmentMonitor`: watch, while a model trains, how each of its layers aligns with
reference models, with its own earlier self and with its other layers.

::

    monitor = AlignmentMonitor(probe=probe_loader, references={"minilm": Reference(...)})
    Trainer(callbacks=[monitor], logger=TensorBoardLogger("runs")).fit(model, dm)

Every check runs the model on a fixed probe set (eval mode, ``no_grad``, forked RNG, training
flags restored) and computes, per metric, the layer x layer matrices

- ``<reference>``: model layers [Lx] x reference layers [Ly], for each reference;
- ``self``: model layers x model layers (within-model);
- ``self_initial`` / ``self_previous``: model now x model at train start / at the previous check.

Scalars go to every logger; TensorBoard also gets a heatmap per matrix and a plot of each
layer's alignment over steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from prh_lightning.callbacks._probe import (
    Probe,
    check_layer_selection,
    make_probe,
    module_device,
    move_inputs,
    num_rows,
    probe_features,
    side_effect_free,
    slice_inputs,
)

Features = dict[str, torch.Tensor]
SNAPSHOTS = ("self_initial", "self_previous")
_RESERVED = ("self", *SNAPSHOTS)
_IMAGE_DPI = 80  # TensorBoard images: readable, and cheap enough to render at every check
_UNIT_RANGE = {"cka", "mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"}  # scores in [0, 1]


@dataclass
class Reference:
    """A reference model and how to feed it the probe.

    Args:
        model: an ``nn.Module`` (a sentence-transformer works out of the box through ``encode``).
        inputs: what the model reads for the ``n`` probe samples: ``None`` (the probe inputs
            themselves), a sequence of ``n`` items (strings, a tensor ``[n, ...]``), or a function
            ``inputs(x, y) -> such a sequence`` of the probe inputs and labels, e.g.
            ``lambda x, y: [CLASS_NAMES[i] for i in y]`` for a text model (cross-modal).
        layers: ``None`` (the model's output only, one column ``"output"``; ``encode`` for a
            sentence-transformer given strings) or a :class:`~prh_lightning.taps.LayerTaps`
            selection: ``"*"`` (every leaf), ``"auto"`` (the family default, e.g. the
            transformer blocks), names, globs.
        reduce: pooling of tapped layers (see ``LayerTaps``).
        forward_fn: ``forward_fn(model, inputs_chunk) -> output`` to call the model yourself.
        batch_size: probe rows per forward call.
        frozen: the reference does not change during training, so it is computed once and cached.
    """

    model: nn.Module
    inputs: Sequence[Any] | torch.Tensor | Callable[[Any, torch.Tensor | None], Any] | None = None
    layers: Any = None
    reduce: Any = "mean"
    forward_fn: Callable[[nn.Module, Any], Any] | None = None
    batch_size: int = 64
    frozen: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(
                f"Reference.model must be an nn.Module, got {type(self.model).__name__}; "
                "pass a plain callable or precomputed Representations directly in references={...}"
            )
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"Reference.batch_size must be a positive int, got {self.batch_size!r}")

    def features(self, probe: Probe) -> Features:
        """Ordered ``{layer: Tensor[n, d]}`` of the reference on the probe."""
        inputs = self._inputs(probe)
        size = num_rows(inputs) if _is_text(inputs) and self.layers is None else self.batch_size  # encode batches
        chunks = [slice_inputs(inputs, i, i + size) for i in range(0, num_rows(inputs), size)]
        if self.layers is not None:
            forward = self.forward_fn or _call_reference
            return probe_features(self.model, chunks, layers=self.layers, reduce=self.reduce, forward_fn=forward)
        with side_effect_free(self.model):
            device = module_device(self.model)
            outputs = [_as_features(self._output(move_inputs(c, device))) for c in chunks]
        return {"output": torch.cat(outputs)}

    def _inputs(self, probe: Probe) -> Any:
        if self.inputs is None:
            return probe.x
        if callable(self.inputs) and not isinstance(self.inputs, (torch.Tensor, nn.Module)):
            return self.inputs(probe.x, probe.y)
        return self.inputs

    def _output(self, chunk: Any) -> Any:
        if self.forward_fn is not None:
            return self.forward_fn(self.model, chunk)
        if _is_text(chunk) and hasattr(self.model, "encode"):
            return _encode_unique(self.model, chunk)
        return _call_reference(self.model, chunk)


def _call_reference(model: nn.Module, chunk: Any) -> Any:
    """``model.encode`` for a list of strings (sentence-transformers), ``model(**x)`` for a
    mapping, else ``model(x)``."""
    if _is_text(chunk) and hasattr(model, "encode"):
        return model.encode(chunk, convert_to_tensor=True, show_progress_bar=False)
    return model(**chunk) if isinstance(chunk, Mapping) else model(chunk)


def _is_text(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], str)


def _encode_unique(model: nn.Module, texts: list[str]) -> torch.Tensor:
    """``model.encode`` of each distinct string once (class names repeat), ``[len(texts), d]``."""
    unique = list(dict.fromkeys(texts))
    position = {text: i for i, text in enumerate(unique)}
    embeddings = _call_reference(model, unique)
    return embeddings[torch.tensor([position[t] for t in texts], device=embeddings.device)]


def _as_features(output: Any) -> torch.Tensor:
    """``[n, d]`` float features from a model output (tensor, ``sentence_embedding``, or the
    first tensor of a tuple / ``ModelOutput``)."""
    from prh_lightning.taps.outputs import describe, pick_tensor

    if isinstance(output, Mapping) and "sentence_embedding" in output:
        output = output["sentence_embedding"]
    tensor = pick_tensor(output)
    if tensor is None:
        raise TypeError(
            f"the reference returned {describe(output)}, which holds no tensor; "
            "pass Reference(..., forward_fn=...) returning a [n, d] tensor"
        )
    return tensor.detach().float().flatten(1) if tensor.ndim > 1 else tensor.detach().float()[:, None]


class AlignmentMonitor(Callback):
    """Log layer x layer representational alignment of the model being trained, on a fixed probe.

    Args:
        probe: fixed probe inputs: a DataLoader, a tensor ``[n, ...]``, an ``(x, y)`` tuple or a
            dict of tensors; the first ``max_probe_samples`` rows are kept.
        references: ``{name: spec}``; a spec is a :class:`Reference`; an ``nn.Module`` fed the
            probe inputs (every leaf layer tapped; a sentence-transformer gives its embedding); a
            callable ``f(x) -> Tensor[n, d] | {layer: Tensor[n, d]}`` of the probe inputs; a
            :class:`Representations` / mapping of ``[n, d]`` tensors; or one ``[n, d]`` tensor.
            Frozen references are computed at the first check and cached.
        metrics: names from ``prh_lightning.functional.METRICS``.
        layers: layers of the trained model to tap (``LayerTaps`` selection).
        reduce: pooling of the tapped outputs.
        every_n_train_steps: also check every N optimiser steps (``None``: only at validation end).
        check_on_validation_end: check after each validation run (sanity check excluded).
        max_probe_samples: most probe rows kept.
        k: neighbours for k-NN metrics (``mutual_knn``, ``cycle_knn``, ...).
        metric_kwargs: extra keyword arguments per metric, ``{"cka": {"kernel": "rbf"}}``.
        within_model: compute the ``self`` matrix (model layers x model layers).
        snapshots: compute ``self_initial`` and ``self_previous`` (model now x model before).
        log_images: TensorBoard loggers get a heatmap of each reference and within-model matrix
            at every check after step 0 (an int ``m``: every ``m``-th check; ``False``: none) and, at the end of
            training, a plot of each layer's score over steps per metric and target.
        batch_size: probe rows per forward call.
        forward_fn: ``forward_fn(pl_module, x_chunk)`` runs the model (default ``pl_module(x)``).
    """

    def __init__(
        self,
        probe: Any,
        references: Mapping[str, Any] | None = None,
        metrics: Sequence[str] = ("cka", "mutual_knn"),
        layers: Any = "*",
        reduce: Any = "mean",
        every_n_train_steps: int | None = None,
        check_on_validation_end: bool = True,
        max_probe_samples: int | None = 256,
        k: int = 10,
        metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        within_model: bool = True,
        snapshots: bool = True,
        log_images: bool | int = True,
        batch_size: int = 256,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        self.metrics = _check_metrics(metrics, metric_kwargs)
        if every_n_train_steps is not None and (not isinstance(every_n_train_steps, int) or every_n_train_steps <= 0):
            raise ValueError(f"every_n_train_steps must be a positive int or None, got {every_n_train_steps!r}")
        if every_n_train_steps is None and not check_on_validation_end:
            raise ValueError(
                "AlignmentMonitor would never check: set every_n_train_steps=N or check_on_validation_end=True"
            )
        if max_probe_samples is not None and (not isinstance(max_probe_samples, int) or max_probe_samples < 2):
            raise ValueError(f"max_probe_samples must be an int >= 2 or None, got {max_probe_samples!r}")
        if not isinstance(log_images, int) or log_images < 0:  # bool is an int
            raise ValueError(f"log_images must be True, False or a positive int (every m-th check), got {log_images!r}")
        for label, value in (("k", k), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        self.references = _check_references(references or {})
        self.layers = layers
        self.reduce = reduce
        self.every_n_train_steps = every_n_train_steps
        self.check_on_validation_end = check_on_validation_end
        self.k = k
        self.metric_kwargs = {m: _metric_kwargs(m, k, metric_kwargs) for m in self.metrics}
        self.within_model = within_model
        self.snapshots = snapshots
        self.log_images = int(log_images)
        self.batch_size = batch_size
        self.forward_fn = forward_fn
        self.probe = make_probe(probe, max_probe_samples)
        self._check_probe_size()

        self.history: dict[str, list[tuple[int, float]]] = {}  # scalar tag -> [(step, value)]
        self.last_matrices: dict[str, torch.Tensor] = {}  # "<metric>/<target>" -> [Lx, Ly]
        self._initial: Features | None = None
        self._previous: Features | None = None
        self._last_step: int | None = None
        self._n_checks = 0
        self._cache: dict[str, Features] = {}  # frozen references' features
        self._reference_layers: dict[str, list[str]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            metrics=self.metrics, references=sorted(self.references), layers=repr(self.layers)
        )

    # -- argument checks -----------------------------------------------------------
    def _check_probe_size(self) -> None:
        n = self.probe.n
        needs = max((kw["k"] + 1 for kw in self.metric_kwargs.values() if "k" in kw), default=2)
        if n < needs:
            raise ValueError(
                f"the probe has {n} samples but the metrics need at least {needs} (k + 1 with k={self.k}); "
                f"give a larger probe or a smaller k"
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "AlignmentMonitor logs through the Trainer's loggers but the Trainer has none; pass "
                "Trainer(logger=TensorBoardLogger('runs')) (or CSVLogger) or remove the monitor"
            )
        check_layer_selection(pl_module, self.layers)
        # Every rank must hold the same probe; rank 0's copy wins (a collective every rank joins).
        self.probe = trainer.strategy.broadcast(self.probe, src=0)

    # -- triggers ------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._initial is None:  # not restored from a checkpoint
            self._initial = self._previous = self._model_features(pl_module)
            self._check(trainer, pl_module, features=self._initial)
        else:  # restored from a checkpoint (on the CPU): snapshots go where the probe pass runs
            self._initial = {k: v.to(pl_module.device) for k, v in self._initial.items()}
            self._previous = {k: v.to(pl_module.device) for k, v in (self._previous or self._initial).items()}
            self._check(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_train_steps
        if n is not None and trainer.global_step % n == 0:
            self._check(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.check_on_validation_end and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._check(trainer, pl_module)

    # -- one check -----------------------------------------------------------------
    def _check(self, trainer: Trainer, pl_module: LightningModule, features: Features | None = None) -> None:
        step = trainer.global_step
        if self._last_step is not None and step <= self._last_step:
            return  # already checked at this step (e.g. validation right after a step check)
        features = self._model_features(pl_module) if features is None else features
        matrices = self.compute_matrices(features, self._reference_features(pl_module))
        self._previous = features
        self._last_step = step
        self._n_checks += 1
        self.last_matrices = matrices
        scalars = _scalars(matrices, list(features))
        for tag, value in scalars.items():
            self.history.setdefault(tag, []).append((step, value))
        if trainer.is_global_zero:
            self._log(trainer, scalars, matrices, step)

    def _model_features(self, pl_module: LightningModule) -> Features:
        return probe_features(
            pl_module, self.probe.chunks(self.batch_size), self.layers, self.reduce, self.forward_fn
        )

    def _reference_features(self, pl_module: LightningModule) -> dict[str, Features]:
        device = pl_module.device
        out = {}
        for name, spec in self.references.items():
            if name in self._cache:
                out[name] = self._cache[name]
                continue
            feats = {k: v.to(device=device, dtype=torch.float32) for k, v in _run_reference(spec, self.probe).items()}
            _check_samples(name, feats, self.probe.n)
            self._reference_layers[name] = list(feats)
            if not (isinstance(spec, Reference) and not spec.frozen):
                self._cache[name] = feats
            out[name] = feats
        return out

    def compute_matrices(self, features: Features, references: Mapping[str, Features]) -> dict[str, torch.Tensor]:
        """``{"<metric>/<target>": Tensor[Lx, Ly]}`` for every metric and target (references,
        ``self``, ``self_initial``, ``self_previous``)."""
        from prh_lightning.alignment import alignment_matrix

        targets: dict[str, Features | None] = dict(references)
        if self.within_model:
            targets["self"] = None
        if self.snapshots and self._initial is not None:
            targets["self_initial"] = self._initial
            targets["self_previous"] = self._previous
        matrices = {}
        for metric in self.metrics:
            for name, ys in targets.items():
                kwargs = self.metric_kwargs[metric]
                try:
                    matrix = alignment_matrix(features, ys, metric=metric, **kwargs)
                except ValueError:  # a degenerate layer (all-zero rows, constant features): NaN cells
                    matrix = _pairwise_or_nan(features, features if ys is None else ys, name, metric, kwargs)
                matrices[f"{metric}/{name}"] = matrix.detach().float().cpu()
        return matrices

    # -- logging -------------------------------------------------------------------
    def _log(self, trainer: Trainer, scalars: dict[str, float], matrices: dict[str, torch.Tensor], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        if self.log_images and step > 0 and (self._n_checks - 1) % self.log_images == 0:
            self._add_images(trainer, self._heatmaps(matrices), step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_images and trainer.is_global_zero and self._last_step is not None:
            self._add_images(trainer, self._curves(), self._last_step)

    def _add_images(self, trainer: Trainer, figures: dict[str, Any], step: int) -> None:
        """Render ``{tag: Figure}`` into every TensorBoard logger (other loggers get no images)."""
        from prh_lightning.plotting import figure_to_array

        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards:
            return
        for tag, fig in figures.items():
            array = figure_to_array(fig)
            for logger in tensorboards:
                logger.experiment.add_image(tag, array, step, dataformats="HWC")

    def _heatmaps(self, matrices: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``{"alignment_heatmap/<metric>/<target>": Figure}`` for the reference and within-model
        matrices (snapshot matrices are summarised by their diagonals, see :meth:`_curves`)."""
        from prh_lightning.plotting import heatmap_figure

        rows = self.model_layers
        figures = {}
        for key, matrix in matrices.items():
            metric, target = key.split("/", 1)
            if target in SNAPSHOTS:
                continue
            cols = rows if target == "self" else self._reference_layers[target]
            limits = (0.0, 1.0) if metric in _UNIT_RANGE else (None, None)  # same colours at every step
            figures[f"alignment_heatmap/{key}"] = heatmap_figure(
                matrix, rows, cols, f"{metric}: model vs {target}", *limits, xlabel=target, ylabel="model layer",
                dpi=_IMAGE_DPI,
            )
        return figures

    def _curves(self) -> dict[str, Any]:
        """``{"alignment_curves/<metric>/<target>": Figure}``: each model layer's score over steps,
        for each reference and ``self_initial``."""
        from prh_lightning.plotting import line_figure

        figures = {}
        for key in dict.fromkeys("/".join(tag.split("/")[1:3]) for tag in self.history):
            metric, target = key.split("/", 1)
            if target == "self_previous":  # step-to-step change: its scalars say enough
                continue
            series = {
                layer: tuple(zip(*self.history[tag]))
                for layer in self.model_layers
                if (tag := f"alignment/{key}/{layer}") in self.history
            }
            if series:
                figures[f"alignment_curves/{key}"] = line_figure(
                    series, title=f"{metric}: each model layer vs {target}", ylabel=metric, dpi=_IMAGE_DPI
                )
        return figures

    @property
    def reference_layers(self) -> dict[str, list[str]]:
        """Layer names (matrix columns) of each reference computed so far."""
        return dict(self._reference_layers)

    @property
    def model_layers(self) -> list[str]:
        """Names of the model's tapped layers (rows of every matrix); empty before the first check."""
        return list(self._previous or {})

    # -- checkpointing -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def cpu(feats: Features | None) -> Features | None:
            return None if feats is None else {k: v.detach().cpu() for k, v in feats.items()}

        return {
            "history": {tag: [list(p) for p in points] for tag, points in self.history.items()},
            "initial": cpu(self._initial),
            "previous": cpu(self._previous),
            "last_step": self._last_step,
            "n_checks": self._n_checks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {tag: [(int(s), float(v)) for s, v in points] for tag, points in state_dict["history"].items()}
        self._initial = state_dict["initial"]
        self._previous = state_dict["previous"]
        self._last_step = state_dict["last_step"]
        self._n_checks = state_dict["n_checks"]


# -- helpers -------------------------------------------------------------------------
def _check_metrics(metrics: Sequence[str], metric_kwargs: Mapping[str, Any] | None) -> tuple[str, ...]:
    from prh_lightning.functional import METRICS

    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    if not metrics:
        raise ValueError(f"metrics is empty; choose one or more of {sorted(METRICS)}")
    unknown = [m for m in (*metrics, *(metric_kwargs or {})) if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")
    return metrics


def _metric_kwargs(metric: str, k: int, metric_kwargs: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """``k`` for metrics that take one, then the user's kwargs for ``metric``."""
    from prh_lightning.functional import METRICS

    kwargs: dict[str, Any] = {}
    if "k" in inspect.signature(METRICS[metric]).parameters:
        kwargs["k"] = k
    kwargs.update((metric_kwargs or {}).get(metric, {}))
    return kwargs


def _check_references(references: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(references, Mapping):
        raise TypeError(f"references must be a dict {{name: reference}}, got {type(references).__name__}")
    out = {}
    for name, spec in references.items():
        if not isinstance(name, str) or not name or "/" in name or name in _RESERVED:
            raise ValueError(
                f"reference name {name!r} is not allowed: use a non-empty string without '/', "
                f"other than {list(_RESERVED)}"
            )
        if isinstance(spec, nn.Module):  # every leaf layer; a sentence-transformer's embedding
            spec = Reference(spec, layers=None if hasattr(spec, "encode") else "*")
        elif not isinstance(spec, (Reference, Mapping, torch.Tensor)) and not callable(spec):
            raise TypeError(
                f"reference {name!r} is a {type(spec).__name__}; use an nn.Module, a Reference(...), "
                "a callable f(x) -> Tensor[n, d], Representations, or a [n, d] tensor"
            )
        out[name] = spec
    return out


def _run_reference(spec: Any, probe: Probe) -> Features:
    """Ordered ``{layer: Tensor[n, d]}`` of one reference spec on the probe."""
    if isinstance(spec, Reference):
        return spec.features(probe)
    if isinstance(spec, (Mapping, torch.Tensor)):
        return _as_feature_dict(spec)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        return _as_feature_dict(spec(probe.x))


def _as_feature_dict(value: Any) -> Features:
    if isinstance(value, torch.Tensor):
        return {"output": value if value.ndim == 2 else value.flatten(1)}
    if isinstance(value, Mapping):
        return dict(value.items())
    raise TypeError(
        f"a reference callable must return a [n, d] tensor or {{layer: [n, d]}}, got {type(value).__name__}"
    )


def _check_samples(name: str, features: Features, n: int) -> None:
    for layer, value in features.items():
        if value.ndim != 2 or value.shape[0] != n:
            raise ValueError(
                f"reference {name!r} layer {layer!r} has shape {tuple(value.shape)} but the probe has {n} samples; "
                "a reference must give one [n, d] row per probe sample, in probe order"
            )


def _scalars(matrices: Mapping[str, torch.Tensor], layers: Sequence[str]) -> dict[str, float]:
    """Scalar tags of one check; ``layers`` names the matrix rows (the model's layers).

    References: ``alignment/<metric>/<ref>/best`` (max of the matrix) and ``.../<layer>`` (best
    over reference layers). Snapshots: ``.../<layer>`` (the diagonal: each layer vs itself
    before) and ``.../mean``. Within-model: ``alignment/<metric>/self/mean_offdiag``.
    """
    out: dict[str, float] = {}
    for key, matrix in matrices.items():
        target = key.split("/", 1)[1]
        prefix = f"alignment/{key}"
        if target == "self":
            off = matrix[~torch.eye(matrix.shape[0], dtype=torch.bool)]
            out[f"{prefix}/mean_offdiag"] = float(off.nanmean()) if off.numel() else float("nan")
            continue
        if target in SNAPSHOTS:
            per_layer = matrix.diagonal()
            out[f"{prefix}/mean"] = float(per_layer.nanmean())
        else:
            per_layer = _nanmax(matrix, dim=1)
            out[f"{prefix}/best"] = float(_nanmax(matrix.flatten(), dim=0))
        out.update({f"{prefix}/{layer}": float(v) for layer, v in zip(layers, per_layer)})
    return out


def _pairwise_or_nan(xs: Features, ys: Features, target: str, metric: str, kwargs: dict) -> torch.Tensor:
    """``[Lx, Ly]`` scored pair by pair; a pair the metric cannot score (e.g. a layer whose
    features are all zero for some probe sample) gets NaN and a warning instead of ending training."""
    from prh_lightning.alignment import alignment_matrix

    matrix = torch.full((len(xs), len(ys)), float("nan"))
    for i, (x_name, x) in enumerate(xs.items()):
        for j, (y_name, y) in enumerate(ys.items()):
            try:
                matrix[i, j] = alignment_matrix([x], [y], metric=metric, **kwargs)[0, 0]
            except ValueError as err:
                rank_zero_warn(f"AlignmentMonitor: {metric} of layer {x_name!r} vs {target} {y_name!r} is NaN: {err}")
    return matrix


def _nanmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    best = torch.where(torch.isnan(x), torch.full_like(x, -torch.inf), x).amax(dim=dim)
    return torch.where(torch.isinf(best), torch.full_like(best, float("nan")), best)
