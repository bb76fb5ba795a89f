"""Assembling a run from a :class:`~rl_distill.config.Config`: the one place that builds its parts.

:func:`build_run` builds, in this order (the order fixes the random streams): the process group,
the seed, the task, the models (tokenizers checked first), the rollout engine, the prompt-length
check, the evaluation reward, the optimizer, the agent (which adds its own parameters to the
optimizer), the learning-rate scheduler, the DDP wrap, and the curriculum sampler
(``train.curriculum``; its own generator, seeded ``train.seed``, so no other stream moves). The trainer (:mod:`rl_distill.trainer`)
only runs the loop over what it returns; ``rl-distill eval`` uses :func:`build_components` (no
optimizer, no agent) with :func:`rl_distill.evaluation.evaluate`; ``env-check`` uses
:func:`env_kwargs`.

This module and the config schema are the only parts of the core that import ``agents/`` and
``envs/`` (the registry :data:`rl_distill.agents.AGENTS`).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from rl_distill.agents import AGENTS, Agent
from rl_distill.config import TASK_EVAL_REWARDS, Config, ConfigError
from rl_distill.cross_tokenizer import CrossTokenizerTeacher
from rl_distill.curriculum import CurriculumSampler
from rl_distill.distributed import Distributed, resolve_device, sharding_problems
from rl_distill.envs import ENV_ID  # importing the envs registers the Gymnasium ids
from rl_distill.models import (
    check_tokenizers_match,
    load_causal_lm,
    load_tokenizer,
    make_kept_layer_student,
    resolve_dtype,
    student_from_config,
)
from rl_distill.models.lora import BASE_OF_STUDENT, prepare_models
from rl_distill.precision import grad_scaler
from rl_distill.rewards import CheckedReward
from rl_distill.rewards.registry import resolve_reward
from rl_distill.rollout import PromptTooLongError, RolloutEngine
from rl_distill.tasks import TaskData, load_task
from rl_distill.tasks.hf_dataset import check_rendered_prompts
from rl_distill.teacher_cache import check_cache_for_run, teacher_folder

Models = tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]

__all__ = [
    "ENV_ID",
    "Run",
    "agent_tensors",
    "build_agent",
    "build_components",
    "build_curriculum",
    "build_eval_reward",
    "build_models",
    "build_run",
    "check_prompts_fit",
    "copy_weights",
    "env_kwargs",
    "frozen_copy",
    "load_agent_tensors",
    "lr_factor",
    "seed_everything",
]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (the one place where a run is seeded)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_models(
    config: Config, device: torch.device
) -> tuple[PreTrainedModel | None, PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the teacher, build or load the student, and check that they share a tokenizer.

    ``model.teacher: self`` makes the teacher a frozen copy of the loaded student
    (:func:`frozen_copy`); ``null`` loads no teacher. Both take the student's own tokenizer.
    With ``agent.teacher_cache`` the cache is checked against ``model.teacher`` and the tokenizer first
    (:func:`~rl_distill.teacher_cache.check_cache_for_run`) and no teacher is returned; its weights are
    read only to copy the layers of a kept-layer student.

    Returns:
        ``(teacher, student, tokenizer)``; the teacher is None with ``model.teacher: null`` (and
        ``base_of_student``, made later by :func:`~rl_distill.models.lora.prepare_models`).
    """
    mc = config.model
    if mc.teacher in (None, "self"):  # self-distillation, or no teacher at all (SPIN, GRPO)
        assert mc.student is not None  # the config requires it
        tokenizer = load_tokenizer(mc.student, trust_remote_code=mc.trust_remote_code)
        student = load_causal_lm(
            mc.student, dtype=mc.dtype, device=device, trust_remote_code=mc.trust_remote_code
        ).train()
        return (frozen_copy(student) if mc.teacher == "self" else None), student, tokenizer
    # LoRA self-distillation: no teacher to load, it is the student's base (rl_distill.models.lora).
    base_teacher = mc.teacher == BASE_OF_STUDENT
    tokenizer = load_tokenizer(
        mc.student if base_teacher else mc.teacher, trust_remote_code=mc.trust_remote_code
    )
    if mc.student is not None and not base_teacher:
        # Check tokenizers before loading the (possibly large) student weights.
        student_tokenizer = load_tokenizer(mc.student, trust_remote_code=mc.trust_remote_code)
        if mc.cross_tokenizer is None:
            check_tokenizers_match(tokenizer, student_tokenizer)
        else:  # model.cross_tokenizer: the run's tokenizer is the student's (the teacher's: build_components)
            tokenizer = student_tokenizer
    cache = getattr(config.agent, "teacher_cache", None)
    if cache is not None:  # supervised KD from a teacher cache: refuse a mismatched cache before any loading
        check_cache_for_run(config, tokenizer)
    # With a cache the teacher is loaded only to copy the layers of a kept-layer student, then dropped.
    copies_layers = mc.student is None and mc.student_config is None
    teacher = None
    if not base_teacher and (cache is None or copies_layers):
        teacher = load_causal_lm(
            mc.teacher, dtype=mc.dtype, device=device, trust_remote_code=mc.trust_remote_code
        )
    if mc.student is not None:
        student = load_causal_lm(
            mc.student, dtype=mc.dtype, device=device, trust_remote_code=mc.trust_remote_code
        )
    elif mc.student_config is not None:
        vocab = (
            teacher.config.vocab_size
            if teacher is not None
            else AutoConfig.from_pretrained(teacher_folder(mc.teacher)).vocab_size
        )  # a teacher cache: the teacher's config alone
        cfg = {"vocab_size": vocab, **mc.student_config}
        student = student_from_config(cfg, seed=config.train.seed, dtype=resolve_dtype(mc.dtype)).to(device)
    else:
        layers = mc.student_layers
        student = make_kept_layer_student(
            teacher,
            num_layers=layers if isinstance(layers, int) else None,
            layers=layers if isinstance(layers, list) else None,
        )
    if cache is not None:
        teacher = None  # the cache replaces it: it never scores
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    student.train()
    return teacher, student, tokenizer


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``model`` in eval mode without gradients: the ``model.teacher: self`` teacher."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def resolve_teacher(
    config: Config, teacher: PreTrainedModel | None, student: PreTrainedModel
) -> PreTrainedModel | None:
    """The teacher of pre-built models: a frozen copy of the student for ``model.teacher: self``.

    Raises:
        ValueError: pre-built models that contradict ``model.teacher`` (a teacher passed in for
            ``self`` or ``null``).
    """
    name = config.model.teacher
    if name not in (None, "self"):
        return teacher
    if teacher is not None:
        raise ValueError(
            f"model.teacher is {name!r}, but a teacher model was passed in; pass None "
            "(teacher: self copies the student)"
        )
    return frozen_copy(student) if name == "self" else None


def copy_weights(source: PreTrainedModel, target: PreTrainedModel) -> None:
    """``target``'s weights become ``source``'s (``model.teacher_refresh_every``); ``target`` stays frozen."""
    with torch.no_grad():
        target.load_state_dict(source.state_dict())


def check_prompts_fit(engine: RolloutEngine, task: TaskData, max_new_tokens: int) -> None:
    """Fail before any work if a prompt plus the completion budget exceeds the context length.

    Raises:
        PromptTooLongError: naming the split, the example and the sizes.
    """
    teacher_prompts = engine.teacher_prompt_map or {}  # privileged teacher prompts (OPSD), if any
    for split, examples in (("train", task.train), ("eval", task.eval)):
        for i, ex in enumerate(examples):
            for what, text in (("prompt", ex.prompt), ("teacher prompt", teacher_prompts.get(ex.prompt))):
                if text is None:
                    continue
                length = len(engine.encoder.token_ids(text))
                if length + max_new_tokens > engine.context_length:
                    raise PromptTooLongError(
                        f"{split} {what} {i} has {length} tokens; with max_new_tokens={max_new_tokens} it "
                        f"exceeds the models' context length {engine.context_length}: {text[:60]!r}"
                    )


def build_cross_teacher(
    config: Config, teacher: PreTrainedModel | None, student_tokenizer: PreTrainedTokenizerBase
) -> CrossTokenizerTeacher | None:
    """The teacher with its own tokenizer (``model.cross_tokenizer``, loaded from ``model.teacher``); else None."""
    mc = config.model
    if mc.cross_tokenizer is None:
        return None
    assert teacher is not None and mc.teacher is not None  # the config requires a teacher model
    teacher_tokenizer = load_tokenizer(mc.teacher, trust_remote_code=mc.trust_remote_code)
    return CrossTokenizerTeacher(
        teacher,
        teacher_tokenizer,
        student_tokenizer,
        chat_template=mc.chat_template,
        engine_options=config.train.engine_options(),
    )


def build_eval_reward(config: Config) -> CheckedReward | None:
    """The reward averaged into the evaluation metrics (``eval.reward``; ``auto`` resolved here)."""
    spec = config.eval.reward
    if spec == "auto":
        spec = config.agent.reward or TASK_EVAL_REWARDS.get(config.data.task)
    return resolve_reward(spec)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier after ``step`` scheduler steps (``train.warmup_steps``, ``train.lr_schedule``).

    Linear warm-up to 1 over ``warmup`` steps, then constant, or a linear or cosine decay from 1 that
    would reach 0 at ``total`` (the last of the ``total`` updates still has a non-zero rate).

    >>> [round(lr_factor(s, warmup=2, total=6, schedule="linear"), 2) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}")


@dataclass
class Run:
    """Everything a run is made of. :func:`build_components` fills the first part, :func:`build_run` all.

    Attributes:
        config: the validated configuration.
        dist: the process group (one process without Accelerate).
        task: train and held-out examples.
        teacher: the frozen teacher (None with ``model.teacher: null``).
        student: the student (DDP-wrapped inside ``engine`` and ``agent`` under several processes).
        tokenizer: the shared tokenizer.
        engine: the rollout engine over student and teacher.
        eval_reward: the evaluation reward (``eval.reward`` resolved), or None.
        optimizer: AdamW over the student's parameters and the agent's own group(s).
        generator: the agent's sampling generator (seeded ``train.seed + rank``).
        agent: the configured agent.
        scheduler: the learning-rate scheduler (built after the agent, so it drives its groups too).
        curriculum: the sampler of training-example indices (``train.curriculum``), or None for the
            trainer's uniform shuffle.
        cross_teacher: with ``model.cross_tokenizer``, the teacher and its own tokenizer.
    """

    config: Config
    dist: Distributed
    task: TaskData
    teacher: PreTrainedModel | None
    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    engine: RolloutEngine
    eval_reward: CheckedReward | None
    optimizer: torch.optim.Optimizer | None = None
    generator: torch.Generator | None = None
    agent: Agent | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    curriculum: CurriculumSampler | None = None
    cross_teacher: CrossTokenizerTeacher | None = None
    """The teacher with its own tokenizer (``model.cross_tokenizer``); the engine then has no teacher."""

    @property
    def max_new_tokens(self) -> int:
        """The agent's completion budget."""
        return self.config.agent.max_new_tokens

    @property
    def eval_max_new_tokens(self) -> int:
        """The completion budget at evaluation."""
        return self.config.eval.max_new_tokens or self.max_new_tokens


def build_components(config: Config, *, models: Models | None = None, task: TaskData | None = None) -> Run:
    """The parts a run needs before training: process group, seed, task, models, engine, eval reward.

    Args:
        config: the run configuration.
        models: optional pre-built ``(teacher, student, tokenizer)`` (tests and notebooks).
        task: optional pre-built task data.

    Raises:
        ConfigError, ValueError, FileNotFoundError: bad models, data or prompt lengths (named).
    """
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    dist = Distributed.setup(config.model.device)
    seed_everything(tc.seed)  # the same in every process: identical initial students
    dc = config.data
    task = task or load_task(
        dc.task, seed=dc.seed, num_train=dc.num_train, num_eval=dc.num_eval, **dc.options
    )
    if models is not None:
        teacher, student, tokenizer = models
        teacher = resolve_teacher(config, teacher, student)  # teacher: self copies the student
        if getattr(config.agent, "teacher_cache", None) is not None:  # the cache replaces the teacher
            check_cache_for_run(config, tokenizer)
            teacher = None
    else:
        teacher, student, tokenizer = build_models(config, dist.device)
    # model.lora, model.teacher (base_of_student), model.teacher_dtype, train.precision and
    # train.gradient_checkpointing: rl_distill.models.lora.prepare_models.
    teacher, student = prepare_models(config.model, config.train, teacher, student, dist.device)
    if dist.sharded:  # FSDP (docs/scaling.md): refuse what would desynchronise forwards, then shard both
        problems = sharding_problems(config, len(task.eval), dist.world_size)
        if problems:
            raise ConfigError("FSDP (accelerate launch --use_fsdp) cannot run this: " + "; ".join(problems))
        teacher = dist.shard(teacher) if teacher is not None else None
        student = dist.shard(student)
        if dist.is_main:
            print(
                f"rl-distill: FSDP2: teacher and student sharded over {dist.world_size} processes", flush=True
            )
    cross_teacher = build_cross_teacher(config, teacher, tokenizer)
    engine_teacher = None if cross_teacher is not None else teacher  # it cannot read student token ids
    engine = RolloutEngine(
        student,
        engine_teacher,
        tokenizer,
        chat_template=config.model.chat_template,
        **config.train.engine_options(),
    )
    if dist.sharded:  # every forward is a collective: decode in lock-step across processes
        engine.lockstep = dist.all_finished
    template = getattr(config.agent, "teacher_template", None)
    if template:  # privileged teacher prompts (OPSD), one per example of both splits
        try:
            engine.set_teacher_template(template, [*task.train, *task.eval])
        except ValueError as err:
            raise ConfigError(f"agent.{err}") from None
    run = Run(config, dist, task, teacher, student, tokenizer, engine, eval_reward=None)
    run.cross_teacher = cross_teacher
    check_prompts_fit(engine, task, max(run.max_new_tokens, run.eval_max_new_tokens))
    check_rendered_prompts(task, engine.encoder.use_chat_template)
    run.eval_reward = build_eval_reward(config)
    return run


def build_run(config: Config, *, models: Models | None = None, task: TaskData | None = None) -> Run:
    """Every part of a training run: :func:`build_components`, then optimizer, agent, scheduler, DDP.

    Args:
        config: the run configuration.
        models: optional pre-built ``(teacher, student, tokenizer)``.
        task: optional pre-built task data.
    """
    run = build_components(config, models=models, task=task)
    tc, dist, student = config.train, run.dist, run.student
    # fused=True: one kernel for all parameters (measured 1.97 -> 1.84 s per GKD step on CPU,
    # docs/results/performance.md); supported on CPU and CUDA for floating-point parameters.
    run.optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        fused=True,
    )
    # Each process samples its own stream; batches are drawn from one shared order.
    run.generator = torch.Generator(device=dist.device).manual_seed(tc.seed + dist.rank)
    run.agent = build_agent(run)
    if hasattr(run.agent, "set_heldout"):  # SPIN's end-of-round saturation check reads held-out prompts
        run.agent.set_heldout(run.task.eval)
    # After the agent: its own param group (value head) must follow the schedule too.
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, partial(lr_factor, warmup=tc.warmup_steps, total=tc.steps, schedule=tc.lr_schedule)
    )
    if dist.enabled:  # wrap after the agent is built: it may read the plain model's config
        run.engine.student = run.agent.student = dist.wrap_student(student)
    run.curriculum = build_curriculum(config, run.task)
    return run


def build_curriculum(config: Config, task: TaskData) -> CurriculumSampler | None:
    """The curriculum sampler over ``task.train`` (``train.curriculum``), seeded ``train.seed``; None when off.

    The same on every process (same seed, same examples), so they draw the same global batches.

    Raises:
        ConfigError: ``train.curriculum.difficulty`` names no numeric metadata field of the examples.
    """
    cc = config.train.curriculum_config
    if cc is None:
        return None
    try:
        return CurriculumSampler.from_examples(task.train, cc, seed=config.train.seed)
    except ValueError as err:
        raise ConfigError(f"train.curriculum.{err}") from None


def build_agent(run: Run) -> Agent:
    """The configured agent (:data:`rl_distill.agents.AGENTS`), its own parameters in the optimizer.

    Agents add their value heads to the optimizer themselves; a group is added here for any
    parameter an agent lists but did not register.
    """
    assert run.optimizer is not None and run.generator is not None
    agent_cls, _ = AGENTS[run.config.agent_name]
    tc = run.config.train
    scaler = grad_scaler(tc.precision, run.dist.device)  # fp16 only
    agent = agent_cls(
        run.engine,
        run.optimizer,
        run.config.agent,
        max_grad_norm=run.config.train.max_grad_norm,
        generator=run.generator,
        **({"accelerator": run.dist.accelerator} if run.dist.enabled else {}),
        **({"grad_accum_steps": tc.grad_accum_steps} if tc.grad_accum_steps > 1 else {}),
        **({"grad_scaler": scaler} if scaler is not None else {}),
        **({"cross_teacher": run.cross_teacher} if run.cross_teacher is not None else {}),
    )
    known = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    missing = [p for p in agent.extra_parameters() if p.requires_grad and id(p) not in known]
    if missing:
        run.optimizer.add_param_group({"params": missing})
    return agent


def agent_tensors(agent: Agent) -> dict[str, torch.Tensor]:
    """The agent's own weights (value heads) as flat ``module/param`` tensors; empty for GKD."""
    return {
        f"{name}/{key}": t
        for name, sd in agent.state_dict().items()
        for key, t in sd.items()
        if torch.is_tensor(t)
    }


def load_agent_tensors(agent: Agent, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`agent_tensors`."""
    if not tensors and not agent_tensors(agent):
        return
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for flat, t in tensors.items():
        name, key = flat.split("/", 1)
        nested.setdefault(name, {})[key] = t
    agent.load_state_dict(nested)


def env_kwargs(config: Config, num_prompts: int) -> dict[str, Any]:
    """The token-generation environment's arguments from a config: teacher, prompts, alpha, reward, budget.

    The prompts are the first ``num_prompts`` training examples (with their metadata).
    """
    mc, dc, agent = config.model, config.data, config.agent
    if mc.teacher is None:
        raise ConfigError(
            "model.teacher: the token-generation environment's reward is the teacher's; it is null"
        )
    if mc.cross_tokenizer is not None:
        raise ConfigError(
            "model.cross_tokenizer: the environments reward student tokens with the teacher's log-probs of the "
            "same token ids; they need a shared tokenizer"
        )
    if getattr(agent, "teacher_template", None):
        raise ConfigError(
            "agent.teacher_template: the environments score with the student's prompt; privileged teacher "
            "prompts are not supported there"
        )
    task = load_task(dc.task, seed=dc.seed, num_train=dc.num_train, num_eval=dc.num_eval, **dc.options)
    source = mc.student if mc.teacher == "self" else mc.teacher  # self: the starting student
    tokenizer = load_tokenizer(source, trust_remote_code=mc.trust_remote_code)
    teacher = load_causal_lm(
        source, dtype=mc.dtype, device=resolve_device(mc.device), trust_remote_code=mc.trust_remote_code
    )
    kwargs: dict[str, Any] = {
        "teacher": (teacher.eval().requires_grad_(False), tokenizer),
        # Examples rather than strings: their metadata (answers, fact tables) reaches the reward.
        "prompts": list(task.train[:num_prompts]),
        # The environment has no notion of training progress: a scheduled alpha enters at its start value.
        "alpha": agent.schedules["alpha"].at(0.0),
        "reward": resolve_reward(agent.reward),
        "max_new_tokens": agent.max_new_tokens,
        "beta_ext": agent.beta_ext,
        "teacher_temperature": agent.teacher_temp,
    }
    if mc.chat_template is not None:
        kwargs["chat_template"] = mc.chat_template
    return kwargs
