"""The training loop around ``agent.update()``: build everything from a config, evaluate, train, save."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_distill.config import Config
from rl_distill.evaluation import heldout_divergence
from rl_distill.logger import MetricsLogger
from rl_distill.models import (
    check_tokenizers_match,
    load_causal_lm,
    load_tokenizer,
    make_kept_layer_student,
    resolve_dtype,
    student_from_config,
)
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.tasks import Example, TaskData, load_task


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (the one place where a run is seeded)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_models(
    config: Config, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the teacher, build or load the student, and check that they share a tokenizer.

    Returns:
        ``(teacher, student, tokenizer)``.
    """
    mc = config.model
    tokenizer = load_tokenizer(mc.teacher, trust_remote_code=mc.trust_remote_code)
    if mc.student is not None:
        # Check tokenizers before loading the (possibly large) student weights.
        check_tokenizers_match(tokenizer, load_tokenizer(mc.student, trust_remote_code=mc.trust_remote_code))
    teacher = load_causal_lm(
        mc.teacher, dtype=mc.dtype, device=device, trust_remote_code=mc.trust_remote_code
    )
    if mc.student is not None:
        student = load_causal_lm(
            mc.student, dtype=mc.dtype, device=device, trust_remote_code=mc.trust_remote_code
        )
    elif mc.student_config is not None:
        cfg = {"vocab_size": teacher.config.vocab_size, **mc.student_config}
        student = student_from_config(cfg, seed=config.train.seed, dtype=resolve_dtype(mc.dtype)).to(device)
    else:
        layers = mc.student_layers
        student = make_kept_layer_student(
            teacher,
            num_layers=layers if isinstance(layers, int) else None,
            layers=layers if isinstance(layers, list) else None,
        )
    teacher.eval().requires_grad_(False)
    student.train()
    return teacher, student, tokenizer


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns.

    Attributes:
        before: held-out metrics before training.
        after: held-out metrics after training.
        steps: optimizer steps taken.
        seconds: wall time of the training loop (evaluation excluded).
        output_dir: where logs and the final model went.
    """

    before: dict[str, float]
    after: dict[str, float]
    steps: int
    seconds: float
    output_dir: Path


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
        from rl_distill.agents import AGENTS

        self.config = config
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        seed_everything(tc.seed)
        self.device = resolve_device(config.model.device)
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
        self.optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay
        )
        warmup = tc.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.generator = torch.Generator(device=self.device).manual_seed(tc.seed)
        self.batch_rng = random.Random(tc.seed)
        agent_cls, _ = AGENTS[config.agent_name]
        self.agent = agent_cls(
            self.engine,
            self.optimizer,
            config.agent,
            max_grad_norm=tc.max_grad_norm,
            generator=self.generator,
        )
        self.output_dir = Path(tc.output_dir)
        self.step = 0
        self._order: list[int] = []

    # --- data -----------------------------------------------------------------------------
    def next_batch(self) -> list[Example]:
        """The next ``batch_size`` training examples: shuffled epochs without replacement."""
        out = []
        while len(out) < self.config.train.batch_size:
            if not self._order:
                self._order = list(range(len(self.task.train)))
                self.batch_rng.shuffle(self._order)
            out.append(self.task.train[self._order.pop()])
        return out

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out divergences on the eval split, student sampling at the agent's temperature."""
        agent_cfg = self.config.agent
        sampling = SamplingConfig(
            max_new_tokens=getattr(agent_cfg, "max_new_tokens", 32),
            temperature=getattr(agent_cfg, "temperature", 1.0),
        )
        return heldout_divergence(
            self.engine,
            self.task.eval,
            sampling=sampling,
            batch_size=self.config.train.eval_batch_size,
            seed=self.config.train.eval_seed,
            beta=getattr(agent_cfg, "beta", 0.5),
        )

    # --- loop -----------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Evaluate, train for ``train.steps`` steps with a progress bar, evaluate, save."""
        tc = self.config.train
        logger = MetricsLogger(self.output_dir, tensorboard=tc.tensorboard)
        logger.log_hparams(self.config.to_dict())
        try:
            before = self.evaluate()
            logger.record_dict(before)
            logger.dump(self.step)
            bar = tqdm(
                total=tc.steps, desc="train", unit="step", disable=not sys.stderr.isatty(), dynamic_ncols=True
            )
            start = time.perf_counter()
            while self.step < tc.steps:
                stats = self.agent.update(self.next_batch())
                self.scheduler.step()
                self.step += 1
                stats["train/lr"] = self.scheduler.get_last_lr()[0]
                stats["time/tokens_per_s"] = stats.get("time/tokens", 0.0) / max(
                    stats.get("time/step", 1e-9), 1e-9
                )
                logger.record_dict(stats)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    logger.record_dict(self.evaluate())
                logger.dump(self.step)
                bar.set_postfix(
                    loss=f"{stats['train/loss']:.4f}",
                    tok_s=f"{stats['time/tokens_per_s']:.0f}",
                    refresh=False,
                )
                bar.update(1)
                if not sys.stderr.isatty() and (
                    self.step % max(1, tc.steps // 10) == 0 or self.step == tc.steps
                ):
                    elapsed = time.perf_counter() - start
                    eta = elapsed / self.step * (tc.steps - self.step)
                    print(
                        f"step {self.step}/{tc.steps}  loss {stats['train/loss']:.4f}  "
                        f"{stats['time/tokens_per_s']:.0f} tok/s  elapsed {elapsed:.0f}s  eta {eta:.0f}s",
                        file=sys.stderr,
                        flush=True,
                    )
            bar.close()
            seconds = time.perf_counter() - start
            after = self.evaluate()
            logger.record_dict(after)
            logger.dump(self.step)
            if tc.save_final:
                self.save_final()
        finally:
            logger.close()
        return TrainResult(
            before=before, after=after, steps=self.step, seconds=seconds, output_dir=self.output_dir
        )

    def save_final(self) -> Path:
        """Save the student with ``save_pretrained`` plus the tokenizer to ``output_dir/final``."""
        from rl_distill.checkpoint import atomic_directory

        target = self.output_dir / "final"
        with atomic_directory(target) as tmp:
            self.student.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        return target


def summarize(result: TrainResult) -> dict[str, Any]:
    """Before/after table of the held-out metrics."""
    return {k: {"before": result.before[k], "after": result.after.get(k)} for k in result.before}
