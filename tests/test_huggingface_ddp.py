"""The Hugging Face front end under DDP: a real ``transformers.Trainer`` in 2 gloo CPU processes
(``TrainingArguments(use_cpu=True, ddp_backend="gloo")``), the tracker drawing its probe from the
training data. Checked: both ranks drew the same probe; each rank ran half of the probe rows
(``distributed_probe="shard"``) and only rank 0 scored matrices and logged; every rank holds rank
0's values, which equal a float64 brute-force recomputation from features the test computes
itself (no hooks) and a single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from callback_helpers import HFTiny, Rows, brute_cka, brute_mutual_knn, synthetic_data, tiny_features
from torch import distributed as dist
from torch import multiprocessing as mp

LAYERS = ["conv1", "conv2", "fc"]
N_PROBE, K, MAX_STEPS, WORLD = 40, 5, 6, 2
CHECK_STEPS = [0, 2, 4, 6]


class CountingHF(HFTiny):
    """HFTiny counting the rows its forward sees in eval mode (the tracker's probe passes: the
    Trainer runs no evaluation here)."""

    def __init__(self) -> None:
        super().__init__()
        self.probe_rows = 0

    def forward(self, x, labels=None):
        if not self.training:
            self.probe_rows += x.shape[0]
        return super().forward(x, labels)


def _train(out_dir: str, batch_size: int, ddp: bool):
    """A Trainer run of ``MAX_STEPS`` SGD steps with the callback attached; returns (trainer, callback, model)."""
    import transformers

    from prh_lightning.integrations.huggingface import AlignmentTrainerCallback
    from prh_lightning.tracking import AlignmentTracker

    torch.manual_seed(0)
    model = CountingHF()
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=MAX_STEPS, per_device_train_batch_size=batch_size, learning_rate=0.1,
        save_strategy="no", logging_steps=100, report_to=[], use_cpu=True, disable_tqdm=True,
        lr_scheduler_type="constant", optim="sgd", seed=0, dataloader_num_workers=0,
        **({"ddp_backend": "gloo"} if ddp else {}),
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(*synthetic_data(48)))
    # no probe given: the callback draws max_probe_samples rows of the training data
    tracker = AlignmentTracker(layers=[f"net.{l}" for l in LAYERS], metrics=("cka", "mutual_knn"), k=K,
                               every_n_steps=2, max_probe_samples=N_PROBE)
    callback = AlignmentTrainerCallback.attach(trainer, tracker)
    trainer.train()
    return trainer, callback, model


def _history(tracker) -> dict[str, list]:
    return {tag: [[s, v] for s, v in tracker.history[tag]] for tag in tracker.history}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), HF_HUB_OFFLINE="1",
                      OMP_NUM_THREADS="1")  # accelerate sizes CPU threads with psutil unless this is set
    torch.set_num_threads(1)
    record: dict = {}
    try:
        import prh_lightning.tracking.tracker as tracker_module

        calls = {"score_matrix": 0}
        score_matrix = tracker_module.score_matrix

        def counted(*args, **kwargs):  # this worker's module only
            calls["score_matrix"] += 1
            return score_matrix(*args, **kwargs)

        tracker_module.score_matrix = counted
        trainer, callback, model = _train(os.path.join(out, f"out{rank}"), batch_size=8, ddp=True)
        tracker = callback.tracker
        px = tracker.probe.batch["x"]
        record.update(
            world=dist.get_world_size() if dist.is_initialized() else 1,
            probe_x=px.tolist(),
            final={k: v.tolist() for k, v in tiny_features(model.net, px).items()},
            probe_rows=model.probe_rows,
            score_matrix_calls=calls["score_matrix"],
            history=_history(tracker),
            logged=[e for e in trainer.state.log_history if any(k.startswith("alignment/") for k in e)],
        )
    except Exception as err:  # noqa: BLE001 - recorded for the test
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_trainer_under_ddp_shards_the_probe_scores_on_rank0_and_matches_brute_force(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert r0["world"] == r1["world"] == WORLD  # the Trainer really ran under torch.distributed

    # both ranks drew the same probe from the (unsharded) training data
    assert r0["probe_x"] == r1["probe_x"] and len(r0["probe_x"]) == N_PROBE
    # the work is not duplicated: each rank ran half of the probe rows at each check ...
    assert r0["probe_rows"] == r1["probe_rows"] == len(CHECK_STEPS) * N_PROBE // WORLD
    # ... and rank 0 alone computed the matrices and logged the scalars
    assert r0["score_matrix_calls"] > 0 and r1["score_matrix_calls"] == 0
    assert [e["step"] for e in r0["logged"]] == CHECK_STEPS and r1["logged"] == []
    # every rank records rank 0's values
    assert r0["history"] == r1["history"]
    tag = "alignment/cka/self_initial/net.fc"
    assert [s for s, _ in r0["history"][tag]] == CHECK_STEPS

    # rank 0's last values equal brute force on the final and the initial model's features
    px = torch.tensor(r0["probe_x"])
    torch.manual_seed(0)
    initial = tiny_features(HFTiny().net, px)
    final = {k: torch.tensor(v) for k, v in r0["final"].items()}
    assert torch.allclose(final["fc"], torch.tensor(r1["final"]["fc"]))  # DDP kept the replicas equal
    for layer in LAYERS:
        cka = r0["history"][f"alignment/cka/self_initial/net.{layer}"][-1]
        assert cka == [MAX_STEPS, pytest.approx(brute_cka(final[layer], initial[layer]), abs=1e-4)]
        knn = r0["history"][f"alignment/mutual_knn/self_initial/net.{layer}"][-1]
        assert knn == [MAX_STEPS, pytest.approx(brute_mutual_knn(final[layer], initial[layer], K), abs=1e-6)]
    pairs = [(a, b) for a in LAYERS for b in LAYERS if a != b]
    offdiag = sum(brute_cka(final[a], final[b]) for a, b in pairs) / len(pairs)
    assert r0["history"]["alignment/cka/self/mean_offdiag"][-1] == [MAX_STEPS, pytest.approx(offdiag, abs=1e-4)]

    # a single process with the same global batch (2 x 8 = 16 rows of the same shuffled order)
    # and seed takes the same SGD steps, so it logs the same values at every check
    _, single, model = _train(str(tmp_path / "single"), batch_size=16, ddp=False)
    assert model.probe_rows == len(CHECK_STEPS) * N_PROBE
    expected = _history(single.tracker)
    assert set(expected) == set(r0["history"])
    for tag, points in expected.items():
        assert [s for s, _ in r0["history"][tag]] == [s for s, _ in points], tag
        assert [v for _, v in r0["history"][tag]] == pytest.approx([v for _, v in points], abs=1e-5), tag
