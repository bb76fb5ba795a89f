"""The tutorial's toolbox in the GKD agent (issue #14): schedules of lambda and alpha, TIP token
importance, flawed-prefix rejection before the teacher, teacher temperature and reward extrapolation."""

import json
import math

import pytest
import torch
from run_helpers import final_weights, save_tiny_model, tiny_config

from rl_distill.agents import GKDAgent, GKDConfig
from rl_distill.agents.base import concat_rollouts, select_rows
from rl_distill.config import ConfigError, config_from_dict, load_config
from rl_distill.filters import FilterResult, SampleFilter
from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.rollout import RolloutEngine
from rl_distill.schedules import industrial
from rl_distill.tasks import Example
from rl_distill.trainer import Trainer, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["1+2=", "ab", "hello", "x y z"]
EXAMPLES = [Example(p, reference="ok") for p in PROMPTS]


def make_agent(engine, *, opt=None, seed=0, reward=None, **cfg):
    opt = opt or torch.optim.SGD(engine.student.parameters(), lr=1e-3)
    config = GKDConfig(**{"max_new_tokens": 8, **cfg})
    return GKDAgent(engine, opt, config, generator=torch.Generator().manual_seed(seed), reward=reward)


@pytest.fixture
def engine64():
    """Tiny float64 teacher (sharpened) and student: gradients compared to 1e-6."""
    tok = char_tokenizer()
    teacher = tiny_llama(len(tok), num_layers=2, seed=1).double()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    student = tiny_llama(len(tok), num_layers=1, seed=2).double()
    return RolloutEngine(student, teacher, tok)


def unpadded_logits(model, rollout, i, vocab, *, grad=False):
    """Logits predicting each completion token of row ``i``, the sequence alone (no padding)."""
    prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
    comp = rollout.completion_ids[i, : int(rollout.lengths[i])]
    ids = torch.cat([prompt, comp])[None]
    with torch.set_grad_enabled(grad):
        return model(input_ids=ids).logits[0, len(prompt) - 1 : -1, :vocab]


def jsd_tokens(t_logp, s_logp, beta=0.5):
    t, s = t_logp.exp(), s_logp.exp()
    m = (beta * t + (1 - beta) * s).log()
    return beta * (t * (t_logp - m)).sum(-1) + (1 - beta) * (s * (s_logp - m)).sum(-1)


def student_grad(engine, loss):
    engine.student.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in engine.student.parameters() if p.grad is not None])


# --- 1. schedules ---------------------------------------------------------------------------
def test_scheduled_fields_parse_at_load_and_name_the_field():
    cfg = load_config(None, ["agent.lmbda={preset: industrial}", "agent.alpha={schedule: [[0, 0.5], [1, 1]]}",
                             "agent.reward=exact_match"])  # fmt: skip
    assert cfg.agent.lmbda == {"preset": "industrial"}  # the spec stays as written (YAML round trip)
    assert cfg.agent.schedules["lmbda"] == industrial() and cfg.agent.value_range("alpha") == (0.5, 1.0)
    assert config_from_dict(cfg.to_dict()) == cfg
    bad = {
        "agent.lmbda={preset: nope}": r"agent\.lmbda: unknown preset 'nope'",
        "agent.lmbda={schedule: [[0, 0], [0.5, 1.5]]}": r"agent\.lmbda: value 1.5 is outside",
        "agent.alpha={schedule: [[0.5, 1], [0.2, 1]]}": r"agent\.alpha: knots must be sorted",
        "agent.lmbda=[0, 1]": r"agent\.lmbda: expected",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_checks_that_depend_on_alpha_and_lmbda_consider_the_whole_schedule(engine):
    ramp = {"schedule": [[0.0, 0.5], [1.0, 1.0]]}
    with pytest.raises(ValueError, match=r"alpha < 1 \(0.5\) weights an external reward"):
        make_agent(engine, alpha=ramp)  # alpha is 1 only at the end: the reward is needed before
    with pytest.raises(ValueError, match="target 'one_hot' .* needs lmbda=0 \\(the constant\\)"):
        GKDConfig(target="one_hot", lmbda={"preset": "industrial"}, divergence="forward_kl")
    GKDConfig(target="one_hot", lmbda={"schedule": [[0.0, 0.0], [1.0, 0.0]]}, divergence="forward_kl")
    with pytest.raises(ValueError, match="weights a reward on on-policy samples, but lmbda=0"):
        GKDConfig(alpha=ramp, lmbda={"schedule": [[0.0, 0.0]]}, reward="exact_match")
    GKDConfig(alpha=ramp, lmbda={"preset": "industrial"}, reward="exact_match")  # on-policy later: fine
    with pytest.raises(ValueError, match="leave alpha at 1"):
        GKDConfig(alpha=ramp, beta_ext=1.0, reward="exact_match")
    assert GKDConfig(alpha={"schedule": [[0.0, 1.0]]}).uses_reward is False


def test_the_agent_follows_the_schedules_it_is_told(engine):
    agent = make_agent(engine, lmbda={"preset": "industrial"}, alpha={"schedule": [[0, 0.5], [1, 1]]},
                       reward=lambda prompts, completions, **_: [0.0] * len(prompts))  # fmt: skip
    assert agent.lmbda_now == 0.0 and agent.alpha_now == 0.5  # progress 0 until the trainer says otherwise
    agent.set_progress(5, 10)
    assert agent.lmbda_now == pytest.approx(0.3 + 0.4 * 0.75) and agent.alpha_now == 0.75
    assert agent.schedule_metrics() == {"train/lmbda": agent.lmbda_now, "train/alpha": 0.75}
    assert make_agent(engine).schedule_metrics() == {
        "train/lmbda": 1.0,
        "train/alpha": 1.0,
    }  # logged every step
    for step, expected in ((0, 0.0), (1, 0.0), (9, 1.0)):
        agent.set_progress(step, 10)
        assert agent.update(EXAMPLES)["rollout/on_policy_fraction"] == expected


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher", sharpen=30.0)


class StopAfter(Trainer):
    """A trainer that gets Ctrl-C after ``stop_at`` steps (it checkpoints that step and stops)."""

    stop_at = 0

    def train_step(self):
        stats = super().train_step()
        if self.step == self.stop_at:
            self._sigint.set()
        return stats


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path, teacher_dir):
    agent = {
        "lmbda": {"preset": "industrial"},
        "alpha": {"schedule": [[0, 0.6], [1, 1]]},
        "reward": "exact_match",
    }
    raw = tiny_config(teacher_dir, tmp_path / "straight", agent=agent,
                      train={"steps": 5, "threads": 1, "tensorboard": False})  # fmt: skip
    Trainer(config_from_dict(raw)).train()
    split = {**raw, "train": {**raw["train"], "output_dir": str(tmp_path / "split")}}
    StopAfter.stop_at = 3
    with pytest.raises(TrainingInterrupted):
        StopAfter(config_from_dict(split)).train()
    result = Trainer(config_from_dict(split)).train(resume=True)
    assert result.resumed_from.name == "step-3"
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows, again = train_rows(tmp_path / "straight"), train_rows(tmp_path / "split")
    keys = ("train/loss", "train/lmbda", "train/alpha", "rollout/on_policy_fraction")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in again]
    schedule = industrial()
    assert [r["train/lmbda"] for r in rows] == [schedule.value(s, 5) for s in range(5)]
    assert [r["train/alpha"] for r in rows] == pytest.approx([0.6 + 0.4 * s / 5 for s in range(5)])


# --- 2. TIP token importance ----------------------------------------------------------------
def tip_reference(engine, rollouts, temperature, teacher_temperature):
    """Per sequence: teacher/student log-probs at their temperatures, JSD per token, TIP weight per token."""
    out = []
    for r in rollouts:
        for i in range(len(r)):
            t = unpadded_logits(engine.teacher, r, i, engine.vocab_size)
            s = unpadded_logits(engine.student, r, i, engine.vocab_size, grad=True)
            t_logp = torch.log_softmax(t / teacher_temperature, -1)
            s_logp = torch.log_softmax(s / temperature, -1)
            d = jsd_tokens(t_logp, s_logp)  # (L,)
            entropy = -(t_logp.exp() * t_logp).sum(-1)
            kl = (t_logp.exp() * (t_logp - s_logp.detach())).sum(-1)
            w = (1 - entropy / math.log(engine.vocab_size)) * kl  # tutorial ch. 7
            out.append((d, w.detach()))
    return out


@pytest.mark.parametrize(("temperature", "teacher_temperature"), [(1.0, None), (0.8, 1.5)])
def test_tip_weight_loss_is_the_weighted_eq2_mean(engine64, temperature, teacher_temperature):
    agent = make_agent(engine64, token_weighting="tip_weight", temperature=temperature,
                       teacher_temperature=teacher_temperature)  # fmt: skip
    rollouts, _ = agent.collect(EXAMPLES)
    loss, per_seq, stats = agent.divergence_terms(rollouts)
    ref = tip_reference(engine64, rollouts, temperature, teacher_temperature or temperature)
    expected = torch.stack([(w * d).sum() / w.sum() for d, w in ref]).mean()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-7)  # weights: float32
    torch.testing.assert_close(per_seq, torch.stack([d.mean() for d, _ in ref]).detach())  # unweighted Eq. 2
    # The weights are constants: the gradient is that of the weighted mean with fixed weights.
    torch.testing.assert_close(
        student_grad(engine64, loss), student_grad(engine64, expected), rtol=1e-5, atol=1e-8
    )
    assert stats["rollout/tip_sequences_fraction"] == 1.0


def test_tip_filter_averages_the_kept_tokens_of_each_sequence(engine64):
    probe = make_agent(engine64, token_weighting="tip_weight")
    rollouts, _ = probe.collect(EXAMPLES)
    ref = tip_reference(engine64, rollouts, 1.0, 1.0)
    scores = torch.cat([w for _, w in ref])
    ordered = scores.sort().values
    k = int(0.6 * len(ordered))
    threshold = float(ordered[k - 1] + ordered[k]) / 2  # between two scores: no float32 tie
    assert ordered[k] - ordered[k - 1] > 1e-4 * ordered[k]
    agent = make_agent(engine64, token_weighting="tip_filter", tip_threshold=threshold)
    loss, _, stats = agent.divergence_terms(rollouts)
    kept = [(d[w >= threshold], w) for d, w in ref]
    with_tokens = [k.mean() for k, _ in kept if k.numel()]
    assert 0 < len(with_tokens)
    torch.testing.assert_close(loss.detach(), torch.stack(with_tokens).mean().detach(), rtol=1e-5, atol=1e-7)
    assert stats["rollout/tip_kept_fraction"] == pytest.approx(float((scores >= threshold).float().mean()))
    assert stats["rollout/tip_sequences_fraction"] == len(with_tokens) / len(ref)
    # Nothing kept anywhere: a zero loss with a zero gradient, no NaN.
    none = make_agent(engine64, token_weighting="tip_filter", tip_threshold=1e9)
    loss, per_seq, stats = none.divergence_terms(rollouts)
    assert float(loss.detach()) == 0.0 and stats["rollout/tip_kept_fraction"] == 0.0
    assert torch.isfinite(per_seq).all() and (student_grad(engine64, loss) == 0).all()


def test_tip_needs_the_teacher_and_a_valid_threshold():
    with pytest.raises(ValueError, match="token_weighting 'tip_filter' scores tokens with the teacher"):
        GKDConfig(token_weighting="tip_filter", target="one_hot", lmbda=0.0, divergence="forward_kl")
    with pytest.raises(ConfigError, match=r"agent\.tip_threshold must be a finite number >= 0"):
        load_config(None, ["agent.tip_threshold=-1"])
    with pytest.raises(ConfigError, match=r"agent\.token_weighting: expected one of 'none'"):
        load_config(None, ["agent.token_weighting=tip"])


# --- 3. flawed-prefix rejection -------------------------------------------------------------
def count_teacher_rows(engine):
    rows = []
    engine.teacher.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)  # fmt: skip
    return rows


def test_rejected_samples_never_reach_the_teacher(engine):
    examples = [Example(p) for p in PROMPTS * 2]
    sampling = make_agent(engine).config.sampling
    sampled = engine.generate(
        [e.prompt for e in examples], sampling, generator=torch.Generator().manual_seed(0)
    )
    ppl = SampleFilter()(sampled).perplexity
    threshold = float(ppl.median())  # about half the samples above it
    keep = (ppl <= threshold).nonzero().flatten().tolist()
    assert 0 < len(keep) < len(examples)
    agent = make_agent(engine, reject={"max_perplexity": threshold})
    rows = count_teacher_rows(engine)
    stats = agent.update(examples)  # the same generator seed: the same samples
    assert rows == [len(keep)]  # one teacher forward over the kept rows only
    assert stats["rollout/filter/rejected_fraction"] == 1 - len(keep) / len(examples)
    assert stats["rollout/filter/dropped_fraction"] == stats["rollout/filter/rejected_fraction"]
    assert stats["rollout/on_policy_fraction"] == len(keep) / len(examples)
    assert [i for i, v in enumerate(agent.example_scores) if not math.isnan(v)] == keep
    with pytest.raises(
        ConfigError, match=r"agent\.reject: unknown keys \['max_ppl'\]; it accepts max_perplexity"
    ):
        load_config(None, ["agent.reject={max_ppl: 300}"])
    with pytest.raises(ConfigError, match=r"agent\.reject\.max_perplexity: must be a finite number >= 1"):
        load_config(None, ["agent.reject={max_perplexity: 0.5}"])


class FirstTokenFilter:
    """Rejects rows whose first completion token is even (a deterministic stand-in for a SampleFilter)."""

    def __call__(self, rollout):
        keep = rollout.completion_ids[:, 0] % 2 == 1
        return FilterResult(
            keep, {"even": int((~keep).sum())}, float((~keep).float().mean()), torch.ones(len(keep))
        )


def test_resampling_replaces_rejected_rows_in_place(engine):
    agent = make_agent(engine)
    prompts = PROMPTS * 3
    sampled = engine.generate(prompts, agent.config.sampling, generator=agent.generator)
    kept, first, rows = agent.reject_flawed(sampled, resample=4, sample_filter=FirstTokenFilter())
    assert first.rejected_fraction > 0 and len(rows) > int(first.keep.sum())  # resampling rescued some
    assert kept.texts == [prompts[i] for i in rows.tolist()]  # each kept row is its own prompt's
    assert bool(FirstTokenFilter()(kept).keep.all())
    for k, i in enumerate(rows.tolist()):  # unchanged rows are the original samples, re-padded
        if first.keep[i]:
            n = int(sampled.lengths[i])
            assert torch.equal(kept.completion_ids[k, :n], sampled.completion_ids[i, :n])
            assert int(kept.lengths[k]) == n
    # The re-padded prompts and completions score like the originals (left/right padding is exact).
    whole = concat_rollouts(
        [select_rows(sampled, torch.tensor([i])) for i in range(len(sampled))], engine.pad_id
    )
    torch.testing.assert_close(engine.score(whole).teacher_logprobs, engine.score(sampled).teacher_logprobs)


def test_an_all_rejected_batch_is_a_counted_no_op(engine):
    opt = torch.optim.AdamW(engine.student.parameters(), lr=1e-2)
    agent = make_agent(engine, opt=opt, reject={"max_perplexity": 1.0}, reject_resample=1)
    before = {k: v.clone() for k, v in engine.student.state_dict().items()}
    rows = count_teacher_rows(engine)
    stats = agent.update(EXAMPLES)
    assert rows == [] and not opt.state  # no teacher call, no optimizer step
    assert all(torch.equal(before[k], v) for k, v in engine.student.state_dict().items())
    assert stats["train/skipped"] == 1.0 and stats["train/loss"] == 0.0
    assert stats["rollout/filter/rejected_fraction"] == 1.0 and all(math.isfinite(v) for v in stats.values())
    assert (agent.empty_steps, agent.skipped_steps) == (1, 0)
    assert all(math.isnan(v) for v in agent.example_scores)


def test_a_run_whose_samples_are_all_rejected_does_not_abort(tmp_path, teacher_dir):
    raw = tiny_config(teacher_dir, tmp_path / "run", agent={"reject": {"max_perplexity": 1.0}},
                      train={"steps": 3, "max_consecutive_skips": 2, "threads": 1, "tensorboard": False})  # fmt: skip
    trainer = Trainer(config_from_dict(raw))
    result = trainer.train()
    assert result.steps == 3 and trainer.agent.empty_steps == 3 and trainer.scheduler.last_epoch == 0
    rows = train_rows(tmp_path / "run")
    assert [r["train/empty_steps"] for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["train/skipped"] == 1.0 and r["train/skipped_steps"] == 0.0 for r in rows)


# --- 4. teacher temperature and reward extrapolation ----------------------------------------
def test_teacher_temperature_scales_only_the_teacher(engine64):
    agent = make_agent(engine64, divergence="forward_kl", temperature=0.7, teacher_temperature=2.0)
    rollouts, _ = agent.collect(EXAMPLES)
    per_seq = agent.sequence_divergence(rollouts[0]).detach()
    expected = []
    for i in range(len(EXAMPLES)):
        t = torch.log_softmax(
            unpadded_logits(engine64.teacher, rollouts[0], i, engine64.vocab_size) / 2.0, -1
        )
        s = torch.log_softmax(
            unpadded_logits(engine64.student, rollouts[0], i, engine64.vocab_size) / 0.7, -1
        )
        expected.append((t.exp() * (t - s)).sum(-1).mean())
    torch.testing.assert_close(per_seq, torch.stack(expected), rtol=1e-10, atol=1e-12)


def test_beta_ext_gradient_is_the_alpha_form_divided_by_alpha(engine64, monkeypatch):
    def reward(prompts, completions, **_):
        return [float(len(c) % 3) for c in completions]

    alpha = 0.3
    eq5 = make_agent(engine64, alpha=alpha, reward=reward)
    g_opd = make_agent(engine64, alpha=1.0, beta_ext=(1 - alpha) / alpha, reward=reward)
    rollouts, num_on = eq5.collect(EXAMPLES)
    rewards = eq5.external_rewards(EXAMPLES, rollouts[0]).double()
    assert rewards.std() > 0
    # The gradient at the student's float64 logits (Llama's RMSNorm rounds to float32 inside the
    # model, so parameter gradients of two loss scalings differ in their last float32 bits).
    logits = engine64.score_student(rollouts[0]).detach().requires_grad_()
    monkeypatch.setattr(engine64, "score_student", lambda rollout: logits)

    def grad(loss):
        logits.grad = None
        loss.backward()
        return logits.grad.clone()

    loss_eq5, stats = eq5.objective(rollouts, num_on, rewards)
    loss_ext, stats_ext = g_opd.objective(rollouts, num_on, rewards)
    grad_eq5, grad_ext = grad(loss_eq5), grad(loss_ext)
    assert grad_eq5.abs().max() > 1e-3
    torch.testing.assert_close(grad_ext, grad_eq5 / alpha, rtol=1e-6, atol=1e-12)
    assert stats_ext["train/pg_loss"] == pytest.approx(stats["train/pg_loss"])
    monkeypatch.undo()
    assert "train/pg_loss" in g_opd.update(EXAMPLES)  # the update asks for the reward too
