"""Per-layer features of a model on paired image-caption data, saved as :class:`Representations`.

Layout (resumable: an existing file for the same model, dataset and pooling is reused)::

    <out>/features/<dataset-slug>/<model-slug>_pool-<pool>.safetensors

Language models: every hidden state (embeddings + each layer), pooled over the caption tokens
(``avg``: mean over the attention mask, ``last``: the last caption token). Causal LMs read the
caption after their BOS (else EOS) token, which is left out of the pooling; the same pass gives
the bits per byte of the captions. Vision models: each block's output, ``none`` = the CLS token
(the paper's default; CNNs have none and use the spatial mean), ``avg`` = mean over tokens/positions.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from prh_lightning.data.paired import PairedData, slugify
from prh_lightning.models.zoo import LoadedModel, load_model, modality_of
from prh_lightning.recording import record_representations
from prh_lightning.representations import Representations

LANGUAGE_POOLS = ("avg", "last")
VISION_POOLS = ("none", "avg")


def feature_path(out: str | Path, dataset_slug: str, model_name: str, pool: str) -> Path:
    """``<out>/features/<dataset-slug>/<model-slug>_pool-<pool>.safetensors``.

    >>> feature_path("runs", "flickr8k-1024_n256", "hf-lm:bigscience/bloomz-560m", "avg").as_posix()
    'runs/features/flickr8k-1024_n256/hf-lm-bigscience-bloomz-560m_pool-avg.safetensors'
    """
    return Path(out) / "features" / dataset_slug / f"{slugify(model_name)}_pool-{pool}.safetensors"


def check_pool(modality: str, pool: str) -> None:
    """Refuse a pooling that is not defined for the modality.

    >>> check_pool("vision", "avg")
    >>> check_pool("vision", "last")
    Traceback (most recent call last):
    ...
    ValueError: --pool 'last' is not defined for vision models; use one of ('none', 'avg')
    """
    allowed = LANGUAGE_POOLS if modality == "language" else VISION_POOLS
    if pool not in allowed:
        raise ValueError(f"--pool {pool!r} is not defined for {modality} models; use one of {allowed}")


# -- language --------------------------------------------------------------------------------
def _context_token(tokenizer) -> int | None:
    """The token a causal LM reads before the caption (BOS, else EOS), None if the tokenizer adds it."""
    probe = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and probe and probe[0] == bos:
        return None
    return bos if bos is not None else tokenizer.eos_token_id


def _tokenize(tokenizer, texts: list[str], context: int | None, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` ``[B, T]``, with ``context`` prepended if given,
    and ``caption_mask`` ``[B, T]``: 1 on caption tokens (not the context token, not padding)."""
    ids = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts]
    if context is not None:
        ids = [[context] + row for row in ids]
    width = max(len(r) for r in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    caption = mask.clone()
    if context is not None:
        caption[:, 0] = 0
    return {"input_ids": input_ids, "attention_mask": mask, "caption_mask": caption}


def _pool_tokens(hidden: torch.Tensor, caption_mask: torch.Tensor, pool: str) -> torch.Tensor:
    """``[B, T, d]`` -> ``[B, d]``: masked mean (``avg``) or the last caption token (``last``)."""
    m = caption_mask.to(hidden.dtype).unsqueeze(-1)
    if pool == "avg":
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    last = caption_mask.shape[1] - 1 - caption_mask.flip(1).argmax(1)
    return hidden[torch.arange(hidden.shape[0]), last]


def _caption_nll(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token NLL (nats) of the caption tokens, ``[B]``."""
    targets = batch["input_ids"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -(logp * batch["caption_mask"][:, 1:]).sum(1)


@torch.inference_mode()
def language_features(loaded: LoadedModel, texts: list[str], pool: str = "avg", batch_size: int = 32,
                      max_length: int = 128) -> tuple[dict[str, torch.Tensor], float | None]:
    """Every hidden state of a Hugging Face LM, pooled: ``({"hidden_states.<i>": [n, d]}, bits per byte)``.

    Bits per byte (causal LMs only, else None) = caption NLL in bits / caption UTF-8 bytes.
    Captions are batched by length to save padding; rows come back in the input order.
    """
    check_pool("language", pool)
    causal = loaded.family == "hf_causal_lm"
    tokenizer, model = loaded.tokenizer, loaded.model.eval()
    context = _context_token(tokenizer) if causal else None
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks: list[list[torch.Tensor]] = []
    nll = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = _tokenize(tokenizer, [texts[i] for i in idx], context, max_length)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        chunks.append([_pool_tokens(h.float(), batch["caption_mask"], pool) for h in out.hidden_states])
        if causal:
            nll += float(_caption_nll(out.logits, batch).sum())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    feats = {f"hidden_states.{i}": torch.cat([c[i] for c in chunks])[inverse] for i in range(len(chunks[0]))}
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return feats, (nll / math.log(2) / n_bytes if causal else None)


# -- vision ----------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    def __init__(self, images: list, preprocess) -> None:
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(self.images[i])


@torch.no_grad()
def vision_features(loaded: LoadedModel, images: list, pool: str = "none", batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Per-block features ``{layer: [n, d]}`` of a vision model on PIL images."""
    check_pool("vision", pool)
    loader = DataLoader(_Images(images, loaded.preprocess), batch_size=batch_size, shuffle=False)
    if loaded.family == "hf_vision":
        chunks = []
        for x in loader:
            hidden = loaded.model(pixel_values=x, output_hidden_states=True).hidden_states
            chunks.append([h[:, 0] if pool == "none" else h.mean(1) for h in hidden])
        return {f"hidden_states.{i}": torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))}
    if loaded.family in ("efficientnet_lite", "torchvision"):
        # depthwise/grouped convolutions run ~25% faster on CPU in channels-last layout
        loaded.model.to(memory_format=torch.channels_last)
        loader = (x.contiguous(memory_format=torch.channels_last) for x in loader)
    # "none": the class token where the model has one ("auto" decides for timm/torchvision);
    # CNNs have none, their blocks are averaged over positions for either pool
    reduce = "mean" if pool == "avg" or loaded.family == "efficientnet_lite" else "auto"
    reps = record_representations(loaded.model, loader, layers=loaded.layers or "auto", reduce=reduce, progress=False)
    return dict(reps.items())


# -- one model, saved ---------------------------------------------------------------------------
def extract_model(name: str, data: PairedData, out: str | Path, pool: str | None = None, force: bool = False,
                  batch_size: int = 32, loaded: LoadedModel | None = None) -> tuple[Path, bool]:
    """Extract and save the features of model ``name`` on ``data``; returns ``(path, extracted)``.

    An existing file for the same model, dataset and pool is kept (``extracted=False``) unless
    ``force``; ``pool`` defaults to ``avg`` for language and ``none`` for vision models.
    """
    modality = modality_of(name)
    pool = pool or ("avg" if modality == "language" else "none")
    check_pool(modality, pool)
    path = feature_path(out, data.slug, name, pool)
    if path.is_file() and not force:
        return path, False
    loaded = loaded or load_model(name)
    meta = {"model": name, "dataset": data.name, "pool": pool, "n": len(data), "modality": modality,
            "family": loaded.family, "num_params": loaded.num_params}
    if modality == "language":
        feats, bpb = language_features(loaded, data.texts, pool, batch_size)
        meta["bits_per_byte"] = bpb
    else:
        feats = vision_features(loaded, data.images, pool, batch_size)
    Representations(feats, sample_ids=data.sample_ids, metadata=meta).save(path)
    return path, True
