from pathlib import Path

import pytest
from rl_distill.agents import GKDConfig

from rl_distill.config import ConfigError, apply_overrides, config_from_dict, load_config

EXAMPLES = sorted(Path(__file__).resolve().parents[1].joinpath("examples", "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_loads(path):
    config = load_config(path)
    assert config.train.steps >= 1


def test_defaults_are_on_policy_gkd():
    config = load_config(None)
    assert isinstance(config.agent, GKDConfig) and config.agent.lmbda == 1.0
    assert config.model.teacher == "smollm2-135m-instruct" and config.model.student_layers == 6


def test_overrides_are_parsed_as_yaml():
    config = load_config(
        None, ["agent.beta=0.9", "train.steps=3", "model.student_layers=[0, 29]", "train.lr=1"]
    )
    assert config.agent.beta == 0.9 and config.train.steps == 3
    assert config.model.student_layers == [0, 29]
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_round_trip_through_dict():
    config = load_config(None, ["agent.divergence=forward_kl"])
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("agent.beta=1.5", r"agent\.beta must be in \[0, 1\], got 1.5"),
        ("agent.lmbda=2", r"agent\.lmbda must be in \[0, 1\]"),
        ("agent.divergence=kl", r"agent\.divergence must be one of"),
        ("train.lr=-1", r"train\.lr: must be > 0"),
        ("train.steps=0", r"train\.steps: must be >= 1"),
        ("train.steps=ten", r"train\.steps: expected int, got 'ten'"),
        ("train.stepz=3", r"train\.stepz: unknown field"),
        ("model.dtype=float8", r"model\.dtype: expected one of 'float32', 'bfloat16', 'float16'"),
        ("model.device=tpu", r"model\.device: must be"),
        ("data.task=nope", r"data\.task: unknown task 'nope'"),
        ("agent.name=dqn", r"agent\.name: unknown agent 'dqn'"),
        ("data.num_eval=0", r"data\.num_eval: must be >= 1"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected section.field=value"):
        apply_overrides({}, ["beta0.5"])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer: {steps: 3}\n")
    with pytest.raises(ConfigError, match="trainer: unknown section"):
        load_config(unknown)
