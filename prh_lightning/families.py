"""Good default layer sets and pooling per model family, for ``LayerTaps(model, "auto", "auto")``.

=====================  ==============================================  =================
family                 default layers                                  default reduce
=====================  ==============================================  =================
Hugging Face           ``<blocks>.0:input`` (the embedding output),    ``"mean"`` over the
transformers           every block, the final norm if the model has    attention mask
                       one (= every ``output_hidden_states`` entry)
sentence-transformers  the same, inside its transformer module         ``"mean"`` (mask)
timm                   ``model.feature_info`` modules (ViT: blocks,    ``"cls"`` if the model
                       CNNs: stages)                                   has a class token,
                                                                       else ``"mean"``
torchvision            stem, stages, ``avgpool`` (ResNet); children    ``"mean"`` (``"cls"``
classifiers            of ``features`` + ``avgpool`` (VGG, MobileNet,  for ViT)
                       EfficientNet, ConvNeXt); encoder layers (ViT)
EfficientNet(-Lite)    every ``_blocks.i``, then ``_avg_pooling``      ``"mean"``
(lukemelas-style)      (the pooled head features)
LightningModule        the defaults of its largest child module,       as the child
                       prefixed with the child's name
anything else          ``"*"``: every leaf module with a tensor output ``"mean"``
=====================  ==============================================  =================

For models with a final norm (GPT-2's ``ln_f``, Llama's ``norm``) Hugging Face's last hidden
state is the normed output of the last block; both the last block and the final norm are tapped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from prh_lightning.taps.reduction import ReduceSpec
    from prh_lightning.taps.selection import Selection

GENERIC = "*"


def _is_instance(model: nn.Module, module_name: str, class_name: str) -> bool:
    """Whether ``model``'s class derives from ``class_name`` defined in the library
    ``module_name`` (or one of its sub-modules), read from the class hierarchy: nothing is imported
    (looking up ``transformers.PreTrainedModel`` on the lazy ``transformers`` module would import
    its modelling code, about half a second).

    >>> _is_instance(nn.Linear(2, 2), "torch", "Module"), _is_instance(nn.Linear(2, 2), "transformers", "Module")
    (True, False)
    """
    return any(
        cls.__name__ == class_name and (cls.__module__ == module_name or cls.__module__.startswith(module_name + "."))
        for cls in type(model).__mro__
    )


def model_family(model: nn.Module) -> str:
    """One of ``"huggingface"``, ``"sentence-transformers"``, ``"timm"``, ``"torchvision"``,
    ``"efficientnet"``, ``"lightning"``, ``"generic"``.

    >>> model_family(nn.Sequential(nn.Linear(4, 4)))
    'generic'
    """
    if _is_instance(model, "sentence_transformers", "SentenceTransformer"):
        return "sentence-transformers"
    if _is_instance(model, "transformers", "PreTrainedModel"):
        return "huggingface"
    if _is_instance(model, "lightning.pytorch", "LightningModule") or _is_instance(
        model, "pytorch_lightning", "LightningModule"
    ):
        return "lightning"
    module = type(model).__module__
    if module.startswith("timm."):
        return "timm"
    if module.startswith("torchvision.models"):
        return "torchvision"
    if module.startswith(("efficientnet_lite_pytorch", "efficientnet_pytorch")) and hasattr(model, "_blocks"):
        return "efficientnet"
    return "generic"


def default_layers(model: nn.Module) -> list[str] | str:
    """Layer names to tap for ``model`` (``"*"`` for the generic all-leaves selection).

    >>> default_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    '*'
    """
    family = model_family(model)
    if family == "huggingface":
        return _huggingface_layers(model)
    if family == "sentence-transformers":
        prefix, inner = _inner_transformer(model)
        return [f"{prefix}.{name}" for name in _huggingface_layers(inner)]
    if family == "timm":
        return _timm_layers(model)
    if family == "torchvision":
        return _torchvision_layers(model)
    if family == "efficientnet":
        return [f"_blocks.{i}" for i in range(len(model._blocks))] + ["_avg_pooling"]
    if family == "lightning":
        child = _largest_child(model)
        if child is None:
            return GENERIC
        name, module = child
        inner = default_layers(module)
        return GENERIC if inner == GENERIC else [f"{name}.{layer}" for layer in inner]
    return GENERIC


def default_reduce(model: nn.Module) -> str:
    """The pooling that suits ``model``'s family (see the module table).

    >>> default_reduce(nn.Conv2d(1, 8, 3))
    'mean'
    """
    family = model_family(model)
    if family == "timm":
        has_cls = getattr(model, "cls_token", None) is not None
        return "cls" if has_cls and getattr(model, "global_pool", "token") == "token" else "mean"
    if family == "torchvision":
        return "cls" if getattr(model, "class_token", None) is not None else "mean"
    if family == "lightning":
        child = _largest_child(model)
        return "mean" if child is None else default_reduce(child[1])
    return "mean"


def default_tap_kwargs(model: nn.Module) -> dict[str, Selection | ReduceSpec]:
    """``{"layers": ..., "reduce": ...}`` for ``LayerTaps(model, **default_tap_kwargs(model))``.

    >>> default_tap_kwargs(nn.Sequential(nn.Linear(4, 4)))
    {'layers': '*', 'reduce': 'mean'}
    """
    return {"layers": default_layers(model), "reduce": default_reduce(model)}


# -- Hugging Face -------------------------------------------------------------------
def _block_lists(model: nn.Module) -> list[str]:
    """Names of ``nn.ModuleList``s of same-class blocks, outermost only, in registration order."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if any(name.startswith(outer + ".") for outer in found):
            continue
        found.append(name)
    return found


def _final_norm(model: nn.Module, block_list: str) -> str | None:
    """A norm module registered right after ``block_list`` under the same parent, if any."""
    parent_name, _, list_name = block_list.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    after = False
    for name, child in parent.named_children():
        if name == list_name:
            after = True
        elif after and "norm" in type(child).__name__.lower():
            return f"{parent_name}.{name}" if parent_name else name
    return None


def _huggingface_layers(model: nn.Module) -> list[str]:
    lists = _block_lists(model)
    if not lists:
        raise ValueError(
            f"found no list of transformer blocks in {type(model).__name__}; pass layers= explicitly "
            "(see LayerTaps.available(model, example_input))"
        )
    layers: list[str] = []
    for block_list in lists:
        count = len(model.get_submodule(block_list))
        layers.append(f"{block_list}.0:input")
        layers.extend(f"{block_list}.{i}" for i in range(count))
        norm = _final_norm(model, block_list)
        if norm is not None:
            layers.append(norm)
    return layers


def _inner_transformer(model: nn.Module) -> tuple[str, nn.Module]:
    for name, module in model.named_modules():
        if name and _is_instance(module, "transformers", "PreTrainedModel"):
            return name, module
    raise ValueError(f"{type(model).__name__} holds no Hugging Face transformer; pass layers= explicitly")


# -- vision -------------------------------------------------------------------------
def _timm_layers(model: nn.Module) -> list[str] | str:
    info = getattr(model, "feature_info", None)
    if not info:
        return GENERIC
    names = [entry["module"] for entry in info if isinstance(entry, dict) and "module" in entry]
    modules = dict(model.named_modules())
    return [name for name in names if name in modules] or GENERIC


def _torchvision_layers(model: nn.Module) -> list[str] | str:
    children = dict(model.named_children())
    if all(f"layer{i}" in children for i in range(1, 5)):  # ResNet, ResNeXt, Wide ResNet
        return ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    features = children.get("features")
    if isinstance(features, nn.Sequential):  # VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt, DenseNet
        layers = [f"features.{name}" for name, _ in features.named_children()]
        return layers + (["avgpool"] if "avgpool" in children else [])
    encoder_layers = getattr(children.get("encoder"), "layers", None)
    if isinstance(encoder_layers, nn.Sequential):  # VisionTransformer
        return [f"encoder.layers.{name}" for name, _ in encoder_layers.named_children()] + ["encoder.ln"]
    return GENERIC


def _largest_child(model: nn.Module) -> tuple[str, nn.Module] | None:
    children = [(name, child) for name, child in model.named_children()]
    if not children:
        return None
    return max(children, key=lambda item: sum(p.numel() for p in item[1].parameters()))
