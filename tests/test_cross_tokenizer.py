"""Cross-tokenizer distillation: span alignment, merged probabilities, ULD, the uld agent and its config."""

import sys
from pathlib import Path

import pytest
import torch

from rl_distill.agents import AGENTS, ULDAgent, ULDConfig
from rl_distill.config import ConfigError, config_from_dict
from rl_distill.cross_tokenizer import (
    CrossTokenizerTeacher,
    align_rollout,
    align_spans,
    char_ends,
    evaluate_cross,
    group_logprobs,
    span_teacher_rewards,
    uld_distance,
    uld_terms,
)
from rl_distill.models import char_tokenizer, check_tokenizers_match, tiny_llama
from rl_distill.models.loading import TokenizerMismatchError
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.tasks import Example

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from cross_tokenizer import digit_pair_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a busy machine

CHARS = "0123456789+-=?. #"


# --- alignment --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("student_ends", "teacher_ends", "groups"),
    [
        # the same tokenization: one group per token
        ([1, 2, 3], [1, 2, 3], [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)]),
        # "12+34": student "12", "+", "34"; teacher one character each
        ([2, 3, 5], [1, 2, 3, 4, 5], [(0, 1, 0, 2), (1, 2, 2, 3), (2, 3, 3, 5)]),
        # crossing boundaries "ab|cd" vs "a|bc|d": the only common boundary is the end
        ([2, 4], [1, 3, 4], [(0, 2, 0, 3)]),
        # a token without a boundary (half a UTF-8 character) joins the next one's group
        ([None, 2, 3], [1, 2, 3], [(0, 2, 0, 2), (2, 3, 2, 3)]),
        # a zero-width (special) token between groups belongs to none
        ([1, 1, 2], [1, 2], [(0, 1, 0, 1), (2, 3, 1, 2)]),
        # texts that differ at their ends: the tail after the last common boundary is not aligned
        ([1, 2, 4], [1, 2, 3], [(0, 1, 0, 1), (1, 2, 1, 2)]),
        ([], [1], []),
    ],
)
def test_align_spans_hand_computed(student_ends, teacher_ends, groups):
    assert align_spans(student_ends, teacher_ends) == groups


def test_char_ends_of_the_two_tokenizers_and_their_alignment():
    student, teacher = digit_pair_tokenizer(), char_tokenizer()
    text = "12+7=19. #### 123"
    s_ids = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    t_ids = teacher(text, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    assert student.convert_ids_to_tokens(s_ids[:5]) == ["12", "+", "7", "=", "19"]
    assert s_ids[:5] != t_ids[:5] and len(s_ids) == 15 and len(t_ids) == 18
    s_ends, t_ends = char_ends(student, s_ids), char_ends(teacher, t_ids)
    assert s_ends == [2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 17]  # EOS adds no character
    assert t_ends == [*range(1, 18), 17]  # one character each
    groups = align_spans(s_ends, t_ends)
    assert groups[:5] == [(0, 1, 0, 2), (1, 2, 2, 3), (2, 3, 3, 4), (3, 4, 4, 5), (4, 5, 5, 7)]
    assert groups[-2:] == [
        (12, 13, 14, 16),
        (13, 14, 16, 17),
    ]  # "123" = "12" + "3"; EOS left to align_rollout
    assert all(t1 - t0 == len(student.convert_ids_to_tokens(s_ids[s0])) for s0, s1, t0, t1 in groups)


def test_group_logprobs_hand_computed():
    logp = torch.log(torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]]))  # (T=3, V=2)
    ids = torch.tensor([1, 1, 0])
    merged = group_logprobs(logp, ids, torch.tensor([0, 2]), torch.tensor([2, 3])).exp()
    # group 0 = tokens 0, 1: p0(v) * p1(y1 = 1) = [0.6, 0.4] * 0.7; group 1 = token 2 alone
    torch.testing.assert_close(merged, torch.tensor([[0.42, 0.28], [0.9, 0.1]]))


def test_span_teacher_rewards_hand_computed():
    """Each span's teacher log-prob lands on its last student token; a row sums to log pT of the text."""
    from rl_distill.cross_tokenizer import RowAlignment

    t_logp = torch.tensor([[-0.1, -0.2, -0.3, -0.4, -0.5]])  # teacher tokens "1" "2" "+" "3" <eos>
    # student "12" "+" "3" <eos>: groups (0,1,0,2) (1,2,2,3) (2,3,3,4) (3,4,4,5)
    a = RowAlignment(
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([1, 2, 3, 4]),
        torch.tensor([0, 2, 3, 4]),
        torch.tensor([2, 3, 4, 5]),
        4,
        4,
    )
    out = span_teacher_rewards(t_logp, [a], (1, 5))  # one padded student column
    torch.testing.assert_close(out, torch.tensor([[-0.3, -0.3, -0.4, -0.5, 0.0]]))
    assert float(out.sum()) == pytest.approx(float(t_logp.sum()))


# --- ULD ------------------------------------------------------------------------------------
def test_uld_closed_forms():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([1.0, 0.0, 0.0])
    assert float(uld_distance(p, q)) == pytest.approx(1.0)  # |0.5 - 1| + |0.5 - 0| + 0
    assert float(uld_distance(q, p)) == pytest.approx(1.0)  # symmetric, padding on either side
    r = torch.tensor([0.2, 0.3, 0.5])
    assert float(uld_distance(r, r)) == 0.0
    # sorted: [0.5, 0.3, 0.2] vs [0.7, 0.2, 0.1, 0] -> 0.2 + 0.1 + 0.1 + 0
    assert float(uld_distance(r, torch.tensor([0.1, 0.7, 0.0, 0.2]))) == pytest.approx(0.4)


def test_uld_ignores_token_identity():
    """The stated limit: two one-hot distributions on different tokens (or vocabularies) are at distance 0."""
    right = torch.tensor([0.0, 0.0, 1.0])
    wrong = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    assert float(uld_distance(wrong, right)) == 0.0


def test_uld_permutation_invariance_and_bound_by_l1():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(8, 6, generator=gen).softmax(-1)
    q = torch.rand(8, 6, generator=gen).softmax(-1)
    perm_p, perm_q = torch.randperm(6, generator=gen), torch.randperm(6, generator=gen)
    d = uld_distance(p, q)
    torch.testing.assert_close(uld_distance(p[:, perm_p], q[:, perm_q]), d)
    assert d.shape == (8,)
    assert bool((d <= (p - q).abs().sum(-1) + 1e-6).all())  # sorting is the cheapest pairing
    assert bool((d > 0).all())


def test_uld_gradient_reaches_the_student():
    s_logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    uld_distance(s_logits.softmax(-1), torch.tensor([[0.1, 0.2, 0.3, 0.4]])).sum().backward()
    assert s_logits.grad is not None and float(s_logits.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="leading shapes differ"):
        uld_distance(torch.ones(2, 3), torch.ones(3, 3))


# --- the teacher's reading and uld_terms --------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    """A char teacher and a digit-pair student (different ids, different lengths)."""
    t_tok, s_tok = char_tokenizer(CHARS), digit_pair_tokenizer()
    teacher = tiny_llama(len(t_tok), hidden_size=32, num_layers=1, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # sharp: a distance far from zero to learn
    student = tiny_llama(len(s_tok), hidden_size=32, num_layers=1, seed=2)
    return teacher, t_tok, student, s_tok


def test_teacher_reads_the_student_text_and_eos_pairs_up(pair):
    teacher, t_tok, student, s_tok = pair
    engine = RolloutEngine(student, None, s_tok)
    cross = CrossTokenizerTeacher(teacher, t_tok, s_tok)
    r = engine.from_completions(["1+2=", "9+9="], ["3. #### 3", "18. #### 18"])  # EOS appended
    view = cross.read(r, engine)
    assert view.texts == ["3. #### 3", "18. #### 18"]
    assert t_tok.decode(view.rollout.completion_ids[1][view.rollout.completion_mask[1]]) == "18. #### 18<eos>"
    # the teacher's scores are those of its own sequence scored alone
    alone = cross.engine.score(
        cross.engine.from_completions(["9+9="], ["18. #### 18"]), teacher_output="full"
    )
    torch.testing.assert_close(view.rollout.teacher_logprobs[1, :12], alone.teacher_logprobs[0])
    alignments = align_rollout(r, s_tok, view.rollout, t_tok)
    a = alignments[1]  # "18" "." " " "#" "#" "#" "#" " " "18" <eos>: 10 student tokens, 12 teacher tokens
    assert a.student_tokens == 10 and a.num_groups == 10 and a.student_aligned == 10
    assert a.teacher_starts.tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert (a.student_starts[-1].item(), a.teacher_starts[-1].item()) == (9, 11)  # the two EOS


def test_uld_terms_equal_the_positionwise_distance_when_the_tokenizers_coincide(pair):
    """Same tokenizer on both sides: every group is one token, so uld_terms is the mean per-token ULD."""
    teacher, t_tok, _, _ = pair
    student = tiny_llama(len(t_tok), hidden_size=32, num_layers=1, seed=5)
    engine = RolloutEngine(student, None, t_tok)
    cross = CrossTokenizerTeacher(teacher, t_tok, t_tok)
    ids = [t_tok("3. #### 3", add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]]
    ids.append(t_tok("9.#", add_special_tokens=False)["input_ids"])  # cut at a budget: no EOS
    r = engine.from_completions(["1+2=", "12-3="], ids, append_eos=False)
    view = cross.read(r, engine)
    torch.testing.assert_close(view.rollout.completion_ids, r.completion_ids)
    logits = engine.score_student(r)
    per_row, has = uld_terms(logits, r, view, align_rollout(r, t_tok, view.rollout, t_tok))
    direct = uld_distance(logits.softmax(-1), view.rollout.teacher_logits.softmax(-1))  # (B, T)
    mask = r.completion_mask
    expected = (direct * mask).sum(-1) / mask.sum(-1)
    assert bool(has.all())
    torch.testing.assert_close(per_row, expected)


# --- the agent -------------------------------------------------------------------------------
def _agent(pair, **overrides):
    teacher, t_tok, student, s_tok = pair
    student = tiny_llama(len(s_tok), hidden_size=32, num_layers=1, seed=2)
    engine = RolloutEngine(student, None, s_tok)
    cross = CrossTokenizerTeacher(teacher, t_tok, s_tok)
    agent = ULDAgent(
        engine,
        torch.optim.Adam(student.parameters(), lr=3e-3),
        ULDConfig(max_new_tokens=6, **overrides),
        generator=torch.Generator().manual_seed(0),
        cross_teacher=cross,
    )
    return agent, engine, cross


def test_on_policy_uld_lowers_the_heldout_uld_distance(pair):
    agent, engine, cross = _agent(pair, lmbda=1.0)
    train = [Example(f"{a}+{b}=") for a in range(6) for b in range(6)]
    held_out = [f"{a}-{b}=" for a in range(4) for b in range(2)]
    sampling = SamplingConfig(max_new_tokens=6)

    def measure():
        return evaluate_cross(engine, cross, held_out, sampling, generator=torch.Generator().manual_seed(1))

    before = measure()
    for step in range(25):
        stats = agent.update(train[(step * 4) % 36 : (step * 4) % 36 + 4])
        assert stats["train/skipped"] == 0.0 and stats["rollout/on_policy_fraction"] == 1.0
        assert "train/ce" not in stats  # on-policy rows get no cross-entropy
    after = measure()
    assert after["uld"] < 0.7 * before["uld"], (before, after)
    assert before["aligned_fraction"] > 0.5


def test_span_policy_gradient_lowers_the_sequence_level_reverse_kl(pair):
    """The identity-aware on-policy term: REINFORCE on span rewards lowers log pS(y) - log pT(text)."""
    agent, engine, cross = _agent(pair, lmbda=1.0, uld_weight=0.0, pg_weight=1.0)
    train = [Example(f"{a}+{b}=") for a in range(6) for b in range(6)]
    held_out = [f"{a}-{b}=" for a in range(4) for b in range(2)]
    sampling = SamplingConfig(max_new_tokens=6)

    def measure():
        return evaluate_cross(engine, cross, held_out, sampling, generator=torch.Generator().manual_seed(1))

    before = measure()
    for step in range(25):
        stats = agent.update(train[(step * 4) % 36 : (step * 4) % 36 + 4])
        assert stats["train/skipped"] == 0.0 and "train/pg_loss" in stats
    after = measure()
    assert after["reverse_kl_seq"] < 0.7 * before["reverse_kl_seq"], (before, after)


def test_seqkd_special_case_is_cross_entropy_on_teacher_text(pair):
    agent, engine, cross = _agent(pair, lmbda=0.0, uld_weight=0.0, ce_weight=1.0)
    stats = agent.update([Example("1+2="), Example("3+4=")])
    assert stats["train/uld"] == 0.0 and stats["train/loss"] == pytest.approx(stats["train/ce"])
    assert stats["rollout/on_policy_fraction"] == 0.0


def test_agent_and_config_checks(pair):
    assert AGENTS["uld"] == (ULDAgent, ULDConfig)
    with pytest.raises(ValueError, match="uld_weight 0 leaves no loss"):
        ULDConfig(uld_weight=0.0, lmbda=1.0)
    ULDConfig(uld_weight=0.0, lmbda=1.0, pg_weight=1.0)  # the span-reward policy gradient alone
    with pytest.raises(ValueError, match="ce_weight must be >= 0"):
        ULDConfig(ce_weight=-1.0)
    with pytest.raises(ValueError, match="no reward term"):
        ULDConfig(alpha=0.5, reward="exact_match")
    _, _, student, s_tok = pair
    with pytest.raises(ValueError, match="set model.cross_tokenizer: uld"):
        ULDAgent(RolloutEngine(student, None, s_tok), torch.optim.SGD(student.parameters(), lr=0.1))


def test_every_uld_config_field_has_a_docstring():
    from test_agents import test_every_config_field_has_a_docstring as check_field_docstrings

    check_field_docstrings(ULDConfig)


def test_the_mismatch_error_names_the_option(pair):
    _, t_tok, _, s_tok = pair
    with pytest.raises(TokenizerMismatchError, match="set model.cross_tokenizer: uld with agent.name: uld"):
        check_tokenizers_match(t_tok, s_tok)


@pytest.mark.parametrize(
    ("model", "agent", "message"),
    [
        (
            {"cross_tokenizer": "uld"},
            {"name": "gkd"},
            "model.cross_tokenizer: 'uld' trains with agent.name: uld",
        ),
        ({}, {"name": "uld"}, "agent.name: 'uld' distils from a teacher with another tokenizer"),
        ({"cross_tokenizer": "gold"}, {"name": "uld"}, "cross_tokenizer: must be one of uld or null"),
        ({"cross_tokenizer": "uld", "student": None}, {"name": "uld"}, "cross_tokenizer: needs student"),
    ],
)
def test_config_refuses_inconsistent_cross_tokenizer_settings(model, agent, message):
    raw = {"model": {"teacher": "t", "student": "s", **model}, "agent": agent}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_the_teacher_engine_takes_the_fast_path_switches(pair):
    """``TrainConfig.engine_options`` reaches the cross-tokenizer teacher's own engine."""
    from rl_distill.config import TrainConfig

    teacher, t_tok, _, s_tok = pair
    off = TrainConfig(
        few_row_products=False,
        teacher_prefix_cache=False,
        sparse_embedding_grad=False,
        dense_head_input=False,
    )
    engine = CrossTokenizerTeacher(teacher, t_tok, s_tok, engine_options=off.engine_options()).engine
    assert not engine.skinny_head and not engine.skinny_layers and engine.prefix_cache is None
    assert not engine.dense_head_input
    default = CrossTokenizerTeacher(teacher, t_tok, s_tok).engine
    assert default.skinny_head and default.skinny_layers and default.prefix_cache is not None
    assert default.dense_head_input
