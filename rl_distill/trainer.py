"""The training loop around ``agent.update()``: evaluate, train, checkpoint, save.

One step: the next batch of prompts (this process's shard of the global batch), the training
progress for the agent's schedules (``agent.set_progress(step, train.steps)``), ``agent.update``,
the scheduler, then logging, periodic evaluation and checkpoints.

Batches come from a uniform shuffle (epochs without replacement), or, with ``train.curriculum``,
from a :class:`~rl_distill.curriculum.CurriculumSampler` at progress ``step / train.steps``; when the
agent measures per-example values (``agent.example_scores``, e.g. GKD's Eq. 2 divergence) and the
curriculum weighs measured difficulty, they are fed back with ``sampler.update``. The sampler's
state is part of the checkpoint (``trainer_state["curriculum"]``), so a resumed run draws the same
batches. Scheduled agent values follow from the step alone, so they resume exactly too. Every part of a run is built by
:func:`rl_distill.build.build_run`; checkpointing lives in :mod:`rl_distill.checkpoint`, evaluation
in :mod:`rl_distill.evaluation`, multi-process plumbing in :mod:`rl_distill.distributed`.

Runs never mix: a fresh run refuses an ``output_dir`` that holds another run's checkpoints or logs
(``train.overwrite`` moves them aside first), every run gets a run id (``run.json``) that its
checkpoints carry, and ``--resume`` checks the checkpoint's run id and configuration. Ctrl-C stops
after the current step and writes a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_distill import checkpoint as ckpt
from rl_distill.build import (
    Run,
    agent_tensors,
    build_eval_reward,
    build_models,
    build_run,
    copy_weights,
    load_agent_tensors,
    lr_factor,
    seed_everything,
)
from rl_distill.config import Config
from rl_distill.distributed import resolve_device
from rl_distill.evaluation import evaluate
from rl_distill.logger import MetricsLogger, Progress, truncate_jsonl
from rl_distill.models.lora import is_lora, save_final_lora
from rl_distill.precision import autocast
from rl_distill.tasks import Example, TaskData

__all__ = [
    "OutputDirInUseError",
    "TrainResult",
    "Trainer",
    "TrainingAborted",
    "TrainingInterrupted",
    "build_eval_reward",
    "build_models",
    "lr_factor",
    "resolve_device",
    "seed_everything",
]

#: Key prefix of the refreshed self-teacher's weights among a checkpoint's extra tensors.
TEACHER_PREFIX = "teacher/"
#: Files a run writes at the top of its ``output_dir`` (what makes a folder "hold a run").
RUN_FILES = ("run.json", "metrics.jsonl", "hparams.json", "samples.jsonl", "summary.json")
#: Fields that may change between a run and its resumption (budget, logging, bookkeeping).
RESUMABLE_CHANGES = frozenset(
    {
        "train.steps",
        "train.save_every",
        "train.keep_last",
        "train.eval_every",
        "train.threads",
        "train.tensorboard",
        "train.save_final",
        "train.output_dir",
        "train.overwrite",
        "train.allow_code_rewards",
        "train.max_consecutive_skips",
        # Memory only: the same updates (grad_accum_steps: up to float rounding).
        "train.gradient_checkpointing",
        "train.grad_accum_steps",
        # Speed and memory only: the same computation to float32 rounding (rl_distill/rollout/).
        "train.few_row_products",
        "train.teacher_prefix_cache",
        "train.sparse_embedding_grad",
        "train.dense_head_input",
        "train.packed_weights",
        "train.fused_decode_step",
        "train.eval_batch_size",
        "train.eval_seed",
        "model.device",
        # Evaluation does not change training: every eval.* field may change too.
        "eval.sampled",
        "eval.greedy",
        "eval.num_samples",
        "eval.max_new_tokens",
        "eval.reward",
    }
)


class TrainingAborted(RuntimeError):
    """Too many consecutive steps were skipped (non-finite loss or gradient); a checkpoint was written."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped training after a step; a checkpoint of that step was written."""


class OutputDirInUseError(ValueError):
    """A fresh run was pointed at an ``output_dir`` holding another run (or a resume at a different run)."""


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
    """Run the training loop over the parts :func:`~rl_distill.build.build_run` assembles from a config.

    Args:
        config: the validated run configuration.
        models: optional pre-built ``(teacher, student, tokenizer)`` (tests and notebooks).
        task: optional pre-built task data.

    Attributes:
        run: the assembled parts; ``config``, ``dist``, ``device``, ``task``, ``engine``, ``student``,
            ``tokenizer``, ``optimizer``, ``generator``, ``agent``, ``scheduler`` and ``eval_reward``
            are shortcuts to them.
    """

    def __init__(
        self,
        config: Config,
        *,
        models: tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase] | None = None,
        task: TaskData | None = None,
    ) -> None:
        self.run: Run = build_run(config, models=models, task=task)
        run = self.run
        assert run.agent is not None and run.optimizer is not None and run.scheduler is not None
        self.config, self.dist, self.device = config, run.dist, run.dist.device
        self.task, self.engine, self.student, self.tokenizer = (
            run.task,
            run.engine,
            run.student,
            run.tokenizer,
        )
        self.optimizer, self.generator, self.agent, self.scheduler = (
            run.optimizer,
            run.generator,
            run.agent,
            run.scheduler,
        )
        self.eval_reward = run.eval_reward
        self.batch_rng = random.Random(config.train.seed)
        self.output_dir = Path(config.train.output_dir).expanduser()
        self.step = 0
        self.before: dict[str, float] | None = None
        self.consecutive_skips = 0
        self.run_id: str | None = None
        self._order: list[int] = []
        self._indices: list[int] = []  # the global batch's example indices (curriculum)
        self.curriculum = run.curriculum
        self._sigint = threading.Event()

    @property
    def max_new_tokens(self) -> int:
        """The agent's completion budget."""
        return self.run.max_new_tokens

    @property
    def eval_max_new_tokens(self) -> int:
        """The completion budget at evaluation."""
        return self.run.eval_max_new_tokens

    # --- data -----------------------------------------------------------------------------
    def next_batch(self) -> list[Example]:
        """This process's shard of the next global batch (shuffled epochs without replacement).

        Every process draws the same ``batch_size * world_size`` examples from one shared order and
        keeps its contiguous slice, so N processes see exactly the examples one process would see
        with an N times larger batch.
        """
        bs, world = self.config.train.batch_size, self.dist.world_size
        if self.curriculum is not None:
            self._indices = self.curriculum.next_indices(self.step, self.config.train.steps, bs * world)
            mine = self._indices[self.dist.rank * bs : (self.dist.rank + 1) * bs]
            return [self.task.train[i] for i in mine]
        batch = []
        while len(batch) < bs * world:
            if not self._order:
                self._order = list(range(len(self.task.train)))
                self.batch_rng.shuffle(self._order)
            batch.append(self.task.train[self._order.pop()])
        return batch[self.dist.rank * bs : (self.dist.rank + 1) * bs]

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self, *, write: bool = True) -> dict[str, float]:
        """Held-out metrics (:func:`rl_distill.evaluation.evaluate`), gathered over processes.

        Args:
            write: append sample completions to ``output_dir/samples.jsonl`` (main process).
        """
        return evaluate(
            self.engine,
            self.task.eval,
            self.config,
            self.dist,
            reward=self.eval_reward,
            step=self.step,
            samples_path=self.output_dir / "samples.jsonl" if write else None,
        )

    # --- loop -----------------------------------------------------------------------------
    def train(self, *, resume: bool = False) -> TrainResult:
        """Evaluate, train until ``train.steps`` with a progress bar, evaluate, save the final student.

        Args:
            resume: continue from the newest usable checkpoint in ``output_dir/checkpoints`` (a
                damaged one is reported and the previous one used; a fresh start when there is none).

        Raises:
            OutputDirInUseError: a fresh run into a folder holding another run (without
                ``train.overwrite``), or a checkpoint of another run or configuration.
            TrainingAborted: ``train.max_consecutive_skips`` steps in a row were skipped.
            TrainingInterrupted: Ctrl-C; the step it stopped after was checkpointed.
        """
        tc = self.config.train
        resumed_from = self.resume_latest() if resume else None
        if resumed_from is None:
            self._claim_output_dir(fresh_after_resume=resume)
        logger = self._open_logger(resume=resume, resumed=resumed_from is not None)
        try:
            if self.before is None:
                self.before = self.evaluate()
                logger.record_dict(self.before)
                logger.dump(self.step)
            progress = Progress(tc.steps, initial=self.step, enabled=self.dist.is_main)
            with self._stop_on_sigint():
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
        """One ``agent.update`` on the next batch, then the scheduler; returns the step's metrics.

        ``train/skipped`` (from the agent) is 1 when the optimizer did not step: a non-finite loss or
        gradient (``train/skipped_steps``, guarded by ``train.max_consecutive_skips``) or nothing left
        to train on after rejection (``train/empty_steps``, not an error). The learning-rate schedule
        advances only with the optimizer; the agent's value schedules follow the step.
        """
        skipped_before, empty_before = self.agent.skipped_steps, self.agent.empty_steps
        self._refresh_teacher()
        batch = self.next_batch()
        self.agent.set_progress(self.step, self.config.train.steps)
        with autocast(self.config.train.precision, self.device):  # train.precision; backward runs outside
            update_stats = self.agent.update(batch)
        stats = self.dist.reduce_stats(update_stats)
        self._feed_curriculum()
        skipped = self.agent.skipped_steps > skipped_before
        if not skipped and self.agent.empty_steps == empty_before:  # the LR follows the optimizer steps
            self.scheduler.step()
        self.step += 1
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        stats.update(self.agent.schedule_metrics())
        stats["train/lr"] = self.scheduler.get_last_lr()[0]
        stats["train/skipped_steps"] = float(self.agent.skipped_steps)
        if self.agent.sample_filter is not None:
            stats["train/empty_steps"] = float(self.agent.empty_steps)
        stats["time/tokens_per_s"] = stats.get("time/tokens", 0.0) / max(stats.get("time/step", 1e-9), 1e-9)
        return stats

    def _refresh_teacher(self) -> None:
        """``model.teacher_refresh_every = N`` (``teacher: self``): the teacher re-copies the student.

        Before steps N, 2N, ... the teacher becomes a frozen copy of the student as it is then.
        """
        every = self.config.model.teacher_refresh_every
        if every and self.step > 0 and self.step % every == 0:
            copy_weights(self.student, self.run.teacher)

    def _teacher_tensors(self) -> dict[str, Any]:
        """The refreshed teacher's weights for a checkpoint (``teacher/<name>``); empty when it never changes."""
        if not self.config.model.teacher_refresh_every:
            return {}
        return {f"{TEACHER_PREFIX}{k}": v.clone() for k, v in self.run.teacher.state_dict().items()}

    def _feed_curriculum(self) -> None:
        """Give the curriculum the agent's per-example measurements of the last batch (every process's)."""
        sampler, scores = self.curriculum, self.agent.example_scores
        if sampler is None or scores is None or sampler.config.measured_weight == 0:
            return
        values = [v for part in self.dist.gather(list(scores)) for v in part]  # rank order = index order
        pairs = [(i, v) for i, v in zip(self._indices, values) if math.isfinite(v)]
        if pairs:
            sampler.update([i for i, _ in pairs], [v for _, v in pairs])

    def _after_step(self, stats: dict[str, float]) -> None:
        """Periodic checkpoint; stop (after a checkpoint) on Ctrl-C or too many skipped steps in a row."""
        tc = self.config.train
        if self._interrupt_requested():
            path = self.save_checkpoint()
            raise TrainingInterrupted(
                f"interrupted (Ctrl-C) after step {self.step}; checkpoint written to {path}; "
                "continue with --resume"
            )
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

    @contextlib.contextmanager
    def _stop_on_sigint(self) -> Iterator[None]:
        """While training: the first Ctrl-C asks the loop to stop after the current step (and checkpoint).

        A second Ctrl-C interrupts at once (the newest checkpoint on disk stays intact: saves are
        atomic). Only the main thread can install signal handlers; elsewhere this does nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._sigint.is_set():
                raise KeyboardInterrupt
            self._sigint.set()
            if self.dist.is_main:
                print(
                    "\nrl-distill: Ctrl-C: stopping after this step and writing a checkpoint "
                    "(press Ctrl-C again to stop at once)",
                    flush=True,
                )

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _interrupt_requested(self) -> bool:
        """Whether any process got Ctrl-C (all processes must agree to stop at the same step)."""
        flag = 1.0 if self._sigint.is_set() else 0.0
        if self.dist.enabled:
            flag = self.dist.reduce_stats({"interrupt": flag})["interrupt"]
        return flag > 0

    def _open_logger(self, *, resume: bool, resumed: bool) -> MetricsLogger:
        """JSONL + TensorBoard on the main process (in-memory elsewhere); hyper-parameters once.

        A resumed run drops what the interrupted run logged after the checkpoint (a ``--resume``
        that found no checkpoint starts over and drops everything).
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

    # --- one run per output_dir -------------------------------------------------------------
    def existing_run(self) -> list[str]:
        """What of another run ``output_dir`` holds (run files, checkpoints, final model); empty if none."""
        found = [name for name in RUN_FILES if (self.output_dir / name).is_file()]
        steps = ckpt.step_dirs(self.checkpoint_root)
        if steps:
            found.append(f"{len(steps)} checkpoint(s) up to step {steps[-1][0]}")
        if (self.output_dir / "final").is_dir():
            found.append("final/")
        return found

    def _claim_output_dir(self, *, fresh_after_resume: bool = False) -> None:
        """Make ``output_dir`` this run's: refuse another run's folder, or move it aside (``train.overwrite``).

        Then write ``run.json`` (a new run id and the config hash) on the main process.
        """
        found = self.existing_run()
        # Every process looks before the main process writes run.json below: without this barrier a
        # slower process could find this run's own run.json and refuse it as "another run".
        self.dist.barrier()
        if fresh_after_resume:  # nothing to resume: an unfinished attempt may be replaced, a finished run not
            found = [f for f in found if f == "final/"]
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise OutputDirInUseError(f"train.output_dir {str(self.output_dir)!r} is a file, not a folder")
        if found:
            aside = self.output_dir.with_name(f"{self.output_dir.name}-old-{time.strftime('%Y%m%d-%H%M%S')}")
            if not self.config.train.overwrite:
                raise OutputDirInUseError(
                    f"train.output_dir {str(self.output_dir)!r} already holds a run ({', '.join(found)}); "
                    "continue it with --resume, choose another train.output_dir, or pass --overwrite "
                    f"(train.overwrite: true) to move it aside to {str(aside)!r}"
                )
            if self.dist.is_main:
                moved = ckpt.move_run_aside(self.output_dir, aside, [*RUN_FILES, "checkpoints", "final"])
                print(f"rl-distill: moved the previous run in {self.output_dir} aside to {moved}", flush=True)
            self.dist.barrier()
        self.run_id = uuid.uuid4().hex
        if self.dist.is_main:
            self._write_run_file()
        self.dist.barrier()

    def _write_run_file(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "run_id": self.run_id,
            "config_hash": ckpt.config_hash(self.config.to_dict(), RESUMABLE_CHANGES),
        }
        ckpt.atomic_write_text(self.output_dir / "run.json", json.dumps(record, indent=2) + "\n")

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        """``output_dir/checkpoints``."""
        return ckpt.checkpoint_root(self.output_dir)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (main process; every process contributes its RNG)."""
        rng = self.dist.gather(ckpt.capture_rng(self.generator))
        target = self.checkpoint_root / f"step-{self.step}"
        full = self.dist.full_state(self.student, self.optimizer)  # FSDP: gathered (collective); else None
        if self.dist.is_main:
            state = {
                "scheduler": self.scheduler.state_dict(),
                "rng": rng,
                "batch_rng": self.batch_rng.getstate(),
                "order": list(self._order),
                "skipped_steps": self.agent.skipped_steps,
                "empty_steps": self.agent.empty_steps,
                "consecutive_skips": self.consecutive_skips,
                "before": self.before,
            }
            if self.curriculum is not None:
                state["curriculum"] = self.curriculum.state_dict()
            if self.agent.grad_scaler is not None:  # train.precision: fp16
                state["grad_scaler"] = self.agent.grad_scaler.state_dict()
            config = self.config.to_dict()
            ckpt.save_checkpoint(
                self.checkpoint_root,
                self.step,
                student=self.student,
                extra={**agent_tensors(self.agent), **self._teacher_tensors()},
                optimizer=self.optimizer,
                trainer_state=state,
                config=config,
                keep_last=self.config.train.keep_last,
                run_id=self.run_id,
                config_hash=ckpt.config_hash(config, RESUMABLE_CHANGES),
                student_state=full[0] if full is not None else None,
                optimizer_state=full[1] if full is not None else None,
            )
        self.dist.barrier()
        return target

    def resume_latest(self) -> Path | None:
        """Load the newest usable checkpoint, if any (see :func:`rl_distill.checkpoint.find_resumable`).

        A damaged checkpoint is reported (naming the file) and the previous one is used; with no
        checkpoint at all the run starts fresh, and says so.

        Raises:
            CheckpointError: checkpoints exist but none is usable.
            OutputDirInUseError: the checkpoint belongs to another run or another configuration.
        """
        if self.dist.is_main:
            ckpt.remove_stale_temporaries(self.checkpoint_root)
        self.dist.barrier()
        path, damaged = ckpt.find_resumable(self.checkpoint_root)
        if self.dist.is_main:
            for bad, problem in damaged:
                print(
                    f"rl-distill: warning: checkpoint {bad} is damaged ({problem}); skipping it", flush=True
                )
            if path is None:
                print(
                    f"rl-distill: --resume: no checkpoint in {self.checkpoint_root}; starting fresh",
                    flush=True,
                )
        if path is None:
            return None
        self._check_same_run(path)
        self.load_checkpoint(path)
        return path

    def _check_same_run(self, path: Path) -> None:
        """Refuse a checkpoint of another run or of a configuration that differs in more than the budget."""
        meta = ckpt.read_meta(path)
        run_file = self.output_dir / "run.json"
        owner = json.loads(run_file.read_text(encoding="utf-8")).get("run_id") if run_file.is_file() else None
        ckpt_run = meta.get("run_id")
        if owner and ckpt_run and owner != ckpt_run:
            raise OutputDirInUseError(
                f"checkpoint {path} belongs to run {ckpt_run}, but {run_file} is run {owner}: the folder mixes "
                "two runs; move one of them elsewhere"
            )
        changed = ckpt.config_differences(ckpt.read_config(path), self.config.to_dict())
        blocking = {k: v for k, v in changed.items() if k not in RESUMABLE_CHANGES}
        if blocking:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(blocking.items()))
            raise OutputDirInUseError(
                f"checkpoint {path} was written with another configuration ({listed}); resume with the "
                "same settings (only the budget and logging fields may change), or start a new run in "
                "another train.output_dir"
            )
        if self.dist.is_main and changed:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            print(f"rl-distill: resuming with changed settings: {listed}", flush=True)
        self.run_id = ckpt_run or owner or uuid.uuid4().hex
        if self.dist.is_main and owner is None:
            self._write_run_file()

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, RNG states, data position and counters from ``path``."""
        load_states = (  # FSDP: every process reads the full state and keeps its shard
            partial(self.dist.load_full_state, self.student, self.optimizer) if self.dist.sharded else None
        )
        state = ckpt.load_checkpoint(
            path, student=self.student, optimizer=self.optimizer, load_states=load_states
        )
        extra = state["extra"]
        teacher = {k[len(TEACHER_PREFIX) :]: v for k, v in extra.items() if k.startswith(TEACHER_PREFIX)}
        if teacher:  # a refreshed self-teacher (model.teacher_refresh_every)
            self.run.teacher.load_state_dict(teacher)
        load_agent_tensors(self.agent, {k: v for k, v in extra.items() if not k.startswith(TEACHER_PREFIX)})
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        # The same process count resumes exactly; another count reuses rank 0's streams per rank.
        ckpt.restore_rng(
            rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0], self.generator
        )
        self.batch_rng.setstate(ckpt.tuplify(state["batch_rng"]))
        self._order = list(state["order"])
        self.agent.skipped_steps = int(state["skipped_steps"])
        self.agent.empty_steps = int(state.get("empty_steps", 0))
        if self.curriculum is not None:
            self.curriculum.load_state_dict(state["curriculum"])
        if self.agent.grad_scaler is not None and "grad_scaler" in state:
            self.agent.grad_scaler.load_state_dict(state["grad_scaler"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.before = state["before"]
        self.step = int(state["step"])

    def save_final(self) -> Path:
        """Save the student with ``save_pretrained`` plus the tokenizer and run config to ``output_dir/final``.

        A LoRA student (``model.lora``) saves its adapter there (``PeftModel.from_pretrained``), and with
        ``model.lora.merge_on_save`` the merged model to ``final/merged`` (plain ``from_pretrained``).
        """
        import yaml

        target = self.output_dir / "final"
        full = self.dist.full_state(self.student)  # FSDP: the gathered weights (collective); else None
        if self.dist.is_main:
            with ckpt.atomic_directory(target) as tmp:
                if is_lora(self.student):
                    spec = self.config.model.lora_spec
                    folders = save_final_lora(
                        self.student, tmp, merge=spec is not None and spec.merge_on_save
                    )
                else:
                    state = {"state_dict": full[0]} if full is not None else {}
                    self.student.save_pretrained(tmp, safe_serialization=True, **state)
                    folders = [tmp]
                for folder in folders:
                    self.tokenizer.save_pretrained(folder)
                    (folder / ckpt.FINAL_CONFIG).write_text(
                        yaml.safe_dump(self.config.to_dict(), sort_keys=False)
                    )
        self.dist.barrier()
        return target


def summarize(result: TrainResult) -> dict[str, Any]:
    """Before/after table of the held-out metrics."""
    return {k: {"before": result.before[k], "after": result.after.get(k)} for k in result.before}
