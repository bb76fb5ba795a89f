"""stable-baselines3 on the token environment: the VecEnv adapter, the LM policy, and PPO learning."""

import gymnasium
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from rl_distill.agents.sb3 import LMActorCriticPolicy, last_real_index, make_ppo
from rl_distill.envs import SB3VecEnvAdapter, VectorTokenGenerationEnv
from rl_distill.evaluation import heldout_divergence
from rl_distill.models import tiny_llama
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.tasks import Example

PROMPTS = ["1+2=", "hello there", "x", "abc def ghi"]
EOS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def unigram_teacher(tokenizer, favoured="0123456789+=;"):
    """A tiny teacher that ignores the context: mass on ``favoured``, special tokens (EOS) ~impossible.

    One residual direction is made constant (embedding column 0 = 10, far above the other ~0.02
    entries), so the final RMS-normed hidden state is ~(sqrt(H), 0, ..., 0) whatever the context, and
    the LM head's column 0 acts as a bias: logits ~ sqrt(32) * b. Favoured tokens: log pT ~ -2.6;
    others ~ -14; EOS ~ -116, so that ending early is no way around the teacher (the summed reverse-KL
    objective would otherwise favour short sequences while the student is still far off).
    """
    teacher = tiny_llama(len(tokenizer) + 4, hidden_size=32, num_layers=2, seed=1)
    bias = torch.full((teacher.lm_head.weight.shape[0],), -1.0)
    bias[tokenizer.convert_tokens_to_ids(list(favoured))] = 1.0
    bias[: len(tokenizer.all_special_ids)] = -20.0
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, 0] = 10.0
        teacher.lm_head.weight[:, 0] = bias
    return teacher.eval()


def test_adapter_follows_the_sb3_vecenv_conventions(teacher, tokenizer):
    def make():
        return VectorTokenGenerationEnv(
            (teacher, tokenizer),
            PROMPTS,
            num_envs=3,
            max_new_tokens=3,
            alpha=0.5,
            reward=lambda p, c, **m: [1.0] * len(c),
        )

    venv, reference = SB3VecEnvAdapter(make()), make()
    venv.seed(5)
    obs = venv.reset()
    ref_obs, ref_info = reference.reset(seed=5)
    assert all(np.array_equal(obs[k], ref_obs[k]) for k in ref_obs)
    assert [i["prompt"] for i in venv.reset_infos] == list(ref_info["prompt"])
    assert venv.observation_space == reference.single_observation_space
    assert venv.action_space == gymnasium.spaces.Discrete(len(tokenizer))

    obs, rewards, dones, infos = venv.step(np.array([EOS, 5, 6]))
    assert rewards.dtype == np.float32 and dones.tolist() == [True, False, False]
    assert infos[0]["TimeLimit.truncated"] is False and infos[0]["external_reward"] == 1.0
    terminal = infos[0]["terminal_observation"]
    p = reference.layout.max_prompt_length
    assert terminal["input_ids"][p] == EOS and terminal["attention_mask"][p + 1] == 0
    assert obs["attention_mask"][0, p] == 0  # row 0 already holds its next episode
    assert "terminal_observation" not in infos[1] and infos[1]["teacher_logprob"] < 0

    for _ in range(2):
        obs, rewards, dones, infos = venv.step(np.array([7, 8, 9]))
    assert dones.tolist() == [False, True, True]  # rows 1, 2 used their 3-token budget
    assert all(infos[i]["TimeLimit.truncated"] is True for i in (1, 2))
    assert all(infos[i]["terminal_observation"]["input_ids"][p + 2] == [0, 8, 9][i] for i in (1, 2))
    assert set(venv.reset_infos[1]) == {"prompt", "prompt_index"}
    assert venv.get_attr("alpha") == [0.5, 0.5, 0.5] and venv.env_is_wrapped(gymnasium.Wrapper) == [False] * 3


def test_policy_is_the_lm_next_token_distribution_at_the_last_real_token(teacher, student, tokenizer):
    env = VectorTokenGenerationEnv((teacher, tokenizer), PROMPTS, num_envs=3, max_new_tokens=4)
    obs, _ = env.reset(options={"prompts": PROMPTS[:3]})
    obs, *_ = env.step(np.array([EOS, 5, 6]))  # row 0 restarts: rows of different lengths
    obs, *_ = env.step(np.array([7, 8, 9]))
    policy = LMActorCriticPolicy(
        env.single_observation_space, env.single_action_space, lambda _: 1e-3, lm=student
    )
    obs_t, _ = policy.obs_to_tensor(obs)
    # SB3's rollout buffer hands observations back as float32: the policy must read them the same.
    floats = {k: v.float() for k, v in obs_t.items()}
    with torch.no_grad():
        logits = policy.get_distribution(obs_t).distribution.logits
        values, logp, entropy = policy.evaluate_actions(floats, torch.tensor([3, 4, 5]))
    vocab = len(tokenizer)
    for row in range(3):
        ids = obs_t["input_ids"][row][obs_t["attention_mask"][row].bool()]
        with torch.no_grad():
            plain = student(input_ids=ids[None]).logits[0, -1, :vocab].log_softmax(-1)
        torch.testing.assert_close(logits[row], plain, atol=1e-5, rtol=0)
        assert logp[row] == pytest.approx(float(plain[3 + row]), abs=1e-5)
    assert logits.shape == (3, vocab) and values.shape == (3, 1) and (values == 0).all()
    assert (entropy > 0).all()
    assert last_real_index(torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])).tolist() == [2, 3]


def test_plain_sb3_ppo_learns_on_the_adapter(teacher, student, tokenizer):
    venv = SB3VecEnvAdapter(
        VectorTokenGenerationEnv((teacher, tokenizer), PROMPTS, num_envs=2, max_new_tokens=3)
    )
    before = [p.detach().clone() for p in student.parameters()]
    ppo = PPO(
        LMActorCriticPolicy, venv, policy_kwargs={"lm": student}, n_steps=4, batch_size=8, n_epochs=1, seed=0
    )
    ppo.learn(total_timesteps=8)
    assert ppo.num_timesteps == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert ppo.policy.value_net.weight.abs().sum() > 0  # the value head trained too
    action, _ = ppo.predict(venv.reset(), deterministic=True)
    assert action.shape == (2,) and ((0 <= action) & (action < len(tokenizer))).all()


def test_policy_rejects_other_spaces(student):
    box = gymnasium.spaces.Box(0, 1, shape=(4,))
    with pytest.raises(ValueError, match="Dict observation with input_ids and attention_mask"):
        LMActorCriticPolicy(box, gymnasium.spaces.Discrete(4), lambda _: 1e-3, lm=student)


def test_sb3_ppo_lowers_the_heldout_divergence_to_a_tiny_teacher(tokenizer):
    """A short SB3 PPO run (about 1000 tokens, ~2 s) moves the student towards the teacher on held-out prompts."""
    teacher = unigram_teacher(tokenizer)
    student = tiny_llama(len(tokenizer) + 2, hidden_size=32, num_layers=1, seed=2)
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    train = [p for i, p in enumerate(prompts) if i % 4]
    held_out = [Example(p) for i, p in enumerate(prompts) if i % 4 == 0][:16]
    budget = 8
    venv = SB3VecEnvAdapter(
        VectorTokenGenerationEnv((teacher, tokenizer), train, num_envs=8, max_new_tokens=budget)
    )
    engine = RolloutEngine(student, teacher, tokenizer)  # evaluation: the PPO policy's LM is the student
    sampling = SamplingConfig(max_new_tokens=budget)  # the policy's own temperature (1)
    before = heldout_divergence(engine, held_out, sampling=sampling, seed=1)

    ppo = make_ppo(venv, student, learning_rate=3e-3, n_steps=16, batch_size=64, n_epochs=4, seed=0)
    assert isinstance(ppo, PPO) and ppo.policy.lm is student
    assert (ppo.ent_coef, ppo.gamma, ppo.normalize_advantage) == (1.0, 1.0, False)  # Eq. 5 with alpha = 1
    ppo.learn(total_timesteps=1024)
    after = heldout_divergence(engine, held_out, sampling=sampling, seed=1)

    # Reverse KL(pS || pT) is what the reward plus the entropy bonus optimises (Eq. 5 with alpha = 1),
    # measured per token (paper Eq. 2) on the student's own held-out samples at a fixed seed. Over
    # PPO seeds 0-4 it fell by 27-52%; forward KL and JSD may rise at first (reverse KL seeks modes).
    assert after["eval/reverse_kl"] < 0.8 * before["eval/reverse_kl"], (before, after)
    assert after["eval/teacher_logprob"] > before["eval/teacher_logprob"] + 5.0
    assert after["eval/completion_length"] >= before["eval/completion_length"]  # no escape through EOS
