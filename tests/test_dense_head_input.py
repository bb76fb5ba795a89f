"""The head's input made densely strided (rl_distill/rollout/skinny_head.py: ``dense_head_input``).

Hugging Face models slice the hidden states for ``logits_to_keep`` (``h[:, -k:, :]``); the hook copies
such a view to densely packed strides before the output head. These tests check which inputs are
copied, that every forward of the engine that slices goes through it (and none does when switched
off), that values and gradients do not change, and that the hook never outlives its block.
"""

import pytest
import torch
from torch import nn

from rl_distill.models import tiny_llama
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.rollout import skinny_head as sh
from rl_distill.rollout.engine import completion_forward
from rl_distill.rollout.skinny_head import dense_head_input

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["1+2=", "hello there, friend", "x", "abc"]


def dense(x):
    return x.stride() == sh._dense_strides(x.shape)


def test_dense_strides_by_hand():
    assert sh._dense_strides(torch.Size([4, 32, 576])) == (32 * 576, 576, 1)
    assert sh._dense_strides(torch.Size([3])) == (1,)
    assert sh._dense_strides(torch.Size([2, 0, 5])) == (
        5,
        5,
        1,
    )  # size 0 counts as 1 (nothing to stride over)
    h = torch.randn(4, 39, 8)
    assert h[:, -32:].stride() == (39 * 8, 8, 1) and not h[:, -32:].is_contiguous()
    # One kept position: PyTorch calls the view contiguous, but its outer strides are the sequence's.
    one = torch.randn(1, 24, 8)[:, -1:]
    assert one.is_contiguous() and one.stride() == (24 * 8, 8, 1) and not dense(one)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 39, 8)[:, -32:],  # logits_to_keep=32
        lambda: torch.randn(4, 39, 8)[:, -1:],  # the prefill's logits_to_keep=1
        lambda: torch.randn(1, 24, 8)[:, -1:],  # one row: "contiguous" by PyTorch's test, strided still
        lambda: torch.randn(8, 4).t(),  # a transposed input
    ],
)
def test_a_strided_input_is_copied_dense_and_the_value_kept(make):
    x = make()
    assert not dense(x)
    (got,) = sh._densify_input(nn.Identity(), (x,))
    assert dense(got) and torch.equal(got, x) and got.data_ptr() != x.data_ptr()


@pytest.mark.parametrize(
    "x", [torch.randn(4, 32, 8), torch.randn(3, 8), torch.randn(8), torch.randn(0, 5, 8)]
)
def test_a_dense_input_is_left_alone(x):
    assert sh._densify_input(nn.Identity(), (x,)) is None
    assert (
        sh._densify_input(nn.Identity(), ()) is None and sh._densify_input(nn.Identity(), ("text",)) is None
    )


def seen_strides(head):
    """Record whether each input the head's forward receives is densely strided."""
    seen = []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(dense(args[0])))
    return seen, handle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_and_gradients_do_not_change(dtype):
    model = tiny_llama(64, hidden_size=32, num_layers=2, seed=0).to(dtype)
    ids = torch.randint(3, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    seen, handle = seen_strides(model.get_output_embeddings())
    out = {}
    for on in (False, True):
        model.zero_grad()
        logits, hidden = completion_forward(
            model, ids, mask, 5, 64, output_hidden_states=True, dense_head_input=on
        )
        (logits.float().logsumexp(-1).sum() + hidden.float().sum()).backward()
        out[on] = (logits.detach(), hidden.detach(), [p.grad.clone() for p in model.parameters()])
    handle.remove()
    assert seen == [False, True]  # off: the model's strided slice; on: a dense copy
    # The same product on the same numbers: bit-identical logits, hidden states and gradients.
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert all(torch.equal(a, b) for a, b in zip(out[True][2], out[False][2]))


def test_the_hook_lives_only_inside_the_block():
    model = tiny_llama(64, hidden_size=16, num_layers=1)
    head = model.get_output_embeddings()
    with dense_head_input(model) as on:
        assert on and len(head._forward_pre_hooks) == 1
        with dense_head_input(model):  # nested: a second hook, which sees dense input
            assert len(head._forward_pre_hooks) == 2
        assert len(head._forward_pre_hooks) == 1
    assert not head._forward_pre_hooks
    with pytest.raises(RuntimeError, match="inside"), dense_head_input(model):
        raise RuntimeError("inside")
    assert not head._forward_pre_hooks
    with dense_head_input(model, enabled=False) as on:
        assert not on and not head._forward_pre_hooks


class Wrapper(nn.Module):
    """What DDP looks like to the engine: the model under ``.module``, no ``get_output_embeddings``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class ScaledHead(nn.Linear):
    """A custom head (a subclass): the hook does not care about the head's class."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_wrapped_models_custom_heads_and_headless_samplers():
    model = tiny_llama(64, hidden_size=16, num_layers=1)
    with dense_head_input(Wrapper(model)) as on:
        assert on and len(model.get_output_embeddings()._forward_pre_hooks) == 1
    model.lm_head = ScaledHead(16, 64, bias=False)
    seen, _ = seen_strides(model.lm_head)
    with dense_head_input(model):
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), logits_to_keep=2)
    assert seen == [True]
    for headless in (object(), nn.Linear(4, 4)):  # a custom sampler; a module without a head
        with dense_head_input(headless) as on:
            assert not on


@pytest.mark.parametrize("on", [True, False])
def test_every_engine_forward_that_slices_goes_through_it(on, student, teacher, tokenizer):
    """Scoring (plain and prefix-cached), the student's forward, the prefill, the incremental scorer."""
    # fused_step=False: the fused path's prefill gathers each row's last token (dense either way).
    engine = RolloutEngine(student, teacher, tokenizer, dense_head_input=on, fused_step=False)
    plain = RolloutEngine(
        student, teacher, tokenizer, dense_head_input=on, teacher_prefix_cache=False, fused_step=False
    )
    s_seen, s_handle = seen_strides(student.get_output_embeddings())
    t_seen, t_handle = seen_strides(teacher.get_output_embeddings())
    prompts = ["system: be brief. " + p for p in PROMPTS]  # a shared prefix: the prefix cache applies
    rollout = engine.generate(
        prompts, SamplingConfig(max_new_tokens=6), generator=torch.Generator().manual_seed(0)
    )
    prefill = s_seen[0]
    engine.score(rollout, teacher_output="full")
    assert engine.prefix_cache.hits + engine.prefix_cache.misses == 1
    plain.score(rollout, teacher_output="full")
    engine.student_forward(rollout)
    scorer = engine.incremental_scorer()
    scorer.start(engine.encode(prompts))
    s_handle.remove()
    t_handle.remove()
    # Every strided input (the prefill's last position, the scoring slices) is dense when on, none when off;
    # the decode steps' (B, 1, d) inputs are dense either way.
    assert prefill is on and s_seen[-1] is on
    assert len(t_seen) == 4 and all(
        seen is on for seen in t_seen
    )  # prefix entry, cached score, plain, incremental
    assert all(s_seen[1:-1])  # decode steps


def test_scores_and_rollouts_do_not_change(student, teacher, tokenizer):
    on, off = (RolloutEngine(student, teacher, tokenizer, dense_head_input=flag) for flag in (True, False))
    rollouts = [
        e.rollout(PROMPTS, SamplingConfig(max_new_tokens=8), generator=torch.Generator().manual_seed(1),
                  teacher_output="full")
        for e in (on, off)
    ]  # fmt: skip
    a, b = rollouts
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.teacher_logits, b.teacher_logits)
    assert torch.equal(on.score_student(a), off.score_student(a))


def test_lora_models_and_lora_heads_get_a_dense_input():
    """A PEFT model (``get_output_embeddings`` through the wrapper), with LoRA on the head itself."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(64, hidden_size=16, num_layers=1, seed=5),
        peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], lora_alpha=4, lora_dropout=0.0),
    )
    head = model.get_output_embeddings()
    assert type(head) is not nn.Linear  # the LoRA layer wrapping the head
    seen, handle = seen_strides(head)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    outs = [completion_forward(model, ids, mask, 4, 64, dense_head_input=on)[0] for on in (False, True)]
    handle.remove()
    assert seen == [False, True] and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("on", [True, False])
def test_minillm_mixed_policy_prefill_goes_through_it(on, student, teacher, tokenizer):
    """MiniLLM's teacher-mixed sampler has no head of its own: it applies the switch to both models."""
    from rl_distill.agents.minillm import TeacherMixedPolicy

    engine = RolloutEngine(student, teacher, tokenizer, dense_head_input=on)
    policy = TeacherMixedPolicy(student, teacher, 0.3, engine.vocab_size, 1.0, 1.0, dense_head_input=on)
    s_seen, s_handle = seen_strides(student.get_output_embeddings())
    t_seen, t_handle = seen_strides(teacher.get_output_embeddings())
    engine.generate(
        PROMPTS, SamplingConfig(max_new_tokens=3), model=policy, generator=torch.Generator().manual_seed(0)
    )
    s_handle.remove()
    t_handle.remove()
    assert s_seen[0] is on and t_seen[0] is on  # the prefills' strided slices
    assert all(s_seen[1:]) and all(t_seen[1:])  # the decode steps' inputs are dense anyway


@pytest.mark.parametrize("on", [True, False])
def test_agents_own_forwards_follow_the_engine_switch(on, student, tokenizer, monkeypatch):
    """SPIN's and GRPO's own ``completion_forward`` calls (policy, reference) pass the engine's switch."""
    import rl_distill.agents.grpo
    import rl_distill.agents.spin
    from rl_distill.agents import GRPOAgent, GRPOConfig, SPINAgent, SPINConfig
    from rl_distill.tasks import Example

    seen = []
    for module in (rl_distill.agents.spin, rl_distill.agents.grpo):
        real = module.completion_forward

        def spy(*args, real=real, **kwargs):
            seen.append(kwargs.get("dense_head_input", "default"))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "completion_forward", spy)
    examples = [
        Example("1+2=?", "1+2=3. #### 3", {"answer": 3}),
        Example("9-9=?", "9-9=0. #### 0", {"answer": 0}),
    ]
    engine = RolloutEngine(student, None, tokenizer, dense_head_input=on)
    spin = SPINAgent(
        engine,
        torch.optim.AdamW(student.parameters(), lr=1e-3),
        SPINConfig(max_new_tokens=4),
        generator=torch.Generator().manual_seed(0),
    )
    spin.update(examples)  # policy and reference log-probs of chosen and rejected sequences
    spin.saturation_kl(examples)
    grpo = GRPOAgent(
        engine,
        torch.optim.AdamW(student.parameters(), lr=1e-3),
        GRPOConfig(samples_per_prompt=2, max_new_tokens=4, kl_coef=0.05),
        reward=lambda prompts, completions, answer: [float(len(c) % 2) for c in completions],
        generator=torch.Generator().manual_seed(0),
    )
    grpo.update(examples)  # the reference's forward
    assert len(seen) >= 4 and all(flag is on for flag in seen)
