"""Lock-step decoding (issue #17): every process runs the same forwards; each keeps its own rollout.

Sharded models (FSDP) all-gather their parameters at every forward, so processes whose sequences
finish at different steps must keep stepping together. :attr:`RolloutEngine.lockstep` does that
with one all-reduce per step; these tests check that it changes the number of forwards and nothing
else: not the tokens, not the log-probs, not the generator's state.

The two-process test runs this file as a script under ``torch.distributed.run`` (gloo, CPU): rank 0
stops at every token (one-token completions), rank 1 only at EOS (completions up to the budget).
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import run_launcher

from rl_distill.config import config_from_dict
from rl_distill.distributed import Distributed, ShardingSpec, sharding_problems
from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.rollout import RolloutEngine, SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = SamplingConfig(max_new_tokens=12, temperature=1.0)
PROMPTS = ["12+7=", "3*4=", "99-1=", "8/2="]


def _early_stopping_engine(student, teacher, tokenizer) -> RolloutEngine:
    """An engine whose sequences end at different early steps: a quarter of the token ids stop them."""
    engine = RolloutEngine(student, teacher, tokenizer)
    engine.stop_ids = torch.arange(0, len(tokenizer), 4)
    return engine


def _count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _rollout_record(r) -> dict:
    return {
        "tokens": r.completion_ids.tolist(),
        "mask": r.completion_mask.tolist(),
        "logprobs": r.logprobs.tolist(),
        "teacher_logprobs": r.teacher_logprobs.tolist() if r.teacher_logprobs is not None else None,
    }


class _SlowerPeer:
    """A stand-in for the all-reduce: another process that finishes ``at_step`` (0-based)."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.calls = at_step, 0

    def __call__(self, done: bool) -> bool:
        step, self.calls = self.calls, self.calls + 1
        return done and step >= self.at_step


def test_lockstep_padding_steps_change_nothing_but_the_number_of_forwards(student, teacher, tokenizer):
    engine = _early_stopping_engine(student, teacher, tokenizer)
    calls = _count_forwards(student)
    gen = torch.Generator().manual_seed(0)
    alone = engine.generate(PROMPTS, SAMPLING, generator=gen)
    after_alone = gen.get_state()
    forwards_alone = calls[0]
    width = alone.completion_ids.shape[1]
    assert forwards_alone == width  # prefill + one forward per token after the first
    assert width < SAMPLING.max_new_tokens - 2  # every sequence stopped early: padding steps follow
    assert len(set(alone.lengths.tolist())) > 1  # at different steps: finished rows pad while others run

    peer = _SlowerPeer(at_step=SAMPLING.max_new_tokens - 1)  # the other process uses the whole budget
    engine.lockstep = peer
    calls[0] = 0
    gen = torch.Generator().manual_seed(0)
    stepped = engine.generate(PROMPTS, SAMPLING, generator=gen)

    assert calls[0] == SAMPLING.max_new_tokens  # kept stepping with the peer: 1 prefill + 11 decodes
    assert peer.calls == SAMPLING.max_new_tokens  # one all-reduce per decoding step
    assert torch.equal(stepped.completion_ids, alone.completion_ids)  # padding columns cut off
    assert torch.equal(stepped.completion_mask, alone.completion_mask)
    assert torch.equal(stepped.logprobs, alone.logprobs)
    assert torch.equal(gen.get_state(), after_alone)  # padding steps draw nothing


def test_lockstep_stops_as_soon_as_every_process_is_done(student, teacher, tokenizer):
    engine = _early_stopping_engine(student, teacher, tokenizer)
    alone = engine.generate(PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(0))
    width = alone.completion_ids.shape[1]
    engine.lockstep = peer = _SlowerPeer(at_step=width + 2)  # finishes three steps after this process
    calls = _count_forwards(student)
    stepped = engine.generate(PROMPTS, SAMPLING, generator=torch.Generator().manual_seed(0))
    assert calls[0] == width + 3 and peer.calls == width + 3
    assert torch.equal(stepped.completion_ids, alone.completion_ids)


def test_two_processes_step_together_and_each_keeps_its_single_process_rollout(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "ranks"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
        str(_free_port()), __file__, str(out),
    ]  # fmt: skip
    out.mkdir()
    run = run_launcher(cmd, env=env, timeout=240)  # retries only gloo's teardown abort
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    # The single-process rollouts really end at very different steps: 1 token against up to 12.
    assert {len(row) for row in ranks[0]["alone"][0]["tokens"]} == {1}
    assert max(sum(m) for m in ranks[1]["alone"][0]["mask"]) >= 8
    assert ranks[0]["forwards_alone"] == 2  # two generate calls, a prefill each, no decode step
    assert ranks[1]["forwards_alone"] > 2 * 8

    for mode in ("lockstep", "fsdp"):
        # The same number of student forwards on both ranks (what a sharded module needs) ...
        assert ranks[0][f"forwards_{mode}"] == ranks[1][f"forwards_{mode}"] == ranks[1]["forwards_alone"]
        assert ranks[0][f"teacher_forwards_{mode}"] == ranks[1][f"teacher_forwards_{mode}"] == 2
        for rank in ranks:
            # ... and each rank's rollouts (two calls: the generator stream continues) are its own.
            for got, want in zip(rank[mode], rank["alone"]):
                assert got["tokens"] == want["tokens"] and got["mask"] == want["mask"]
                for key in ("logprobs", "teacher_logprobs"):
                    assert torch.allclose(torch.tensor(got[key]), torch.tensor(want[key]), atol=1e-5)


def test_sharding_problems_name_the_fields_that_would_desynchronise_processes(tmp_path):
    base = {
        "model": {"teacher": "unused", "student_layers": 1, "device": "cpu"},
        "data": {"task": "arithmetic", "num_train": 8, "num_eval": 8},
        "agent": {"name": "gkd", "lmbda": 1.0},
        "train": {"output_dir": str(tmp_path), "eval_batch_size": 4},
    }
    assert sharding_problems(config_from_dict(base), num_eval=8, world_size=2) == []
    bad = {
        **base,
        "agent": {"name": "gkd", "lmbda": 0.5, "reject": {"loop_repeats": 3}},
        "train": {**base["train"], "precision": "fp16"},
    }
    problems = sharding_problems(config_from_dict(bad), num_eval=9, world_size=2)  # shards of 5 and 4
    assert [p.split(":")[0] for p in problems] == [
        "agent.lmbda",
        "agent.reject",
        "train.precision",
        "data.num_eval",
    ]
    assert "[2, 1] evaluation batches" in problems[-1]
    problems = sharding_problems(config_from_dict(base), num_eval=6, world_size=4)  # 2, 2, 2, 0 examples
    assert problems and problems[0].startswith("data.num_eval") and "[1, 1, 1, 0]" in problems[0]
    ppo = {**base, "agent": {"name": "ppo"}}
    assert sharding_problems(config_from_dict(ppo), num_eval=8, world_size=2)[0].startswith("agent.name")


def test_sharding_spec_reads_the_launcher_and_refuses_what_it_does_not_support():
    assert ShardingSpec.from_env({}) is None
    assert ShardingSpec.from_env({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == ShardingSpec(True)
    spec = ShardingSpec.from_env(
        {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}
    )
    assert spec == ShardingSpec(reshard_after_forward=False)
    with pytest.raises(ValueError, match="--fsdp_version 2"):
        ShardingSpec.from_env({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    with pytest.raises(ValueError, match="--fsdp_offload_params"):
        ShardingSpec.from_env(
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}
        )


def test_one_process_is_never_lockstep_nor_sharded():
    one = Distributed(None, 0, 1, torch.device("cpu"), ShardingSpec())
    assert not one.sharded and one.all_finished(False) is False
    model = tiny_llama(8, hidden_size=8, num_layers=1)
    assert one.shard(model) is model and one.full_state(model) is None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# The two-process worker (run by torch.distributed.run; not collected by pytest).
# ------------------------------------------------------------------------------------------------
def _worker(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = char_tokenizer()
    student = tiny_llama(len(tok), hidden_size=32, num_layers=2, seed=2)
    teacher = tiny_llama(len(tok), hidden_size=32, num_layers=2, seed=1)
    engine = RolloutEngine(student, teacher, tok)
    if rank == 0:  # every token ends a sequence here: one-token completions
        engine.stop_ids = torch.arange(len(tok))
    record: dict = {}

    def run(mode: str) -> None:
        calls, teacher_calls = _count_forwards(engine.student), _count_forwards(engine.teacher)
        gen = torch.Generator().manual_seed(100 + rank)
        rollouts = []
        for _ in range(2):  # a second call continues the generator's stream
            r = engine.generate(PROMPTS, SAMPLING, generator=gen)
            rollouts.append(_rollout_record(engine.score(r)))
        record[mode], record[f"forwards_{mode}"] = rollouts, calls[0]
        record[f"teacher_forwards_{mode}"] = teacher_calls[0]

    run("alone")
    group = Distributed(None, rank, 2, torch.device("cpu"), ShardingSpec())
    engine.lockstep = group.all_finished
    run("lockstep")
    # Sharded student and teacher: without lock-step, rank 0 would leave rank 1 waiting in an all-gather.
    engine.student, engine.teacher = group.shard(student), group.shard(teacher)
    run("fsdp")
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
