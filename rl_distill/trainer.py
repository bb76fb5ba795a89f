"""The training loop around ``agent.update()``: build everything from a config, evaluate, train, save.

One step: the next batch of prompts (this process's shard of the global batch), ``agent.update``,
the scheduler, then logging, periodic evaluation and checkpoints. Building the parts lives in
:mod:`rl_distill.build`, checkpointing in :mod:`rl_distill.checkpoint`, evaluation in
:mod:`rl_distill.evaluation`, multi-process plumbing in :mod:`rl_distill.distributed`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_distill import checkpoint as ckpt
from rl_distill.build import (
    agent_tensors,
    build_eval_reward,
    build_models,
    check_prompts_fit,
    load_agent_tensors,
    seed_everything,
)
from rl_distill.config import Config
from rl_distill.distributed import Distributed, resolve_device
from rl_distill.evaluation import evaluation_rows, summarize_rows, write_samples
from rl_distill.logger import MetricsLogger, Progress, truncate_jsonl
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.tasks import Example, TaskData, load_task

__all__ = [
    "TrainResult",
    "Trainer",
    "TrainingAborted",
    "build_eval_reward",
    "build_models",
    "resolve_device",
    "seed_everything",
]


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


class TrainingAborted(RuntimeError):
    """Too many consecutive steps were skipped (non-finite loss or gradient); a checkpoint was written."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns.

    Attributes:
        before: held-out metrics before training.
        after: held-out metrics after training.
        steps: optimizer steps taken (in total, counting those before a resume).
        seconds: wall time of the training loop of this invocation (evaluation excluded).
        output_dir: where logs and the final model went.
        resumed_from: the checkpoint this invocation resumed from, if any.
    """

    before: dict[str, float]
    after: dict[str, float]
    steps: int
    seconds: float
    output_dir: Path
    resumed_from: Path | None = None


class Trainer:
    """Build models, task, engine and agent from a :class:`Config`; run the loop.

    Args:
        config: the validated run configuration.
        models: optional pre-built ``(teacher, student, tokenizer)`` (tests and notebooks).
        task: optional pre-built task data.
    """

    def __init__(
        self,
        config: Config,
        *,
        models: tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase] | None = None,
        task: TaskData | None = None,
    ) -> None:
        self.config = config
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.dist = Distributed.setup(config.model.device)
        seed_everything(tc.seed)  # the same in every process: identical initial students
        self.device = self.dist.device
        self.task = task or load_task(
            config.data.task,
            seed=config.data.seed,
            num_train=config.data.num_train,
            num_eval=config.data.num_eval,
            **config.data.options,
        )
        teacher, student, tokenizer = models or build_models(config, self.device)
        self.engine = RolloutEngine(student, teacher, tokenizer, chat_template=config.model.chat_template)
        self.student, self.tokenizer = student, tokenizer
        check_prompts_fit(self.engine, self.task, max(self.max_new_tokens, self.eval_max_new_tokens))
        self.eval_reward = build_eval_reward(config)
        # fused=True: one kernel for all parameters (measured 1.97 -> 1.84 s per GKD step on CPU,
        # docs/results/performance.md); supported on CPU and CUDA for floating-point parameters.
        self.optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad],
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            fused=True,
        )
        # Each process samples its own stream; batches are drawn from one shared order.
        self.generator = torch.Generator(device=self.device).manual_seed(tc.seed + self.dist.rank)
        self.batch_rng = random.Random(tc.seed)
        self.agent = self._build_agent()
        # After the agent: its own param group (value head) must follow the schedule too.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            partial(lr_factor, warmup=tc.warmup_steps, total=tc.steps, schedule=tc.lr_schedule),
        )
        if self.dist.enabled:  # wrap after the agent is built: it may read the plain model's config
            self.engine.student = self.agent.student = self.dist.wrap_student(student)
        self.output_dir = Path(tc.output_dir)
        self.step = 0
        self.before: dict[str, float] | None = None
        self.consecutive_skips = 0
        self._order: list[int] = []

    # --- set-up helpers -------------------------------------------------------------------
    @property
    def max_new_tokens(self) -> int:
        """The agent's completion budget."""
        return getattr(self.config.agent, "max_new_tokens", 32)

    @property
    def eval_max_new_tokens(self) -> int:
        """The completion budget at evaluation."""
        return self.config.eval.max_new_tokens or self.max_new_tokens

    def _build_agent(self) -> Any:
        """The configured agent, with its own parameters (``extra_parameters()``) in the optimizer.

        Agents add their value heads to the optimizer themselves; a group is added here for any
        parameter an agent lists but did not register.
        """
        from rl_distill.agents import AGENTS

        agent_cls, _ = AGENTS[self.config.agent_name]
        agent = agent_cls(
            self.engine,
            self.optimizer,
            self.config.agent,
            max_grad_norm=self.config.train.max_grad_norm,
            generator=self.generator,
            **({"accelerator": self.dist.accelerator} if self.dist.enabled else {}),
        )
        extra = list(getattr(agent, "extra_parameters", lambda: [])())
        known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [p for p in extra if p.requires_grad and id(p) not in known]
        if missing:
            self.optimizer.add_param_group({"params": missing})
        return agent

    # --- data -----------------------------------------------------------------------------
    def next_batch(self) -> list[Example]:
        """This process's shard of the next global batch (shuffled epochs without replacement).

        Every process draws the same ``batch_size * world_size`` examples from one shared order and
        keeps its contiguous slice, so N processes see exactly the examples one process would see
        with an N times larger batch.
        """
        bs, world = self.config.train.batch_size, self.dist.world_size
        batch = []
        while len(batch) < bs * world:
            if not self._order:
                self._order = list(range(len(self.task.train)))
                self.batch_rng.shuffle(self._order)
            batch.append(self.task.train[self._order.pop()])
        return batch[self.dist.rank * bs : (self.dist.rank + 1) * bs]

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self, *, write: bool = True) -> dict[str, float]:
        """Held-out metrics (sampled and/or greedy decoding), gathered over processes.

        Args:
            write: append sample completions to ``output_dir/samples.jsonl`` (main process).
        """
        ec, tc = self.config.eval, self.config.train
        temperature = getattr(self.config.agent, "temperature", 1.0)
        decodings = [("sampled", "eval/", temperature)] if ec.sampled else []
        decodings += [("greedy", "eval/greedy/", 0.0)] if ec.greedy else []
        n, world, rank = len(self.task.eval), self.dist.world_size, self.dist.rank
        chunk = -(-n // world)
        shard = self.task.eval[rank * chunk : (rank + 1) * chunk]
        metrics: dict[str, float] = {}
        for decoding, prefix, temp in decodings:
            rows = evaluation_rows(
                self.engine,
                shard,
                sampling=SamplingConfig(max_new_tokens=self.eval_max_new_tokens, temperature=temp),
                batch_size=tc.eval_batch_size,
                seed=tc.eval_seed + rank,
                beta=getattr(self.config.agent, "beta", 0.5),
                reward=self.eval_reward,
                first_index=rank * chunk,
            )
            rows = self.dist.gather_rows(rows)
            name = self.eval_reward.name if self.eval_reward is not None else None
            metrics.update(summarize_rows(rows, prefix=prefix, reward_name=name))
            if write and self.dist.is_main:
                path = self.output_dir / "samples.jsonl"
                write_samples(path, rows, step=self.step, decoding=decoding, limit=ec.num_samples)
        return metrics

    # --- loop -----------------------------------------------------------------------------
    def train(self, *, resume: bool = False) -> TrainResult:
        """Evaluate, train until ``train.steps`` with a progress bar, evaluate, save the final student.

        Args:
            resume: continue from the newest complete checkpoint in ``output_dir/checkpoints``
                (a fresh start when there is none).

        Raises:
            TrainingAborted: ``train.max_consecutive_skips`` steps in a row were skipped.
        """
        tc = self.config.train
        resumed_from = self.resume_latest() if resume else None
        logger = self._open_logger(resume=resume, resumed=resumed_from is not None)
        try:
            if self.before is None:
                self.before = self.evaluate()
                logger.record_dict(self.before)
                logger.dump(self.step)
            progress = Progress(tc.steps, initial=self.step, enabled=self.dist.is_main)
            while self.step < tc.steps:
                stats = self.train_step()
                logger.record_dict(stats)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    logger.record_dict(self.evaluate())
                logger.dump(self.step)
                self._after_step(stats)
                progress.update(self.step, stats["train/loss"], stats["time/tokens_per_s"])
            progress.close()
            seconds = progress.elapsed
            after = self.evaluate()
            logger.record_dict(after)
            logger.dump(self.step)
            if tc.save_final:
                self.save_final()
        finally:
            logger.close()
        return TrainResult(
            before=self.before,
            after=after,
            steps=self.step,
            seconds=seconds,
            output_dir=self.output_dir,
            resumed_from=resumed_from,
        )

    def train_step(self) -> dict[str, float]:
        """One ``agent.update`` on the next batch, then the scheduler; returns the step's metrics."""
        skipped_before = self.agent.skipped_steps
        stats = self.dist.reduce_stats(self.agent.update(self.next_batch()))
        skipped = self.agent.skipped_steps > skipped_before
        if not skipped:  # the schedule follows the updates that happened
            self.scheduler.step()
        self.step += 1
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        stats["train/lr"] = self.scheduler.get_last_lr()[0]
        stats["train/skipped_steps"] = float(self.agent.skipped_steps)
        stats["time/tokens_per_s"] = stats.get("time/tokens", 0.0) / max(stats.get("time/step", 1e-9), 1e-9)
        return stats

    def _after_step(self, stats: dict[str, float]) -> None:
        """Periodic checkpoint; abort (after a checkpoint) on too many skipped steps in a row."""
        tc = self.config.train
        limit = tc.max_consecutive_skips
        if self.consecutive_skips >= limit:
            path = self.save_checkpoint()
            raise TrainingAborted(
                f"{limit} consecutive steps (up to step {self.step}) were skipped because the loss or the "
                f"gradient was not finite (last loss {stats.get('train/loss')}, grad norm "
                f"{stats.get('train/grad_norm')}); checkpoint written to {path}. Lower train.lr, check the "
                "reward and the data, or raise train.max_consecutive_skips"
            )
        if tc.save_every and self.step % tc.save_every == 0:
            self.save_checkpoint()

    def _open_logger(self, *, resume: bool, resumed: bool) -> MetricsLogger:
        """JSONL + TensorBoard on the main process (in-memory elsewhere); hyper-parameters once.

        A resumed run drops what the interrupted run logged after the checkpoint (a ``--resume``
        that found no checkpoint starts over and drops everything); a plain run appends.
        """
        if not self.dist.is_main:
            return MetricsLogger(None)
        keep_until = self.step if resumed else (-1 if resume else None)
        if keep_until is not None:
            truncate_jsonl(self.output_dir / "samples.jsonl", keep_until)
        logger = MetricsLogger(
            self.output_dir, tensorboard=self.config.train.tensorboard, resume_step=keep_until
        )
        if not resumed:
            logger.log_hparams(self.config.to_dict())
        return logger

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        """``output_dir/checkpoints``."""
        return ckpt.checkpoint_root(self.output_dir)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (main process; every process contributes its RNG)."""
        rng = self.dist.gather(ckpt.capture_rng(self.generator))
        target = self.checkpoint_root / f"step-{self.step}"
        if self.dist.is_main:
            state = {
                "scheduler": self.scheduler.state_dict(),
                "rng": rng,
                "batch_rng": self.batch_rng.getstate(),
                "order": list(self._order),
                "skipped_steps": self.agent.skipped_steps,
                "consecutive_skips": self.consecutive_skips,
                "before": self.before,
            }
            ckpt.save_checkpoint(
                self.checkpoint_root,
                self.step,
                student=self.student,
                extra=agent_tensors(self.agent),
                optimizer=self.optimizer,
                trainer_state=state,
                config=self.config.to_dict(),
                keep_last=self.config.train.keep_last,
            )
        self.dist.barrier()
        return target

    def resume_latest(self) -> Path | None:
        """Load the newest complete checkpoint (after removing leftovers of a killed save), if any."""
        if self.dist.is_main:
            ckpt.remove_stale_temporaries(self.checkpoint_root)
        self.dist.barrier()
        path = ckpt.latest_checkpoint(self.checkpoint_root)
        if path is not None:
            self.load_checkpoint(path)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, RNG states, data position and counters from ``path``."""
        state = ckpt.load_checkpoint(path, student=self.student, optimizer=self.optimizer)
        load_agent_tensors(self.agent, state["extra"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        # The same process count resumes exactly; another count reuses rank 0's streams per rank.
        ckpt.restore_rng(
            rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0], self.generator
        )
        self.batch_rng.setstate(ckpt.tuplify(state["batch_rng"]))
        self._order = list(state["order"])
        self.agent.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.before = state["before"]
        self.step = int(state["step"])

    def save_final(self) -> Path:
        """Save the student with ``save_pretrained`` plus the tokenizer and run config to ``output_dir/final``."""
        import yaml

        target = self.output_dir / "final"
        if self.dist.is_main:
            with ckpt.atomic_directory(target) as tmp:
                self.student.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                (tmp / ckpt.FINAL_CONFIG).write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        self.dist.barrier()
        return target


def summarize(result: TrainResult) -> dict[str, Any]:
    """Before/after table of the held-out metrics."""
    return {k: {"before": result.before[k], "after": result.after.get(k)} for k in result.before}
