"""AlignmentMonitor in real Trainer runs: TensorBoard scalars and images read back and checked
against brute-force formulas, CSV and bare loggers, bit-identical training, resume, bad arguments."""

from __future__ import annotations

import copy
import csv
import math
import os

import lightning as L
import pytest
import torch
from callback_helpers import (
    TRAINER_KW,
    TinyNet,
    brute_cka,
    brute_mutual_knn,
    event_accumulator,
    loader,
    read_scalars,
    synthetic_data,
    tiny_features,
)
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from prh_lightning.callbacks import AlignmentMonitor, Reference
from prh_lightning.representations import Representations

K = 5
SNAPSHOTS = ("self_initial", "self_previous")
LAYERS = ["conv1", "conv2", "fc"]


def probe_data(n: int = 40):
    return synthetic_data(n, seed=123)


def monitor(**kw) -> AlignmentMonitor:
    x, y = probe_data()
    kw.setdefault("layers", LAYERS)
    kw.setdefault("k", K)
    return AlignmentMonitor(probe=(x, y), **kw)


def fit(model, callbacks, logger, max_epochs=2, n_train=64, **kw):
    x, y = synthetic_data(n_train)
    vx, vy = synthetic_data(32, seed=1)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=logger, **{**TRAINER_KW, **kw})
    trainer.fit(model, loader(x, y), loader(vx, vy))
    return trainer


@pytest.mark.slow
def test_tensorboard_scalars_images_and_values(tmp_path):
    L.seed_everything(0)
    twin = TinyNet()
    fixed = torch.randn(40, 7, generator=torch.Generator().manual_seed(5))
    mon = monitor(
        references={
            "twin": Reference(twin, layers=["conv1", "fc"]),
            "fixed": Representations({"r": fixed}),
            "fn": lambda x: x.flatten(1) ** 2,  # a callable of the probe inputs
        },
        every_n_train_steps=2,
    )
    model = TinyNet()
    start = copy.deepcopy(model)
    trainer = fit(model, [mon], TensorBoardLogger(tmp_path, name="tb"))

    scalars = read_scalars(str(tmp_path))
    metrics = ("cka", "mutual_knn")
    expected = {f"alignment/{m}/{t}/{s}" for m in metrics for t in ("twin", "fixed", "fn") for s in ["best", *LAYERS]}
    expected |= {f"alignment/{m}/{t}/{s}" for m in metrics for t in SNAPSHOTS for s in ["mean", *LAYERS]}
    expected |= {f"alignment/{m}/self/mean_offdiag" for m in metrics}
    # live calibration (default calibration=20) against each reference, not against the model itself
    expected |= {f"alignment/{m}/{t}/{s}" for m in metrics for t in ("twin", "fixed", "fn") for s in ["chance", "threshold", "calibrated"]}
    expected |= {f"alignment/{m}/{t}/{l}/calibrated" for m in metrics for t in ("twin", "fixed", "fn") for l in LAYERS}
    assert set(scalars) == expected
    # checks at train start, every 2 steps; validation ends (steps 4, 8) coincide with step checks.
    # History holds trainer.global_step; loggers get the step self.log uses (one less after a batch).
    assert [s for s, _ in mon.history["alignment/cka/twin/best"]] == [0, 2, 4, 6, 8]
    for tag, points in scalars.items():
        assert [s for s, _ in points] == [0, 1, 3, 5, 7], tag
        assert all(-1e-5 <= v <= 1 + 1e-5 for _, v in points), (tag, points)
    for layer in LAYERS:
        assert scalars[f"alignment/cka/self_initial/{layer}"][0][1] == pytest.approx(1.0, abs=1e-5)
        assert scalars[f"alignment/mutual_knn/self_previous/{layer}"][0][1] == pytest.approx(1.0)

    # final values against brute force on the same probe and the trained / initial weights
    x, _ = probe_data()
    now, then, ref = tiny_features(model, x), tiny_features(start, x), tiny_features(twin, x)
    last = {tag: points[-1][1] for tag, points in scalars.items()}
    for layer in LAYERS:
        cka_then = brute_cka(now[layer], then[layer])
        assert last[f"alignment/cka/self_initial/{layer}"] == pytest.approx(cka_then, abs=1e-4)
        twin_best = max(brute_cka(now[layer], ref[r]) for r in ("conv1", "fc"))
        assert last[f"alignment/cka/twin/{layer}"] == pytest.approx(twin_best, abs=1e-4)
        knn_fixed = brute_mutual_knn(now[layer], fixed, K)
        assert last[f"alignment/mutual_knn/fixed/{layer}"] == pytest.approx(knn_fixed, abs=1e-6)
    assert last["alignment/cka/twin/best"] == pytest.approx(max(last[f"alignment/cka/twin/{l}"] for l in LAYERS))
    assert trainer.callback_metrics["alignment/cka/twin/best"].item() == pytest.approx(last["alignment/cka/twin/best"])

    images = event_accumulator(str(tmp_path)).Tags()["images"]
    heatmaps = {f"alignment_heatmap/{m}/{t}" for m in metrics for t in ("twin", "fixed", "fn", "self")}
    curves = {f"alignment_curves/{m}/{t}" for m in metrics for t in ("twin", "fixed", "fn", "self_initial")}
    assert set(images) == heatmaps | curves
    acc = event_accumulator(str(tmp_path))
    shots = acc.Images("alignment_heatmap/cka/twin")
    assert [e.step for e in shots] == [3, 7]  # at validation ends only (images cost more than scalars)
    assert shots[-1].width > 200 and shots[-1].height > 150
    assert len(acc.Images("alignment_curves/mutual_knn/self_initial")) == 1


@pytest.mark.slow
def test_training_is_bit_identical_with_and_without_monitor(tmp_path):
    """Dropout and BatchNorm make any RNG draw or train-mode probe pass visible in the weights."""

    def run(with_monitor: bool) -> TinyNet:
        L.seed_everything(7)
        callbacks = []
        if with_monitor:  # a shuffling probe loader: materialising it must not draw from training's RNG
            px, py = probe_data()
            probe = loader(px, py, batch_size=8, shuffle=True)
            callbacks.append(AlignmentMonitor(probe=probe, layers="*", k=K, every_n_train_steps=3))
        model = TinyNet(dropout=0.3, batchnorm=True)
        x, y = synthetic_data(64)
        trainer = L.Trainer(max_steps=9, callbacks=callbacks, logger=CSVLogger(tmp_path), **TRAINER_KW)
        trainer.fit(model, loader(x, y, shuffle=True))
        assert model.training and all(m.training for m in model.modules())
        return model

    plain, monitored = run(False).state_dict(), run(True).state_dict()
    assert plain.keys() == monitored.keys()
    for name in plain:
        assert torch.equal(plain[name], monitored[name]), name


class RecordingLogger(Logger):
    """A bare Logger (neither TensorBoard nor CSV) that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


@pytest.mark.slow
def test_csv_logger_gets_scalars_and_bare_logger_does_not_crash(tmp_path):
    other = TinyNet()
    mon = monitor(references={"other": other})  # a bare nn.Module: every leaf layer
    recording = RecordingLogger()
    csv_logger = CSVLogger(tmp_path, name="csv")
    fit(TinyNet(), [mon], [csv_logger, recording])

    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    tag = "alignment/cka/other/best"
    logged = [(int(r["step"]), float(r[tag])) for r in rows if r.get(tag)]
    assert [s for s, _ in logged] == [0, 3, 7]  # train start + two validation ends (the step self.log uses)
    written = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert not [f for f in written if f.endswith(".png") or "tfevents" in f]  # scalars only

    mine = [(step, m) for step, m in recording.calls if tag in m]
    assert [s for s, _ in mine] == [s for s, _ in logged]
    assert [m[tag] for _, m in mine] == pytest.approx([v for _, v in logged], abs=1e-6)
    other_layers = ["conv1", "act1", "pool", "conv2", "act2", "fc"]  # every leaf but eval-mode identities
    assert mon.reference_layers == {"other": other_layers}
    for layer in LAYERS:
        assert f"alignment/mutual_knn/other/{layer}" in mine[-1][1]


@pytest.mark.slow
def test_resume_from_checkpoint_continues_histories(tmp_path):
    L.seed_everything(3)
    model = TinyNet()
    start = copy.deepcopy(model)
    first = monitor(references={"twin": TinyNet()})
    trainer = fit(model, [first], TensorBoardLogger(tmp_path, name="a"), max_epochs=1)
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    steps_before = [s for s, _ in first.history["alignment/cka/self_initial/conv1"]]
    assert steps_before == [0, 4]

    second = monitor(references={"twin": TinyNet()})
    resumed = TinyNet()
    x, y = synthetic_data(64)
    vx, vy = synthetic_data(32, seed=1)
    trainer = L.Trainer(max_epochs=3, callbacks=[second], logger=TensorBoardLogger(tmp_path, name="b"), **TRAINER_KW)
    trainer.fit(resumed, loader(x, y), loader(vx, vy), ckpt_path=ckpt)

    history = second.history["alignment/cka/self_initial/conv1"]
    assert [s for s, _ in history] == [0, 4, 8, 12]
    assert history[:2] == first.history["alignment/cka/self_initial/conv1"]
    # the initial snapshot is the one from before the first run, not the resumed weights
    px, _ = probe_data()
    expected = brute_cka(tiny_features(resumed, px)["conv1"], tiny_features(start, px)["conv1"])
    assert history[-1][1] == pytest.approx(expected, abs=1e-4)
    scalars = read_scalars(str(tmp_path / "b"))
    assert [s for s, _ in scalars["alignment/cka/twin/best"]] == [7, 11]


# -- bad arguments -----------------------------------------------------------------------------
def test_unknown_metric():
    with pytest.raises(ValueError, match=r"unknown metric.*'ckaa'.*choose from"):
        monitor(metrics=("cka", "ckaa"))


def test_probe_smaller_than_k_plus_one():
    x, y = synthetic_data(8)
    with pytest.raises(ValueError, match=r"probe has 8 samples.*at least 11"):
        AlignmentMonitor(probe=(x, y), k=10)
    AlignmentMonitor(probe=(x, y), metrics=("cka",), k=10)  # CKA has no k


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(every_n_train_steps=0), ValueError, "every_n_train_steps must be a positive int"),
        (dict(on_error="ignore"), ValueError, "on_error must be one of"),
        (dict(stages=("fit", "predict")), ValueError, r"unknown stage\(s\) \['predict'\]"),
        (dict(max_history=2), ValueError, "max_history must be an int >= 4"),
        (dict(check_on_validation_end=False), ValueError, "would never check"),
        (dict(references={"self": TinyNet()}), ValueError, "reference name 'self' is not allowed"),
        (dict(references={"a/b": TinyNet()}), ValueError, "without '/'"),
        (dict(references={"x": 3}), TypeError, "reference 'x' is a int"),
        (dict(metrics=()), ValueError, "metrics is empty"),
        (dict(log_images=-1), ValueError, "log_images must be True, False or a positive int"),
        (dict(k=0), ValueError, "k must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        monitor(**kwargs)


def test_reference_needs_a_module():
    with pytest.raises(TypeError, match="Reference.model must be an nn.Module"):
        Reference(lambda x: x)


def test_bad_probe():
    with pytest.raises(TypeError, match="probe must be 'val', 'train', a DataLoader"):
        AlignmentMonitor(probe="images/")


def quick_fit(mon, logger=None, model=None):
    x, y = synthetic_data(32)
    trainer = L.Trainer(max_steps=1, callbacks=[mon], logger=logger, **TRAINER_KW)
    trainer.fit(model or TinyNet(), loader(x, y))


def test_no_logger_warns_and_values_still_reach_history_and_callback_metrics(tmp_path):
    mon = monitor(metrics=("cka",))
    x, y = synthetic_data(32)
    trainer = L.Trainer(max_steps=1, callbacks=[mon], logger=False, **TRAINER_KW)
    with pytest.warns(UserWarning, match="the Trainer has no logger"):
        trainer.fit(TinyNet(), loader(x, y))
    assert "alignment/cka/self_initial/fc" in trainer.callback_metrics
    assert mon.history["alignment/cka/self_initial/fc"][0] == (0, pytest.approx(1.0, abs=1e-5))


def test_unknown_layer(tmp_path):
    with pytest.raises(KeyError, match=r"no module named 'conv3'.*close matches.*conv"):
        quick_fit(monitor(layers=["conv1", "conv3"]), logger=CSVLogger(tmp_path))


def test_reference_with_wrong_number_of_samples(tmp_path):
    mon = monitor(references={"short": torch.randn(30, 4)}, on_error="raise")
    with pytest.raises(ValueError, match=r"layer 'output'.*\(30, 4\).*probe has 40 samples"):
        quick_fit(mon, logger=CSVLogger(tmp_path))


def test_degenerate_layer_gives_nan_and_a_warning_not_a_crash(tmp_path):
    """A layer that outputs zeros for every sample cannot be scored; training goes on."""

    class Dead(TinyNet):
        def __init__(self):
            super().__init__()
            torch.nn.init.zeros_(self.conv2.weight)
            torch.nn.init.zeros_(self.conv2.bias)
            self.conv2.requires_grad_(False)

    mon = monitor(metrics=("cka",))
    with pytest.warns(UserWarning, match="conv2"):
        quick_fit(mon, logger=CSVLogger(tmp_path), model=Dead())
    assert math.isnan(mon.history["alignment/cka/self_initial/conv2"][-1][1])
    assert not math.isnan(mon.history["alignment/cka/self_initial/conv1"][-1][1])
