"""Held-out evaluation: token-level divergence of the student to the teacher on the student's samples."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rl_distill.divergences import forward_kl, generalized_jsd, reverse_kl
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.tasks import Example


@torch.no_grad()
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

    Completions are sampled from the student with a fixed seed (so two evaluations of the same
    student see the same random stream), scored by the teacher, and every divergence is averaged
    per sequence (Eq. 2) and then over sequences.

    Args:
        engine: rollout engine.
        examples: held-out examples.
        sampling: how the student samples (use the training temperature for an on-policy measure).
        batch_size: prompts per batch.
        seed: seed of the evaluation sampler.
        beta: beta of the reported JSD.

    Returns:
        ``eval/jsd``, ``eval/forward_kl``, ``eval/reverse_kl`` (nats per token, mean over sequences),
        ``eval/completion_length`` and ``eval/teacher_logprob`` (mean per token).
    """
    if not examples:
        raise ValueError("held-out evaluation needs at least one example")
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    totals: dict[str, float] = {"jsd": 0.0, "forward_kl": 0.0, "reverse_kl": 0.0, "length": 0.0, "tlogp": 0.0}
    for lo in range(0, len(examples), batch_size):
        prompts = [ex.prompt for ex in examples[lo : lo + batch_size]]
        r = engine.rollout(prompts, sampling, teacher_output="full", generator=generator)
        student_logits = engine.score_student(r)  # (B, T, V)
        t, s, m = r.teacher_logits, student_logits, r.completion_mask
        temp = sampling.temperature if sampling.temperature > 0 else 1.0
        totals["jsd"] += float(
            generalized_jsd(t, s, m, beta=beta, temperature=temp, reduction="sequence").sum()
        )
        totals["forward_kl"] += float(forward_kl(t, s, m, temperature=temp, reduction="sequence").sum())
        totals["reverse_kl"] += float(reverse_kl(t, s, m, temperature=temp, reduction="sequence").sum())
        totals["length"] += float(r.lengths.sum())
        totals["tlogp"] += float((r.teacher_logprobs.sum(-1) / r.lengths.clamp(min=1)).sum())
    n = len(examples)
    return {
        "eval/jsd": totals["jsd"] / n,
        "eval/forward_kl": totals["forward_kl"] / n,
        "eval/reverse_kl": totals["reverse_kl"] / n,
        "eval/completion_length": totals["length"] / n,
        "eval/teacher_logprob": totals["tlogp"] / n,
    }
