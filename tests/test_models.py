import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rl_distill.models import (
    TokenizerMismatchError,
    char_tokenizer,
    check_pair,
    check_tokenizers_match,
    evenly_spaced_layers,
    load_causal_lm,
    load_tokenizer,
    make_kept_layer_student,
    student_from_config,
    tiny_llama,
)
from rl_distill.rollout import RolloutEngine, SamplingConfig, position_ids_from_mask


def test_char_tokenizer_round_trip(tokenizer):
    text = "Tom has 12 apples.\n12+7=19 #### 19"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(5, 2) == [0, 4]
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 30\]"):
        evenly_spaced_layers(30, 31)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_kept_layer_student_copies_weights_and_keeps_teacher(tokenizer):
    teacher = tiny_llama(len(tokenizer), num_layers=4, seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_kept_layer_student(teacher, layers=[0, 3])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert teacher.config.num_hidden_layers == 4 and len(teacher.model.layers) == 4
    for new, old in ((0, 0), (1, 3)):
        for name, value in student.model.layers[new].state_dict().items():
            assert torch.equal(value, teacher.model.layers[old].state_dict()[name]), name
        assert student.model.layers[new].self_attn.layer_idx == new
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    for k, v in teacher.state_dict().items():  # the teacher is untouched
        assert torch.equal(v, before[k])


def test_keeping_all_layers_reproduces_the_teacher(tokenizer):
    teacher = tiny_llama(len(tokenizer), num_layers=3, seed=0)
    student = make_kept_layer_student(teacher, num_layers=3)
    ids = torch.tensor([tokenizer("abc 123")["input_ids"]])
    torch.testing.assert_close(_logits(student, ids), _logits(teacher, ids))


def test_kept_layer_student_kv_cache_matches_full_forward(tokenizer):
    teacher = tiny_llama(len(tokenizer), num_layers=4, seed=0)
    student = make_kept_layer_student(teacher, layers=[1, 2])
    engine = RolloutEngine(student, teacher, tokenizer)
    r = engine.generate(["2+2=", "hi"], SamplingConfig(max_new_tokens=6, temperature=0))
    mask = r.attention_mask
    with torch.no_grad():
        full = student(
            input_ids=r.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
    p = r.prompt_ids.shape[1]
    ref = full[:, p - 1 : -1].log_softmax(-1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(r.logprobs, ref * r.completion_mask, atol=1e-5, rtol=0)


def test_kept_layer_errors(tokenizer):
    teacher = tiny_llama(len(tokenizer), num_layers=3)
    with pytest.raises(ValueError, match="exactly one"):
        make_kept_layer_student(teacher)
    with pytest.raises(ValueError, match="sorted, unique"):
        make_kept_layer_student(teacher, layers=[2, 1])
    with pytest.raises(ValueError, match=r"indices in \[0, 2\]"):
        make_kept_layer_student(teacher, layers=[0, 3])


def test_tokenizer_mismatch_is_reported_with_both_vocabularies():
    a, b = char_tokenizer("abc"), char_tokenizer("abd")
    a.name_or_path, b.name_or_path = "teacher-tok", "student-tok"
    with pytest.raises(
        TokenizerMismatchError,
        match=r"token 'c' has id 6 for the teacher and is missing for the student.*teacher-tok.*7 tokens.*student-tok",
    ):
        check_tokenizers_match(a, b)
    with pytest.raises(TokenizerMismatchError, match="vocabulary sizes differ"):
        check_tokenizers_match(char_tokenizer("abc"), char_tokenizer("abcd"))
    check_tokenizers_match(char_tokenizer("abc"), char_tokenizer("abc"))  # same vocabulary: fine


def test_logit_width_smaller_than_vocabulary_is_an_error(tokenizer):
    small = tiny_llama(len(tokenizer) - 1)
    with pytest.raises(TokenizerMismatchError, match=f"student has {len(tokenizer) - 1} output logits"):
        check_pair(tiny_llama(len(tokenizer)), small, tokenizer)
    info = check_pair(tiny_llama(len(tokenizer) + 3), tiny_llama(len(tokenizer)), tokenizer)
    assert (info.vocab_size, info.teacher_width, info.student_width) == (
        len(tokenizer),
        len(tokenizer) + 3,
        len(tokenizer),
    )


def test_load_from_path_round_trip(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer), seed=4)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    ids = torch.tensor([tok("hello")["input_ids"]])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_missing_or_invalid_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(str(tmp_path))


def test_student_from_config(tokenizer):
    model = student_from_config(
        {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}, seed=3,
    )  # fmt: skip
    again = student_from_config(
        {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}, seed=3,
    )  # fmt: skip
    assert model.config.num_hidden_layers == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="model_type"):
        student_from_config({"hidden_size": 16})


@pytest.mark.slow
def test_builtin_smollm2_teacher_and_six_layer_student():
    """The offline default teacher: converted once and cached (installed by `make install`)."""
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    teacher = load_causal_lm("smollm2-135m-instruct")
    assert sum(p.numel() for p in teacher.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert teacher.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert tokenizer.chat_template is not None
    student = make_kept_layer_student(teacher, num_layers=6)
    assert student.config.kept_teacher_layers == [0, 6, 12, 17, 23, 29]
    engine = RolloutEngine(student, teacher, tokenizer)
    r = engine.rollout(["What is 2+3?"], SamplingConfig(max_new_tokens=8, temperature=0))
    assert torch.isfinite(r.teacher_logprobs).all()
    # The teacher itself answers sensibly: greedy decoding with the teacher as sampler.
    t = engine.generate(["What is 2+3?"], SamplingConfig(max_new_tokens=12, temperature=0), model=teacher)
    assert "5" in engine.decode(t)[0]


@pytest.mark.slow
def test_smollm2_conversion_is_atomic_and_loadable(tmp_path):
    from rl_distill.models import ensure_smollm2

    target = ensure_smollm2(tmp_path / "smol")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol"]  # no temporary folder left behind
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(target)
    assert model.config.vocab_size == 49152
