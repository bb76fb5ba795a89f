"""Held-out evaluation: divergence of the student to the teacher on the student's own completions.

Without a teacher (``model.teacher: null``: SPIN, verifier-only GRPO) the rows carry the completion
length and the reward only: no divergence and no teacher log-prob, and nothing scores with a teacher.
With a privileged teacher prompt (``agent.teacher_template``) the divergences are to the teacher
reading its own prompt (the run's training target).

For each held-out prompt the student writes a completion (sampled at a fixed seed, or greedy), the
teacher scores it, and we record the paper-Eq.-2 token-level divergences on that sequence, its
length, the teacher's mean log-prob of its tokens and, when a reward is configured, the reward
(``exact_match`` gives verifier accuracy, ``factual_consistency`` factuality). Per-example rows are
the unit: the trainer gathers them across processes, averages them with :func:`summarize_rows` and
writes some to ``samples.jsonl`` with :func:`write_samples`. :func:`evaluate` does all of it for a
run's configuration (the trainer's periodic evaluation and ``rl-distill eval`` both call it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rl_distill.divergences import forward_kl, generalized_jsd, reverse_kl
from rl_distill.rewards.registry import score_examples
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.tasks import Example

if TYPE_CHECKING:
    from rl_distill.config import Config
    from rl_distill.distributed import Distributed

#: Per-example metrics, in the order they are reported.
METRICS = ("jsd", "forward_kl", "reverse_kl", "completion_length", "teacher_logprob")
#: The metrics that need a teacher (absent from the rows of a run without one).
TEACHER_METRICS = ("jsd", "forward_kl", "reverse_kl", "teacher_logprob")


def metric_name(reward_name: str) -> str:
    """A reward's name as a metric key suffix: ``fixtures:my_reward`` -> ``fixtures_my_reward``."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", reward_name).strip("_") or "reward"


@torch.no_grad()
def evaluation_rows(
    engine: RolloutEngine,
    examples: Sequence[Example],
    *,
    sampling: SamplingConfig,
    batch_size: int = 8,
    seed: int = 1234,
    beta: float = 0.5,
    reward: Callable[..., list[float]] | None = None,
    first_index: int = 0,
) -> list[dict[str, Any]]:
    """One row per example: prompt, completion, reference, divergences, length, teacher log-prob, reward.

    Completions come from the student with a generator seeded with ``seed`` (two evaluations of the
    same student see the same random stream); ``sampling.temperature == 0`` is greedy decoding, and
    the divergences are then taken at temperature 1.

    Args:
        engine: rollout engine.
        examples: held-out examples.
        sampling: how the student decodes.
        batch_size: prompts per batch.
        seed: seed of the evaluation sampler.
        beta: beta of the reported JSD.
        reward: optional reward, called through :func:`~rl_distill.rewards.registry.score_examples`.
        first_index: index of ``examples[0]`` in the whole eval split (rows carry ``index``).

    Returns:
        Rows with keys ``index``, ``prompt``, ``reference``, ``completion``, the :data:`METRICS`
        (without the :data:`TEACHER_METRICS` when the engine has no teacher) and ``reward`` (None
        without a reward).
    """
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    temp = sampling.temperature if sampling.temperature > 0 else 1.0
    rows: list[dict[str, Any]] = []
    student = engine.student
    was_training = student.training
    student.eval()  # no dropout (e.g. LoRA dropout) in held-out metrics
    try:
        _evaluation_batches(
            engine, examples, rows, sampling, batch_size, generator, temp, beta, reward, first_index
        )
    finally:
        student.train(was_training)
    return rows


def _evaluation_batches(
    engine: RolloutEngine,
    examples: Sequence[Example],
    rows: list[dict[str, Any]],
    sampling: SamplingConfig,
    batch_size: int,
    generator: torch.Generator,
    temp: float,
    beta: float,
    reward: Callable[..., list[float]] | None,
    first_index: int,
) -> None:
    """Append one row per example to ``rows`` (the body of :func:`evaluation_rows`)."""
    for lo in range(0, len(examples), batch_size):
        batch = list(examples[lo : lo + batch_size])
        prompts = [ex.prompt for ex in batch]
        if not engine.has_teacher:  # no teacher: nothing to score or compare with
            r = engine.generate(prompts, sampling, generator=generator)
            per_seq = {"completion_length": r.lengths.float()}
        else:
            r = engine.rollout(prompts, sampling, teacher_output="full", generator=generator)
            # (B, T, V), (B, T, V), (B, T)
            t, s, m = r.teacher_logits, engine.score_student(r), r.completion_mask
            per_seq = {
                "jsd": generalized_jsd(t, s, m, beta=beta, temperature=temp, reduction="sequence"),
                "forward_kl": forward_kl(t, s, m, temperature=temp, reduction="sequence"),
                "reverse_kl": reverse_kl(t, s, m, temperature=temp, reduction="sequence"),
                "completion_length": r.lengths.float(),
                "teacher_logprob": r.teacher_logprobs.sum(-1) / r.lengths.clamp(min=1),
            }  # each (B,)
        completions = engine.decode(r)
        rewards = score_examples(reward, batch, completions) if reward is not None else None
        for i, ex in enumerate(batch):
            row: dict[str, Any] = {
                "index": first_index + lo + i,
                "prompt": ex.prompt,
                "reference": ex.reference,
                "completion": completions[i],
            }
            row.update({k: float(v[i]) for k, v in per_seq.items()})
            row["reward"] = rewards[i] if rewards is not None else None
            rows.append(row)


def summarize_rows(
    rows: Sequence[dict[str, Any]], *, prefix: str = "eval/", reward_name: str | None = None
) -> dict[str, float]:
    """Means over examples: ``<prefix>jsd`` ... and ``<prefix><reward name>`` when rows carry rewards.

    Only the :data:`METRICS` every row has (rows of a run without a teacher have no divergences).

    Raises:
        ValueError: no rows.
    """
    if not rows:
        raise ValueError("held-out evaluation needs at least one example")
    n = len(rows)
    out = {f"{prefix}{k}": sum(row[k] for row in rows) / n for k in METRICS if all(k in row for row in rows)}
    if reward_name is not None and all(row.get("reward") is not None for row in rows):
        out[f"{prefix}{metric_name(reward_name)}"] = sum(row["reward"] for row in rows) / n
    return out


def heldout_divergence(
    engine: RolloutEngine,
    examples: Sequence[Example],
    *,
    sampling: SamplingConfig,
    batch_size: int = 8,
    seed: int = 1234,
    beta: float = 0.5,
) -> dict[str, float]:
    """Mean paper-Eq.-2 divergences of the student to the teacher on held-out prompts.

    Every divergence is averaged per sequence (Eq. 2) and then over sequences.

    Returns:
        ``eval/jsd``, ``eval/forward_kl``, ``eval/reverse_kl`` (nats per token, mean over sequences),
        ``eval/completion_length`` and ``eval/teacher_logprob`` (mean per token).
    """
    if not examples:
        raise ValueError("held-out evaluation needs at least one example")
    rows = evaluation_rows(engine, examples, sampling=sampling, batch_size=batch_size, seed=seed, beta=beta)
    return summarize_rows(rows)


def write_samples(
    path: str | Path, rows: Sequence[dict[str, Any]], *, step: int, decoding: str, limit: int
) -> None:
    """Append the first ``limit`` rows (by ``index``) to a JSONL file, tagged with step and decoding."""
    if limit <= 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for row in sorted(rows, key=lambda r: r["index"])[:limit]:
            fh.write(json.dumps({"step": step, "decoding": decoding, **row}) + "\n")


def evaluate(
    engine: RolloutEngine,
    examples: Sequence[Example],
    config: Config,
    dist: Distributed,
    *,
    reward: Callable[..., list[float]] | None = None,
    step: int = 0,
    samples_path: str | Path | None = None,
) -> dict[str, float]:
    """A run's held-out metrics: sampled and/or greedy decoding (``config.eval``), gathered over processes.

    Each process evaluates its contiguous shard of ``examples``; rows are gathered and averaged.

    Args:
        engine: the run's rollout engine.
        examples: the held-out split.
        config: the run configuration (``eval``, ``train.eval_*``, the agent's temperature, budget, beta).
        dist: the process group (one process without Accelerate).
        reward: the evaluation reward (``eval.reward`` resolved), or None.
        step: the global step, written with the sample completions.
        samples_path: where the main process appends ``eval.num_samples`` completions (None: nowhere).

    Returns:
        ``eval/...`` (sampled) and ``eval/greedy/...`` metrics.
    """
    ec, tc, agent = config.eval, config.train, config.agent
    max_new_tokens = ec.max_new_tokens or agent.max_new_tokens
    decodings = [("sampled", "eval/", agent.temperature)] if ec.sampled else []
    decodings += [("greedy", "eval/greedy/", 0.0)] if ec.greedy else []
    n, world, rank = len(examples), dist.world_size, dist.rank
    chunk = -(-n // world)
    shard = examples[rank * chunk : (rank + 1) * chunk]
    reward_name = getattr(reward, "name", None) if reward is not None else None
    metrics: dict[str, float] = {}
    for decoding, prefix, temperature in decodings:
        rows = evaluation_rows(
            engine,
            shard,
            sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature),
            batch_size=tc.eval_batch_size,
            seed=tc.eval_seed + rank,
            beta=agent.eval_beta,
            reward=reward,
            first_index=rank * chunk,
        )
        rows = dist.gather_rows(rows)
        metrics.update(summarize_rows(rows, prefix=prefix, reward_name=reward_name))
        if samples_path is not None and dist.is_main:
            write_samples(samples_path, rows, step=step, decoding=decoding, limit=ec.num_samples)
    return metrics
