from pathlib import Path

import pytest
import yaml

from rl_distill.agents import GKDConfig
from rl_distill.config import ConfigError, EvalConfig, apply_overrides, config_from_dict, load_config

EXAMPLES = sorted(Path(__file__).resolve().parents[1].joinpath("examples", "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_loads(path):
    config = load_config(path)
    assert config.train.steps >= 1
    assert config_from_dict(config.to_dict()) == config


def test_the_issue_s_example_configs_exist():
    names = {p.stem for p in EXAMPLES}
    assert {
        "onpolicy_gkd_smollm2",
        "supervised_kd_arithmetic",
        "seqkd_smollm2",
        "reinforce_smollm2",
        "ppo_smollm2",
        "rl_gkd_verifier_arithmetic",
        "rl_gkd_factual_summary",
    } <= names


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
    config = load_config(None, ["agent.divergence=forward_kl", "eval.greedy=true", "train.save_every=5"])
    assert config_from_dict(config.to_dict()) == config


def test_eval_section_defaults_and_overrides():
    config = load_config(None, ["eval.greedy=true", "eval.num_samples=3", "eval.reward=exact_match"])
    assert config.eval == EvalConfig(sampled=True, greedy=True, num_samples=3, reward="exact_match")
    assert load_config(None).eval.reward == "auto"
    with pytest.raises(ConfigError, match=r"eval\.sampled: at least one of sampled and greedy"):
        load_config(None, ["eval.sampled=false"])


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
        ("train.save_every=-1", r"train\.save_every: must be >= 0"),
        ("train.keep_last=0", r"train\.keep_last: must be >= 1"),
        ("train.max_consecutive_skips=0", r"train\.max_consecutive_skips: must be >= 1"),
        ("eval.num_samples=-2", r"eval\.num_samples: must be >= 0"),
        ("eval.max_new_tokens=0", r"eval\.max_new_tokens: must be >= 1 or null"),
        ("eval.reward=bleu", r"eval\.reward: unknown reward 'bleu'; choose one of auto, exact_match, "),
        ("eval.reward={normalize: true}", r"eval\.reward: a reward spec dict needs 'name' or 'weighted_sum'"),
        ("eval.greedy=maybe", r"eval\.greedy: expected bool, got 'maybe'"),
        ("train.few_row_products=fast", r"train\.few_row_products: expected bool, got 'fast'"),
        ("train.teacher_prefix_cache=1", r"train\.teacher_prefix_cache: expected bool, got 1"),
        ("train.dense_head_input=yes please", r"train\.dense_head_input: expected bool, got 'yes please'"),
        ("agent.reward=bleu", r"agent\.reward: unknown reward 'bleu'; choose one of exact_match, "),
        ("evaluation.greedy=true", r"evaluation: unknown section; expected model, data, agent, train, eval"),
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


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from run_helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_trains_one_step_on_a_tiny_teacher(path, tiny_teacher, tmp_path):
    """The same config with SmolLM2 swapped for a tiny teacher: agent, reward and evaluation all run."""
    from rl_distill.trainer import Trainer

    overrides = [
        f"model.teacher={tiny_teacher}", "model.student=null", "model.student_layers=1", "model.device=cpu",
        "data.num_train=4",
        "data.num_eval=2", "agent.max_new_tokens=4", "train.steps=1", "train.batch_size=2",
        "train.save_every=1", f"train.output_dir={tmp_path}", "train.tensorboard=false",
    ]  # fmt: skip
    accum = (yaml.safe_load(path.read_text()).get("train") or {}).get("grad_accum_steps", 1)
    if accum > 2:  # keep the config's accumulation: at least one sequence per micro-batch
        overrides.append(f"train.batch_size={accum}")
    config = load_config(path, overrides)
    result = Trainer(config).train()
    assert result.steps == 1 and "eval/jsd" in result.after
    if config.data.task in ("arithmetic", "factual_summary"):  # the task's (or agent's) reward is evaluated
        assert any(k in result.after for k in ("eval/exact_match", "eval/factual_consistency"))
    assert (tmp_path / "checkpoints" / "step-1" / "meta.json").is_file()


@pytest.mark.parametrize("on", [True, False])
def test_engine_levers_follow_the_config(on, tiny_teacher, tmp_path):
    """``train.few_row_products``, ``teacher_prefix_cache``, ``sparse_embedding_grad``, ``dense_head_input`` reach the engine."""
    from rl_distill.build import build_run

    flag = str(on).lower()
    config = load_config(
        None,
        [f"model.teacher={tiny_teacher}", "model.student_layers=1", "model.device=cpu", "data.num_train=4",
         "data.num_eval=2", f"train.output_dir={tmp_path}", "train.tensorboard=false",
         f"train.few_row_products={flag}", f"train.teacher_prefix_cache={flag}", f"train.sparse_embedding_grad={flag}",
         f"train.dense_head_input={flag}"],
    )  # fmt: skip
    engine = build_run(config).engine
    assert engine.skinny_head is on and engine.skinny_layers is on
    assert (engine.prefix_cache is not None) is on and engine.sparse_embedding_grad is on
    assert engine.dense_head_input is on
