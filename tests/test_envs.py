"""The token-generation environments: Gymnasium contract, determinism, vector = B singles, rewards."""

import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env, data_equivalence
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from rl_distill.envs import ENV_ID, TokenGenerationEnv, VectorTokenGenerationEnv, unbatch_info
from rl_distill.models import tiny_llama
from rl_distill.rollout import PromptTooLongError, RolloutEngine, SamplingConfig, position_ids_from_mask
from rl_distill.tasks import Example

PROMPTS = ["1+2=", "hello there", "x", "abc def ghi"]
EOS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pair(teacher, tokenizer):
    return teacher, tokenizer


class LengthReward:
    """A deterministic external reward that records every batch it sees."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, **metadata):
        self.calls.append((list(prompts), list(completions), metadata))
        return [
            0.1 * len(c) + 0.01 * len(p) + float(m)
            for p, c, m in zip(prompts, completions, metadata.get("bonus", [0.0] * len(prompts)))
        ]


def action_stream(seed, n, vocab, eos_rate=0.25):
    """Random token ids with frequent EOS, so that episodes end at different steps."""
    rng = np.random.default_rng(seed)
    acts = rng.integers(3, vocab, size=n)
    acts[rng.random(n) < eos_rate] = EOS
    return acts


def no_cache_logprobs(model, prompt_ids, completion_ids, vocab):
    """Reference: one plain forward over the unpadded prompt + completion, no cache at all."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1, :vocab]
    return logits.float().log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1)


# --------------------------------------------------------------------------- Gymnasium contract
def test_check_env_passes_on_every_registered_id_without_warnings(pair):
    ids = [env_id for env_id in gymnasium.registry if env_id.startswith("rl_distill/")]
    assert ENV_ID in ids
    for env_id in ids:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            env = gymnasium.make(
                env_id, teacher=pair, prompts=PROMPTS, max_new_tokens=4, alpha=0.5, reward=LengthReward()
            )
            check_env(env.unwrapped)
            # The passive checker wrapped around a made env inspects the first reset/step too.
            env.reset(seed=0)
            env.step(env.action_space.sample())
            env.close()


def test_spaces_have_exact_integer_dtypes_and_the_documented_layout(pair, tokenizer):
    env = TokenGenerationEnv(pair, PROMPTS, max_new_tokens=5)
    vocab, length = len(tokenizer), env.layout.length
    assert env.action_space == gymnasium.spaces.Discrete(vocab)
    assert env.layout.max_prompt_length == max(len(p) for p in PROMPTS)  # char tokenizer: one id per char
    for key in ("input_ids", "attention_mask"):
        box = env.observation_space[key]
        assert isinstance(box, gymnasium.spaces.Box) and box.dtype == np.int64 and box.shape == (length,)
    assert env.observation_space["input_ids"].high.max() == vocab - 1
    assert env.observation_space["attention_mask"].high.max() == 1

    obs, info = env.reset(seed=0, options={"prompt": "x"})
    assert info == {"prompt": "x", "prompt_index": 2}
    p = env.layout.max_prompt_length
    assert obs["attention_mask"].tolist() == [0] * (p - 1) + [1] + [0] * 5
    assert obs["input_ids"][p - 1] == tokenizer.convert_tokens_to_ids("x")
    obs, *_ = env.step(7)
    obs, *_ = env.step(8)
    assert obs["input_ids"][p : p + 2].tolist() == [7, 8]
    assert obs["attention_mask"][p - 1 : p + 3].tolist() == [1, 1, 1, 0]
    assert obs in env.observation_space


def test_reset_options_choose_the_prompt_and_the_seed_draws_it(pair):
    env = TokenGenerationEnv(pair, [Example("ab", metadata={"k": 1}), "cd"], max_new_tokens=3)
    assert env.reset(options={"prompt": 1})[1] == {"prompt": "cd", "prompt_index": 1}
    assert env.reset(options={"prompt": "ab"})[1]["prompt_index"] == 0
    assert env.reset(options={"prompt": "q"})[1]["prompt_index"] == -1
    drawn = [env.reset(seed=s)[1]["prompt_index"] for s in range(20)]
    assert drawn == [env.reset(seed=s)[1]["prompt_index"] for s in range(20)] and set(drawn) == {0, 1}
    with pytest.raises(ValueError, match="out of range"):
        env.reset(options={"prompt": 5})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"promt": 1})


def test_episode_end_terminated_on_eos_truncated_at_budget_and_no_step_after(pair):
    env = TokenGenerationEnv(pair, PROMPTS, max_new_tokens=3)
    env.reset(seed=0)
    assert env.step(5)[2:4] == (False, False)
    assert env.step(EOS)[2:4] == (True, False)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(5)
    env.reset(seed=0)
    flags = [env.step(5)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    env.reset(seed=0)
    env.step(5)
    env.step(5)
    assert env.step(EOS)[2:4] == (True, False)  # EOS on the last budgeted token is a termination
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        env.step(env.action_space.n)


# --------------------------------------------------------------------------- determinism
def run_single(env, seed, actions):
    out = [env.reset(seed=seed)]
    for a in actions:
        step = env.step(a)
        out.append(step)
        if step[2] or step[3]:
            out.append(env.reset())
    return out


def test_same_seed_and_actions_give_identical_outputs(pair):
    reward = LengthReward()
    actions = action_stream(0, 12, 40)
    runs = [
        run_single(
            TokenGenerationEnv(
                pair, PROMPTS, max_new_tokens=4, alpha=0.5, reward=reward, return_teacher_logprobs=True
            ),
            7,
            actions,
        )
        for _ in range(2)
    ]
    assert data_equivalence(runs[0], runs[1], exact=True)
    other = run_single(TokenGenerationEnv(pair, PROMPTS, max_new_tokens=4), 8, actions)
    assert [o[1]["prompt"] for o in runs[0] if len(o) == 2] != [o[1]["prompt"] for o in other if len(o) == 2]


def test_vector_env_is_deterministic(pair):
    actions = action_stream(1, 3 * 10, 40).reshape(10, 3)
    outs = []
    for _ in range(2):
        env = VectorTokenGenerationEnv(
            pair, PROMPTS, num_envs=3, max_new_tokens=4, alpha=0.5, reward=LengthReward()
        )
        outs.append([env.reset(seed=3)] + [env.step(a) for a in actions])
    assert data_equivalence(outs[0], outs[1], exact=True)


@pytest.mark.parametrize("with_reward", [False, True])
def test_vector_env_equals_b_single_envs_step_for_step(pair, with_reward):
    """Same seeds, same actions: the batched env and SyncVectorEnv over singles agree, autoresets included."""
    kwargs = dict(max_new_tokens=4, return_teacher_logprobs=True)
    if with_reward:
        kwargs.update(alpha=0.3, reward=LengthReward())
    num = 3
    vector = VectorTokenGenerationEnv(pair, PROMPTS, num_envs=num, **kwargs)
    singles = SyncVectorEnv(
        [lambda: TokenGenerationEnv(pair, PROMPTS, **kwargs) for _ in range(num)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    assert vector.metadata["autoreset_mode"] == singles.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert vector.observation_space == singles.observation_space
    assert vector.action_space == singles.action_space

    obs_v, info_v = vector.reset(seed=11)
    obs_s, info_s = singles.reset(seed=11)
    assert data_equivalence((obs_v, info_v), (obs_s, info_s), exact=True)
    ended = 0
    for actions in action_stream(2, num * 14, 40).reshape(14, num):
        out_v, out_s = vector.step(actions), singles.step(actions)
        # Observations and episode flags exactly; rewards and log-probs up to fp32 batching noise.
        assert data_equivalence(out_v[0], out_s[0], exact=True)
        assert data_equivalence(out_v[2:4], out_s[2:4], exact=True)
        assert data_equivalence(out_v[1], out_s[1]) and data_equivalence(out_v[4], out_s[4])
        ended += int((out_v[2] | out_v[3]).sum())
    assert ended >= 6  # several autoresets happened, some of them not for all rows at once


def test_vector_external_rewards_are_one_batched_call_per_step(pair):
    reward = LengthReward()
    env = VectorTokenGenerationEnv(
        pair,
        [Example(p, metadata={"bonus": i}) for i, p in enumerate(PROMPTS)],
        num_envs=3,
        max_new_tokens=5,
        alpha=0.5,
        reward=reward,
    )
    env.reset(options={"prompts": [0, 1, 2]})
    _, rewards, terminated, _, infos = env.step(np.array([EOS, 5, EOS]))
    assert terminated.tolist() == [True, False, True]
    assert len(reward.calls) == 1
    prompts, completions, metadata = reward.calls[0]
    assert prompts == [PROMPTS[0], PROMPTS[2]] and completions == ["", ""] and metadata == {"bonus": [0, 2]}
    final = infos["final_info"]
    assert final["_external_reward"].tolist() == [True, False, True]
    for row in (0, 2):
        expected = 0.5 * final["teacher_logprob"][row] + 0.5 * final["external_reward"][row]
        assert rewards[row] == pytest.approx(expected, abs=1e-6)
        assert final["external_reward"][row] == pytest.approx(0.01 * len(PROMPTS[row]) + row)
    assert "external_reward" not in infos  # the continuing row has none


# --------------------------------------------------------------------------- teacher log-probs
def test_step_logprobs_equal_engine_score_and_no_cache_recomputation(pair, student, teacher, tokenizer):
    """Stepping the vector env through sampled sequences = RolloutEngine.score = plain forwards."""
    num, budget = 3, 6
    sampling = SamplingConfig(max_new_tokens=budget)
    free = RolloutEngine(student, teacher, tokenizer).generate(
        PROMPTS[:num], sampling, generator=torch.Generator().manual_seed(0)
    )
    stop = int(free.completion_ids[0, 2])  # a stop token the student emits: sequences of unequal length
    engine = RolloutEngine(student, teacher, tokenizer, stop_token_ids=[stop])
    rollout = engine.score(
        engine.generate(PROMPTS[:num], sampling, generator=torch.Generator().manual_seed(0))
    )
    assert int(rollout.lengths.min()) < budget
    env = VectorTokenGenerationEnv(
        pair,
        PROMPTS,
        num_envs=num,
        max_new_tokens=budget,
        return_teacher_logprobs=True,
        stop_token_ids=[stop],
    )
    env.reset(options={"prompts": PROMPTS[:num]})
    stepped = np.zeros(rollout.completion_ids.shape)
    for t in range(rollout.completion_ids.shape[1]):
        _, rewards, _, _, infos = env.step(rollout.completion_ids[:, t].numpy())
        stepped[:, t] = rewards
        ended = infos.get("_final_info", np.zeros(num, dtype=bool))
        for row in range(num):
            info = unbatch_info(infos["final_info"] if ended[row] else infos, row)
            # The full teacher distribution in info is the one the token was scored under.
            assert info["teacher_logprobs"][rollout.completion_ids[row, t]] == pytest.approx(
                info["teacher_logprob"]
            )
    mask = rollout.completion_mask.numpy()
    torch.testing.assert_close(
        torch.tensor(stepped * mask), rollout.teacher_logprobs.double(), atol=1e-5, rtol=0
    )
    for row in range(num):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        comp = rollout.completion_ids[row][rollout.completion_mask[row]].tolist()
        reference = no_cache_logprobs(teacher, prompt, comp, len(tokenizer))
        torch.testing.assert_close(
            torch.tensor(stepped[row, : len(comp)]).float(), reference, atol=1e-5, rtol=0
        )


def test_incremental_scorer_restart_equals_a_fresh_start(teacher, tokenizer, student):
    engine = RolloutEngine(student, teacher, tokenizer)
    scorer = engine.incremental_scorer()
    state = scorer.start(engine.encode(PROMPTS[:3]))
    tokens = torch.tensor(action_stream(3, 3 * 9, 40).reshape(9, 3))
    for t in range(4):
        scorer.advance(state, tokens[t])
    long_prompt = "a much longer prompt than any cached row"
    scorer.restart(state, [1], engine.encode([long_prompt]))  # grows the cache on the left
    fresh = scorer.start(engine.encode([long_prompt]))
    for t in range(4, 9):
        got = scorer.step(state, tokens[t])
        want = scorer.step(fresh, tokens[t, 1:2])
        assert got[1] == pytest.approx(float(want[0]), abs=1e-5)
    # Every row restarted once more: the dead columns are cropped (the cache never grows unbounded).
    scorer.restart(state, [0, 2], engine.encode(["x", "y"]))
    scorer.restart(state, [1], engine.encode(["z"]))
    assert state.cache_length == 1
    torch.testing.assert_close(
        state.next_logprobs, scorer.start(engine.encode(["x", "z", "y"])).next_logprobs
    )


# --------------------------------------------------------------------------- rewards
def test_alpha_one_has_no_external_component(pair):
    reward = LengthReward()
    env = TokenGenerationEnv(pair, PROMPTS, max_new_tokens=3, alpha=1.0, reward=reward)
    env.reset(seed=0)
    for a in (5, 6, EOS):
        _, r, *_, info = env.step(a)
        assert r == info["teacher_logprob"] and "external_reward" not in info and info["alpha"] == 1.0
    assert reward.calls == []


def test_alpha_zero_gives_only_the_terminal_external_reward(pair):
    reward = LengthReward()
    env = TokenGenerationEnv(pair, PROMPTS, max_new_tokens=3, alpha=0.0, reward=reward)
    env.reset(options={"prompt": "x"})
    steps = [env.step(a) for a in (5, 6, 7)]  # three tokens: truncated
    assert [s[1] for s in steps[:2]] == [0.0, 0.0]
    _, r, terminated, truncated, info = steps[2]
    assert truncated and not terminated
    assert info["external_reward"] == 0.1 * len(reward.calls[0][1][0]) + 0.01
    assert r == pytest.approx(info["external_reward"], rel=1e-7)  # rewards are float32 (objective.py)
    assert all("external_reward" not in s[4] for s in steps[:2])


def test_alpha_mixes_the_two_terms(pair):
    env = TokenGenerationEnv(pair, PROMPTS, max_new_tokens=4, alpha=0.25, reward=LengthReward())
    env.reset(seed=1)
    _, r, *_, info = env.step(9)
    assert r == pytest.approx(0.25 * info["teacher_logprob"], abs=1e-6)
    _, r, terminated, _, info = env.step(EOS)
    assert terminated
    assert r == pytest.approx(0.25 * info["teacher_logprob"] + 0.75 * info["external_reward"], abs=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_bulk_rewards_equal_stepping_token_by_token(pair, alpha):
    env = TokenGenerationEnv(pair, PROMPTS, max_new_tokens=5, alpha=alpha, reward=LengthReward())
    completions = [[7, 8, EOS], [9, 10, 11, 12, 13], [EOS], [14, 15, 16, 17, EOS]]
    bulk = env.bulk_rewards(env.rollout_from_tokens(PROMPTS, completions))
    assert bulk.rewards.shape == (4, 5)
    for row, (prompt, tokens) in enumerate(zip(PROMPTS, completions)):
        env.reset(options={"prompt": prompt})
        stepped = [env.step(a)[1] for a in tokens]
        torch.testing.assert_close(
            torch.tensor(stepped, dtype=torch.float64),
            bulk.rewards[row, : len(tokens)].double(),
            atol=1e-5,
            rtol=0,
        )
        assert (bulk.rewards[row, len(tokens) :] == 0).all()
    assert (bulk.external is None) == (alpha == 1.0)


def test_bulk_rewards_of_an_engine_rollout(pair, student, teacher, tokenizer):
    """What a fast agent does: sample with the engine, then one teacher forward for the env's rewards."""
    engine = RolloutEngine(student, teacher, tokenizer)
    rollout = engine.generate(
        PROMPTS, SamplingConfig(max_new_tokens=4), generator=torch.Generator().manual_seed(4)
    )
    env = VectorTokenGenerationEnv(
        pair, PROMPTS, num_envs=len(PROMPTS), max_new_tokens=4, alpha=0.5, reward=LengthReward()
    )
    bulk = env.bulk_rewards(rollout)
    env.reset(options={"prompts": PROMPTS})
    stepped = np.stack(
        [env.step(rollout.completion_ids[:, t].numpy())[1] for t in range(rollout.completion_ids.shape[1])], 1
    )
    torch.testing.assert_close(
        torch.tensor(stepped).float() * rollout.completion_mask, bulk.rewards, atol=1e-5, rtol=0
    )


# --------------------------------------------------------------------------- construction
def test_make_vec_and_a_teacher_loaded_by_path(teacher, tokenizer, tmp_path):
    teacher.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    env = gymnasium.make_vec(
        ENV_ID, num_envs=2, teacher=str(tmp_path), prompts="arithmetic", max_new_tokens=3
    )
    assert isinstance(env, VectorTokenGenerationEnv) and env.num_envs == 2
    obs, info = env.reset(seed=0)
    assert obs["input_ids"].shape == (2, env.layout.length) and info["prompt_index"].shape == (2,)
    ref = VectorTokenGenerationEnv((teacher, tokenizer), "arithmetic", num_envs=2, max_new_tokens=3)
    ref_obs, _ = ref.reset(seed=0)
    actions = np.array([5, 6])
    assert data_equivalence((obs, env.step(actions)[:4]), (ref_obs, ref.step(actions)[:4]))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"teacher": "no-such-teacher-xyz"}, ValueError, "unknown teacher 'no-such-teacher-xyz'"),
        ({"teacher": "./no/such/folder"}, FileNotFoundError, "does not exist"),
        ({"teacher": object()}, TypeError, "teacher must be a model name or path"),
        ({"prompts": []}, ValueError, "prompt source is empty"),
        ({"prompts": "no_such_task"}, ValueError, "names a task, and there is no such task"),
        ({"alpha": 1.5}, ValueError, r"alpha must be in \[0, 1\], got 1.5"),
        ({"alpha": -0.1}, ValueError, r"alpha must be in \[0, 1\], got -0.1"),
        ({"alpha": 0.0}, ValueError, "alpha=0 keeps only the external reward, but no reward was given"),
        ({"reward": 3}, TypeError, "reward must be a callable"),
        ({"reward": "no_such_reward"}, ValueError, "unknown reward 'no_such_reward'"),
        ({"max_prompt_length": 3}, PromptTooLongError, "exceeds max_prompt_length=3"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
    ],
)
def test_bad_arguments_fail_with_clear_messages(pair, kwargs, error, message):
    args = {"teacher": pair, "prompts": PROMPTS, **kwargs}
    with pytest.raises(error, match=message):
        gymnasium.make(ENV_ID, **args)
    with pytest.raises(error, match=message):
        VectorTokenGenerationEnv(num_envs=2, **args)


def test_a_prompt_too_long_for_the_context_fails_clearly(tokenizer):
    short_context = tiny_llama(len(tokenizer), max_position_embeddings=16)
    with pytest.raises(
        PromptTooLongError, match="plus max_new_tokens=8 exceed the teacher's context length 16"
    ):
        TokenGenerationEnv((short_context, tokenizer), ["a prompt of 20 chars"], max_new_tokens=8)
    env = TokenGenerationEnv((short_context, tokenizer), ["short"], max_new_tokens=8)
    with pytest.raises(PromptTooLongError, match="exceeds max_prompt_length=5"):
        env.reset(options={"prompt": "a longer prompt"})


def test_position_ids_of_the_layout_match_an_unpadded_forward(pair, teacher, tokenizer):
    """The observation is directly usable by an LM: mask-derived positions give the unpadded logits."""
    env = TokenGenerationEnv(pair, PROMPTS, max_new_tokens=4)
    obs, _ = env.reset(options={"prompt": "x"})
    for a in (20, 21):
        obs, *_ = env.step(a)
    ids, mask = torch.tensor(obs["input_ids"])[None], torch.tensor(obs["attention_mask"])[None]
    with torch.no_grad():
        padded = teacher(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        plain = teacher(input_ids=ids[mask.bool()][None]).logits
    last = int(mask[0].nonzero()[-1])
    torch.testing.assert_close(padded[0, last], plain[0, -1], atol=1e-5, rtol=0)
