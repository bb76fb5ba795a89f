"""Hugging Face Accelerate for more than one process: who is main, DDP for the student, gathering.

One process (plain ``rl-distill train``) needs none of this: :meth:`Distributed.setup` returns a
single-process object whose methods are no-ops, and the loop is exactly the plain PyTorch one.
Under ``accelerate launch`` (``WORLD_SIZE > 1``) it creates an ``accelerate.Accelerator``:

- the student is wrapped in DistributedDataParallel, so the backward pass of every process
  all-reduces (averages) its gradients; buffers are not synchronised at each forward
  (``forward_sync_buffers=False``), so sampling, whose number of forwards differs between
  processes (each stops at its own EOS), needs no collective;
- the agent's extra parameters (value heads) are not inside the DDP module; the agent averages
  their gradients itself (``Agent.optimizer_step`` with the accelerator);
- the teacher is never wrapped: each process holds a full, inference-only copy;
- only the main process logs and writes files.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; any other name must be a device this machine has.

    Raises:
        ConfigError: naming ``model.device`` when CUDA (or that CUDA index) or MPS is not available.
    """
    from rl_distill.config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"model.device: {name!r} is not a device name ({err})") from None
    fix = "use model.device: cpu or auto"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only PyTorch build" if torch.version.cuda is None else "no CUDA GPU found"
            raise ConfigError(f"model.device: {name!r}, but CUDA is not available ({build}); {fix}")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"model.device: {name!r}, but this machine has {count} CUDA device(s); {fix}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device: {name!r}, but MPS (Apple GPU) is not available; {fix}")
    return device


#: Variables holding the process count: torchrun / ``accelerate launch --multi_gpu``, then MPI.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_distributed() -> bool:
    """Whether this process was started as one of several (``accelerate launch``, ``torchrun``, MPI)."""
    return any(int(os.environ.get(name, "1")) > 1 for name in _WORLD_SIZE_VARS)


def warn_if_single_cpu_launch() -> None:
    """Say so when ``accelerate launch --cpu --num_processes N`` started one process (it needs MPI).

    Accelerate's CPU launcher starts a single process unless given ``--mpirun_hostfile``; it only
    sets ``MASTER_ADDR`` when more than one was asked for, which is how this case is recognised.
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
    if use_cpu and "MASTER_ADDR" in os.environ and not launched_distributed():
        warnings.warn(
            "accelerate launch --cpu with several processes started only this one (multi-CPU launching needs "
            "MPI: --mpirun_hostfile). Training runs as ONE process. For several CPU processes without MPI use "
            "'accelerate launch --multi_gpu --num_processes N' with model.device: cpu (see docs/scaling.md)",
            stacklevel=2,
        )


@dataclass
class Distributed:
    """The process group as the trainer sees it.

    Attributes:
        accelerator: the ``accelerate.Accelerator``, or None for a single process.
        rank: this process's index.
        world_size: number of processes.
        device: where this process's models live.
    """

    accelerator: Any
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def setup(cls, device: str) -> Distributed:
        """Single process, or an Accelerator when launched as several processes.

        Args:
            device: ``model.device`` from the config (``cpu`` forces CPU processes).

        Raises:
            ConfigError: ``device`` names a CUDA/MPS device this machine does not have.
            ValueError: Accelerate was configured for FSDP or DeepSpeed (see docs/scaling.md).
        """
        if not launched_distributed():
            warn_if_single_cpu_launch()
            return cls(None, 0, 1, resolve_device(device))
        resolve_device(device)  # a device this machine lacks fails here, naming model.device
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        accelerator = Accelerator(cpu=device == "cpu")
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError(
                f"accelerate is configured for {accelerator.distributed_type.value}, which rl_distill does not "
                "support: sharded modules need every process to run the same forwards in lockstep, and "
                "sampling stops at a different step in each process. Use a DDP (multi-GPU / multi-CPU) "
                "accelerate config; see docs/scaling.md for large teachers"
            )
        return cls(accelerator, accelerator.process_index, accelerator.num_processes, accelerator.device)

    @property
    def is_main(self) -> bool:
        """Whether this process logs and saves."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    def wrap_student(self, student: torch.nn.Module) -> torch.nn.Module:
        """DDP-wrap the student (gradients all-reduced in backward); unchanged for one process.

        Buffers are not synchronised at each forward: that is a collective, and sampling runs a
        different number of forwards in each process.
        """
        if not self.enabled:
            return student
        from torch.nn.parallel import DistributedDataParallel

        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in params
            else {"broadcast_buffers": False}
        )
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(student.to(self.device), device_ids=device_ids, **no_sync)

    @staticmethod
    def unwrap(model: torch.nn.Module) -> torch.nn.Module:
        """The plain module inside a DDP wrapper."""
        return getattr(model, "module", model)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (``[obj]`` for one process)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Concatenate per-process evaluation rows, ordered by their ``index``."""
        return sorted((row for part in self.gather(rows) for row in part), key=lambda r: r["index"])

    def reduce_stats(self, stats: Mapping[str, float]) -> dict[str, float]:
        """Average per-process step metrics; ``time/tokens`` is summed (tokens of the whole step)."""
        if not self.enabled:
            return dict(stats)
        parts = self.gather(dict(stats))
        keys = sorted({k for p in parts for k in p})
        out = {}
        for key in keys:
            values = [p[key] for p in parts if key in p]
            out[key] = sum(values) if key == "time/tokens" else sum(values) / len(values)
        return out

    def barrier(self) -> None:
        """Wait for every process."""
        if self.enabled:
            self.accelerator.wait_for_everyone()
