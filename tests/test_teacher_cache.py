"""The offline teacher cache: equal to the live teacher, resumable, refused for another teacher/tokenizer/k."""

import json
import shutil

import pytest
import torch
from run_helpers import save_tiny_model, tiny_config, write_yaml
from safetensors.torch import load_file

import rl_distill.build as build
import rl_distill.teacher_cache as tc
from rl_distill.build import build_run
from rl_distill.cli import main
from rl_distill.config import ConfigError, config_from_dict
from rl_distill.models import char_tokenizer
from rl_distill.teacher_cache import TeacherCache, TeacherCacheError, build_teacher_cache

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    teacher = save_tiny_model(root / "teacher", num_layers=2, sharpen=3.0, seed=0)
    student = save_tiny_model(root / "student", num_layers=1, seed=5)
    return teacher, student


def kd_config(teacher, student, out, **agent):
    """Supervised KD (lmbda 0, JSD(0.3), top-k) on the references of 16 compact arithmetic examples."""
    agent = {"lmbda": 0.0, "divergence": "jsd", "beta": 0.3, "teacher_topk": K, **agent}
    cfg = tiny_config(teacher, out, agent=agent, model={"student": str(student), "student_layers": None})
    cfg["train"]["tensorboard"] = False
    return cfg


@pytest.fixture(scope="module")
def cache_dir(models, tmp_path_factory):
    teacher, student = models
    out = tmp_path_factory.mktemp("cache") / "cache"
    config = config_from_dict(kd_config(teacher, student, tmp_path_factory.mktemp("run")))
    build_teacher_cache(config, out, shard_size=5, batch_size=3, log=None)
    return out


def loss_and_grads(run, batch):
    agent = run.agent
    rollouts, num_on = agent.collect(batch)
    assert num_on == 0
    run.student.zero_grad()
    loss, _ = agent.loss(rollouts)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in run.student.parameters()]


def test_cache_layout_and_manifest(cache_dir, models):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_examples"] == 16 and len(manifest["shards"]) == 4
    assert [s["examples"] for s in manifest["shards"]] == [5, 5, 5, 1]
    assert manifest["scoring"]["k"] == K and manifest["teacher"]["path"] == str(models[0].resolve())
    shard = load_file(str(cache_dir / "shard-00000.safetensors"))
    assert shard["topk_ids"].dtype == torch.int32 and shard["topk_ids"].shape[1] == K
    assert shard["topk_logprobs"].dtype == torch.float32
    assert shard["offsets"][-1] == shard["completion_ids"].shape[0] == shard["topk_logprobs"].shape[0]
    # Top-k log-probs are sorted, and each token's own log-prob is at most the largest.
    assert (shard["topk_logprobs"].diff(dim=-1) <= 0).all()
    assert (shard["token_logprobs"] <= shard["topk_logprobs"][:, 0] + 1e-6).all()
    assert sum(s["tokens"] for s in manifest["shards"]) == manifest["num_tokens"]


def test_supervised_kd_from_the_cache_equals_the_live_teacher(cache_dir, models, tmp_path, monkeypatch):
    teacher, student = models
    live = build_run(config_from_dict(kd_config(teacher, student, tmp_path / "live")))
    loaded = []
    real_load = build.load_causal_lm
    monkeypatch.setattr(
        build, "load_causal_lm", lambda name, **kw: loaded.append(name) or real_load(name, **kw)
    )
    cached = build_run(
        config_from_dict(kd_config(teacher, student, tmp_path / "cached", teacher_cache=str(cache_dir)))
    )
    assert loaded == [str(student)]  # the teacher is never loaded
    assert cached.teacher is None and cached.engine.teacher is None and cached.agent.topk == K
    batch = live.task.train[:6]
    loss_live, grads_live = loss_and_grads(live, batch)
    loss_cache, grads_cache = loss_and_grads(cached, batch)
    assert float(loss_live) > 1e-3  # a non-trivial loss (tiny models sit near uniform)
    torch.testing.assert_close(loss_cache, loss_live, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_live, grads_cache):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-5)
    # The cache also feeds the per-token teacher log-probs (rollout/teacher_logprob).
    r_live, r_cache = live.agent.collect(batch)[0][0], cached.agent.collect(batch)[0][0]
    torch.testing.assert_close(r_cache.teacher_logprobs, r_live.teacher_logprobs)


def test_an_interrupted_cache_resumes_redoing_only_the_damaged_shards(
    cache_dir, models, tmp_path, monkeypatch
):
    teacher, student = models
    work = tmp_path / "cache"
    shutil.copytree(cache_dir, work)
    manifest = json.loads((work / "manifest.json").read_text())
    (work / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (work / "shard-00001.safetensors").unlink()  # never written
    data = (work / "shard-00002.safetensors").read_bytes()
    (work / "shard-00002.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    (work / ".tmp-shard-00003.safetensors-999").write_bytes(b"partial")  # a killed write
    with pytest.raises(TeacherCacheError, match="unfinished"):
        TeacherCache.open(work)
    scored = []
    real = tc._score_shard
    monkeypatch.setattr(
        tc, "_score_shard", lambda engine, part, *a: scored.append(len(part)) or real(engine, part, *a)
    )
    config = config_from_dict(kd_config(teacher, student, tmp_path / "run"))
    build_teacher_cache(config, work, shard_size=5, batch_size=3, log=None)
    assert scored == [5, 5]  # shards 1 and 2 redone; 0 and 3 kept
    assert not list(work.glob(".tmp-*"))
    for s in range(4):
        fresh = load_file(str(cache_dir / f"shard-{s:05d}.safetensors"))
        again = load_file(str(work / f"shard-{s:05d}.safetensors"))
        assert fresh.keys() == again.keys() and all(torch.equal(fresh[n], again[n]) for n in fresh)
    assert json.loads((work / "manifest.json").read_text()) == manifest
    scored.clear()
    build_teacher_cache(config, work, shard_size=5, batch_size=3, log=None)  # complete: nothing to do
    assert scored == []


def test_a_cache_for_another_teacher_is_refused_naming_both(cache_dir, models, tmp_path):
    teacher, student = models
    other = save_tiny_model(tmp_path / "other_teacher", num_layers=2, sharpen=3.0, seed=7)
    config = config_from_dict(kd_config(other, student, tmp_path / "run", teacher_cache=str(cache_dir)))
    with pytest.raises(TeacherCacheError) as err:
        build_run(config)
    msg = str(err.value)
    assert "agent.teacher_cache" in msg and str(teacher.resolve()) in msg and str(other) in msg


def test_a_cache_for_another_tokenizer_is_refused_naming_both(cache_dir, models, tmp_path):
    teacher, student = models
    # The same weights and config, with a tokenizer that maps the same number of characters differently.
    same = tmp_path / "same_weights"
    shutil.copytree(teacher, same)
    for f in same.glob("tokenizer*"):
        f.unlink()
    chars = char_tokenizer().convert_ids_to_tokens(list(range(len(char_tokenizer()))))
    specials = set(char_tokenizer().all_special_tokens)
    plain = "".join(c for c in chars if c not in specials)
    char_tokenizer(plain[::-1]).save_pretrained(same)
    config = config_from_dict(kd_config(same, same, tmp_path / "run", teacher_cache=str(cache_dir)))
    with pytest.raises(TeacherCacheError, match="tokenizer") as err:
        build_run(config)
    assert str(teacher) in str(err.value) and str(same) in str(err.value)


def test_k_and_lambda_mismatches_are_refused(cache_dir, models, tmp_path):
    teacher, student = models
    config = config_from_dict(
        kd_config(teacher, student, tmp_path / "run", teacher_cache=str(cache_dir), teacher_topk=8)
    )
    with pytest.raises(TeacherCacheError, match=r"agent.teacher_topk = 4, but this run has 8"):
        build_run(config)
    with pytest.raises(ConfigError, match="agent.teacher_cache .*samples on-policy.*live teacher"):
        config_from_dict(kd_config(teacher, student, tmp_path, teacher_cache=str(cache_dir), lmbda=0.5))
    with pytest.raises(ConfigError, match="agent.teacher_cache: model.teacher must name"):
        cfg = kd_config(teacher, student, tmp_path, teacher_cache=str(cache_dir))
        config_from_dict({**cfg, "model": {**cfg["model"], "teacher": "self"}})
    with pytest.raises(FileNotFoundError, match="holds no teacher cache"):
        build_run(
            config_from_dict(
                kd_config(teacher, student, tmp_path / "r", teacher_cache=str(tmp_path / "none"))
            )
        )


def test_cache_teacher_cli_and_training_from_the_cache(models, tmp_path, capsys):
    teacher, student = models
    cfg = kd_config(teacher, student, tmp_path / "run", teacher_cache=str(tmp_path / "cli_cache"))
    cfg["train"].update(steps=2, save_final=False)
    path = write_yaml(tmp_path / "c.yaml", cfg)
    assert main(["cache-teacher", str(path), "--shard-size", "8"]) == 0
    assert "teacher cache complete" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli_cache" / "manifest.json").read_text())["complete"]
    assert main(["train", str(path)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 2 and all(v > 0 for v in losses)
    # Another teacher on the command line: one error line naming both.
    other = save_tiny_model(tmp_path / "t2", num_layers=2, seed=9)
    assert main(["cache-teacher", str(path), "--set", f"model.teacher={other}"]) == 2
    assert "was built for teacher" in capsys.readouterr().err


def test_topk_must_be_set_to_build_a_cache(models, tmp_path):
    teacher, student = models
    config = config_from_dict(kd_config(teacher, student, tmp_path / "run", teacher_topk=None))
    with pytest.raises(ConfigError, match="agent.teacher_topk"):
        build_teacher_cache(config, tmp_path / "c", log=None)


def test_cache_teacher_help_documents_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["cache-teacher", "--help"])
    out = capsys.readouterr().out
    assert all(option in out for option in ("--out", "--shard-size", "--batch-size", "--dtype", "--set"))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "cache-teacher" in capsys.readouterr().out


def test_bfloat16_cache_halves_the_logprobs_and_stays_close(models, tmp_path):
    teacher, student = models
    config = config_from_dict(kd_config(teacher, student, tmp_path / "run"))
    f32 = build_teacher_cache(config, tmp_path / "f32", shard_size=16, log=None)
    bf16 = build_teacher_cache(config, tmp_path / "bf16", shard_size=16, logprob_dtype="bfloat16", log=None)
    a = load_file(str(f32 / "shard-00000.safetensors"))
    b = load_file(str(bf16 / "shard-00000.safetensors"))
    assert b["topk_logprobs"].dtype == torch.bfloat16
    assert b["topk_logprobs"].nbytes * 2 == a["topk_logprobs"].nbytes
    assert torch.equal(a["topk_ids"], b["topk_ids"])
    torch.testing.assert_close(b["topk_logprobs"].float(), a["topk_logprobs"], atol=0.02, rtol=0.01)


def test_the_cache_builder_honours_the_fast_path_switches(models, tmp_path, monkeypatch):
    """``train.few_row_products`` / ``teacher_prefix_cache`` reach the teacher engine that fills the cache."""
    import rl_distill.teacher_cache as tc

    teacher, student = models
    seen = []
    real = tc.RolloutEngine
    monkeypatch.setattr(tc, "RolloutEngine", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    raw = kd_config(teacher, student, tmp_path / "run")
    raw["train"].update(few_row_products=False, teacher_prefix_cache=False, dense_head_input=False)
    build_teacher_cache(config_from_dict(raw), tmp_path / "cache", shard_size=8, batch_size=4, log=None)
    assert seen and all(
        kw["skinny_head"]
        is kw["skinny_layers"]
        is kw["teacher_prefix_cache"]
        is kw["dense_head_input"]
        is False
        for kw in seen
    )
