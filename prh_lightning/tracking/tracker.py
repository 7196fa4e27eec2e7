"""`AlignmentTracker`: layer x layer alignment of a model while it trains, from any training
loop (no Lightning import; the Lightning, Fabric and Hugging Face front ends are thin shells).

::

    tracker = AlignmentTracker(probe=(x_probe, y_probe), references={"minilm": Reference("minilm",
                               class_names=CLASS_NAMES)}, every_n_steps=50, sinks=[TensorBoardSink("runs")])
    for step, batch in enumerate(loader):
        ...  # forward, backward, optimiser step
        tracker.step(model, step)          # checks when due; returns the scalars it logged

Each check runs the model on the fixed probe (eval mode, ``no_grad``, forked RNG, training flags
restored) and computes, per metric, the layer x layer matrices against each reference, against
itself (``self``), against itself at the first check (``self_initial``) and at the previous
check (``self_previous``); see :func:`~prh_lightning.tracking.scoring.scalars` for the tags.
Against each reference it also logs the chance level and the calibrated score of the best and
of each layer's score (``calibration=K`` permutations, default 20; see
:mod:`prh_lightning.tracking.chance`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prh_lightning.tracking.chance import ChanceLevels, TargetChance, chance_scalars
from prh_lightning.tracking.failures import Failures
from prh_lightning.tracking.history import History
from prh_lightning.tracking import distributed
from prh_lightning.tracking.prepared import PreparedStates
from prh_lightning.tracking.probe import (
    ForwardError,
    Probe,
    check_layer_selection,
    make_probe,
    module_device,
    probe_pass,
    slice_inputs,
)
from prh_lightning.tracking.references import check_references, is_frozen, reference_features, reference_metrics
from prh_lightning.tracking.scoring import check_metrics, metric_kwargs, scalars, score_matrix
from prh_lightning.tracking.sinks import as_sink

Features = dict[str, torch.Tensor]
DISTRIBUTED_PROBE = ("shard", "rank0")


def _positive_int(label: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{label} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


class AlignmentTracker:
    """Probe, references, metrics, schedule, bounded history, checkpoint state and sinks.

    Args:
        probe: fixed probe inputs (DataLoader, tensor ``[n, ...]``, tuple of tensors such as
            ``(x, y)``, dict of tensors); the first ``max_probe_samples`` rows are kept. May be
            given later with :meth:`set_probe` (the Lightning callback takes it from the
            validation or training data).
        references: ``{name: spec}``, see :mod:`prh_lightning.tracking.references`; frozen
            references are computed at the first check and cached.
        metrics: names from ``prh_lightning.functional.METRICS``.
        layers, reduce: layers of the tracked model to tap and their pooling (``LayerTaps``).
            Default ``"auto"``: the model family's layers (the blocks' hidden states of a Hugging
            Face transformer, the stages of a torchvision / timm network; see
            :func:`prh_lightning.families.default_layers`), else every leaf module that computes
            something in eval mode (``"*"``).
        every_n_steps: :meth:`step` checks when ``step % every_n_steps == 0`` (``None``: only
            explicit :meth:`check` calls).
        max_probe_samples: most probe rows kept.
        k: neighbours for k-NN metrics.
        metric_kwargs: extra keyword arguments per metric, ``{"cka": {"kernel": "rbf"}}``.
        within_model: compute the ``self`` matrix (model layers x model layers).
        snapshots: compute ``self_initial`` and ``self_previous``.
        batch_size: probe rows per forward call.
        forward_fn: ``forward_fn(model, batch)`` runs the model on a probe batch (a slice of the
            batch form the probe was given in); default :func:`~prh_lightning.tracking.probe.call_model`.
        on_error: ``"warn"`` (default): a failing reference, probe pass or metric is warned about
            once per (layer or reference, cause), recorded as NaN and skipped; ``"raise"``: raise.
        max_history: most points kept per scalar tag (older ones thinned); ``None``: unbounded.
        sinks: where :meth:`check` sends scalars (and figures, for sinks with ``log_images``):
            objects with ``log_scalars(scalars, step)`` or callables ``f(scalars, step)``.
        images_every_n_checks: send heatmaps to image sinks at every m-th check (``None``: never
            automatically; call :meth:`log_figures`).
        prefix: first part of every scalar tag.
        calibration: permutations ``K`` of the live permutation null against each reference
            (default 20; ``0`` or ``None``: off): logs ``.../chance``, ``.../threshold``,
            ``.../calibrated`` and ``.../<layer>/calibrated`` next to ``.../best``.
        calibration_seed: seed of the ``K`` permutations, drawn once for the run (see
            :attr:`permutations`).
        calibration_alpha: null quantile of ``threshold``.
        calibration_max_memory: a budget (bytes, or ``"512MB"``, ``"4GB"``, ``"2GiB"``) for the
            working memory of the chance levels: the layers' preparation and the nulls' tables and batches
            (CKA default 1 GiB); ``None``: each metric's ``max_memory`` in ``metric_kwargs``, else the
            defaults.
        heatmap_scores: ``"raw"`` (default) or ``"calibrated"``: what reference heatmaps show
            (calibrated: each cell against its own null, colour range [0, 1]).
        distributed_probe: under ``torch.distributed`` (2 or more ranks; every rank must call
            :meth:`check` / :meth:`step` at the same steps): ``"shard"`` (default) splits the
            probe rows over the ranks and gathers the features on rank 0; ``"rank0"`` runs the
            whole probe on rank 0. Either way rank 0 alone computes the references, matrices and
            chance levels and sends the scalars to the sinks, and every rank gets the same
            scalars back (see :mod:`prh_lightning.tracking.distributed`).
    """

    def __init__(
        self,
        probe: Any = None,
        references: Mapping[str, Any] | None = None,
        metrics: Sequence[str] = ("cka", "mutual_knn"),
        layers: Any = "auto",
        reduce: Any = "mean",
        every_n_steps: int | None = None,
        max_probe_samples: int | None = 256,
        k: int = 10,
        metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        within_model: bool = True,
        snapshots: bool = True,
        batch_size: int = 64,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        on_error: str = "warn",
        max_history: int | None = 1000,
        sinks: Sequence[Any] = (),
        images_every_n_checks: int | None = None,
        prefix: str = "alignment",
        calibration: int | None = 20,
        calibration_seed: int = 0,
        calibration_alpha: float = 0.05,
        calibration_max_memory: int | str | None = None,
        heatmap_scores: str = "raw",
        distributed_probe: str = "shard",
    ) -> None:
        self.metrics = check_metrics(metrics, metric_kwargs)
        _positive_int("every_n_steps", every_n_steps, allow_none=True)
        _positive_int("k", k)
        _positive_int("batch_size", batch_size)
        _positive_int("images_every_n_checks", images_every_n_checks, allow_none=True)
        if max_probe_samples is not None and (not isinstance(max_probe_samples, int) or max_probe_samples < 2):
            raise ValueError(f"max_probe_samples must be an int >= 2 or None, got {max_probe_samples!r}")
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty string not ending in '/', got {prefix!r}")
        if heatmap_scores not in ("raw", "calibrated"):
            raise ValueError(f"heatmap_scores must be 'raw' or 'calibrated', got {heatmap_scores!r}")
        self.chance = ChanceLevels(calibration, calibration_seed, calibration_alpha, calibration_max_memory)
        if heatmap_scores == "calibrated" and not self.chance.enabled:
            raise ValueError("heatmap_scores='calibrated' needs calibration > 0 permutations")
        self.heatmap_scores = heatmap_scores
        if distributed_probe not in DISTRIBUTED_PROBE:
            raise ValueError(f"distributed_probe must be one of {DISTRIBUTED_PROBE}, got {distributed_probe!r}")
        self.distributed_probe = distributed_probe
        self.references = check_references(references or {})
        for name, spec in self.references.items():
            wanted = reference_metrics(spec)
            if wanted is not None and not set(wanted) <= set(self.metrics):
                raise ValueError(
                    f"reference {name!r} asks for metrics {sorted(set(wanted) - set(self.metrics))} that the tracker "
                    f"does not compute ({list(self.metrics)})"
                )
        self.layers = layers
        self.reduce = reduce
        self.every_n_steps = every_n_steps
        self.max_probe_samples = max_probe_samples
        self.k = k
        self.metric_kwargs = {m: metric_kwargs_for(m, k, metric_kwargs) for m in self.metrics}
        self.within_model = within_model
        self.snapshots = snapshots
        self.batch_size = batch_size
        self.forward_fn = forward_fn
        self.failures = Failures(on_error)
        self.history = History(max_history)
        self.sinks = [as_sink(s) for s in sinks]
        self.images_every_n_checks = images_every_n_checks
        self.prefix = prefix
        self.probe: Probe | None = None

        self.last_matrices: dict[str, torch.Tensor] = {}  # "<metric>/<target>" -> [Lx, Ly]
        self.last_chance: dict[str, TargetChance | None] = {}  # "<metric>/<reference>" -> calibration
        self.last_step: int | None = None
        self.n_checks = 0
        self._initial: Features | None = None
        self._previous: Features | None = None
        self._model_layers: list[str] = []
        self._reference_layers: dict[str, list[str]] = {}
        self._cache: dict[str, Features] = {}  # frozen references' features
        self._prepared = PreparedStates()  # per-layer metric states of the features above and the snapshots
        self._layers_checked = False
        if probe is not None:
            self.set_probe(probe)

    # -- probe ---------------------------------------------------------------------------
    def set_probe(self, probe: Any) -> None:
        """Materialise the probe (see :func:`~prh_lightning.tracking.probe.make_probe`); a clear
        error when it has too few samples for the metrics."""
        probe = make_probe(probe, self.max_probe_samples)
        needs = max((kw["k"] + 1 for kw in self.metric_kwargs.values() if "k" in kw), default=2)
        if probe.n < needs:
            raise ValueError(
                f"the probe has {probe.n} samples but the metrics need at least {needs} (k + 1 with k={self.k}); "
                "give a larger probe or a smaller k"
            )
        self.probe = probe
        self._cache.clear()
        self._prepared.clear()
        self.chance.forget()

    @property
    def permutations(self) -> torch.Tensor | None:
        """``LongTensor[K, n]`` the live calibration reorders each reference's samples by (the
        same at every check; ``None`` without a probe or with calibration off). Pass it as
        ``prh_lightning.calibrate(model_features, reference_features, metric, permutations=...)``
        to reproduce a logged value."""
        if self.probe is None or not self.chance.enabled:
            return None
        return self.chance.permutations(self.probe.n)

    # -- schedule ------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether :meth:`step` would check at ``step`` (a multiple of ``every_n_steps`` not yet checked)."""
        n = self.every_n_steps
        return n is not None and step % n == 0 and (self.last_step is None or step > self.last_step)

    def step(self, model: nn.Module, step: int, **kwargs: Any) -> dict[str, float] | None:
        """Check when :meth:`due`; returns the scalars of the check, else ``None``."""
        return self.check(model, step, **kwargs) if self.due(step) else None

    # -- one check -----------------------------------------------------------------------
    def check(
        self,
        model: nn.Module,
        step: int,
        *,
        context: Callable[[], contextlib.AbstractContextManager] | None = None,
        log: bool = True,
    ) -> dict[str, float]:
        """Run the probe, score every matrix, record and (``log=True``) send the scalars to the
        sinks; returns ``{tag: value}`` (empty when this step was already checked).

        ``context()`` wraps each probe forward (e.g. an autocast for mixed precision).
        """
        if self.probe is None:
            raise RuntimeError("AlignmentTracker has no probe yet: pass probe=... or call set_probe(...) first")
        if self.last_step is not None and step <= self.last_step:
            return {}
        model = unwrap_model(model)
        group = distributed.current()
        if group is None:
            values = self._score(self._safe_model_features(model, context))
        else:
            values = self._check_distributed(group, model, context)
        self.last_step = step
        self.n_checks += 1
        self.history.append(step, values)
        if log and (group is None or group.rank == 0):
            self.log_scalars(values, step)
            m = self.images_every_n_checks
            if m is not None and (self.n_checks - 1) % m == 0 and self.last_matrices:
                self.log_figures(step)
        return values

    def _score(self, features: Features) -> dict[str, float]:
        """Every matrix and chance level of the model's ``features`` (``{}``: the probe pass
        failed), as scalars; keeps the matrices for figures and the features as ``self_previous``."""
        device = next(iter(features.values())).device if features else torch.device("cpu")
        self.move_snapshots(device)
        references, failed = self._safe_reference_features(device)
        matrices = self.compute_matrices(features, references) if features else {}
        for name in failed:  # a failed reference: NaN for every layer (its layers as last seen)
            for metric in self._metrics_for(name):
                width = max(1, len(self._reference_layers.get(name, ())))
                matrices[f"{metric}/{name}"] = torch.full((len(self._model_layers), width), float("nan"))
        chance = self.compute_chance(features, references, failed) if features and self.chance.enabled else {}
        if features:
            self._previous = features
        self._prepared.retain(self._live_tensors())
        values = scalars(matrices, self._model_layers, self.prefix)
        values.update(chance_scalars(chance, self._model_layers, self.prefix))
        if not features:  # the probe pass failed: NaN for everything logged before
            values = {tag: float("nan") for tag in self.history}
        self.last_matrices = matrices
        self.last_chance = chance
        return values

    def _live_tensors(self) -> list[torch.Tensor]:
        """The feature tensors the next check may score again (snapshots, frozen references)."""
        held = [self._initial or {}, self._previous or {}, *self._cache.values()]
        return [t for feats in held for t in feats.values()]

    def _check_layers(self, model: nn.Module) -> None:
        if not self._layers_checked:  # an unknown layer name is a configuration error: raise now
            check_layer_selection(model, self.layers)
            self._layers_checked = True

    def _safe_model_features(self, model: nn.Module, context) -> Features:
        self._check_layers(model)
        try:
            features = self.model_features(model, context)
            if not features:
                raise ValueError(f"no layer selected by layers={self.layers!r} produced a tensor on the probe")
        except ForwardError:
            raise
        except Exception as err:  # noqa: BLE001 - reported (warn once, or raised with on_error="raise")
            self.failures.report("the model's probe pass", err)
            return {}
        return self._track_layers(features)

    def _track_layers(self, features: Features) -> Features:
        """Layer bookkeeping of a successful probe pass: the first snapshot, and a restart of
        the snapshots when the tapped layers changed."""
        if self._initial is not None and list(self._initial) != list(features):
            warnings.warn(
                f"{self.failures.owner}: the tapped layers changed since the first check ({list(self._initial)} -> "
                f"{list(features)}); self_initial and self_previous restart from this check",
                UserWarning,
                stacklevel=4,
            )
            self._initial = self._previous = None
        if self._initial is None:
            self._initial = self._previous = features
        self._model_layers = list(features)
        return features

    # -- one check under torch.distributed -------------------------------------------------
    def _check_distributed(self, group: distributed.Group, model: nn.Module, context) -> dict[str, float]:
        """Each rank runs its share of the probe rows (``distributed_probe``), rank 0 gathers
        the features, scores everything alone and broadcasts the scalars; every rank returns
        the same values. A failure anywhere is decided on rank 0 and raised (or warned about)
        on every rank together, so no rank is left waiting in a collective."""
        n, world = self.probe.n, group.world_size
        if self.distributed_probe == "shard":
            bounds = [distributed.shard_bounds(n, world, r) for r in range(world)]
        else:
            bounds = [(0, n)] + [(n, n)] * (world - 1)
        counts = [stop - start for start, stop in bounds]
        self._check_layers(model)  # the same model everywhere: a bad selection raises on every rank
        local, error = self._shard_features(model, context, bounds[group.rank])
        headers = group.all_gather_json(
            {
                "layers": [[name, int(v.shape[1])] for name, v in local.items()],
                "error": None if error is None else f"{type(error).__name__}: {error}",
                "forward_error": isinstance(error, ForwardError),
            }
        )
        problem = _shard_problem(headers, counts)
        gathered: Features = {}
        if problem is None:
            layers = headers[0]["layers"]
            if any(counts[1:]):
                width = sum(d for _, d in layers)
                flat = torch.cat([local[name] for name, _ in layers], 1) if local else torch.zeros(0, width)
                full = group.gather_rows(flat.float(), counts)
                if full is not None:
                    device = unwrap_device(model)
                    columns = torch.split(full.to(device), [d for _, d in layers], dim=1)
                    gathered = {name: column.contiguous() for (name, _), column in zip(layers, columns)}
            else:
                gathered = local
        payload, caught = None, None
        if group.rank == 0:
            try:
                features: Features = {}
                if problem is not None:
                    rank, message, forward_error = problem
                    err = error if rank == 0 and error is not None else RuntimeError(f"on rank {rank}: {message}")
                    if forward_error:
                        raise err if isinstance(err, ForwardError) else ForwardError(str(err))
                    self.failures.report("the model's probe pass", err)
                else:
                    features = self._track_layers(gathered)
                payload = {
                    "values": self._score(features),
                    "model_layers": self._model_layers,
                    "reference_layers": self._reference_layers,
                }
            except Exception as err:  # noqa: BLE001 - sent to every rank, then raised everywhere
                caught, payload = err, {"error": f"{type(err).__name__}: {err}"}
        payload = group.broadcast_json(payload)
        if "error" in payload:
            if caught is not None:
                raise caught
            if error is not None:
                raise error
            raise RuntimeError(f"{self.failures.owner}: the alignment check failed on rank 0 ({payload['error']})")
        if group.rank != 0:
            self._model_layers = list(payload["model_layers"])
            self._reference_layers = {k: list(v) for k, v in payload["reference_layers"].items()}
        return {tag: float(v) for tag, v in payload["values"].items()}

    def _shard_features(self, model: nn.Module, context, rows: tuple[int, int]) -> tuple[Features, Exception | None]:
        """This rank's probe rows ``[start, stop)`` through the model, or the exception it raised."""
        if rows[1] <= rows[0]:
            return {}, None
        try:
            features = self.model_features(model, context, rows)
            if not features:
                raise ValueError(f"no layer selected by layers={self.layers!r} produced a tensor on the probe")
        except Exception as err:  # noqa: BLE001 - decided on rank 0 (see _check_distributed)
            return {}, err
        return features, None

    def model_features(self, model: nn.Module, context=None, rows: tuple[int, int] | None = None) -> Features:
        """Ordered ``{layer: Tensor[n, d]}`` (float32, on the model's device) of ``model`` on the
        probe (``rows=(start, stop)``: on those probe rows only)."""
        probe = self.probe if rows is None else Probe(slice_inputs(self.probe.batch, *rows))
        return probe_pass(model, probe, self.batch_size, self.layers, self.reduce, self.forward_fn, context=context)

    def _safe_reference_features(self, device: torch.device) -> tuple[dict[str, Features], list[str]]:
        out, failed = {}, []
        for name, spec in self.references.items():
            if name in self._cache:
                out[name] = self._cache[name]
                continue
            try:
                feats = {k: v.to(device) for k, v in reference_features(spec, self.probe).items()}
            except ForwardError:
                raise
            except Exception as err:  # noqa: BLE001
                self.failures.report(f"reference {name!r}", err)
                failed.append(name)
                continue
            self._reference_layers[name] = list(feats)
            if is_frozen(spec):
                self._cache[name] = feats
            out[name] = feats
        return out, failed

    def compute_matrices(self, features: Features, references: Mapping[str, Features]) -> dict[str, torch.Tensor]:
        """``{"<metric>/<target>": Tensor[Lx, Ly]}`` for every metric and target (references,
        ``self``, ``self_initial``, ``self_previous``); unscorable cells are NaN."""
        targets: dict[str, Features | None] = dict(references)
        if self.within_model:
            targets["self"] = None
        if self.snapshots and self._initial is not None:
            targets["self_initial"] = self._initial
            targets["self_previous"] = self._previous
        matrices = {}
        for metric in self.metrics:
            for name, ys in targets.items():
                if metric not in self._metrics_for(name):
                    continue
                try:
                    matrix = score_matrix(
                        features, ys, metric, self.metric_kwargs[metric], self.failures, name, cache=self._prepared
                    )
                except Exception as err:  # noqa: BLE001 - the metric itself failed
                    self.failures.report(f"{metric} against {name}", err)
                    matrix = torch.full((len(features), len(features if ys is None else ys)), float("nan"))
                matrices[f"{metric}/{name}"] = matrix
        return matrices

    def compute_chance(
        self, features: Features, references: Mapping[str, Features], failed: Sequence[str] = ()
    ) -> dict[str, TargetChance | None]:
        """``{"<metric>/<reference>": TargetChance or None}``: the permutation null of every
        reference matrix (``None``: failed, logged as NaN). Runs under a forked RNG."""
        out: dict[str, TargetChance | None] = {}
        self.chance.new_check()
        with torch.random.fork_rng(devices=[]):
            for metric in self.metrics:
                for name in self.references:
                    if metric not in self._metrics_for(name):
                        continue
                    if name in failed or name not in references:
                        out[f"{metric}/{name}"] = None
                        continue
                    try:
                        out[f"{metric}/{name}"] = self.chance.score(
                            features, references[name], metric, self.metric_kwargs[metric], name,
                            frozen=is_frozen(self.references[name]),
                        )
                    except Exception as err:  # noqa: BLE001 - reported, NaN, training goes on
                        self.failures.report(f"chance level of {metric} against {name}", err)
                        out[f"{metric}/{name}"] = None
        self.chance.new_check()  # the model's states are not kept between checks
        return out

    def _metrics_for(self, target: str) -> tuple[str, ...]:
        spec = self.references.get(target)
        return (reference_metrics(spec) or self.metrics) if spec is not None else self.metrics

    # -- output --------------------------------------------------------------------------
    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log_scalars(dict(values), step)

    def figures(self, heatmaps: bool = True, curves: bool = False) -> dict[str, Any]:
        """``{tag: matplotlib Figure}``: the last check's heatmaps and / or each layer's curves."""
        from prh_lightning.tracking import figures

        out = {}
        if heatmaps and self.last_matrices:
            calibrated = None
            if self.heatmap_scores == "calibrated":
                calibrated = {key: r.cells for key, r in self.last_chance.items() if r is not None}
            out.update(
                figures.heatmaps(
                    self.last_matrices, self._model_layers, self._reference_layers, self.metric_kwargs, calibrated
                )
            )
        if curves:
            out.update(figures.curves(self.history, self._model_layers, self.prefix, self.metric_kwargs))
        return out

    def log_figures(self, step: int, heatmaps: bool = True, curves: bool = False) -> None:
        """Render figures once and send them to every sink that takes images."""
        image_sinks = [s for s in self.sinks if getattr(s, "takes_images", False)]
        if not image_sinks:
            return
        from prh_lightning.plotting import figure_to_array

        arrays = {tag: figure_to_array(fig) for tag, fig in self.figures(heatmaps, curves).items()}
        for sink in image_sinks:
            sink.log_images(arrays, step)

    @property
    def model_layers(self) -> list[str]:
        """Names of the model's tapped layers (rows of every matrix); empty before the first check."""
        return list(self._model_layers)

    @property
    def reference_layers(self) -> dict[str, list[str]]:
        """Layer names (matrix columns) of each reference computed so far."""
        return dict(self._reference_layers)

    # -- checkpointing -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"metrics": list(self.metrics), "references": sorted(self.references), "layers": repr(self.layers)}

    def state_dict(self) -> dict[str, Any]:
        """Plain values and CPU tensors: history, snapshots, counters and the configuration."""

        def cpu(feats: Features | None) -> Features | None:
            return None if feats is None else {k: v.detach().cpu() for k, v in feats.items()}

        return {
            "version": 2,
            "config": self.config(),
            "history": self.history.state_dict(),
            "initial": cpu(self._initial),
            "previous": cpu(self._previous),
            "last_step": self.last_step,
            "n_checks": self.n_checks,
            "model_layers": list(self._model_layers),
            "reference_layers": {k: list(v) for k, v in self._reference_layers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a changed metric or reference list is a warning (the old
        histories are kept, new ones start now), never a silent restart."""
        old = state.get("config", {})
        for key in ("metrics", "references"):
            before, now = old.get(key), self.config()[key]
            if before is not None and sorted(before) != sorted(now):
                gone, new = sorted(set(before) - set(now)), sorted(set(now) - set(before))
                warnings.warn(
                    f"{self.failures.owner}: the checkpoint's history was recorded with {key} {sorted(before)} but this "
                    f"tracker computes {sorted(now)}; the histories of {gone} are kept but no longer extended, and "
                    f"{new} start at the resumed step",
                    UserWarning,
                    stacklevel=2,
                )
        self.history.load_state_dict(state["history"])
        self._prepared.clear()
        self._initial = state.get("initial")
        self._previous = state.get("previous") or self._initial
        self.last_step = state.get("last_step")
        self.n_checks = int(state.get("n_checks", 0))
        self._model_layers = list(state.get("model_layers") or (self._previous or {}))
        self._reference_layers = {k: list(v) for k, v in (state.get("reference_layers") or {}).items()}

    def move_snapshots(self, device: torch.device) -> None:
        """Snapshots restored on the CPU go where the probe pass runs."""
        if self._initial is not None:
            self._initial = {k: v.to(device) for k, v in self._initial.items()}
        if self._previous is not None:
            self._previous = {k: v.to(device) for k, v in self._previous.items()}


_WRAPPERS = ("_FabricModule", "DistributedDataParallel", "DataParallel")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside Lightning Fabric's / DDP's wrappers (layer names as the user wrote them)."""
    while type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def unwrap_device(model: nn.Module) -> torch.device:
    return module_device(unwrap_model(model))


def _shard_problem(headers: Sequence[Mapping[str, Any]], counts: Sequence[int]) -> tuple[int, str, bool] | None:
    """``(rank, message, is_forward_error)`` of the first rank whose share of the probe pass
    failed or tapped other layers than rank 0; ``None`` when every share can be gathered."""
    for rank, header in enumerate(headers):
        if header["error"] is not None:
            return rank, header["error"], bool(header["forward_error"])
    first = headers[0]["layers"]
    for rank, (header, count) in enumerate(zip(headers, counts)):
        if count and header["layers"] != first:
            return rank, (
                f"its probe rows tapped layers {header['layers']} but rank 0's tapped {first} "
                "(a layer that runs on some inputs only?)"
            ), False
    return None


def metric_kwargs_for(metric: str, k: int, extra: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    return metric_kwargs(metric, k, extra)
