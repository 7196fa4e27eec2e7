"""A token probe runs in length-sorted batches trimmed to each batch's longest text
(:func:`~prh_lightning.tracking.probe.probe_pass`): features equal each text run alone without
padding (masked mean of a small random BERT's hidden states, by hand), equal the pass at the
probe's full length within 1e-5, come back in probe order, and the model sees shorter inputs."""

from __future__ import annotations

import pytest
import torch

from prh_lightning.tracking import AlignmentTracker
from prh_lightning.tracking.probe import Probe, probe_features, probe_pass

transformers = pytest.importorskip("transformers")
LAYERS = ["encoder.layer.0", "encoder.layer.1"]


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def token_probe(n=22, width=24, left=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    lengths[5] = width  # one text at the probe's full length
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        cols = slice(width - length, width) if left else slice(0, length)
        ids[i, cols] = torch.randint(1, 50, (length,), generator=g)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, lengths


def by_hand(model, batch, lengths):
    """Each text alone, unpadded: the mean over its tokens of each block's hidden state, float64 mean."""
    rows = {layer: [] for layer in LAYERS}
    with torch.no_grad():
        for i, length in enumerate(lengths.tolist()):
            ids = batch["input_ids"][i : i + 1, :length]
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            for b, layer in enumerate(LAYERS):
                rows[layer].append(hidden[b + 1][0].double().mean(0))
    return {layer: torch.stack(v) for layer, v in rows.items()}


def test_length_sorted_pass_equals_each_text_alone_and_the_full_length_pass():
    model = tiny_bert()
    batch, lengths = token_probe()
    widths = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape), with_kwargs=True)
    tracker = AlignmentTracker(probe=batch, layers=LAYERS, metrics=("cka",), k=3, batch_size=4, calibration=None)
    sorted_pass = tracker.model_features(model)
    handle.remove()
    expected = by_hand(model, batch, lengths)
    full = probe_features(model, Probe(batch).chunks(4), LAYERS, "mean")
    for layer in LAYERS:
        assert sorted_pass[layer].shape == (22, 32)
        torch.testing.assert_close(sorted_pass[layer].double(), expected[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(sorted_pass[layer], full[layer], atol=1e-5, rtol=0)
    # batches of 4 texts by length, each at its own longest: fewer token positions than 22 x 24
    ordered = sorted(lengths.tolist())
    assert [tuple(w) for w in widths] == [(len(ordered[i : i + 4]), max(ordered[i : i + 4])) for i in range(0, 22, 4)]
    assert sum(w[0] * w[1] for w in widths) < 22 * 24


def test_left_padding_keeps_every_real_token_and_the_probe_order():
    model = tiny_bert()
    batch, _ = token_probe(left=True)
    full = probe_features(model, Probe(batch).chunks(4), LAYERS, "mean")
    chunks, order = Probe(batch).length_sorted_chunks(4)
    assert all(c["input_ids"].shape[1] == 24 for c in chunks)  # the last position is always real: nothing cut
    assert sorted(order.tolist()) == list(range(22))
    out = probe_pass(model, Probe(batch), 4, LAYERS, "mean")
    for layer in LAYERS:
        torch.testing.assert_close(out[layer], full[layer], atol=1e-5, rtol=0)


def test_plain_pass_without_a_mask_or_with_a_shape_keeping_reduction():
    model = tiny_bert()
    batch, _ = token_probe()
    assert Probe(batch["input_ids"]).length_sorted_chunks(4) is None  # no attention_mask: consecutive rows
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    flat = probe_pass(model, Probe(batch), 8, ["embeddings"], "flatten")  # [n, T * d]: every text at full length
    assert seen == [24, 24, 24] and flat["embeddings"].shape == (22, 24 * 32)
