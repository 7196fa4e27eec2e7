"""References given by name or ``class_path`` are loaded at the first check that needs them:
under DDP (2 gloo processes, a plain loop) only rank 0 scores, so rank 1 never materialises the
offline MiniLM, and rank 0's logged values equal a brute-force CKA against MiniLM embeddings
computed here, and a single-process tracker's values."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from callback_helpers import TinyNet, brute_cka, synthetic_data, tiny_features
from torch import distributed as dist
from torch import multiprocessing as mp

from prh_lightning.tracking import AlignmentTracker, Reference
from prh_lightning.tracking.references import check_references, reference_features
from prh_lightning.tracking.probe import Probe

LAYERS = ["conv1", "conv2", "fc"]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STEPS = (0, 1, 2)


def _tracker(px, py) -> AlignmentTracker:
    return AlignmentTracker(
        probe=(px, py), layers=LAYERS, metrics=("cka",), k=5, calibration=3, every_n_steps=1,
        references={"minilm": {"model": "minilm", "class_names": NAMES}},
    )


def _train(record_step):
    """Three identical SGD steps on every rank (same seed, same data), ``record_step(model, step)`` before each."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = synthetic_data(32, seed=1)
    for step in STEPS:
        record_step(model, step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    record: dict = {"values": {}, "features": {}}
    try:
        px, py = synthetic_data(40, seed=5)
        tracker = _tracker(px, py)
        ref = tracker.references["minilm"]
        record["loaded_before"] = ref.loaded

        def step(model, s):
            record["values"][str(s)] = tracker.step(model, s)
            record["features"][str(s)] = {k: v.tolist() for k, v in tiny_features(model, px).items()}
            model.train()

        _train(step)
        record.update(loaded=ref.loaded, loads=ref.loads, model_type=type(ref.model).__name__)
    except Exception as err:  # noqa: BLE001 - recorded for the test
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_named_reference_is_loaded_on_rank0_only_and_values_are_unchanged(tmp_path):
    pytest.importorskip("sentence_transformers")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))

    # rank 1 never materialised the reference; rank 0 loaded it once for three checks
    assert r0["loaded_before"] is False and r1["loaded_before"] is False
    assert (r1["loaded"], r1["loads"], r1["model_type"]) == (False, 0, "str")  # still the name
    assert (r0["loaded"], r0["loads"]) == (True, 1) and r0["model_type"] == "SentenceTransformer"

    # every rank got rank 0's values, which equal brute force against MiniLM embeddings
    assert r0["values"] == r1["values"] and sorted(r0["values"]) == [str(s) for s in STEPS]
    from prh_lightning.models.pretrained import load_minilm

    px, py = synthetic_data(40, seed=5)
    text = load_minilm().encode([NAMES[int(i)] for i in py], convert_to_tensor=True).cpu().float()
    for s in map(str, STEPS):
        feats = {k: torch.tensor(v) for k, v in r0["features"][s].items()}
        for layer in LAYERS:
            expected = brute_cka(feats[layer].double(), text.double())
            assert r0["values"][s][f"alignment/cka/minilm/{layer}"] == pytest.approx(expected, abs=1e-4)

    # ... and a single-process tracker's values (chance levels included)
    single = {}
    tracker = _tracker(px, py)

    def step(model, s):
        single[str(s)] = tracker.step(model, s)

    _train(step)
    for s in map(str, STEPS):
        assert set(single[s]) == set(r0["values"][s])
        for tag, value in single[s].items():
            assert r0["values"][s][tag] == pytest.approx(value, abs=1e-5, nan_ok=True), tag


def test_names_are_checked_at_once_but_loaded_on_first_use():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        check_references({"r": "no-such-model"})
    with pytest.raises(ValueError, match="cannot import reference class_path"):
        check_references({"r": {"class_path": "torch.nn.NoSuchLayer"}})
    with pytest.raises(ValueError, match="unknown model"):
        Reference("no-such-model")

    # a class_path reference: nothing built until its features are asked for; then every leaf
    # layer, as for a bare module (it has no encode())
    ref = check_references({"r": {"class_path": "callback_helpers.TinyNet"}})["r"]
    assert isinstance(ref, Reference) and not ref.loaded and ref.loads == 0 and ref.model == {
        "class_path": "callback_helpers.TinyNet"}
    x, y = synthetic_data(12, seed=3)
    feats = reference_features(ref, Probe((x, y), labels=y))
    assert ref.loaded and ref.loads == 1 and ref.layers == "*"
    assert {"conv1", "conv2", "fc"} <= set(feats)
    by_hand = tiny_features(ref.model, x)
    for layer in ("conv1", "conv2", "fc"):
        torch.testing.assert_close(feats[layer], by_hand[layer], atol=1e-6, rtol=1e-5)
    reference_features(ref, Probe((x, y), labels=y))
    assert ref.loads == 1  # loaded once
