"""The monitor under DDP (2 gloo CPU processes): rank 0 alone scores, every rank gets the same
scalars, the probe rows are shared out (``distributed_probe="shard"``) or run on rank 0
(``"rank0"``), references run on rank 0 only (a frozen one once), and ``monitor.history`` is
filled in the process that launched ``ddp_spawn``. Logged values are checked against a
brute-force recomputation from features the test records itself (no hooks, float64 formulas).
"""

from __future__ import annotations

import json
import os
import socket
import warnings

import lightning as L
import pytest
import torch
from callback_helpers import (
    TRAINER_KW,
    EndDistributedCleanly,
    TinyNet,
    brute_cka,
    brute_mutual_knn,
    loader,
    synthetic_data,
    tiny_features,
)
from lightning.pytorch.callbacks import EarlyStopping
from torch import distributed as dist
from torch import multiprocessing as mp

from prh_lightning.callbacks import AlignmentMonitor, Reference
from prh_lightning.tracking import AlignmentTracker
from prh_lightning.tracking.distributed import shard_bounds

LAYERS = ["conv1", "conv2", "fc"]
N_PROBE, K, CHECKS = 40, 5, (0, 2, 4)


class CountingNet(TinyNet):
    """A TinyNet that counts the rows its forward sees outside training (probe passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.probe_rows = 0

    def forward(self, x):
        if not self.training:
            self.probe_rows += x.shape[0]
        return super().forward(x)

    def train_dataloader(self):
        return loader(*synthetic_data(64), batch_size=16)


class Witness(L.Callback):
    """Runs after the monitor in each worker: records the model's features at every check by
    hand, the alignment scalars in ``trainer.callback_metrics``, and how much scoring work this
    rank did; writes them to ``<out>/rank<r>.json`` at the end."""

    def __init__(self, monitor: AlignmentMonitor, out) -> None:
        self.monitor, self.out = monitor, out
        self.features, self.metrics = {}, {}
        self.calls = {"score_matrix": 0, "chance": 0}

    def setup(self, trainer, pl_module, stage):
        import prh_lightning.tracking.tracker as tracker_module

        def counted(name, fn):
            def wrapper(*args, **kwargs):
                self.calls[name] += 1
                return fn(*args, **kwargs)

            return wrapper

        tracker_module.score_matrix = counted("score_matrix", tracker_module.score_matrix)  # this worker only
        self.monitor.tracker.chance.score = counted("chance", self.monitor.tracker.chance.score)

    def _record(self, trainer, pl_module):
        rows, was_training = pl_module.probe_rows, pl_module.training
        feats = tiny_features(pl_module, self.monitor.probe.batch[0])
        pl_module.train(was_training)
        pl_module.probe_rows = rows  # the witness's own pass is not the monitor's
        step = str(trainer.global_step)
        self.features[step] = {k: v.tolist() for k, v in feats.items()}
        self.metrics[step] = {t: float(v) for t, v in trainer.callback_metrics.items() if t.startswith("alignment/")}

    def on_train_start(self, trainer, pl_module):
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in CHECKS:
            self._record(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage):
        refs = self.monitor.tracker.references
        record = {
            "features": self.features,
            "metrics": self.metrics,
            "calls": self.calls,
            "probe_rows": pl_module.probe_rows,
            "twin_rows": refs["twin"].model.probe_rows,
            "moving_rows": refs["moving"].model.probe_rows,
        }
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["shard", "rank0"])
def test_ddp_spawn_scores_once_on_rank0_and_broadcasts(tmp_path, mode):
    torch.set_num_threads(1)
    L.seed_everything(3)
    model, twin, moving = CountingNet(), CountingNet(), CountingNet()
    px, py = synthetic_data(N_PROBE, seed=5)
    monitor = AlignmentMonitor(
        probe=(px, py), layers=LAYERS, k=K, every_n_train_steps=2, calibration=5, distributed_probe=mode,
        references={
            "twin": Reference(twin, layers=LAYERS, batch_size=N_PROBE),  # frozen: computed once
            "moving": Reference(moving, layers=["conv1", "fc"], frozen=False, batch_size=N_PROBE),
        },
    )
    # EarlyStopping on an alignment tag: present on every rank (strict), one decision
    stop = dict(monitor="alignment/cka/twin/best", mode="max", patience=100, check_on_train_epoch_end=True, strict=True)
    trainer = L.Trainer(
        max_steps=4, logger=False, strategy="ddp_spawn",
        callbacks=[monitor, Witness(monitor, str(tmp_path)), EarlyStopping(**stop), EndDistributedCleanly()],
        **{**TRAINER_KW, "devices": 2, "use_distributed_sampler": False},
    )
    trainer.fit(model)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # the same scalars in callback_metrics on both ranks, at every check (EarlyStopping sees one value)
    assert sorted(r0["metrics"]) == sorted(r1["metrics"]) == [str(s) for s in CHECKS]
    assert r0["metrics"] == r1["metrics"]
    tags = set(r0["metrics"]["4"])
    assert {"alignment/cka/twin/best", "alignment/mutual_knn/moving/fc", "alignment/cka/twin/chance"} <= tags

    # values equal a brute-force recomputation from the features recorded by hand on rank 0
    ref = tiny_features(twin, px)
    initial = {k: torch.tensor(v) for k, v in r0["features"]["0"].items()}
    for step in map(str, CHECKS):
        feats = {k: torch.tensor(v) for k, v in r0["features"][step].items()}
        logged = r0["metrics"][step]
        for layer in LAYERS:
            best_cka = max(brute_cka(feats[layer], ref[j]) for j in LAYERS)
            assert logged[f"alignment/cka/twin/{layer}"] == pytest.approx(best_cka, abs=1e-5)
            best_knn = max(brute_mutual_knn(feats[layer], ref[j], K) for j in LAYERS)
            assert logged[f"alignment/mutual_knn/twin/{layer}"] == pytest.approx(best_knn, abs=1e-6)
            assert logged[f"alignment/cka/self_initial/{layer}"] == pytest.approx(
                brute_cka(feats[layer], initial[layer]), abs=1e-5
            )

    # rank 0 alone scored (matrices, chance levels) and ran the references, the frozen one once
    assert r0["calls"]["score_matrix"] > 0 and r0["calls"]["chance"] > 0
    assert r1["calls"] == {"score_matrix": 0, "chance": 0}
    assert (r0["twin_rows"], r1["twin_rows"]) == (N_PROBE, 0)
    assert (r0["moving_rows"], r1["moving_rows"]) == (N_PROBE * len(CHECKS), 0)
    # the model's probe rows: half each, or all on rank 0
    share = (N_PROBE // 2, N_PROBE // 2) if mode == "shard" else (N_PROBE, 0)
    assert (r0["probe_rows"], r1["probe_rows"]) == tuple(s * len(CHECKS) for s in share)

    # the launching process: history handed back, callback_metrics brought back by Lightning
    assert set(monitor.history) == tags
    for tag in tags:
        assert [s for s, _ in monitor.history[tag]] == list(CHECKS), tag
        # callback_metrics hold float32 tensors, the history the float values
        assert [v for _, v in monitor.history[tag]] == pytest.approx([r0["metrics"][str(s)][tag] for s in CHECKS], abs=1e-6)
        assert trainer.callback_metrics[tag].item() == pytest.approx(r0["metrics"]["4"][tag], abs=1e-6)
    assert monitor.model_layers == LAYERS and monitor.reference_layers["moving"] == ["conv1", "fc"]
    assert monitor.last_matrices["cka/twin"].shape == (3, 3)
    assert not os.path.exists(monitor._handoff.path)  # read once, then removed


# -- the protocol without Lightning: failures decided on rank 0, raised or warned on every rank ----
class FlakyNet(torch.nn.Module):
    """Linear layers whose forward raises on rank 1 while ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
        self.fail = False

    def forward(self, x):
        if self.fail and dist.get_rank() == 1:
            raise RuntimeError("boom on this rank")
        return self.b(torch.tanh(self.a(x)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flaky_worker(rank: int, port: int, out: str, on_error: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    record: dict = {"checks": []}
    try:
        torch.manual_seed(0)
        model = FlakyNet()
        tracker = AlignmentTracker(probe=torch.randn(30, 4), metrics=("cka",), calibration=0, on_error=on_error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step, fail in ((0, False), (1, True), (2, False)):
                model.fail = fail
                try:
                    record["checks"].append(tracker.check(model, step))
                except Exception as err:  # noqa: BLE001 - recorded for the test
                    record["error"] = f"{type(err).__name__}: {err}"
                    break
        record["warnings"] = [str(w.message) for w in caught if "failed" in str(w.message)]
        record["history"] = {t: list(map(list, v)) for t, v in tracker.history.items()}
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
        dist.destroy_process_group()


def _run_flaky(tmp_path, on_error: str) -> tuple[dict, dict]:
    mp.spawn(_flaky_worker, args=(_free_port(), str(tmp_path), on_error), nprocs=2, join=True)
    return tuple(json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_a_failing_rank_gives_nan_everywhere_and_training_goes_on(tmp_path):
    r0, r1 = _run_flaky(tmp_path, "warn")
    assert "error" not in r0 and "error" not in r1
    first, failed, recovered = r0["checks"]
    assert len(r1["checks"]) == 3
    assert first and all(v == v for v in first.values())  # finite
    assert set(failed) == set(first) and all(v != v for v in failed.values())  # NaN for every tag
    assert all(v != v for v in r1["checks"][1].values())
    assert recovered == r1["checks"][2] and all(v == v for v in recovered.values())
    assert first == r1["checks"][0]
    # one warning, on rank 0, naming the rank that failed; none on rank 1
    assert len(r0["warnings"]) == 1 and "rank 1" in r0["warnings"][0] and "boom" in r0["warnings"][0]
    assert r1["warnings"] == []
    assert json.dumps(r0["history"]) == json.dumps(r1["history"])


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_on_error_raise_raises_on_every_rank_without_hanging(tmp_path):
    r0, r1 = _run_flaky(tmp_path, "raise")
    assert len(r0["checks"]) == len(r1["checks"]) == 1  # the first check went through
    assert r1["error"] == "RuntimeError: boom on this rank"  # its own error
    assert r0["error"].startswith("RuntimeError: on rank 1:") and "boom" in r0["error"]


SIZES = (7, 2)  # shares of 3, 2, 2 rows; of 1, 1, 0 rows (a rank with nothing to run)


def _uneven_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    record = {}
    try:
        torch.manual_seed(0)
        model = FlakyNet()
        for n in SIZES:
            x = torch.randn(n, 4)
            # the inputs themselves as a precomputed reference: rows gathered out of order would show
            tracker = AlignmentTracker(
                probe=x, references={"inputs": x}, metrics=("cka",), calibration=0, batch_size=2
            )
            values = tracker.check(model, 0)
            with torch.no_grad():  # the layers by hand, on every row at once
                a = model.a(x)
                by_hand = {"a": a, "b": model.b(torch.tanh(a))}
            by_hand["x"] = x
            record[str(n)] = {"values": values, "features": {k: v.tolist() for k, v in by_hand.items()}}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_uneven_shares_on_three_ranks_equal_brute_force(tmp_path):
    mp.spawn(_uneven_worker, args=(3, _free_port(), str(tmp_path)), nprocs=3, join=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for n in map(str, SIZES):
        assert records[0][n]["values"] == records[1][n]["values"] == records[2][n]["values"]
        feats = {k: torch.tensor(v) for k, v in records[0][n]["features"].items()}
        # the tapped layers are the two Linear modules (tanh is a function): their within-model CKA, by hand
        logged = records[0][n]["values"]
        assert logged["alignment/cka/self/mean_offdiag"] == pytest.approx(brute_cka(feats["a"], feats["b"]), abs=1e-5)
        for layer in ("a", "b"):
            assert logged[f"alignment/cka/inputs/{layer}"] == pytest.approx(brute_cka(feats[layer], feats["x"]), abs=1e-5)


def test_shard_bounds_cover_the_rows_in_order():
    for n in (0, 1, 5, 40, 41):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_a_damaged_handoff_file_is_a_warning(tmp_path):
    monitor = AlignmentMonitor(probe=synthetic_data(20)[0], layers=["fc"])
    with open(monitor._handoff.path, "w") as f:
        f.write('{"format": "something else"}')
    with pytest.warns(UserWarning, match="could not read the state the worker processes handed back"):
        assert dict(monitor.history) == {}
    assert not os.path.exists(monitor._handoff.path)
    with pytest.raises(ValueError, match="distributed_probe must be one of"):
        AlignmentMonitor(distributed_probe="everywhere")
