"""Mixed precision (``train.precision``): autocast around the training step, float32 master weights.

``train.precision`` is distinct from ``model.dtype`` (the dtype the weights are *stored* in):

- ``fp32``: no autocast (the default);
- ``bf16``: ``torch.autocast(dtype=bfloat16)`` around each training step: matrix products of student
  and teacher run in bfloat16, the weights, gradients and optimizer state stay float32;
- ``fp16``: the same in float16, with a ``GradScaler`` (float16 gradients underflow without one).

The divergences and log-probabilities upcast to float32 before any log-space math
(:mod:`rl_distill.divergences`, :func:`~rl_distill.rollout.engine.filtered_logprobs`), so
``-inf`` padding columns stay ``-inf`` and never produce NaN. The backward pass runs outside
autocast (:meth:`rl_distill.agents.base.Agent.optimizer_step`), as PyTorch recommends.

``model.teacher_dtype`` (e.g. ``bfloat16``) stores only the teacher in another dtype: a bf16 teacher
next to a float32 student halves the teacher's memory.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

#: ``train.precision`` -> the autocast dtype (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["PRECISIONS", "PrecisionError", "autocast", "check_precision", "grad_scaler"]


class PrecisionError(ValueError):
    """``train.precision`` names a precision the device cannot run."""


def check_precision(precision: str, device: torch.device | str) -> None:
    """Fail before any work when ``device`` cannot autocast to ``precision``.

    Runs one tiny matrix product under autocast and checks its dtype.

    Raises:
        PrecisionError: ``train.precision: ...`` naming the precision, the device and why.
    """
    if precision not in PRECISIONS:
        raise PrecisionError(f"train.precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return
    device = torch.device(device)
    why = None
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        why = "this GPU does not support bfloat16"
    else:
        try:
            with warnings.catch_warnings(), torch.autocast(device.type, dtype=dtype):
                warnings.simplefilter("ignore")  # "CUDA is not available, disabling autocast": reported below
                x = torch.ones(2, 2, device=device)
                got = (x @ x).dtype
            if got != dtype:
                why = f"autocast produced {got}"
        except (RuntimeError, ValueError, AssertionError) as err:
            why = " ".join(str(err).split())[:200]
    if why is not None:
        raise PrecisionError(
            f"train.precision: {precision!r} cannot run on device {device} ({why}); use train.precision: fp32"
            + (" or bf16" if precision == "fp16" else "")
        )


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of ``precision`` on ``device`` (a no-op context for ``fp32``)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A loss scaler for ``fp16`` (float16 gradients underflow otherwise); None for other precisions."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
