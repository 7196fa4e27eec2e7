"""Feature extraction against independent references: sentence-transformers' own MiniLM
embedding, EfficientNet's own pooled features, and Hugging Face's own LM loss."""

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from prh_lightning.data.paired import PairedData, load_paired
from prh_lightning.extraction import extract_model, feature_path, language_features, vision_features
from prh_lightning.models import zoo
from prh_lightning.models.pretrained import minilm_path
from prh_lightning.representations import Representations

pytestmark = pytest.mark.slow


CAPTIONS = ["A black dog leaps over a log .", "Two children play in the sand at the beach with a red bucket .",
            "A man .", "A woman in a blue coat walks past a shop window at night ."]


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pairs() -> PairedData:
    # $PRH_FLICKR_DIR, else the offline copy beside the checkout (the library assumes no location)
    folder = os.environ.get("PRH_FLICKR_DIR") or ROOT.parent / "shared" / "data" / "flickr8k-1024"
    return load_paired(folder, max_samples=8)


@pytest.fixture(scope="module")
def minilm():
    return zoo.load_model("all-MiniLM-L6-v2")


def test_minilm_last_layer_mean_equals_the_sentence_transformers_embedding(minilm):
    from sentence_transformers import SentenceTransformer

    feats, bpb = language_features(minilm, CAPTIONS, pool="avg", batch_size=3)  # batches sorted by length
    assert list(feats) == [f"hidden_states.{i}" for i in range(7)] and bpb is None
    reference = SentenceTransformer(minilm_path(), device="cpu").encode(CAPTIONS, convert_to_tensor=True)
    # the sentence-transformers pipeline is mean pooling over the mask, then L2 normalisation
    torch.testing.assert_close(F.normalize(feats["hidden_states.6"], dim=1), F.normalize(reference, dim=1), atol=1e-5, rtol=1e-4)


def test_efficientnet_blocks_and_pooled_head(pairs):
    lite0 = zoo.load_model("efficientnet-lite0")
    feats = vision_features(lite0, pairs.images[:4], pool="none", batch_size=3)
    assert list(feats)[:2] == ["_blocks.0", "_blocks.1"] and len(feats) == 17  # 16 blocks + pooled head
    x = torch.stack([lite0.preprocess(im) for im in pairs.images[:4]])
    with torch.no_grad():
        head = lite0.model.extract_features(x).mean((2, 3))  # the package's own feature path
    torch.testing.assert_close(feats["_avg_pooling"], head, atol=1e-5, rtol=1e-4)
    assert feats["_blocks.0"].shape == (4, 16)


def _tiny_causal_lm():
    """A random-initialised 2-layer Llama with a word-level tokenizer that does not add BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for c in CAPTIONS for w in c.split()})
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    return zoo.LoadedModel("tiny", "language", "hf_causal_lm", model, tokenizer=tokenizer)


def test_causal_lm_pooling_and_bits_per_byte_match_unpadded_single_caption_runs():
    lm = _tiny_causal_lm()
    avg, bpb = language_features(lm, CAPTIONS, pool="avg", batch_size=3)
    last, _ = language_features(lm, CAPTIONS, pool="last", batch_size=3)
    nll = 0.0
    for i, caption in enumerate(CAPTIONS):  # one caption at a time: no padding, no sorting
        ids = torch.tensor([[1] + lm.tokenizer(caption).input_ids])  # BOS, then the caption
        with torch.no_grad():
            out = lm.model(input_ids=ids, labels=ids, output_hidden_states=True)
        nll += float(out.loss) * (ids.shape[1] - 1)  # HF's loss: mean NLL over the caption tokens
        for layer, h in enumerate(out.hidden_states):
            torch.testing.assert_close(avg[f"hidden_states.{layer}"][i], h[0, 1:].mean(0), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(last[f"hidden_states.{layer}"][i], h[0, -1], atol=1e-5, rtol=1e-4)
    expected = nll / math.log(2) / sum(len(c.encode("utf-8")) for c in CAPTIONS)
    assert bpb == pytest.approx(expected, rel=1e-4)


def test_extract_is_resumable_and_force_redoes(pairs, minilm, tmp_path):
    path, extracted = extract_model("all-MiniLM-L6-v2", pairs, tmp_path, loaded=minilm)
    assert extracted and path == feature_path(tmp_path, "flickr8k-1024_n8", "all-MiniLM-L6-v2", "avg")
    rep = Representations.load(path)
    assert rep.n == 8 and rep.sample_ids == [str(i) for i in range(8)]
    assert {k: rep.metadata[k] for k in ("model", "pool", "modality", "n")} == {
        "model": "all-MiniLM-L6-v2", "pool": "avg", "modality": "language", "n": 8}
    assert rep.metadata["num_params"] == sum(p.numel() for p in minilm.model.parameters())
    before = path.stat().st_mtime_ns
    assert extract_model("all-MiniLM-L6-v2", pairs, tmp_path, loaded=minilm) == (path, False)
    assert path.stat().st_mtime_ns == before
    _, redone = extract_model("all-MiniLM-L6-v2", pairs, tmp_path, force=True, loaded=minilm)
    assert redone
    # another pooling is another file
    other, extracted = extract_model("all-MiniLM-L6-v2", pairs, tmp_path, pool="last", loaded=minilm)
    assert extracted and other.name == "all-MiniLM-L6-v2_pool-last.safetensors"


def test_pool_not_defined_for_the_modality_is_refused(pairs, tmp_path):
    with pytest.raises(ValueError, match="--pool 'last' is not defined for vision"):
        extract_model("efficientnet-lite0", pairs, tmp_path, pool="last")


def test_timm_vit_blocks_cls_and_token_mean_match_timm_intermediates():
    import timm
    from PIL import Image

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()  # random weights: shapes and pooling only
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    vit = zoo.LoadedModel("vit", "vision", "timm", model, preprocess=transform)
    images = [Image.new("RGB", (300, 200), (60 * i, 100, 200 - 40 * i)) for i in range(3)]
    cls = vision_features(vit, images, pool="none")
    avg = vision_features(vit, images, pool="avg")
    x = torch.stack([transform(im) for im in images])
    with torch.no_grad():
        blocks = model.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
    assert list(cls) == [f"blocks.{i}" for i in range(12)]
    for i, (patches, prefix) in enumerate(blocks):
        torch.testing.assert_close(cls[f"blocks.{i}"], prefix[:, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(avg[f"blocks.{i}"], torch.cat([prefix, patches], 1).mean(1), atol=1e-5, rtol=1e-4)
