"""Every ordinary mistake is one line naming the field, file or override: exit code 2, no traceback.

Each row of ``CASES`` is a mistake a new user makes: a one-line config file, a ``--set``, or a model
or data file rigged in ``rig`` (``{rig}`` and ``{tmp}`` in a row are replaced by those folders).
"""

from pathlib import Path

import pytest
import torch
from run_helpers import save_tiny_model

from rl_distill.cli import main
from rl_distill.config import ConfigError, load_config, read_config_file
from rl_distill.tasks import base as tasks_base
from rl_distill.tasks import task_options

CODE_REWARD = "agent: {alpha: 0.5, reward: 'fixtures_rewards:length_reward'}"
WEIGHTED = "eval: {reward: {weighted_sum: [{weight: 1.0, name: exact_match}, {weight: 0.5, name: 'my_rewards:score'}]}}"

# (case, command, config file, extra arguments, expected on the one line of stderr)
CASES = [
    # 1. a device this machine does not have
    ("cuda", "train", "model: {device: cuda}", [], "model.device: 'cuda', but CUDA is not available"),
    ("cuda:1", "train", "model: {device: 'cuda:1'}", [], "model.device: 'cuda:1', but CUDA"),
    ("mps", "train", "model: {device: mps}", [], "model.device: 'mps', but MPS (Apple GPU) is not available"),
    # 2. output_dir is a file, or inside one
    ("output_dir file", "train", "train: {output_dir: '{rig}/a_file'}", [], "train.output_dir: '{rig}/a_file' is an existing file, not a folder"),
    ("output_dir in file", "train", "train: {output_dir: '{rig}/a_file/run'}", [], "train.output_dir: '{rig}/a_file/run' is inside '{rig}/a_file'"),
    # 3. task options come from the task's signature
    ("unknown option", "train", "data: {task: arithmetic, options: {digitz: 3}}", [], "data.options.digitz: unknown option; task 'arithmetic' accepts compact, digits, steps"),
    ("option of no task", "train", "data: {task: instructions, options: {path: x.jsonl}}", [], "data.options.path: unknown option; task 'instructions' takes no options"),
    ("split as option", "train", "data: {options: {seed: 3}}", [], "data.options.seed: not a task option; set data.seed instead"),
    # 4. broken model folders
    ("truncated weights", "train", "model: {teacher: '{rig}/truncated', device: cpu}", [], "weights file '{rig}/truncated/model.safetensors' is truncated"),
    ("only config.json", "train", "model: {teacher: '{rig}/config_only', device: cpu}", [], "model folder '{rig}/config_only' has no tokenizer files"),
    ("only config.json, student", "train", "model: {teacher: '{rig}/teacher', student: '{rig}/config_only', device: cpu}", [], "and no weights (model.safetensors or pytorch_model.bin); it holds only config.json"),
    # 5. malformed --set
    ("--set bad YAML", "train", "", ["--set", "agent.beta=[1,"], "override 'agent.beta=[1,': the value is not valid YAML"),
    ("--set without =", "train", "", ["--set", "train"], "override 'train': expected section.field=value"),
    ("--set into an int", "train", "", ["--set", "train.steps.x=1"], "override 'train.steps.x=1': train.steps is not a mapping field"),
    ("--set into a file's int", "train", "train: {steps: 3}", ["--set", "train.steps.x=1"], "train.steps is 3, not a mapping"),
    # 6. YAML files
    ("top level a list", "train", "- model\n- train", [], "config.yaml': the top level must be a mapping of sections"),
    ("top level a scalar", "train", "just some text", [], "the top level must be a mapping of sections (model, data, agent, train, eval), got a str"),
    ("duplicate section", "train", "train: {steps: 3}\ntrain: {lr: 0.1}", [], "config.yaml': duplicate key 'train' on lines 1 and 2"),
    ("duplicate field", "train", "train:\n  steps: 3\n  lr: 0.1\n  steps: 4", [], "config.yaml': duplicate key 'steps' on lines 2 and 4"),
    ("invalid YAML", "train", "model: [unclosed", [], "config.yaml' is not valid YAML: "),
    ("config not UTF-8", "train", "train: {output_dir: 'caf\xe9'}", [], "config.yaml' is not UTF-8 text (byte 0xe9 on line 1)"),
    # 7. data files
    ("jsonl not UTF-8", "train", "data: {task: jsonl, options: {path: '{rig}/latin1.jsonl'}}\nmodel: {device: cpu}", [], "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at position 16)"),
    # 8. non-finite floats, in every section and the agents' configs
    ("nan lr", "train", "train: {lr: .nan}", [], "train.lr: must be finite, got nan"),
    ("inf beta", "train", "agent: {beta: .inf}", [], "agent.beta: must be finite, got inf"),
    ("nan optional float", "train", "agent: {name: ppo, target_kl: .nan}", [], "agent.target_kl: must be finite, got nan"),
    ("-inf by --set", "train", "", ["--set", "agent.temperature=-.inf"], "agent.temperature: must be finite, got -inf"),
    ("nan task option", "train", "data: {task: factual_summary, options: {hallucination_rate: .nan}}", [], "data.options.hallucination_rate: must be finite, got nan"),
    # 9. code in configs is opt-in, for every command that loads a config
    ("code reward", "train", CODE_REWARD, [], "agent.reward: 'fixtures_rewards:length_reward' would import and run user code; allow it with --allow-code"),
    ("code in weighted_sum", "eval", WEIGHTED, [], "eval.reward.weighted_sum[1].name: 'my_rewards:score' would import"),
    ("code reward, env-check", "env-check", CODE_REWARD, [], "agent.reward: 'fixtures_rewards:length_reward' would import"),
    ("code reward, compare", "compare", CODE_REWARD, [], "or train.allow_code_rewards: true in the config"),
]  # fmt: skip
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
MARKS = {"cuda": NO_CUDA, "cuda:1": NO_CUDA, "mps": NO_MPS}


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """Broken things next to good ones: a plain file, truncated weights, a config-only folder, a bad jsonl."""
    rig = tmp_path_factory.mktemp("rig")
    (rig / "a_file").write_text("not a folder\n")
    save_tiny_model(rig / "teacher")
    weights = save_tiny_model(rig / "truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    (rig / "config_only").mkdir()
    (rig / "config_only" / "config.json").write_text((rig / "teacher" / "config.json").read_text())
    (rig / "latin1.jsonl").write_bytes('{"prompt": "tea"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    return rig


@pytest.mark.parametrize(
    ("case", "command", "config", "args", "expected"),
    [pytest.param(*row, id=row[0], marks=MARKS.get(row[0], ())) for row in CASES],
)
def test_a_mistake_is_one_line_naming_it(case, command, config, args, expected, rig, tmp_path, capsys):
    def fill(text):
        return text.replace("{rig}", str(rig)).replace("{tmp}", str(tmp_path))

    path = tmp_path / "config.yaml"
    path.write_bytes(fill(config).encode("latin-1"))  # latin-1: a "\xe9" in a row is one non-UTF-8 byte
    extra = ["--out", str(tmp_path / "out")] if command == "compare" else []
    assert main([command, str(path), *extra, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rl-distill: error: ") and len(err.strip().splitlines()) == 1, err
    assert fill(expected) in err


def test_code_rewards_load_once_allowed(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CODE_REWARD + "\n")
    assert load_config(path, allow_code=True).agent.reward == "fixtures_rewards:length_reward"
    path.write_text(CODE_REWARD + "\ntrain: {allow_code_rewards: true}\n")
    assert load_config(path).train.allow_code_rewards
    with pytest.raises(ConfigError, match=r"^agent\.reward\.name: .* --allow-code"):
        load_config(None, ["agent.alpha=0.5", "agent.reward={name: 'fixtures_rewards:ContainsReward'}"])


def test_allow_code_flag_reaches_the_config(rig, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{teacher: '{rig}/teacher', device: cpu}}\n{CODE_REWARD}\n")
    assert main(["env-check", str(config), "--allow-code", "--num-prompts", "2"]) == 0
    assert "check_env passed" in capsys.readouterr().out


def test_output_dir_expands_the_home_folder():
    expected = str(Path.home() / "runs" / "x")
    assert load_config(None, ["train.output_dir=~/runs/x"]).train.output_dir == expected


def test_task_options_are_the_factory_keywords(monkeypatch):
    assert task_options("arithmetic") == ["compact", "digits", "steps"]
    assert task_options("jsonl") == ["path"] and task_options("instructions") == []
    monkeypatch.setitem(tasks_base._TASKS, "free", lambda *, seed, num_train, num_eval, **options: None)
    assert task_options("free") is None  # **options: any option goes


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("base: &b {steps: 3, lr: 0.1}\ntrain:\n  <<: *b\n  steps: 4\n")
    assert read_config_file(path)["train"] == {"steps": 4, "lr": 0.1}
