"""Atomic, resumable training checkpoints.

Layout of a run folder (``train.output_dir``)::

    checkpoints/
      step-20/                  # one complete checkpoint per saved step
        student.safetensors     # student weights (shared/tied tensors stored once)
        extra.safetensors       # the agent's extra parameters (value heads...), if any
        optimizer.pt            # optimizer state_dict
        trainer_state.pt        # scheduler, RNG states of every process, data position, counters
        config.yaml             # the run configuration
        meta.json               # {"step": 20, "format": 1}; written last
      step-40/
      .tmp-step-60-XXXX/        # a save in progress (or killed): hidden, never read, removed on resume
    final/                      # save_pretrained student + tokenizer (plain from_pretrained)

Every folder is written into a hidden temporary sibling and renamed into place, so a ``step-N``
folder either exists complete or not at all; deleting old checkpoints renames them to a hidden name
first, for the same reason. :func:`latest_checkpoint` considers only ``step-N`` folders with a
``meta.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor

CHECKPOINTS = "checkpoints"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` by renames.

    A crash or kill inside the block leaves ``target`` untouched (only a hidden ``.tmp-*`` sibling
    remains, which nothing reads). An existing ``target`` is moved aside first and deleted only
    after the new folder is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush the files of ``folder`` to disk before the rename makes them visible."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


# --- where checkpoints live ---------------------------------------------------------------------
def checkpoint_root(output_dir: str | Path) -> Path:
    """``output_dir/checkpoints``."""
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first.

    Only ``step-N`` folders holding a ``meta.json`` count; hidden temporary folders are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / "meta.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete hidden ``.tmp-*`` / ``.old-*`` folders left by a killed save; returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (renamed to a hidden name before deletion)."""
    for _, path in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        hidden = path.parent / f".old-{path.name}-{os.getpid()}"
        os.replace(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


# --- RNG states ---------------------------------------------------------------------------------
def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The global RNG states of Python, NumPy, torch (CPU and CUDA) and, if given, ``generator``."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {k: _listify(v) for k, v in np_state["state"].items()}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`capture_rng` captured (CUDA states only when CUDA is present)."""
    random.setstate(tuplify(state["python"]))
    np_state = state["numpy"]
    key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(
        ("MT19937", key, int(np_state["state"]["pos"]), int(np_state["has_gauss"]), float(np_state["gauss"]))
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _listify(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def tuplify(value: Any) -> Any:
    """Lists back to nested tuples: ``random.setstate`` wants nested tuples; a state that went through lists is turned back."""
    return tuple(tuplify(v) for v in value) if isinstance(value, list | tuple) else value


# --- saving and loading -------------------------------------------------------------------------
def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    student: torch.nn.Module,
    extra: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    trainer_state: Mapping[str, Any],
    config: Mapping[str, Any],
    keep_last: int,
) -> Path:
    """Write ``root/step-<step>`` atomically, then prune to the newest ``keep_last``.

    Args:
        root: the checkpoints folder.
        step: the global step the state belongs to (steps taken so far).
        student: the (unwrapped) student; saved with safetensors, tied tensors once.
        extra: the agent's extra parameters by name (value heads...).
        optimizer: its ``state_dict`` is saved.
        trainer_state: scheduler state, RNG states, data position, counters (``torch.save``-able).
        config: the run configuration as a plain dict.
        keep_last: checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    target = Path(root) / f"step-{step}"
    with atomic_directory(target) as tmp:
        save_model(student, str(tmp / "student.safetensors"))
        if extra:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / "extra.safetensors")
            )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(dict(trainer_state), tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "format": FORMAT}) + "\n", encoding="utf-8")
    prune_checkpoints(root, keep_last)
    return target


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
    """
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a complete rl_distill checkpoint (no meta.json)")
    return json.loads(meta.read_text(encoding="utf-8"))


def read_config(path: str | Path) -> dict[str, Any]:
    """The run configuration stored in a checkpoint (or final model) folder."""
    for name in ("config.yaml", FINAL_CONFIG):
        file = Path(path) / name
        if file.is_file():
            return yaml.safe_load(file.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"{str(path)!r} holds no rl_distill run configuration ({FINAL_CONFIG})")


def load_student_weights(path: str | Path, student: torch.nn.Module) -> None:
    """Load ``student.safetensors`` of checkpoint ``path`` into ``student`` (strict)."""
    missing, unexpected = load_model(student, str(Path(path) / "student.safetensors"), strict=False)
    # Tied weights are stored once; a missing key is only fine when it is tied to a stored one.
    if unexpected or [k for k in missing if not _is_tied(student, k)]:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the student: missing {missing}, unexpected {unexpected}"
        )


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    """Whether state-dict entry ``key`` shares its storage with another entry (tied embeddings)."""
    tensors = model.state_dict(keep_vars=True)
    ptr = tensors[key].data_ptr() if key in tensors else None
    return ptr is not None and any(k != key and t.data_ptr() == ptr for k, t in tensors.items())


def load_checkpoint(
    path: str | Path, *, student: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load student weights and optimizer state in place; return the trainer state.

    The returned dict is what was saved as ``trainer_state`` plus ``step`` and ``extra`` (the
    agent's extra tensors by name, empty when there were none).

    Raises:
        FileNotFoundError: not a complete checkpoint.
        ValueError: weights that do not match the student.
    """
    path = Path(path)
    meta = read_meta(path)
    load_student_weights(path, student)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    extra_file = path / "extra.safetensors"
    state["extra"] = load_file(str(extra_file)) if extra_file.is_file() else {}
    state["step"] = int(meta["step"])
    return state


#: Name of the run configuration written next to the final ``save_pretrained`` student.
FINAL_CONFIG = "rl_distill_config.yaml"
