"""The curriculum in the trainer (issue #14, tutorial ch. 7 PACED): batches by difficulty, measured
difficulty fed back from the agent, checkpointed position; ``train.curriculum: null`` is unchanged."""

import json
import math

import pytest
import torch
from run_helpers import final_weights, save_tiny_model, tiny_config

from rl_distill.config import ConfigError, config_from_dict
from rl_distill.curriculum import CurriculumConfig, CurriculumSampler, difficulty_scores
from rl_distill.trainer import Trainer, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher", sharpen=30.0)


def make_config(teacher_dir, out, curriculum, *, steps=6, agent=None):
    raw = tiny_config(teacher_dir, out, agent=agent,
                      train={"steps": steps, "threads": 1, "tensorboard": False, "curriculum": curriculum})  # fmt: skip
    return config_from_dict(raw)


class StopAfter(Trainer):
    """A trainer that gets Ctrl-C after ``stop_at`` steps (it checkpoints that step and stops)."""

    stop_at = 0

    def train_step(self):
        stats = super().train_step()
        if self.step == self.stop_at:
            self._sigint.set()
        return stats


def test_easy_to_hard_draws_only_the_easiest_fraction_early(tmp_path, teacher_dir):
    curriculum = {"mode": "easy_to_hard", "difficulty": "reference_length", "start_fraction": 0.25,
                  "full_at": 1.0, "measured_weight": 0.0}  # fmt: skip
    trainer = Trainer(make_config(teacher_dir, tmp_path, curriculum, steps=8))
    lengths = difficulty_scores(trainer.task.train, "reference_length")
    cutoff = sorted(lengths)[len(lengths) // 4 - 1]  # the 4 easiest of 16
    early = [len(ex.reference) for _ in range(3) for ex in trainer.next_batch()]  # step 0: pool = 4
    assert max(early) <= cutoff
    # The same draws as the sampler alone, under the run's seed.
    sampler = CurriculumSampler(lengths, CurriculumConfig(**curriculum), seed=0)
    again = [len(trainer.task.train[i].reference) for _ in range(3) for i in sampler.next_indices(0, 8, 2)]
    assert again == early


def test_measured_divergence_feeds_the_sampler_and_resume_continues_it_exactly(tmp_path, teacher_dir):
    curriculum = {
        "mode": "frontier",
        "difficulty": "prompt_length",
        "measured_weight": 0.5,
        "concentration": 4.0,
    }
    straight = Trainer(make_config(teacher_dir, tmp_path / "straight", curriculum))
    straight.train()
    measured = straight.curriculum.measured
    assert 0 < int((~measured.isnan()).sum()) <= 12  # 6 steps of 2 examples: the visited ones have a score
    assert straight.curriculum.draws == 6

    StopAfter.stop_at = 3
    with pytest.raises(TrainingInterrupted):
        StopAfter(make_config(teacher_dir, tmp_path / "split", curriculum)).train()
    state = torch.load(tmp_path / "split" / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=True)
    assert state["curriculum"]["draws"] == 3
    resumed = Trainer(make_config(teacher_dir, tmp_path / "split", curriculum))
    assert resumed.train(resume=True).resumed_from.name == "step-3"
    assert torch.equal(resumed.curriculum.measured.nan_to_num(-1), measured.nan_to_num(-1))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    assert losses("straight") == losses("split") and len(losses("split")) == 6


def test_rejected_samples_are_not_measured(tmp_path, teacher_dir):
    curriculum = {"mode": "frontier", "measured_weight": 1.0}
    trainer = Trainer(
        make_config(teacher_dir, tmp_path, curriculum, steps=2, agent={"reject": {"max_perplexity": 1.0}})
    )
    trainer.train()
    assert trainer.curriculum.measured.isnan().all()  # every sample was rejected: nothing measured


def test_null_curriculum_keeps_the_uniform_shuffle(tmp_path, teacher_dir):
    trainer = Trainer(make_config(teacher_dir, tmp_path, None))
    assert trainer.curriculum is None
    first = [ex.prompt for _ in range(8) for ex in trainer.next_batch()]
    assert sorted(first) == sorted(ex.prompt for ex in trainer.task.train)  # one epoch without replacement


@pytest.mark.parametrize(
    ("curriculum", "message"),
    [
        ({"difficulty": "ops"}, r"train\.curriculum\.difficulty: example 0 has no metadata field 'ops'"),
        ({"mode": "hardest"}, r"train\.curriculum\.mode: expected one of 'easy_to_hard', 'frontier'"),
        ({"pace": "root"}, r"train\.curriculum\.pace: unknown field"),
        ({"start_fraction": 0}, r"train\.curriculum\.start_fraction: must be in \(0.0, 1.0\]"),
    ],
)
def test_bad_curriculum_settings_name_the_field(tmp_path, teacher_dir, curriculum, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(make_config(teacher_dir, tmp_path, curriculum))


def test_difficulty_from_a_metadata_field(tmp_path, teacher_dir):
    trainer = Trainer(make_config(teacher_dir, tmp_path, {"difficulty": "answer", "mode": "easy_to_hard"}))
    answers = [float(ex.metadata["answer"]) for ex in trainer.task.train]
    assert trainer.curriculum.static.tolist() == answers
    assert all(math.isfinite(v) for v in answers)
