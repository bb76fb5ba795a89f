"""Privileged-information teachers (OPSD): the teacher scores the student's completion under another prompt."""

import copy
from pathlib import Path

import pytest
import torch

from rl_distill.agents import GKDAgent, GKDConfig
from rl_distill.divergences import DIVERGENCES
from rl_distill.models import tiny_llama
from rl_distill.rollout import (
    PromptTooLongError,
    RolloutEngine,
    SamplingConfig,
    position_ids_from_mask,
)
from rl_distill.rollout.engine import (
    NoTeacherError,
    format_teacher_prompt,
    template_fields,
)
from rl_distill.tasks import Example

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

EXAMPLES = [
    Example("1+2=?", "1+2=3. #### 3", {"answer": 3}),
    Example("12+7-5=?", "12+7=19. 19-5=14. #### 14", {"answer": 14}),
    Example("9-9=?", "9-9=0. #### 0", {"answer": 0}),
]
TEMPLATE = "{prompt} [Answer: {answer}]"
SAMPLING = SamplingConfig(max_new_tokens=8)


def plain_teacher_logits(teacher, tokenizer, teacher_prompt, completion_ids, vocab):
    """Reference: one unpadded forward of the teacher over its prompt + the completion's real tokens."""
    ids = tokenizer(teacher_prompt)["input_ids"] + completion_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = teacher(input_ids=x, position_ids=position_ids_from_mask(torch.ones_like(x))).logits
    p = len(ids) - len(completion_ids)
    return logits[0, p - 1 : -1, :vocab].float()  # (T, V): the distributions of the completion tokens


def test_template_fields_and_formatting():
    assert template_fields(TEMPLATE) == ["prompt", "answer"]
    assert format_teacher_prompt(TEMPLATE, EXAMPLES[1]) == "12+7-5=? [Answer: 14]"
    assert format_teacher_prompt("{prompt}|{reference}", EXAMPLES[0]) == "1+2=?|1+2=3. #### 3"
    with pytest.raises(
        ValueError,
        match=r"field \{hint\} is missing from the example '1\+2=\?' \(it has: answer, prompt, reference\)",
    ):
        format_teacher_prompt("{prompt} {hint}", EXAMPLES[0])
    with pytest.raises(ValueError, match=r"field \{reference\} is missing"):
        format_teacher_prompt("{reference}", Example("q"))
    with pytest.raises(ValueError, match="must be a name"):
        template_fields("{prompt} {}")
    with pytest.raises(ValueError, match="not a valid format string"):
        template_fields("{prompt")


def test_privileged_teacher_logits_equal_a_plain_forward_on_its_prompt(student, teacher, tokenizer):
    engine = RolloutEngine(student, teacher, tokenizer)
    engine.set_teacher_template(TEMPLATE, EXAMPLES)
    gen = torch.Generator().manual_seed(0)
    r = engine.rollout([ex.prompt for ex in EXAMPLES], SAMPLING, teacher_output="full", generator=gen)
    vocab = len(tokenizer)
    for i, ex in enumerate(EXAMPLES):
        n = int(r.lengths[i])
        ref = plain_teacher_logits(
            teacher,
            tokenizer,
            format_teacher_prompt(TEMPLATE, ex),
            r.completion_ids[i, :n].tolist(),
            vocab,
        )
        torch.testing.assert_close(r.teacher_logits[i, :n].float(), ref, atol=1e-4, rtol=0)
        ref_tok = ref.log_softmax(-1).gather(-1, r.completion_ids[i, :n, None]).squeeze(-1)
        torch.testing.assert_close(r.teacher_logprobs[i, :n], ref_tok, atol=1e-5, rtol=0)
    # The student's own prompt gives other scores: the template really changed the context.
    plain = RolloutEngine(student, teacher, tokenizer).score(copy.copy(r), teacher_output="full")
    assert not torch.allclose(plain.teacher_logits, r.teacher_logits)


def test_left_padded_teacher_prompts_equal_one_prompt_at_a_time(student, teacher, tokenizer):
    # Teacher prompts of different lengths (and longer than the student's): left padding of their own.
    engine = RolloutEngine(student, teacher, tokenizer)
    engine.set_teacher_template("{prompt} so the answer, which you know, is {answer}.", EXAMPLES)
    gen = torch.Generator().manual_seed(3)
    batch = engine.generate([ex.prompt for ex in EXAMPLES], SAMPLING, generator=gen)
    scored = engine.score(copy.copy(batch), teacher_output="full")
    ids, _ = engine.teacher_inputs(batch)
    assert ids.shape[1] - batch.completion_ids.shape[1] != batch.prompt_ids.shape[1]
    for i in range(len(EXAMPLES)):
        one = engine.score(select(batch, i), teacher_output="full")
        n = one.completion_ids.shape[1]
        torch.testing.assert_close(one.teacher_logits[0], scored.teacher_logits[i, :n], atol=1e-4, rtol=0)
        torch.testing.assert_close(one.teacher_logprobs[0], scored.teacher_logprobs[i, :n], atol=1e-5, rtol=0)


def select(rollout, i):
    from rl_distill.agents.base import select_rows

    return select_rows(rollout, torch.tensor([i]))


def test_explicit_teacher_prompts_and_errors(student, teacher, tokenizer):
    engine = RolloutEngine(student, teacher, tokenizer)
    r = engine.generate(["1+2=?", "9-9=?"], SAMPLING, generator=torch.Generator().manual_seed(0))
    a = engine.score(copy.copy(r), teacher_prompts=["1+2=? [3]", "9-9=? [0]"]).teacher_logprobs
    engine.set_teacher_template("{prompt} [{answer}]", EXAMPLES)
    b = engine.score(copy.copy(r)).teacher_logprobs
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="got 1 teacher prompts for 2 sequences"):
        engine.score(copy.copy(r), teacher_prompts=["x"])
    with pytest.raises(KeyError, match="no teacher prompt for the prompt 'unknown'"):
        engine.score(engine.generate(["unknown"], SAMPLING))
    with pytest.raises(ValueError, match="share the prompt"):
        engine.set_teacher_template(
            "{answer}",
            [
                Example("q", metadata={"answer": 1}),
                Example("q", metadata={"answer": 2}),
            ],
        )
    small = tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, max_position_embeddings=24, seed=0)
    tight = RolloutEngine(small, small, tokenizer)
    tight.set_teacher_template("{prompt} and now a very long privileged hint", EXAMPLES)
    with pytest.raises(PromptTooLongError, match="teacher prompt of"):
        tight.score(tight.generate(["1+2=?"], SAMPLING))
    engine.set_teacher_template(None, [])
    torch.testing.assert_close(
        engine.score(copy.copy(r)).teacher_logprobs,
        RolloutEngine(student, teacher, tokenizer).score(copy.copy(r)).teacher_logprobs,
    )


def test_no_teacher_engine_samples_but_refuses_to_score(student, tokenizer):
    engine = RolloutEngine(student, None, tokenizer)
    assert not engine.has_teacher
    r = engine.generate(["1+2=?"], SAMPLING, generator=torch.Generator().manual_seed(0))
    engine.from_completions(["1+2=?"], ["3"])
    with pytest.raises(NoTeacherError, match=r"model.teacher: null"):
        engine.score(r)
    with pytest.raises(NoTeacherError):
        engine.incremental_scorer()


def self_teacher_agent(student, tokenizer, template, **config):
    """GKD whose teacher is a frozen copy of the student (``model.teacher: self`` at step 0)."""
    engine = RolloutEngine(student, copy.deepcopy(student), tokenizer)
    engine.set_teacher_template(template, EXAMPLES)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    return GKDAgent(
        engine,
        opt,
        GKDConfig(max_new_tokens=8, **config),
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("lmbda", [1.0, 0.5])
def test_identity_template_with_a_self_teacher_gives_zero_divergence(student, tokenizer, divergence, lmbda):
    agent = self_teacher_agent(student, tokenizer, "{prompt}", divergence=divergence, lmbda=lmbda)
    rollouts, _ = agent.collect(EXAMPLES)
    with torch.no_grad():
        loss, per_seq = agent.loss(rollouts)
    # Identical logits: the KLs are exactly 0; the JSD's mixture carries one rounding of log(beta + 1 - beta).
    assert float(per_seq.abs().max()) <= (0.0 if "kl" in divergence else 1e-6)


@pytest.mark.parametrize("lmbda", [1.0, 0.0])
def test_privileged_template_with_a_self_teacher_gives_a_signal(student, tokenizer, lmbda):
    agent = self_teacher_agent(student, tokenizer, "{prompt}{answer}", divergence="forward_kl", lmbda=lmbda)
    rollouts, _ = agent.collect(EXAMPLES)
    loss, per_seq = agent.loss(rollouts)
    assert (per_seq > 1e-4).all()
    before = [p.detach().clone() for p in student.parameters()]
    agent.update(EXAMPLES)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    # The teacher stayed frozen at the starting weights.
    assert all(not p.requires_grad for p in agent.engine.teacher.parameters())


# --- the config layer and the trainer: model.teacher: self, agent.teacher_template, refresh --------
def opsd_config(tmp_path, *overrides, steps=1):
    from run_helpers import save_tiny_model

    from rl_distill.config import load_config

    student = tmp_path / "student"
    if not student.is_dir():
        save_tiny_model(student, sharpen=3.0)
    base = [
        f"model.student={student}",
        "model.device=cpu",
        "data.num_train=8",
        "data.num_eval=2",
        "data.options.compact=true",
        "agent.max_new_tokens=6",
        f"train.steps={steps}",
        "train.batch_size=2",
        "train.save_every=0",
        "train.tensorboard=false",
        "train.save_final=false",
        f"train.output_dir={tmp_path / 'run'}",
        "eval.num_samples=0",
        "eval.greedy=false",
    ]
    return load_config(ROOT / "examples" / "configs" / "opsd_arithmetic.yaml", [*base, *overrides])


def test_opsd_config_trains_one_step_with_a_self_teacher(tmp_path):
    from rl_distill.trainer import Trainer

    trainer = Trainer(opsd_config(tmp_path))
    run = trainer.run
    assert run.teacher is not run.student and not any(p.requires_grad for p in run.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(run.teacher.parameters(), run.student.parameters()))
    assert run.engine.teacher_prompt_map[run.task.train[0].prompt].endswith(
        f"[Answer: {run.task.train[0].metadata['answer']}]"
    )
    result = trainer.train()
    assert result.steps == 1 and result.before["eval/reverse_kl"] > 0  # the hint changes the teacher's view


@pytest.mark.parametrize("template", ["{prompt}", ""])
def test_identity_template_and_self_teacher_give_zero_divergence_at_step_0(tmp_path, template):
    from rl_distill.trainer import Trainer

    trainer = Trainer(
        opsd_config(
            tmp_path,
            f"agent.teacher_template='{template}'",
            "agent.divergence=forward_kl",
        )
    )
    before = trainer.evaluate(write=False)
    assert before["eval/forward_kl"] == 0.0 and before["eval/reverse_kl"] == 0.0
    assert before["eval/jsd"] <= 1e-6
    stats = trainer.train_step()
    assert stats["train/divergence"] == 0.0


def test_config_errors_name_the_field(tmp_path):
    from rl_distill.config import ConfigError
    from rl_distill.trainer import Trainer

    with pytest.raises(ConfigError, match=r"model.teacher: 'self' needs student"):
        opsd_config(tmp_path, "model.student=null")
    with pytest.raises(
        ConfigError,
        match="model.teacher_refresh_every: re-copies the student into the teacher; it needs teacher: self",
    ):
        opsd_config(
            tmp_path,
            f"model.teacher={tmp_path / 'student'}",
            "model.teacher_refresh_every=2",
        )
    with pytest.raises(ConfigError, match="model.teacher_refresh_every: must be >= 0"):
        opsd_config(tmp_path, "model.teacher_refresh_every=-1")
    with pytest.raises(
        ConfigError,
        match=r"agent.teacher_template: there is no teacher \(model.teacher: null\)",
    ):
        opsd_config(
            tmp_path,
            "model.teacher=null",
            "agent.name=gkd",
            "agent.lmbda=0",
            "agent.target=one_hot",
            "agent.divergence=forward_kl",
        )
    with pytest.raises(ConfigError, match="agent.teacher_template .* must be a name"):
        opsd_config(tmp_path, "agent.teacher_template='{prompt} {}'")
    with pytest.raises(
        ConfigError,
        match=r"agent.teacher_template field \{hint\} is missing from the example",
    ):
        Trainer(opsd_config(tmp_path, "agent.teacher_template='{prompt} {hint}'"))
    from rl_distill.agents import PPOConfig
    from rl_distill.config import build_dataclass

    with pytest.raises(ConfigError, match="agent.teacher_template: unknown field"):  # GKD only
        build_dataclass(PPOConfig, {"teacher_template": "{prompt}"}, "agent")


def test_teacher_refresh_every_copies_the_student_and_resumes(tmp_path):
    from rl_distill.trainer import Trainer

    config = opsd_config(tmp_path, "model.teacher_refresh_every=2", "train.save_every=1", steps=3)
    trainer = Trainer(config)
    start = [p.detach().clone() for p in trainer.run.teacher.parameters()]
    snapshots = {}
    for _ in range(3):
        trainer.train_step()
        snapshots[trainer.step] = [p.detach().clone() for p in trainer.student.parameters()]
        trainer.save_checkpoint() if trainer.step == 3 else None
    teacher = [p.detach().clone() for p in trainer.run.teacher.parameters()]
    # Refreshed before step 2 (0-based): the student after 2 updates, not the start, not the end.
    assert all(torch.equal(a, b) for a, b in zip(teacher, snapshots[2]))
    assert not all(torch.equal(a, b) for a, b in zip(teacher, start))
    # A resumed run gets the refreshed teacher back from the checkpoint.
    again = Trainer(config)
    again.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-3")
    assert all(torch.equal(a, b) for a, b in zip(again.run.teacher.parameters(), teacher))


def test_self_distillation_experiment_smoke(tmp_path):
    """examples/self_distillation.py end to end at a toy budget, then its page again from the JSON alone."""
    import importlib.util
    import json

    def load(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    art = tmp_path / "art"
    load("tiny_teachers").main(["--task", "arithmetic", "--compact", "--steps", "1,2", "--num-train", "16",
                                "--num-eval", "4", "--teacher-steps", "2", "--student-steps", "2",
                                "--batch-size", "4", "--max-new-tokens", "8", "--threads", "1", "--out", str(art)])  # fmt: skip
    results = tmp_path / "results"
    argv = ["--artifacts", str(art), "--out", str(tmp_path / "runs"), "--results", str(results), "--seeds", "0",
            "--workers", "1", "--train-steps", "1", "--batch-size", "4", "--group-size", "2", "--num-eval", "2",
            "--spin-rounds", "2", "--spin-round-steps", "1"]  # fmt: skip
    mod = load("self_distillation")
    payload = mod.main(argv)
    assert {r["method"] for r in payload["runs"]} == {
        "opsd",
        "gkd",
        "spin",
        "grpo",
        "rl_gkd",
        "grpo_low_lr",
        "rl_gkd_low_lr",
    }
    spin = next(r for r in payload["runs"] if r["method"] == "spin")
    assert [step for step, _ in spin["extra"]["spin_kl"]] == [1, 2]
    page = (results / "self_distillation.md").read_text()
    assert "## Verdicts on chapter 6's claims" in page and (results / "self_distillation.png").is_file()
    assert json.loads((results / "self_distillation.json").read_text())["lscpu_model"]
    mod.main([*argv, "--report-only"])
    assert (results / "self_distillation.md").read_text().split("## 1.")[1] == page.split("## 1.")[1]


def test_seqkd_with_a_privileged_teacher_samples_from_the_hinted_prompt(student, teacher, tokenizer):
    engine = RolloutEngine(student, teacher, tokenizer)
    engine.set_teacher_template(TEMPLATE, EXAMPLES)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    config = GKDConfig(
        max_new_tokens=8, lmbda=0.0, off_policy="teacher", target="one_hot", divergence="forward_kl"
    )
    agent = GKDAgent(engine, opt, config, generator=torch.Generator().manual_seed(5))
    fixed = agent._fixed_sequences(EXAMPLES)
    hinted = [format_teacher_prompt(TEMPLATE, ex) for ex in EXAMPLES]
    direct = engine.generate(
        hinted, config.sampling, model=teacher, generator=torch.Generator().manual_seed(5)
    )
    assert fixed.texts == [ex.prompt for ex in EXAMPLES]  # the student reads the plain prompt
    assert torch.equal(fixed.completion_mask, direct.completion_mask)
    assert torch.equal(
        fixed.completion_ids[fixed.completion_mask], direct.completion_ids[direct.completion_mask]
    )


def test_eval_of_a_self_teacher_run_scores_against_the_starting_student(tmp_path):
    """`rl-distill eval final/` of a `teacher: self` run: the teacher is the run's start, not the final weights."""
    import dataclasses

    from rl_distill.cli import _eval_config
    from rl_distill.trainer import Trainer

    config = opsd_config(
        tmp_path, "agent.teacher_template='{prompt}'", "train.save_final=true", "train.lr=0.05", steps=2
    )
    Trainer(config).train()
    final = tmp_path / "run" / "final"
    evaluated, step_dir, _ = _eval_config(final, [], None)
    assert step_dir is None and evaluated.model.student == str(final)
    assert evaluated.model.teacher == str(tmp_path / "student") and evaluated.model.teacher_refresh_every == 0
    assert dataclasses.replace(evaluated.model, teacher="self").teacher == "self"  # the rest is unchanged


def test_readme_self_distillation_row_quotes_the_page():
    """The README's numbers appear in the page's tables (the page is written from the raw JSON by the script)."""
    page = (ROOT / "docs" / "results" / "self_distillation.md").read_text()
    row = next(
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| self-distillation (issue #15)")
    )
    table = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("|")}
    assert "| 0.711 ± 0.000 | 0.085 ± 0.078 |" in table["opsd"] and "0.085 vs" in row
    assert "| 0.711 ± 0.000 | 0.659 ± 0.002 |" in table["gkd"] and "GKD 0.659" in row
    assert "| `'{prompt}{answer}='` | 0.711 | 0.043 |" in page and "0.043 when decoding" in row
    assert table["1"].split("|")[2].strip().startswith("0.2637") and table["8"].split("|")[
        2
    ].strip().startswith("0.1654")
    assert "0.2637 -> 0.1654 over 8 rounds" in row and "near 0.617" in row and "| 0.617 ±" in table["8"]
    assert "| 0.499 ± 0.032 |" in table["grpo"] and "| 0.616 ± 0.030 |" in table["rl_gkd"]
    assert "| 0.677 ± 0.005 |" in table["grpo_low_lr"] and "| 0.703 ± 0.010 |" in table["rl_gkd_low_lr"]
    assert "GRPO 0.499 vs RL + GKD 0.616 (lr 1e-5: 0.677 vs 0.703)" in row
