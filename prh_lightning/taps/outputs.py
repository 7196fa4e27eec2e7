"""Pick the tensor to record from whatever a module returns.

Tensors are taken as they are; from tuples/lists, dicts and Hugging Face ``ModelOutput``
the ``output=`` key or index is taken, and by default ``last_hidden_state`` if the mapping
has one, else the first tensor value or element.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

OutputKey = str | int | None


def pick_tensor(output: Any, key: OutputKey = None) -> torch.Tensor | None:
    """The tensor to record from ``output``, or ``None`` if it holds no tensor.

    Raises:
        KeyError / IndexError: ``key`` is given but ``output`` has no such entry.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # dicts and transformers.ModelOutput (an OrderedDict)
        if key is not None:
            if key not in output:
                raise KeyError(f"output key {key!r} not found; the output has keys {list(output.keys())}")
            return _first_tensor(output[key])
        if "last_hidden_state" in output:
            return _first_tensor(output["last_hidden_state"])
        return _first_tensor(list(output.values()))
    if isinstance(output, (tuple, list)):
        if isinstance(key, int):
            if not -len(output) <= key < len(output):
                raise IndexError(f"output index {key} out of range for a {type(output).__name__} of {len(output)}")
            return _first_tensor(output[key])
        return _first_tensor(output)
    return None


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    return None


def describe(output: Any) -> str:
    """A short description of a module output for error messages."""
    if isinstance(output, Mapping):
        return f"{type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, (tuple, list)):
        return f"{type(output).__name__} of ({', '.join(type(o).__name__ for o in output)})"
    return type(output).__name__
