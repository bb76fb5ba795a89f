"""Atomic, resumable training checkpoints.

Layout of a run folder (``train.output_dir``)::

    checkpoints/
      step-20/                  # one complete checkpoint per saved step
        student.safetensors     # student weights (shared/tied tensors stored once)
        adapter.safetensors     # instead, for a LoRA student (model.lora): only the adapters
        extra.safetensors       # the agent's extra parameters (value heads...), if any
        optimizer.pt            # optimizer state_dict
        trainer_state.pt        # scheduler, RNG states of every process, data position, counters
        config.yaml             # the run configuration
        meta.json               # step, format, run id, config hash, every file's size; written last
      step-40/
      .tmp-step-60-XXXX/        # a save in progress (or killed): hidden, never read, removed on resume
    final/                      # save_pretrained student + tokenizer (plain from_pretrained)

Every folder is written into a hidden temporary sibling and renamed into place, so a ``step-N``
folder either exists complete or not at all; deleting old checkpoints renames them to a hidden name
first, for the same reason; the parent folder is fsync'd after each rename. :func:`latest_checkpoint`
considers only ``step-N`` folders with a ``meta.json``; :func:`find_resumable` also validates them
(:func:`validate_checkpoint`: every recorded file present with its recorded size, safetensors headers
readable, ``meta.json`` parseable) and falls back to the previous one when the newest is damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor

from rl_distill.models.lora import adapter_state_dict, is_lora, load_adapter_state_dict

CHECKPOINTS = "checkpoints"
FORMAT = 2  # 2: meta.json records run_id, config_hash and the size of every file
_STEP_DIR = re.compile(r"^step-(\d+)$")
#: The adapters of a LoRA student (its frozen base is rebuilt from the configuration on resume).
ADAPTER_FILE = "adapter.safetensors"


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
        fsync_dir(target.parent)  # make the rename itself durable
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
    """The newest complete checkpoint under ``root``, or None (not validated: see :func:`find_resumable`)."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` folder under ``root`` (complete or not) as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


class CheckpointError(ValueError):
    """No usable checkpoint (all damaged), or a checkpoint that cannot be read."""


def _safetensors_problem(file: Path) -> str | None:
    """Why ``file`` is not a readable safetensors file (header length and JSON header), or None."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{file.name}: {size} bytes, too short for a safetensors header"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"{file.name}: header of {header_len} bytes does not fit in the file's {size} bytes"
        try:
            header = json.loads(fh.read(header_len))
        except ValueError:
            return f"{file.name}: unreadable safetensors header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and 8 + header_len + max(ends) > size:
        return f"{file.name}: truncated ({size} bytes, the header needs {8 + header_len + max(ends)})"
    return None


def validate_checkpoint(path: str | Path) -> str | None:
    """Why checkpoint ``path`` cannot be used (naming the file), or None when it looks complete.

    Checks that ``meta.json`` parses; that every file it records exists with the recorded size
    (format 2; format 1 checkpoints: the usual files exist); and that the safetensors headers are
    readable and cover the data they describe.
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return "meta.json is missing"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        int(meta["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "meta.json is not valid checkpoint metadata"
    files = meta.get("files")
    if files is None:  # format 1
        files = {name: None for name in ("student.safetensors", "optimizer.pt", "trainer_state.pt")}
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if size is not None and file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(file)
            if problem:
                return problem
    return None


def find_resumable(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` that passes :func:`validate_checkpoint`, and the damaged newer ones.

    Returns:
        ``(path or None, [(damaged path, problem), ...])``.

    Raises:
        CheckpointError: there are checkpoints, but every one of them is damaged.
    """
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(step_dirs(root)):
        problem = validate_checkpoint(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    if damaged:
        listed = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise CheckpointError(
            f"no usable checkpoint in {root} ({listed}); start a new run (--overwrite moves this one aside)"
        )
    return None, []


def latest_usable_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``--resume`` would load (newest valid one), or None."""
    try:
        return find_resumable(root)[0]
    except CheckpointError:
        return None


def move_run_aside(output_dir: str | Path, aside: str | Path, names: list[str]) -> Path:
    """Move a run's own entries (``names`` that exist, plus TensorBoard event files) into ``aside``.

    Other files the user keeps in ``output_dir`` stay where they are.
    """
    output_dir, aside = Path(output_dir), Path(aside)
    aside.mkdir(parents=True, exist_ok=False)
    entries = [output_dir / n for n in names] + sorted(output_dir.glob("events.out.tfevents.*"))
    for entry in entries:
        if entry.exists():
            os.replace(entry, aside / entry.name)
    fsync_dir(output_dir)
    fsync_dir(aside)
    return aside


# --- run identity -----------------------------------------------------------------------------
def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (sections and fields only, not inside values)."""
    out: dict[str, Any] = {}
    for section, fields in config.items():
        if isinstance(fields, Mapping) and not prefix:
            out.update(flatten_config(fields, f"{section}."))
        else:
            out[f"{prefix}{section}"] = fields
    return out


def config_hash(config: Mapping[str, Any], ignore: frozenset[str] | set[str] = frozenset()) -> str:
    """SHA-256 (first 16 hex digits) of a run configuration, without the fields in ``ignore``."""
    flat = {k: v for k, v in flatten_config(config).items() if k not in ignore}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``field -> (old, new)`` for the fields both configurations have and that differ."""
    a, b = flatten_config(old), flatten_config(new)
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


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
    run_id: str | None = None,
    config_hash: str | None = None,
    student_state: Mapping[str, Tensor] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``root/step-<step>`` atomically, then prune to the newest ``keep_last``.

    Args:
        root: the checkpoints folder.
        step: the global step the state belongs to (steps taken so far).
        student: the (unwrapped) student; saved with safetensors, tied tensors once (a LoRA student:
            only its adapters, to ``adapter.safetensors``).
        extra: the agent's extra parameters by name (value heads...).
        optimizer: its ``state_dict`` is saved.
        trainer_state: scheduler state, RNG states, data position, counters (``torch.save``-able).
        config: the run configuration as a plain dict.
        keep_last: checkpoints to keep.
        run_id: the run's id (``output_dir/run.json``), checked on resume.
        config_hash: :func:`config_hash` of ``config``, recorded for reference.
        student_state: the student's full state dict, saved instead of ``student``'s own when the
            student is sharded (FSDP; :meth:`rl_distill.distributed.Distributed.full_state`).
        optimizer_state: the optimizer's full state dict (keyed by parameter name), saved instead of
            ``optimizer.state_dict()`` when the student is sharded.

    Returns:
        The checkpoint folder.
    """
    target = Path(root) / f"step-{step}"
    with atomic_directory(target) as tmp:
        if is_lora(student):  # only the adapters train; the frozen base comes from the configuration
            adapters = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(student).items()}
            save_file(adapters, str(tmp / ADAPTER_FILE))
        elif student_state is not None:  # a sharded student, gathered: plain tensors, each stored once
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in student_state.items()},
                str(tmp / "student.safetensors"),
            )
        else:
            save_model(student, str(tmp / "student.safetensors"))
        if extra:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / "extra.safetensors")
            )
        optim = optimizer.state_dict() if optimizer_state is None else dict(optimizer_state)
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(dict(trainer_state), tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        meta = {"step": step, "format": FORMAT, "run_id": run_id, "config_hash": config_hash, "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
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
    """Load ``student.safetensors`` of checkpoint ``path`` into ``student`` (strict); a LoRA student's adapters.

    Raises:
        ValueError: the weights do not match the student (or one is LoRA and the other not).
    """
    adapter = Path(path) / ADAPTER_FILE
    if adapter.is_file() or is_lora(student):
        if not adapter.is_file():
            raise ValueError(
                f"checkpoint {str(path)!r} holds a whole student, but the student has LoRA adapters (model.lora)"
            )
        if not is_lora(student):
            raise ValueError(
                f"checkpoint {str(path)!r} holds LoRA adapters (model.lora), but the student has none"
            )
        load_adapter_state_dict(student, load_file(str(adapter)), where=f"checkpoint {str(path)!r}")
        return
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
    path: str | Path,
    *,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    load_states: Callable[[dict[str, Tensor], dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load student weights and optimizer state in place; return the trainer state.

    The returned dict is what was saved as ``trainer_state`` plus ``step`` and ``extra`` (the
    agent's extra tensors by name, empty when there were none).

    A sharded student (FSDP) passes ``load_states``: it is called with the full student and
    optimizer state dicts read from the checkpoint, and loads them itself
    (:meth:`rl_distill.distributed.Distributed.load_full_state`).

    Raises:
        FileNotFoundError: not a complete checkpoint.
        ValueError: weights that do not match the student.
    """
    path = Path(path)
    meta = read_meta(path)
    if load_states is not None:
        optim = torch.load(path / "optimizer.pt", weights_only=True)
        load_states(load_file(str(path / "student.safetensors")), optim)
    else:
        load_student_weights(path, student)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    extra_file = path / "extra.safetensors"
    state["extra"] = load_file(str(extra_file)) if extra_file.is_file() else {}
    state["step"] = int(meta["step"])
    return state


#: Name of the run configuration written next to the final ``save_pretrained`` student.
FINAL_CONFIG = "rl_distill_config.yaml"
