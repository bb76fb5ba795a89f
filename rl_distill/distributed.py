"""Hugging Face Accelerate for more than one process: who is main, DDP or FSDP for the models, gathering.

One process (plain ``rl-distill train``) needs none of this: :meth:`Distributed.setup` returns a
single-process object whose methods are no-ops, and the loop is exactly the plain PyTorch one.
Under ``accelerate launch`` (``WORLD_SIZE > 1``) it creates an ``accelerate.Accelerator``, and then
either (data parallel, the default):

- the student is wrapped in DistributedDataParallel, so the backward pass of every process
  all-reduces (averages) its gradients; buffers are not synchronised at each forward
  (``forward_sync_buffers=False``), so sampling, whose number of forwards differs between
  processes (each stops at its own EOS), needs no collective;
- the agent's extra parameters (value heads) are not inside the DDP module; the agent averages
  their gradients itself (``Agent.optimizer_step`` with the accelerator);
- the teacher is never wrapped: each process holds a full, inference-only copy;

or, launched with ``--use_fsdp --fsdp_version 2`` (:class:`ShardingSpec`), sharded:

- teacher and student are sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): each of the
  model's repeated blocks (its ``_no_split_modules``, the decoder layers) and then the whole model,
  over all processes, before the optimizer is built; every forward all-gathers the parameters and
  the backward reduce-scatters (averages) the student's gradients;
- because every forward is a collective, every process must run the same forwards: the rollout
  engine decodes in lock-step (:meth:`Distributed.all_finished`, one all-reduce per decoding step),
  and :func:`sharding_problems` refuses, at start-up, the settings under which processes would
  run different numbers of forwards;
- checkpoints and ``final/`` hold full (unsharded) weights, gathered on the main process
  (:meth:`Distributed.full_state`) and written by the same atomic code as always.

In both modes only the main process logs and writes files.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rl_distill.config import Config


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


def _env_flag(environ: Mapping[str, str], name: str, default: str = "false") -> str:
    return environ.get(name, default).strip().lower()


@dataclass(frozen=True)
class ShardingSpec:
    """How teacher and student are sharded (FSDP2), read from Accelerate's launcher settings.

    Attributes:
        reshard_after_forward: free the gathered parameters after each forward (``FULL_SHARD``, the
            least memory); False keeps them until the backward (``SHARD_GRAD_OP``: fewer
            all-gathers, more memory). ``--fsdp_reshard_after_forward``.
    """

    reshard_after_forward: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ShardingSpec | None:
        """The spec ``accelerate launch --use_fsdp ...`` asked for (its ``FSDP_*`` variables); None without FSDP.

        Read: ``--fsdp_version`` (must be 2), ``--fsdp_reshard_after_forward``. Refused:
        ``--fsdp_offload_params`` and ``--fsdp_activation_checkpointing`` (true). Not read, whatever
        their value: the wrap policy (the model's ``_no_split_modules`` blocks are always the units),
        prefetching, ``--fsdp_state_dict_type`` (checkpoints always hold the full state dict) and
        ``--fsdp_cpu_ram_efficient_loading`` (every process loads the full models, then shards them).

        Raises:
            ValueError: an FSDP setting rl_distill does not support, naming the launcher option.
        """
        env = os.environ if environ is None else environ
        if _env_flag(env, "ACCELERATE_USE_FSDP") != "true":
            return None
        version = env.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise ValueError(
                f"accelerate is configured for FSDP version {version}; rl_distill shards with FSDP2 "
                "(torch.distributed.fsdp.fully_shard): launch with --fsdp_version 2 (fsdp_version: 2 in the "
                "accelerate config file)"
            )
        for name, option, why in (
            ("FSDP_OFFLOAD_PARAMS", "--fsdp_offload_params", "parameter offloading to CPU is not supported"),
            (
                "FSDP_ACTIVATION_CHECKPOINTING",
                "--fsdp_activation_checkpointing",
                "set train.gradient_checkpointing instead (not tested with FSDP)",
            ),
        ):
            if _env_flag(env, name) == "true":
                raise ValueError(f"accelerate FSDP option {option} true: {why} (see docs/scaling.md)")
        reshard = _env_flag(env, "FSDP_RESHARD_AFTER_FORWARD", "true")
        if reshard not in ("true", "false", "full_shard", "shard_grad_op"):
            raise ValueError(
                f"accelerate FSDP option --fsdp_reshard_after_forward {reshard!r}: use true or false (FSDP2)"
            )
        return cls(reshard_after_forward=reshard in ("true", "full_shard"))


def sharding_problems(config: Config, num_eval: int, world_size: int) -> list[str]:
    """Why this run cannot be sharded: settings under which processes would run different forwards.

    A sharded module all-gathers its parameters at every forward, so every process must call the
    student and the teacher the same number of times in the same order. Sampling is made lock-step
    by the rollout engine; what remains per process is listed here, each naming its config field.

    Args:
        config: the run configuration.
        num_eval: held-out examples (split into one contiguous shard per process).
        world_size: number of processes.

    Returns:
        One message per problem; empty when the run can be sharded.
    """
    agent, mc, tc = config.agent, config.model, config.train
    problems = []
    if config.agent_name != "gkd":
        problems.append(
            f"agent.name: {config.agent_name!r}; only the gkd agent has been checked to run the same forwards "
            "in every process (policy-gradient agents with value heads also mix sharded and plain parameters "
            "in one gradient clip)"
        )
    else:
        if not (agent.is_constant("lmbda", 0.0) or agent.is_constant("lmbda", 1.0)):
            problems.append(
                f"agent.lmbda: {agent.lmbda!r}; with 0 < lambda < 1 (or a schedule) each process flips its own "
                "coins, so processes sample and score different numbers of batches; use 0 or 1"
            )
        if agent.reject is not None:
            problems.append(
                "agent.reject: rejected samples differ per process (and resampling runs extra forwards in some "
                "processes only); set it to null"
            )
    if mc.lora is not None:
        problems.append("model.lora: LoRA students are not supported with FSDP; set it to null")
    if getattr(mc, "cross_tokenizer", None) is not None:
        problems.append("model.cross_tokenizer: a teacher with its own tokenizer is not supported with FSDP")
    if mc.teacher_refresh_every:
        problems.append(
            "model.teacher_refresh_every: copying a sharded student into a sharded teacher is not supported; "
            "set it to 0"
        )
    if tc.precision == "fp16":
        problems.append(
            "train.precision: fp16 needs a gradient scaler that knows the sharded gradients; use bf16 or fp32"
        )
    chunk = -(-num_eval // world_size)
    sizes = [max(0, min(chunk, num_eval - r * chunk)) for r in range(world_size)]
    batches = [-(-n // tc.eval_batch_size) for n in sizes]
    if len(set(batches)) > 1:
        problems.append(
            f"data.num_eval: {num_eval} held-out examples split over {world_size} processes give them "
            f"{batches} evaluation batches of train.eval_batch_size={tc.eval_batch_size}; every process must run "
            f"the same number: use a multiple of {world_size * tc.eval_batch_size} (or of {world_size} with "
            "a train.eval_batch_size that holds a whole shard)"
        )
    return problems


@dataclass
class Distributed:
    """The process group as the trainer sees it.

    Attributes:
        accelerator: the ``accelerate.Accelerator``, or None for a single process.
        rank: this process's index.
        world_size: number of processes.
        device: where this process's models live.
        sharding: how teacher and student are sharded (FSDP2), or None (one process, or DDP).
    """

    accelerator: Any
    rank: int
    world_size: int
    device: torch.device
    sharding: ShardingSpec | None = None

    @classmethod
    def setup(cls, device: str) -> Distributed:
        """Single process, or an Accelerator when launched as several processes.

        Args:
            device: ``model.device`` from the config (``cpu`` forces CPU processes).

        FSDP is read from the launcher's variables (:meth:`ShardingSpec.from_env`) rather than from
        ``accelerator.distributed_type``: Accelerate leaves a CPU run at ``MULTI_CPU`` even when
        launched with ``--use_fsdp``, and rl_distill shards the models itself in both cases
        (:meth:`shard`), never through ``accelerator.prepare``.

        Raises:
            ConfigError: ``device`` names a CUDA/MPS device this machine does not have.
            ValueError: Accelerate was configured for DeepSpeed, or for FSDP settings rl_distill does
                not support (see docs/scaling.md).
        """
        if not launched_distributed():
            warn_if_single_cpu_launch()
            return cls(None, 0, 1, resolve_device(device))
        resolve_device(device)  # a device this machine lacks fails here, naming model.device
        sharding = ShardingSpec.from_env()
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        accelerator = Accelerator(cpu=device == "cpu")
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(
                "accelerate is configured for DeepSpeed, which rl_distill does not support: it shards with "
                "FSDP2 (accelerate launch --use_fsdp --fsdp_version 2; see docs/scaling.md)"
            )
        if accelerator.distributed_type == DistributedType.FSDP and sharding is None:
            raise ValueError(  # an FSDP plugin passed some other way than the launcher's variables
                "accelerate is configured for FSDP without the launcher's FSDP_* variables; launch with "
                "accelerate launch --use_fsdp --fsdp_version 2 (see docs/scaling.md)"
            )
        return cls(
            accelerator, accelerator.process_index, accelerator.num_processes, accelerator.device, sharding
        )

    @property
    def is_main(self) -> bool:
        """Whether this process logs and saves."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether teacher and student are sharded over the processes (FSDP2)."""
        return self.enabled and self.sharding is not None

    def all_finished(self, done: bool) -> bool:
        """Whether every process is ``done`` (one all-reduce of one integer): the lock-step decoding check.

        Every process must call it the same number of times (the rollout engine calls it once per
        decoding step when :attr:`RolloutEngine.lockstep` is set). One process: ``done``.
        """
        if not self.enabled:
            return done
        import torch.distributed as dist

        flag = torch.tensor([int(done)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard ``model`` in place over all processes with FSDP2; unchanged unless :attr:`sharded`.

        Each submodule whose class is one of the model's ``_no_split_modules`` (the repeated
        transformer blocks) becomes its own FSDP unit, then the whole model (embeddings, final norm,
        LM head). The parameters become DTensors holding this process's shard; the model stays the
        same object (its class gains FSDP's methods), so ``model.config`` and ``generate``-style
        loops keep working, each forward all-gathering what it needs. Call it on every process
        with identical weights, before an optimizer is built over the parameters.

        Raises:
            ValueError: the model declares no blocks to shard (``_no_split_modules``).
        """
        if not self.sharded:
            return model
        assert self.sharding is not None
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        names = set(getattr(model, "_no_split_modules", None) or ())
        blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
        if not blocks:
            raise ValueError(
                f"{type(model).__name__} declares no transformer blocks (_no_split_modules) to shard with FSDP"
            )
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        reshard = self.sharding.reshard_after_forward
        model.to(self.device)
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        return model

    def full_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None] | None:
        """Full (unsharded) CPU state dicts of a sharded model and its optimizer, on the main process.

        A collective: every process must call it. The main process gets the model's state dict
        (plain tensors, keyed as ``model.state_dict()``) and the optimizer's (keyed by parameter
        name, as ``torch.distributed.checkpoint.state_dict`` writes it; None without an optimizer);
        the others get empty dicts. None when the models are not sharded (save them as usual).
        """
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = (
            None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)
        )
        return model_state, optim_state

    def load_full_state(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        model_state: Mapping[str, torch.Tensor],
        optim_state: Mapping[str, Any] | None = None,
    ) -> None:
        """Load full state dicts (as :meth:`full_state` writes them) into a sharded model and optimizer.

        A collective: every process passes the full dicts (read from the shared checkpoint) and keeps
        its own shard. A tied weight stored once (the LM head tied to the embeddings) may be absent.

        Raises:
            ValueError: the weights do not match the model (naming the missing and unexpected keys).
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        missing, unexpected = set_model_state_dict(model, dict(model_state), options=options)
        tied = _tied_names(model)
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint does not match the sharded student: missing {missing}, unexpected {unexpected}"
            )
        if optimizer is not None and optim_state is not None:
            set_optimizer_state_dict(model, optimizer, dict(optim_state), options=options)

    def wrap_student(self, student: torch.nn.Module) -> torch.nn.Module:
        """DDP-wrap the student (gradients all-reduced in backward); unchanged for one process or FSDP.

        Buffers are not synchronised at each forward: that is a collective, and sampling runs a
        different number of forwards in each process. A sharded student (:meth:`shard`) already
        reduces its gradients itself.
        """
        if not self.enabled or self.sharded:
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


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier-named one (a tied LM head)."""
    seen: set[int] = set()
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied
