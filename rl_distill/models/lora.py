"""LoRA students (``model.lora``) through PEFT, and the base-model teacher of LoRA self-distillation.

``model.lora: {r, alpha, dropout, target_modules, merge_on_save}`` wraps the built student in a
``peft`` LoRA model (:func:`apply_lora`): the base weights are frozen, so the optimizer (built over
the parameters that require a gradient) holds only the adapters, and so do checkpoints
(:func:`adapter_state_dict` / :func:`load_adapter_state_dict`). The final save
(:func:`save_final_lora`) writes the adapter (``PeftModel.from_pretrained(base, folder)``) and, with
``merge_on_save``, the merged model under ``merged/`` (plain ``AutoModelForCausalLM.from_pretrained``).

``model.teacher: base_of_student`` (:data:`BASE_OF_STUDENT`) distils the student's own base model
into its adapters: :class:`AdapterDisabledTeacher` runs the student's forward under PEFT's
``disable_adapter()``, so one set of base weights serves both roles.

Needs the optional extra ``pip install 'rl-distill[lora]'`` (``peft``); imported only when used.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: ``model.teacher`` value: the teacher is the LoRA student's own base model (adapters disabled).
BASE_OF_STUDENT = "base_of_student"

__all__ = [
    "BASE_OF_STUDENT",
    "AdapterDisabledTeacher",
    "LoraSpec",
    "adapter_state_dict",
    "apply_lora",
    "is_lora",
    "linear_module_names",
    "load_adapter_state_dict",
    "save_final_lora",
]


@dataclass
class LoraSpec:
    """``model.lora``: the LoRA adapters of the student (Hu et al. 2021)."""

    r: int = 8
    """Rank of each adapter, >= 1."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by ``alpha / r``), > 0."""
    dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1)."""
    target_modules: str | list[str] = "all-linear"
    """Module names that get adapters (``[q_proj, v_proj]``: names or name suffixes), or ``all-linear``
    (every linear layer but the output head)."""
    merge_on_save: bool = False
    """Also write the merged model (base + adapters) to ``output_dir/final/merged`` (plain from_pretrained)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        names = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"target_modules: expected 'all-linear' or a non-empty list of module names, got {self.target_modules!r}"
            )


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError(
            "model.lora needs the peft package: pip install 'rl-distill[lora]' (peft 0.21)"
        ) from None
    return peft


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct short names of the model's linear layers (what ``target_modules`` may name), sorted."""
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if name and isinstance(m, nn.Linear | Conv1D)
        }
    )


def _check_targets(model: nn.Module, target_modules: str | list[str]) -> None:
    """Every listed target names at least one linear layer of ``model``.

    Raises:
        ValueError: ``model.lora.target_modules: ...`` naming the missing names and listing the found ones.
    """
    found = linear_module_names(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if target_modules == "all-linear":
        if not [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output]:
            raise ValueError(
                f"model.lora.target_modules: 'all-linear' found no linear layer besides the output head in "
                f"{type(model).__name__}; its linear layers: {', '.join(found) or 'none'}"
            )
        return
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    full = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if not any(n == t or n.endswith(f".{t}") for n in full)]
    if missing:
        raise ValueError(
            f"model.lora.target_modules: {missing} not found in {type(model).__name__}; "
            f"its linear layers are named: {', '.join(found) or 'none'}"
        )


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model: base weights frozen, adapters trainable (float32).

    Args:
        model: a causal LM (kept-layer, loaded or from-config student).
        spec: the adapters.

    Returns:
        The ``peft.PeftModelForCausalLM`` (same forward signature as ``model``).

    Raises:
        ValueError: a target module the model does not have (the message lists the ones it has).
        ImportError: peft is not installed.
    """
    peft = _peft()
    _check_targets(model, spec.target_modules)
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 calls transformers' deprecated `is_gradient_checkpointing` (a FutureWarning in 5.x).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    for p in wrapped.parameters():  # adapters train in float32 even on a low-precision base
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return wrapped


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (without importing peft when it is not installed)."""
    return any(cls.__module__.startswith("peft.") for cls in type(model).__mro__)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights of a LoRA student (PEFT's names, without the adapter name)."""
    return dict(_peft().get_peft_model_state_dict(model))


def load_adapter_state_dict(
    model: nn.Module, tensors: dict[str, Tensor], *, where: str = "checkpoint"
) -> None:
    """Restore :func:`adapter_state_dict` exactly.

    Raises:
        ValueError: naming ``where`` when the adapter names or shapes differ from the model's.
    """
    expected = adapter_state_dict(model)
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(
            f"{where} does not match the LoRA student: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    bad = [k for k, t in tensors.items() if t.shape != expected[k].shape]
    if bad:
        shape, own = tuple(tensors[bad[0]].shape), tuple(expected[bad[0]].shape)
        raise ValueError(f"{where}: adapter {bad[0]} has shape {shape}, the student's is {own}")
    result = _peft().set_peft_model_state_dict(model, tensors)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{where}: adapters not loaded: {result.unexpected_keys[:5]}")


def save_final_lora(model: nn.Module, folder: str | Path, *, merge: bool) -> list[Path]:
    """Write the adapter to ``folder`` and, with ``merge``, the merged model to ``folder/merged``.

    The merge works on a copy: the training student keeps its adapters.

    Returns:
        The folders written (``[folder]`` or ``[folder, folder/merged]``).
    """
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    written = [folder]
    if merge:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(folder / "merged", safe_serialization=True)
        written.append(folder / "merged")
    return written


class AdapterDisabledTeacher(nn.Module):
    """The LoRA student's base model as the teacher: its forward runs under ``disable_adapter()``.

    It holds no weights of its own (the student is referenced, not registered as a submodule, and
    ``parameters()`` is empty), so the engine's ``teacher.eval().requires_grad_(False)`` leaves the
    student's adapters trainable.
    Each call runs in eval mode (no dropout), as a separate frozen teacher would, and restores the
    student's mode afterwards.

    Args:
        student: a PEFT LoRA model (:func:`apply_lora`).
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        if not is_lora(student):
            raise ValueError(f"model.teacher: {BASE_OF_STUDENT!r} needs a LoRA student (set model.lora)")
        object.__setattr__(self, "student", student)  # not a submodule: see the class docstring

    @contextlib.contextmanager
    def _base(self) -> Iterator[None]:
        student = self.student
        was_training = student.training
        student.eval()
        try:
            with student.disable_adapter():
                yield
        finally:
            student.train(was_training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The student's forward with its adapters off."""
        with self._base():
            return self.student(*args, **kwargs)

    @property
    def config(self) -> Any:
        """The base model's config."""
        return self.student.config

    def get_output_embeddings(self) -> nn.Module | None:
        """The (shared) output head."""
        return self.student.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        """The student's device."""
        return next(self.student.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The base weights' dtype."""
        return next(self.student.parameters()).dtype


def lora_spec(spec: dict[str, Any] | None) -> LoraSpec | None:
    """A :class:`LoraSpec` from ``model.lora`` (None when off).

    Raises:
        ValueError: ``lora.<key>: ...`` for an unknown key, a wrong type or a value out of range.
    """
    if spec is None:
        return None
    from rl_distill.config import build_dataclass

    return build_dataclass(LoraSpec, spec, "lora")


def prepare_models(
    model_config: Any,
    train_config: Any,
    teacher: nn.Module | None,
    student: nn.Module,
    device: torch.device,
) -> tuple[nn.Module | None, nn.Module]:
    """Apply the model options of a run to freshly built models; the one place :mod:`rl_distill.build` calls.

    In order: the precision check (``train.precision`` on ``device``), LoRA adapters on the student
    (``model.lora``), the base-model teacher (``model.teacher: base_of_student``), the teacher's own
    dtype (``model.teacher_dtype``; after the student was copied from it), and gradient checkpointing
    of the student (``train.gradient_checkpointing``, non-reentrant). Gradient checkpointing acts only
    in training mode: the rollout engine samples in eval mode, so sampling keeps its KV cache
    (Transformers turns ``use_cache`` off only while a checkpointed model trains).

    Args:
        model_config: the run's :class:`~rl_distill.config.ModelConfig`.
        train_config: the run's :class:`~rl_distill.config.TrainConfig`.
        teacher: the loaded teacher (None with ``base_of_student``).
        student: the built student.
        device: the run's device.

    Returns:
        ``(teacher, student)``: the student possibly a PEFT model, the teacher possibly an
        :class:`AdapterDisabledTeacher` over it.
    """
    from rl_distill.models.loading import resolve_dtype
    from rl_distill.precision import check_precision

    check_precision(train_config.precision, device)
    spec = model_config.lora_spec
    if spec is not None and not is_lora(student):  # a student handed in already wrapped stays as it is
        student = apply_lora(student, spec).to(device)
    if model_config.teacher == BASE_OF_STUDENT:
        teacher = AdapterDisabledTeacher(student)
    elif teacher is not None and model_config.teacher_dtype is not None:
        teacher = teacher.to(resolve_dtype(model_config.teacher_dtype))
    if train_config.gradient_checkpointing:
        base = student.get_base_model() if is_lora(student) else student
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"train.gradient_checkpointing: {type(base).__name__} does not support gradient checkpointing"
            )
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # Transformers >= 5.x's name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return teacher, student
