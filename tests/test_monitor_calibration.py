"""Live calibration in AlignmentMonitor: the chance and calibrated tags a real Trainer run writes
to TensorBoard equal a recomputation from independently recorded features with
``prh_lightning.calibrate`` on the documented permutations, and training stays bit-identical."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from callback_helpers import TRAINER_KW, TinyNet, loader, read_scalars, synthetic_data, tiny_features
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from prh_lightning import calibrate
from prh_lightning.callbacks import AlignmentMonitor, Reference
from prh_lightning.tracking import AlignmentTracker, MemorySink

K_NN = 5
LAYERS = ["conv1", "conv2", "fc"]
REF_LAYERS = ["conv1", "fc"]
N_PERM = 30
SEED = 11


class FeatureRecorder(Callback):
    """Records the model's features on the probe by hand (no hooks) after every optimiser step."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.on_train_batch_end(trainer, pl_module, None, None, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        was = pl_module.training
        with torch.random.fork_rng(devices=[]):
            self.by_step[trainer.global_step] = tiny_features(pl_module, self.x)
        pl_module.train(was)


def documented_permutations(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(N_PERM)])


def test_tensorboard_chance_and_calibrated_equal_a_recomputation(tmp_path):
    L.seed_everything(0)
    x, y = synthetic_data(48, seed=123)
    reference = TinyNet()
    mon = AlignmentMonitor(
        probe=(x, y), layers=LAYERS, k=K_NN, every_n_train_steps=3, check_on_validation_end=False,
        references={"twin": Reference(reference, layers=REF_LAYERS)}, log_images=False,
        calibration=N_PERM, calibration_seed=SEED,
    )
    recorder = FeatureRecorder(x)
    model = TinyNet()
    tx, ty = synthetic_data(64)
    trainer = L.Trainer(max_steps=6, callbacks=[recorder, mon], logger=TensorBoardLogger(tmp_path, name="tb"), **TRAINER_KW)
    trainer.fit(model, loader(tx, ty))

    perms = documented_permutations(48)
    assert torch.equal(mon.permutations, perms)
    scalars = read_scalars(str(tmp_path))
    ref = tiny_features(reference, x)
    ref = {name: ref[name] for name in REF_LAYERS}
    for metric, kwargs in (("cka", {}), ("mutual_knn", {"k": K_NN})):
        tag = f"alignment/{metric}/twin"
        for suffix in ("chance", "threshold", "calibrated", *(f"{layer}/calibrated" for layer in LAYERS)):
            assert [s for s, _ in scalars[f"{tag}/{suffix}"]] == [0, 2, 5], suffix  # log step = global_step - 1 after a batch
        for step, logged_step in ((0, 0), (3, 2), (6, 5)):
            feats = recorder.by_step[step]
            expected = calibrate(feats, ref, metric, permutations=perms, **kwargs)
            at = {suffix: dict(scalars[f"{tag}/{suffix}"])[logged_step] for suffix in ("chance", "threshold", "calibrated", "best")}
            assert at["best"] == pytest.approx(expected.aggregate.raw, abs=1e-5)
            assert at["chance"] == pytest.approx(expected.aggregate.null_mean, abs=1e-5)
            assert at["threshold"] == pytest.approx(expected.aggregate.tau, abs=1e-5)
            assert at["calibrated"] == pytest.approx(expected.aggregate.calibrated, abs=1e-5)
            # per layer: the best over reference layers against the row-wise max of the same null
            for i, layer in enumerate(LAYERS):
                observed = float(expected.raw[i].max())
                null = expected.null[:, i, :].max(dim=-1).values.tolist()
                pooled = sorted([observed, *null])
                tau = pooled[math.ceil(0.95 * (N_PERM + 1)) - 1]  # the paper's threshold, alpha = 0.05
                want = min(max((observed - tau) / (1.0 - tau), 0.0), 1.0)
                got = dict(scalars[f"{tag}/{layer}/calibrated"])[logged_step]
                assert got == pytest.approx(want, abs=1e-5), (metric, step, layer)
    assert scalars["alignment/cka/twin/chance"][-1][1] < scalars["alignment/cka/twin/best"][-1][1]


def _fit(tmp_path, calibration: int | None, monitor: bool = True):
    reference = TinyNet()  # built before seeding: its initialisation draws from the global RNG
    L.seed_everything(7)
    model = TinyNet(dropout=0.3, batchnorm=True)
    callbacks = []
    if monitor:
        px, py = synthetic_data(40, seed=123)
        callbacks.append(
            AlignmentMonitor(probe=(px, py), layers="*", k=K_NN, every_n_train_steps=2, calibration=calibration,
                             references={"twin": Reference(reference, layers=REF_LAYERS)}, log_images=False)
        )
    x, y = synthetic_data(64)
    trainer = L.Trainer(max_steps=6, callbacks=callbacks, logger=CSVLogger(tmp_path), **TRAINER_KW)
    trainer.fit(model, loader(x, y, shuffle=True))
    return model.state_dict(), (callbacks[0] if callbacks else None)


def test_training_is_bit_identical_with_and_without_calibration(tmp_path):
    plain, _ = _fit(tmp_path / "a", None, monitor=False)
    off, mon_off = _fit(tmp_path / "b", 0)
    on, mon_on = _fit(tmp_path / "c", 25)
    assert not any(tag.endswith("calibrated") for tag in mon_off.history)
    assert "alignment/cka/twin/calibrated" in mon_on.history
    for name in plain:
        assert torch.equal(plain[name], off[name]), name
        assert torch.equal(plain[name], on[name]), name


def test_frozen_reference_is_prepared_once_and_values_reproduce():
    """A frozen reference's features and prepared states are computed at the first check only;
    a second tracker with the same seed logs the same values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    calls = []

    def reference(inputs):
        calls.append(1)
        return inputs[:, :3] ** 2

    def run():
        sink = MemorySink()
        tracker = AlignmentTracker(probe=x, references={"sq": reference}, calibration=15, sinks=[sink], snapshots=False)
        for step in range(3):
            tracker.check(model, step)
        return tracker, sink

    calls.clear()
    tracker, sink = run()
    assert len(calls) == 1
    assert len(tracker.chance._frozen) == len(tracker.metrics)  # one prepared reference per metric
    _, again = run()
    assert sink.scalars == again.scalars
    assert {"alignment/cka/sq/chance", "alignment/mutual_knn/sq/0/calibrated"} <= set(sink.scalars[0][1])


def test_unrelated_reference_is_near_chance_and_calibrated_zero():
    """Independent features: the best pair sits inside the null (calibrated small), a copy is far above it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 16, generator=g)
    noise = torch.randn(128, 5, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    tracker = AlignmentTracker(
        probe=x, references={"noise": {"r": noise}, "copy": lambda inputs: model(inputs)}, calibration=40,
        within_model=False, snapshots=False, metrics=["cka"],
    )
    values = tracker.check(model, 0)
    assert values["alignment/cka/noise/calibrated"] < 0.1
    assert values["alignment/cka/noise/best"] <= values["alignment/cka/noise/threshold"] * 1.5
    assert values["alignment/cka/copy/calibrated"] > 0.9


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"calibration": -1}, "calibration must be"),
        ({"calibration": 2.5}, "calibration must be"),
        ({"calibration_alpha": 1.5}, "calibration_alpha"),
        ({"heatmap_scores": "pretty"}, "heatmap_scores"),
        ({"calibration": 0, "heatmap_scores": "calibrated"}, "needs calibration"),
    ],
)
def test_bad_calibration_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        AlignmentTracker(**kwargs)


def test_calibrated_heatmaps_and_chance_band():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 6, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    tracker = AlignmentTracker(probe=x, references={"sq": {"r": x**2}}, calibration=10, heatmap_scores="calibrated",
                               metrics=["cka"])
    tracker.check(model, 0)
    tracker.check(model, 1)
    figures = tracker.figures(heatmaps=True, curves=True)
    image = figures["alignment_heatmap/cka/sq"].axes[0].images[0].get_array()
    cells = tracker.last_chance["cka/sq"].cells
    assert torch.allclose(torch.as_tensor(image.data, dtype=torch.float32), cells, equal_nan=True)
    assert "calibrated" in figures["alignment_heatmap/cka/sq"].axes[0].get_title()
    labels = [t.get_text() for t in figures["alignment_curves/cka/sq"].axes[0].get_legend().get_texts()]
    assert "chance (best pair)" in labels


def test_constant_layer_gives_nan_calibration_for_that_layer_only():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 8)
            self.dead = torch.nn.Linear(6, 4)

        def forward(self, x):
            torch.nn.init.zeros_(self.dead.weight)  # constant output: the metrics reject this layer
            return self.a(x) + self.dead(x).sum()

    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 6, generator=g)
    tracker = AlignmentTracker(probe=x, references={"sq": {"r": x**2}}, calibration=10, snapshots=False, within_model=False)
    with pytest.warns(UserWarning, match="constant") as caught:
        values = tracker.check(Net(), 0)
    assert not any("chance level" in str(w.message) for w in caught)
    for metric in ("cka", "mutual_knn"):
        assert math.isnan(values[f"alignment/{metric}/sq/dead/calibrated"])
        assert 0.0 <= values[f"alignment/{metric}/sq/a/calibrated"] <= 1.0
        assert math.isfinite(values[f"alignment/{metric}/sq/chance"])


# -- the chance levels' memory budget (calibration_max_memory) -----------------------------------


def _np_chance(xs, ys, perms, alpha, cka):
    """chance, threshold and calibrated of the best layer pair, from numpy float64 CKA of the
    reference's permuted rows (the formulas of :mod:`prh_lightning.tracking.chance`)."""
    import numpy as np

    best = max(cka(x, y) for x in xs for y in ys)
    null_best = np.array([max(cka(x, y[p]) for x in xs for y in ys) for p in perms.numpy()])
    pooled = np.sort(np.concatenate([[best], null_best]))
    tau = pooled[math.ceil((1 - alpha) * (len(perms) + 1)) - 1]
    return null_best.mean(), tau, min(max((best - tau) / (1.0 - tau), 0.0), 1.0), np.ptp(null_best)


def _chance_features(n=45):
    g = torch.Generator().manual_seed(8)
    shared = torch.randn(n, 3, generator=g, dtype=torch.float64)
    make = lambda d: shared @ torch.randn(3, d, generator=g, dtype=torch.float64) + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)  # noqa: E731
    return {"a": make(6), "b": make(4), "c": make(7)}, {"r": make(5), "s": make(8), "t": make(3)}


@pytest.mark.parametrize("normalize", [True, False])
def test_chance_levels_under_a_budget_match_numpy_and_the_unbounded_null(normalize, monkeypatch):
    # ChanceLevels(max_memory=...) reaches the CKA null: the smallest budget that still builds
    # tables (one y layer each) and one byte less (streamed) log the chance, threshold and
    # calibrated score of the unbounded null and of numpy float64 CKA; the metric's own
    # preparation options (normalize, max_memory) now reach the chance level as they reach the
    # raw scores, and calibration's budget takes precedence over the metric's
    import numpy as np
    from test_calibration import _np_cka, _smallest_grouped_budget

    from prh_lightning.functional import kernels
    from prh_lightning.tracking.chance import ChanceLevels

    xs, ys = _chance_features()
    smallest = _smallest_grouped_budget(45, 3, 3, 8)
    budgets, tables = [], []
    null_fn, inner = kernels._cka_null, kernels._permuted_inner
    monkeypatch.setattr(kernels, "_cka_null", lambda sx, sy, perms, **o: budgets.append({s.budget for s in sx + sy}) or null_fn(sx, sy, perms, **o))
    monkeypatch.setattr(kernels, "_permuted_inner", lambda tri, diag, table, *r: tables.append(table.shape[1]) or inner(tri, diag, table, *r))
    kwargs = {"normalize": normalize, "max_memory": "1GB"}
    out = {}
    for name, budget in (("whole", None), ("grouped", smallest), ("streamed", smallest - 1)):
        levels = ChanceLevels(12, seed=4, alpha=0.1, max_memory=budget)
        out[name] = levels.score(xs, ys, "cka", kwargs, "ref", frozen=False)
    assert budgets == [{10**9}, {smallest}, {smallest - 1}]
    assert tables == [3] + [1] * 9
    if normalize:
        cka = lambda a, b: _np_cka(a.numpy(), b.numpy(), False)  # noqa: E731
    else:  # the features as given: centred, not row-normalised
        def cka(a, b):
            a, b = a.numpy() - a.numpy().mean(axis=0), b.numpy() - b.numpy().mean(axis=0)
            K, L = a @ a.T, b @ b.T
            return float((K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum()))
    chance, tau, calibrated, spread = _np_chance(list(xs.values()), list(ys.values()), levels.permutations(45), 0.1, cka)
    assert spread > 0.01
    for result in out.values():
        assert (result.chance, result.threshold, result.calibrated) == pytest.approx((chance, tau, calibrated), rel=1e-9, abs=1e-12)


def test_calibration_max_memory_is_a_plain_tracker_and_monitor_option(monkeypatch):
    # settable as a plain value (YAML / LightningCLI): the tracker's and the monitor's chance
    # levels carry the parsed budget, and a check hands it to the CKA null
    from prh_lightning.functional import kernels

    budgets = []
    null_fn = kernels._cka_null
    monkeypatch.setattr(kernels, "_cka_null", lambda sx, sy, perms, **o: budgets.append({s.budget for s in sx + sy}) or null_fn(sx, sy, perms, **o))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    tracker = AlignmentTracker(
        probe=x, references={"sq": {"r": x**2}}, calibration=5, metrics=["cka"], calibration_max_memory="2MiB",
        within_model=False, snapshots=False,
    )
    values = tracker.check(model, 0)
    assert budgets == [{2 * 2**20}]
    assert math.isfinite(values["alignment/cka/sq/chance"])
    assert AlignmentMonitor(calibration_max_memory="4GB").tracker.chance.max_memory == 4 * 10**9
    assert AlignmentMonitor(calibration_max_memory=123456).tracker.chance.max_memory == 123456
    with pytest.raises(ValueError, match="max_memory"):
        AlignmentTracker(calibration_max_memory="a lot")
