"""Make students: keep a subset of the teacher's decoder layers, or build one from a config."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

# Where common causal-LM families keep their stack of decoder blocks.
_LAYER_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
)
# Per-layer config lists that must be cut with the layers (e.g. sliding vs full attention).
_PER_LAYER_CONFIG_FIELDS = ("layer_types", "sliding_window_pattern_list", "no_rope_layers")


def _get_attr_path(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def find_decoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """Return ``(attribute path, ModuleList)`` of the model's decoder blocks.

    Raises:
        ValueError: if no known layer stack is found.
    """
    for path in _LAYER_PATHS:
        try:
            layers = _get_attr_path(model, path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}; looked for {', '.join(_LAYER_PATHS)}"
    )


def evenly_spaced_layers(num_teacher_layers: int, num_keep: int) -> list[int]:
    """Indices of ``num_keep`` layers spread evenly from the first to the last (6 of 30 -> 0,6,12,17,23,29).

    Raises:
        ValueError: unless ``1 <= num_keep <= num_teacher_layers``.
    """
    if not 1 <= num_keep <= num_teacher_layers:
        raise ValueError(
            f"num_layers must be in [1, {num_teacher_layers}] (the teacher's layers), got {num_keep}"
        )
    if num_keep == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_keep - 1)
    return [round(i * step) for i in range(num_keep)]


def make_kept_layer_student(
    teacher: PreTrainedModel, *, num_layers: int | None = None, layers: Sequence[int] | None = None
) -> PreTrainedModel:
    """Build a student that keeps some of the teacher's decoder layers (and all its other weights).

    The embeddings, final norm and LM head are copied; the kept layers keep their weights and
    are renumbered so that their KV-cache slots stay consistent. The teacher is not modified.

    Args:
        teacher: a causal LM with a standard decoder-layer stack.
        num_layers: keep this many layers, evenly spaced (first and last included).
        layers: or keep exactly these layer indices (sorted, unique).

    Returns:
        A new model of the teacher's class with ``config.num_hidden_layers`` set accordingly.

    Raises:
        ValueError: if neither or both of ``num_layers``/``layers`` are given, or an index is out of range.
    """
    path, teacher_layers = find_decoder_layers(teacher)
    n = len(teacher_layers)
    if (num_layers is None) == (layers is None):
        raise ValueError("give exactly one of num_layers (evenly spaced) or layers (explicit indices)")
    keep = evenly_spaced_layers(n, num_layers) if layers is None else list(layers)
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"layers must be sorted, unique indices in [0, {n - 1}], got {list(layers or [])}")

    # Deep-copy everything but the layer stack, then attach copies of the kept layers.
    parent_path, _, attr = path.rpartition(".")
    parent = _get_attr_path(teacher, parent_path) if parent_path else teacher
    memo = {id(teacher_layers): nn.ModuleList()}
    student = copy.deepcopy(teacher, memo)
    new_layers = nn.ModuleList(copy.deepcopy(teacher_layers[i]) for i in keep)
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    student_parent = _get_attr_path(student, parent_path) if parent_path else student
    assert student_parent is not parent
    setattr(student_parent, attr, new_layers)

    config = student.config
    config.num_hidden_layers = len(keep)
    for field in _PER_LAYER_CONFIG_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, list) and len(value) == n:
            setattr(config, field, [value[i] for i in keep])
    config.kept_teacher_layers = keep
    return student


def student_from_config(
    config: dict[str, Any] | str, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Build a randomly initialised causal LM from a config dict (with ``model_type``) or a config path.

    Args:
        config: e.g. ``{"model_type": "llama", "hidden_size": 256, ...}`` or a folder with config.json.
        seed: seed for the initial weights.
        dtype: parameter dtype.
    """
    if isinstance(config, str):
        cfg = AutoConfig.from_pretrained(config)
    else:
        params = dict(config)
        if "model_type" not in params:
            raise ValueError("a student config dict needs a 'model_type' field (e.g. 'llama')")
        cfg = AutoConfig.for_model(params.pop("model_type"), **params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model
