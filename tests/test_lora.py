"""LoRA students (model.lora): adapters only in the optimizer and checkpoints, merge, base-model teacher."""

from pathlib import Path

import pytest
import torch
from run_helpers import save_tiny_model, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.models.lora import (
    AdapterDisabledTeacher,
    LoraSpec,
    adapter_state_dict,
    apply_lora,
    is_lora,
    linear_module_names,
    load_adapter_state_dict,
    save_final_lora,
)

SPEC = LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def tiny(seed=0):
    return tiny_llama(len(char_tokenizer()), hidden_size=32, num_layers=2, seed=seed)


def perturb_adapters(model, seed=1):
    """LoRA starts as the identity (B = 0); give the adapters values so that they change outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_only_adapters_train():
    model = apply_lora(tiny(), SPEC)
    assert is_lora(model) and not is_lora(tiny())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_missing_target_modules_list_the_found_names():
    assert linear_module_names(tiny()) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "lm_head",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    with pytest.raises(
        ValueError,
        match=r"model.lora.target_modules: \['c_attn'\] not found in LlamaForCausalLM; its linear layers are named: down_proj, gate_proj",
    ):
        apply_lora(tiny(), LoraSpec(target_modules=["q_proj", "c_attn"]))


def test_spec_range_checks_name_the_field():
    for bad, field in (
        ({"r": 0}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": []}, "target_modules"),
    ):
        with pytest.raises(ValueError, match=f"^{field}:"):
            LoraSpec(**bad)


def test_adapter_disabled_teacher_is_the_base_model_and_leaves_the_adapters_trainable():
    base = tiny()
    x = torch.randint(4, 60, (2, 7))
    with torch.no_grad():
        expected = base(input_ids=x).logits
    student = apply_lora(tiny(), SPEC)
    perturb_adapters(student)
    teacher = AdapterDisabledTeacher(student)
    teacher.eval().requires_grad_(False)  # what the rollout engine does to its teacher
    assert any(p.requires_grad for p in student.parameters())
    assert list(teacher.parameters()) == []
    student.train()
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=x).logits, expected)
        assert not torch.allclose(student(input_ids=x).logits, expected)
    assert student.training  # the teacher's forward restores the student's mode
    assert teacher.config is student.config
    with pytest.raises(ValueError, match="needs a LoRA student"):
        AdapterDisabledTeacher(tiny())


def test_adapter_state_round_trips_exactly():
    a = apply_lora(tiny(), SPEC)
    perturb_adapters(a, seed=3)
    b = apply_lora(tiny(), SPEC)
    load_adapter_state_dict(b, adapter_state_dict(a))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    other = apply_lora(tiny(), LoraSpec(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="has shape"):
        load_adapter_state_dict(other, adapter_state_dict(a))


def test_merged_save_loads_with_plain_from_pretrained(tmp_path):
    model = apply_lora(tiny(), SPEC)
    perturb_adapters(model)
    written = save_final_lora(model, tmp_path / "final", merge=True)
    assert written == [tmp_path / "final", tmp_path / "final" / "merged"]
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert is_lora(model)  # the merge worked on a copy
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "merged")
    x = torch.randint(4, 60, (2, 7))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )
    assert not any("lora" in k for k in load_file(str(tmp_path / "final" / "merged" / "model.safetensors")))


# --- in a run: built from the config, trained by the trainer ---------------------------------------
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "lora_smollm2.yaml"


def lora_options():
    from rl_distill.config import load_config

    lora = dict(load_config(EXAMPLE).model.lora)
    assert lora["merge_on_save"] is True and lora["r"] >= 1
    return lora


def run_config(tmp_path, teacher, steps, *, agent=None, model=None, train=None, name="run"):
    from rl_distill.config import config_from_dict

    cfg = tiny_config(
        teacher,
        tmp_path / name,
        agent=agent,
        model={"lora": lora_options(), **(model or {})},
        train={"steps": steps, "save_every": 1, "keep_last": 5, **(train or {})},
    )
    return config_from_dict(cfg)


@pytest.fixture
def teacher_dir(tmp_path):
    return save_tiny_model(tmp_path / "teacher", num_layers=2, sharpen=3.0)


def lora_tensors(model):
    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


def test_lora_run_trains_and_checkpoints_only_adapters_and_saves_a_mergeable_final(tmp_path, teacher_dir):
    from rl_distill.trainer import Trainer

    trainer = Trainer(run_config(tmp_path, teacher_dir, 2))
    student = trainer.student
    assert is_lora(student)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in student.named_parameters() if "lora_" in n}
    base_before = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" not in n}
    trainer.train()
    assert all(torch.equal(p, base_before[n]) for n, p in student.named_parameters() if "lora_" not in n)
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    assert (ckpt / "adapter.safetensors").is_file() and not (ckpt / "student.safetensors").exists()
    assert set(load_file(str(ckpt / "adapter.safetensors"))) == set(adapter_state_dict(student))
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    x = torch.randint(4, 60, (2, 7))
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=x).logits, student(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )
    assert (final / "merged" / "tokenizer.json").is_file()


def test_lora_resume_restores_the_adapters_exactly(tmp_path, teacher_dir):
    from rl_distill.trainer import Trainer

    whole = Trainer(run_config(tmp_path, teacher_dir, 3, name="whole"))
    whole.train()
    Trainer(run_config(tmp_path, teacher_dir, 1, name="split")).train()
    resumed = Trainer(run_config(tmp_path, teacher_dir, 3, name="split"))
    assert resumed.train(resume=True).resumed_from.name == "step-1"
    a, b = lora_tensors(whole.student), lora_tensors(resumed.student)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "agent",
    [
        {"name": "gkd"},
        {"name": "reinforce", "baseline": "value", "samples_per_prompt": 2},
        {"name": "ppo", "update_epochs": 2},
        {"name": "minillm"},
        {"name": "grpo", "reward": "fixtures_rewards:length_reward"},
        {"name": "spin", "round_steps": 1, "saturation_prompts": 0},
    ],
    ids=lambda a: a["name"],
)
def test_lora_works_with_every_agent(tmp_path, teacher_dir, agent):
    from rl_distill.trainer import Trainer

    trainer = Trainer(
        run_config(tmp_path, teacher_dir, 1, agent={"max_new_tokens": 6, **agent}, train={"save_every": 0})
    )
    before = lora_tensors(trainer.student)
    heads = [p.detach().clone() for p in trainer.agent.extra_parameters()]
    stats = trainer.train_step()
    assert stats["train/skipped"] == 0.0
    after = lora_tensors(trainer.student)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if agent["name"] in ("ppo", "reinforce"):  # the value head trains next to the adapters
        assert heads and any(not torch.equal(h, p) for h, p in zip(heads, trainer.agent.extra_parameters()))


def test_base_of_student_teacher_is_the_student_with_adapters_off(tmp_path, teacher_dir):
    from rl_distill.trainer import Trainer

    config = run_config(
        tmp_path,
        teacher_dir,
        2,
        model={"teacher": "base_of_student", "student": str(teacher_dir), "student_layers": None},
        agent={"alpha": 0.5, "reward": "exact_match", "max_new_tokens": 6},
        train={"save_every": 0},
    )
    trainer = Trainer(config)
    teacher = trainer.run.teacher
    assert isinstance(teacher, AdapterDisabledTeacher) and teacher.student is trainer.student
    assert list(teacher.parameters()) == []  # one set of weights in memory
    trainer.train()
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter_state_dict(trainer.student).items())
    base = AutoModelForCausalLM.from_pretrained(teacher_dir)
    x = torch.randint(4, 60, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=x).logits, base(input_ids=x).logits)
        assert not torch.allclose(trainer.student(input_ids=x).logits, base(input_ids=x).logits)


def test_lora_config_errors_name_the_field(tmp_path, teacher_dir):
    from rl_distill.build import build_run
    from rl_distill.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"model.teacher: 'base_of_student' needs model.lora"):
        config_from_dict({"model": {"teacher": "base_of_student", "student": "x"}})
    with pytest.raises(ConfigError, match=r"model.student: .*base_of_student.* needs the student checkpoint"):
        config_from_dict({"model": {"teacher": "base_of_student", "lora": {}}})
    with pytest.raises(ConfigError, match=r"model.lora.r: must be >= 1"):
        config_from_dict({"model": {"lora": {"r": 0}}})
    with pytest.raises(ConfigError, match=r"model.lora.rank: unknown field"):
        config_from_dict({"model": {"lora": {"rank": 4}}})
    config = run_config(tmp_path, teacher_dir, 1, model={"lora": {"target_modules": ["c_attn"]}})
    with pytest.raises(ValueError, match=r"model.lora.target_modules: \['c_attn'\] not found.*q_proj"):
        build_run(config)


def test_lora_memory_benchmark_runs_on_a_tiny_model():
    """A smoke run of benchmarks/lora_memory.py (one variant, in this process; no timing asserted)."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import lora_memory

    args = argparse.Namespace(
        model="tiny",
        student_layers=2,
        batch_size=2,
        max_new_tokens=4,
        lora_r=4,
        steps=1,
        warmup=0,
        threads=1,
        device="cpu",
    )
    result = lora_memory.run_variant(args, "lora_bf16")
    assert result["trainable_params"] < result["total_params"] and result["s_per_step"]["n"] == 1


def test_eval_of_a_lora_final_folder_equals_eval_of_the_merged_model(tmp_path, teacher_dir):
    """`rl-distill eval final/` rebuilds the LoRA student from the run's config and loads the adapter."""
    import json

    from rl_distill.cli import main
    from rl_distill.trainer import Trainer

    Trainer(run_config(tmp_path, teacher_dir, 2, train={"lr": 0.05})).train()
    final = tmp_path / "run" / "final"
    assert main(["eval", str(final), "--out", str(tmp_path / "ev_adapter")]) == 0
    assert main(["eval", str(final / "merged"), "--out", str(tmp_path / "ev_merged")]) == 0
    adapter = json.loads((tmp_path / "ev_adapter" / "metrics.json").read_text())
    merged = json.loads((tmp_path / "ev_merged" / "metrics.json").read_text())
    assert adapter.keys() == merged.keys()
    assert adapter == pytest.approx(merged, rel=1e-4, abs=1e-5)
