import json

import pytest

from rl_distill.evaluation import (
    evaluation_rows,
    heldout_divergence,
    metric_name,
    summarize_rows,
    write_samples,
)
from rl_distill.rewards.registry import build_reward, reward_keywords, score_examples
from rl_distill.rollout import SamplingConfig
from rl_distill.tasks import Example, load_task


@pytest.fixture
def held_out():
    return load_task("arithmetic", num_train=4, num_eval=5, compact=True).eval


def test_rows_carry_completions_metrics_and_rewards(engine, held_out):
    reward = build_reward("exact_match")
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0)
    rows = evaluation_rows(
        engine, held_out, sampling=sampling, batch_size=2, seed=3, reward=reward, first_index=10
    )
    assert [r["index"] for r in rows] == [10, 11, 12, 13, 14]
    assert [r["prompt"] for r in rows] == [ex.prompt for ex in held_out]
    assert all(r["reward"] in (0.0, 1.0) and 1 <= r["completion_length"] <= 5 for r in rows)
    summary = summarize_rows(rows, reward_name=reward.name)
    assert summary["eval/exact_match"] == sum(r["reward"] for r in rows) / 5
    # The divergences are the per-sequence means that heldout_divergence reports.
    plain = heldout_divergence(engine, held_out, sampling=sampling, batch_size=2, seed=3)
    assert plain == pytest.approx({k: v for k, v in summary.items() if k != "eval/exact_match"}, rel=1e-6)


def test_greedy_decoding_does_not_depend_on_the_seed(engine, held_out):
    greedy = SamplingConfig(max_new_tokens=5, temperature=0.0)
    a = evaluation_rows(engine, held_out, sampling=greedy, seed=1)
    b = evaluation_rows(engine, held_out, sampling=greedy, seed=2)
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    assert summarize_rows(a, prefix="eval/greedy/")["eval/greedy/jsd"] == pytest.approx(
        summarize_rows(b)["eval/jsd"]
    )


def test_a_reward_sees_every_metadata_key_with_none_where_missing():
    examples = [Example("a", metadata={"answer": 1, "x": 1}), Example("b", metadata={"answer": 2})]
    assert reward_keywords(examples) == {"answer": [1, 2], "x": [1, None]}
    seen = {}

    def reward(prompts, completions, **metadata):
        seen.update(prompts=prompts, completions=completions, **metadata)
        return [0.5] * len(completions)

    assert score_examples(reward, examples, ["p", "q"]) == [0.5, 0.5]
    assert seen == {"prompts": ["a", "b"], "completions": ["p", "q"], "answer": [1, 2], "x": [1, None]}
    with pytest.raises(ValueError, match="metadata key 'name' clashes"):
        reward_keywords([Example("a", metadata={"name": 1})])
    assert metric_name("fixtures_rewards:length_reward") == "fixtures_rewards_length_reward"
    with pytest.raises(ValueError, match="at least one example"):
        summarize_rows([])


def test_write_samples_keeps_the_first_rows_by_index(tmp_path):
    rows = [{"index": i, "completion": str(i)} for i in (3, 1, 2, 0)]
    write_samples(tmp_path / "s.jsonl", rows, step=5, decoding="greedy", limit=2)
    write_samples(tmp_path / "s.jsonl", rows, step=5, decoding="greedy", limit=0)
    written = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["index"], r["step"], r["decoding"]) for r in written] == [(0, 5, "greedy"), (1, 5, "greedy")]
