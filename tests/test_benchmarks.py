"""Smoke tests of benchmarks/ at tiny sizes (tiny Llama, character tokenizer); TRL parts need trl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _harness as H  # noqa: E402
from benchmarks import divergence_memory, onpolicy_overhead, perf_round2, profile_step, report_round2, vs_trl  # noqa: E402
from benchmarks._methods import BenchSpec, aggregate, run_method  # noqa: E402
from benchmarks._patches import apply_patches  # noqa: E402

TINY = BenchSpec(model="tiny", batch_size=2, max_new_tokens=6, steps=2, warmup=1)


def test_reference_texts_have_the_requested_length():
    tok = H.build_models("tiny", 2)[2]
    refs = H.reference_texts(tok, 5, 9)
    assert len(refs) == 5
    assert all(len(tok(r, add_special_tokens=False)["input_ids"]) == 9 for r in refs)


def test_memory_probes_are_positive_and_resettable():
    assert H.rss_bytes() > 0
    H.reset_peak_rss()
    assert H.peak_rss_bytes() >= H.rss_bytes() * 0.9
    assert H.lifetime_peak_rss_bytes() >= H.peak_rss_bytes() * 0.9


@pytest.mark.parametrize("method", ["ours", "ours_lambda0"])
def test_ours_runs_and_reports(method):
    res = run_method(method, TINY)
    assert len(res["step_seconds"]) == TINY.steps and all(s > 0 for s in res["step_seconds"])
    assert len(res["tokens_per_step"]) == TINY.steps
    if method == "ours_lambda0":  # references: max_new_tokens - 1 tokens + EOS
        assert res["tokens_per_step"] == [TINY.batch_size * TINY.max_new_tokens] * TINY.steps
    else:
        assert all(0 < t <= TINY.batch_size * TINY.max_new_tokens for t in res["tokens_per_step"])
    assert res["tokens_per_second"] > 0 and res["peak_rss_steps_mib"] > 0
    assert set(res["machine"]) >= {"torch", "transformers", "load_average", "torch_threads"}


def test_aggregate_pools_steps_and_tokens():
    runs = [
        {"step_seconds": [1.0, 3.0], "tokens_per_step": [10, 10], "median_step_seconds": 2.0,
         "tokens_per_second": 5.0, "peak_rss_steps_mib": 100.0, "peak_rss_lifetime_mib": 120.0,
         "rss_after_setup_mib": 50.0, "machine": {"load_average": [0.1]}},
        {"step_seconds": [2.0], "tokens_per_step": [20], "median_step_seconds": 2.0,
         "tokens_per_second": 10.0, "peak_rss_steps_mib": 300.0, "peak_rss_lifetime_mib": 320.0,
         "rss_after_setup_mib": 50.0, "machine": {"load_average": [0.2]}},
    ]  # fmt: skip
    agg = aggregate(runs)
    assert agg["median_step_seconds"] == 2.0
    assert agg["tokens_per_second"] == pytest.approx(40 / 6)
    assert agg["peak_rss_steps_mib"] == 200.0 and agg["peak_extra_over_setup_mib"] == 150.0


@pytest.mark.parametrize("method", ["rss", "profiler"])
def test_divergence_memory_variants_agree(method):
    results = {
        v: divergence_memory.measure(v, 2, 8, 64, beta=0.5, method=method, threads=2)
        for v in ("chunked", "chunked:3", "recompute", "recompute:3", "naive_stack", "naive_logaddexp")
    }
    losses = [r["loss"] for r in results.values()]
    grads = [r["grad_abs_sum"] for r in results.values()]
    assert max(losses) - min(losses) < 1e-5
    assert max(grads) - min(grads) < 1e-4 * max(grads)
    if method == "profiler":  # the allocator-level count includes at least the gradient
        assert all(r["peak_extra_bytes"] >= r["tensor_bytes"] for r in results.values())


def test_profile_step_checks_and_experiments():
    spec = BenchSpec(model="tiny", batch_size=2, max_new_tokens=4, steps=1, warmup=1)
    res = profile_step.run_profile(spec, experiments=True, torch_profiler=True, repeats=1)
    assert all(res["waste_checks"]["ok"].values()), res["waste_checks"]
    assert res["waste_checks"]["student_forwards_with_grad_per_step"] == 1
    assert "8 optimizer.step" in res["phases"] and res["sum_of_phase_medians_seconds"] > 0
    exp = res["experiments"]
    assert {"optimizer", "sampling", "divergence_step_shape", "teacher_token_logprobs"} <= set(exp)
    div = exp["divergence_step_shape"]
    assert all(v["max_abs_grad_diff_vs_default"] < 1e-5 for k, v in div.items() if isinstance(v, dict))
    assert res["top_operators"]
    assert "phases" in profile_step.format_report(res)


@pytest.mark.parametrize("module", [vs_trl, profile_step, divergence_memory, onpolicy_overhead, perf_round2])
def test_cli_help(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_vs_trl_cli_runs_a_subprocess(tmp_path):
    out = tmp_path / "vs.json"
    vs_trl.main(
        ["--model", "tiny", "--methods", "ours", "--repeats", "1", "--steps", "1", "--warmup", "1",
         "--batch-size", "2", "--max-new-tokens", "3", "--out", str(out)]
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["summary"]["ours"]["runs"] == 1
    assert data["machine"]["torch_threads"] == 2


@pytest.mark.parametrize("method", ["trl_gkd", "trl_distillation", "trl_gkd_lambda0"])
def test_trl_methods(method):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    res = run_method(method, TINY)
    assert len(res["step_seconds"]) == TINY.steps
    assert len(res["tokens_per_step"]) == TINY.steps and all(t > 0 for t in res["tokens_per_step"])
    if method != "trl_gkd_lambda0":
        assert all(t <= TINY.batch_size * TINY.max_new_tokens for t in res["tokens_per_step"])


def _row_fn_calls(monkeypatch) -> list[int]:
    """Count calls of the divergences' per-row autograd function (the recomputing path's work)."""
    import rl_distill.divergences as div

    calls = [0]
    original = div._row_fn

    def counting(*args, **kwargs):
        fn = original(*args, **kwargs)

        def rows(t, s):
            calls[0] += 1
            return fn(t, s)

        return rows

    monkeypatch.setattr(div, "_row_fn", counting)
    return calls


def test_recompute_grad_switches_the_fused_gradient_off_with_the_same_loss_and_gradient(monkeypatch):
    """``recompute_grad`` (lever 1 off): the agent's loss recomputes every chunk in backward; same numbers."""
    import rl_distill.agents.gkd as gkd
    import rl_distill.divergences as div
    from rl_distill.rollout import RolloutEngine
    from rl_distill.tasks import Example

    teacher, student, tokenizer = H.build_models("tiny", 2)
    engine = RolloutEngine(student, teacher, tokenizer)
    config = gkd.GKDConfig(divergence="jsd", beta=0.3, lmbda=1.0, max_new_tokens=6, temperature=0.7)
    agent = gkd.GKDAgent(engine, torch.optim.SGD(student.parameters(), lr=0.0), config,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    rollouts, _ = agent.collect([Example(prompt=p) for p in ("abc", "hello there", "x", "12 + 3")])
    vocab = rollouts[0].teacher_logits.shape[-1]
    monkeypatch.setattr(div, "DEFAULT_CHUNK_ELEMENTS", 3 * vocab)  # several chunks of 3 rows
    rows = int(rollouts[0].completion_mask.sum())
    chunks = -(-rows // 3)
    calls = _row_fn_calls(monkeypatch)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        student.zero_grad(set_to_none=True)
        loss, _ = agent.loss(rollouts)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    ref_loss, ref_grads = loss_and_grads()
    assert calls[0] == 0  # fused: the closed form in forward, backward only scales
    undo = apply_patches(["recompute_grad"])
    try:
        loss, grads = loss_and_grads()
    finally:
        undo()
    assert calls[0] == 2 * chunks  # each chunk once in forward, once more in backward
    assert div._row_value_and_grad.__name__ == "_row_value_and_grad"  # undone
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


def test_removed_patches_are_unknown():
    for name in ("inverse_cdf_sampling", "small_chunks", "fused_jsd"):
        with pytest.raises(ValueError, match="unknown patch"):
            apply_patches([name])


def test_ours_recompute_and_bf16_run_and_split_the_update():
    import rl_distill.divergences as div

    res = run_method("ours_recompute", TINY)
    assert res["method"] == "ours_recompute" and res["patches"] == ["recompute_grad"]
    assert div._row_value_and_grad.__name__ == "_row_value_and_grad"  # undone after the run
    bf16 = run_method("ours", BenchSpec(**{**TINY.__dict__, "precision": "bf16"}))
    for r in (res, bf16):
        phases = r["phase_seconds"]
        assert len(phases["divergence"]) == TINY.steps and all(v > 0 for v in phases["divergence"])
        for i in range(TINY.steps):  # the sub-phases add up to the agent's own student-update time
            parts = phases["student_forward"][i] + phases["divergence"][i] + phases["backward_and_step"][i]
            assert parts == pytest.approx(phases["student_update"][i])
    assert bf16["spec"]["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision"):
        BenchSpec(precision="fp16")


@pytest.mark.parametrize(
    ("overrides", "bf16", "checkpointing"),
    [({"precision": "bf16"}, True, False), ({"trl_defaults": True}, True, True), ({}, False, False)],
)
def test_trl_precision_and_defaults(overrides, bf16, checkpointing):
    pytest.importorskip("trl")
    from benchmarks._methods import _trl_precision_args

    spec = BenchSpec(**{**TINY.__dict__, **overrides})
    args = _trl_precision_args(spec)
    if overrides.get("trl_defaults"):
        assert args == {}  # TRL's own defaults: nothing passed
        res = run_method("trl_distillation", spec)
        assert res["trl_config"]["bf16"] is bf16
        assert res["trl_config"]["gradient_checkpointing"] is checkpointing
    else:
        assert args["bf16"] is bf16 and args["activation_checkpointing"] is checkpointing


def _run(repeat: int, tps: float, rss: float) -> dict:
    return {"repeat": repeat, "step_seconds": [128 / tps], "tokens_per_step": [128], "median_step_seconds": 128 / tps,
            "tokens_per_second": tps, "peak_rss_steps_mib": rss, "load_average_before": [0.5]}  # fmt: skip


def test_pair_ratios_are_per_repeat_and_the_headline_is_their_median():
    data = {
        "steps": {
            "configs": {"ours": {}, "trl_distillation": {}},
            "runs": {
                "ours": [_run(1, 100.0, 900.0), _run(2, 90.0, 1000.0), _run(3, 120.0, 950.0)],
                "trl_distillation": [
                    _run(1, 50.0, 1000.0),
                    _run(2, 60.0, 1000.0),
                    _run(3, 40.0, 1000.0),
                    {"repeat": 4, "error": "boom"},
                ],  # fmt: skip
            },
        }
    }
    p = report_round2.pair_ratios(data, "ours", "trl_distillation")
    assert p["ratios"] == [2.0, 1.5, 3.0] and p["median"] == 2.0 and (p["min"], p["max"]) == (1.5, 3.0)
    assert p["rss_max"] == 1.0 and p["rss_median"] == 0.95
    assert (
        report_round2.config_summary(data, "trl_distillation")["repeats"] == 3
    )  # the failed run is left out
    assert "median **2.00x** (min-max 1.50-3.00x" in report_round2._spread(p)


def test_quality_facts_mean_std_and_spread(tmp_path):
    for precision, seed, jsd in (("fp32", 0, 0.30), ("fp32", 1, 0.28), ("fp32", 2, 0.26), ("bf16", 1, 0.27)):
        run = tmp_path / f"{precision}_s{seed}"
        run.mkdir()
        summary = {"before": {"eval/jsd": 0.6}, "after": {"eval/jsd": jsd}, "train_seconds": 1.0}
        (run / "summary.json").write_text(json.dumps(summary))
    data = {"quality": perf_round2.collect_quality(tmp_path)}
    q = report_round2.quality_facts(data, tmp_path)  # no round-1 fallback files in tmp_path
    f, b = q["fp32_stats"], q["bf16_stats"]
    assert f["n"] == 3 and f["mean"] == pytest.approx(0.28) and f["std"] == pytest.approx(0.02)
    assert b["n"] == 1 and q["within"]  # 0.27 lies in [0.26, 0.30]
    (tmp_path / report_round2.FILE).write_text(json.dumps(data))
    block = report_round2.quality_block(tmp_path)
    assert "| 0 | 0.3000 | not run |" in block and "| 1 | 0.2800 | 0.2700 |" in block
    assert "**inside** the fp32 seeds' range (0.2600-0.3000)" in block


def test_perf_round2_smoke_and_report(tmp_path):
    """The driver end to end at tiny sizes (floors, decode, one step configuration, quality), then its blocks."""
    runs = tmp_path / "quality"
    for precision in ("fp32", "bf16"):
        (runs / f"{precision}_s1").mkdir(parents=True)
        (runs / f"{precision}_s1" / "summary.json").write_text(
            json.dumps({"before": {"eval/jsd": 0.6}, "after": {"eval/jsd": 0.3}})
        )
    out = tmp_path / "perf_round2.json"
    threads = torch.get_num_threads()
    try:
        data = perf_round2.main(
            ["--model", "tiny", "--sections", "floors", "decode", "steps", "quality", "--configs", "ours",
             "ours_recompute", "--repeats", "1", "--steps", "1", "--threads", "1", "--batch-size", "2",
             "--max-new-tokens", "4", "--quality-dir", str(runs), "--out", str(out)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == data
    assert data["floors"]["bandwidth_gb_per_s"] > 0 and data["floors"]["matmul_float32_gflops"] > 0
    dec = data["decode"]
    assert (
        dec["fp32"]["static_vs_dynamic_max_abs_logit_diff"] < 1e-4
    )  # the static cache computes the same logits
    assert {"generate", "generate_linear_head", "generate_linear_layers"} <= set(
        dec["fp32"]["median_ms_per_token"]
    )
    layers = dec["layers"]  # the tiny student keeps all 4 of the tiny teacher's layers, 7 projections each
    assert layers["layers"] == 4 and set(layers["ms"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert all(
        c[str(n)]["linear"] > 0 < c[str(n)]["transposed"]
        for c in layers["ms"].values()
        for n in layers["rows"]
    )
    assert set(data["steps"]["runs"]) == {"ours", "ours_recompute"}
    assert [r["repeat"] for r in data["steps"]["runs"]["ours"]] == [1]
    assert len(data["invocations"]) == 1 and data["invocations"][0]["command"].startswith(
        "python benchmarks/"
    )
    blocks = {name: fn(tmp_path) for name, fn in report_round2.BLOCKS.items()}
    assert "| 1 | 0.3000 | 0.3000 |" in blocks["r2_quality"]
    assert "lever 1: fused vs recompute" in blocks["r2_ratios"] and "not measured" in blocks["r2_ratios"]
    assert "sum of phases" in blocks["r2_phases"] and "not measured" in blocks["r2_summary"]
    assert "`F.linear` decoder layers (`skinny_layers=False`)" in blocks["r2_decode"]
    assert "| `gate_proj` (" in blocks["r2_decode"]
    head_input = dec["head_input"]  # the head on the strided logits_to_keep slice vs a dense copy
    assert set(head_input["slices"]) == {"score", "prefill", "prefill_1row"}
    assert head_input["slices"]["score"] == {
        "hidden": [2, dec["prompt_width"] + 3, dec["hidden_size"]],
        "kept": 4,
    }
    assert (
        all(c["strided"] > 0 < c["dense"] for c in head_input["ms"].values()) and len(head_input["ms"]) == 6
    )
    assert "| prefill of one prompt, `[:, -1:]` (1 x " in blocks["r2_decode"]


def test_lever_switches_turn_the_levers_off_and_are_undone(tokenizer):
    """``linear_head`` and ``no_prefix_cache`` make the engine take the plain paths, then put them back."""
    import copy

    from rl_distill.models import tiny_llama
    from rl_distill.rollout import RolloutEngine, SamplingConfig
    from rl_distill.rollout import skinny_head as sh

    tall = tiny_llama(1024, hidden_size=32, num_layers=1, seed=0)  # a vocabulary-shaped head
    engine = RolloutEngine(tall, tiny_llama(1024, hidden_size=32, num_layers=1, seed=1), tokenizer)
    prompts = ["shared instruction: " + p for p in ("1+1", "2+2", "3+3")]
    rollout = engine.generate(
        prompts, SamplingConfig(max_new_tokens=4), generator=torch.Generator().manual_seed(0)
    )
    undo = apply_patches(["linear_head", "no_prefix_cache"])
    try:
        assert not sh.supports_skinny_head(tall)
        engine.score(copy.copy(rollout))
        assert (engine.prefix_cache.hits, engine.prefix_cache.misses) == (0, 0)
    finally:
        undo()
    assert sh.supports_skinny_head(tall)
    engine.score(copy.copy(rollout))
    assert engine.prefix_cache.misses == 1


def test_linear_layers_switch_turns_the_layer_products_off_and_is_undone():
    from rl_distill.rollout import skinny_head as sh

    x, w = torch.randn(3, 16), torch.randn(16, 16)
    assert sh._uses_transposed(x, w, head=False)
    undo = apply_patches(["linear_layers"])
    try:
        assert not sh._uses_transposed(x, w, head=False)
        assert sh._uses_transposed(x, torch.randn(256, 16))  # the head's product stays on
    finally:
        undo()
    assert sh._uses_transposed(x, w, head=False) and sh.SKINNY_LAYER_MAX_ROWS == 4


def test_strided_head_input_switch_leaves_the_slice_and_is_undone():
    from rl_distill.models import tiny_llama
    from rl_distill.rollout.skinny_head import dense_head_input

    model = tiny_llama(64, hidden_size=16, num_layers=1)
    head = model.get_output_embeddings()
    undo = apply_patches(["strided_head_input"])
    try:
        with dense_head_input(model) as on:
            assert not on and not head._forward_pre_hooks
    finally:
        undo()
    with dense_head_input(model) as on:
        assert on and len(head._forward_pre_hooks) == 1


def test_dense_embedding_grad_switch_declines_and_is_undone(tokenizer):
    from rl_distill.models import tiny_llama
    from rl_distill.rollout import engine as engine_mod

    model = tiny_llama(len(tokenizer), hidden_size=16, num_layers=1, tie_word_embeddings=True)
    ids = torch.tensor([[3, 4, 5]])
    undo = apply_patches(["dense_embedding_grad"])
    try:
        assert engine_mod.sparse_grad_embeddings(model, ids) is None
    finally:
        undo()
    assert engine_mod.sparse_grad_embeddings(model, ids) is not None


def test_headline_ratios_pool_every_repeat_of_both_runs(tmp_path):
    """The headline pairs' median is taken over the full run's and the headline run's repeats together."""

    def run(repeat, tps, rss=1000.0):
        return {"repeat": repeat, "tokens_per_second": tps, "peak_rss_steps_mib": rss, "step_seconds": [128 / tps],
                "tokens_per_step": [128], "median_step_seconds": 128 / tps, "load_average_before": [1.0, 1.0, 1.0]}  # fmt: skip

    def steps(ours, peer):
        configs = {"ours": {}, "trl_distillation": {}}
        return {"configs": configs, "runs": {"ours": ours, "trl_distillation": peer}}

    full = {"steps": steps([run(1, 2.0), run(2, 1.5)], [run(1, 1.0), run(2, 1.0)])}
    (tmp_path / report_round2.FILE).write_text(json.dumps(full))
    only_full = report_round2.pooled_ratios(tmp_path, "ours", "trl_distillation")
    assert only_full["ratios"] == [2.0, 1.5] and [n for n, _ in only_full["parts"]] == ["full run"]
    assert "No headline run recorded" in report_round2.headline_block(tmp_path)
    head = {
        "invocations": [
            {
                "command": "python benchmarks/perf_round2.py --configs ours trl_distillation",
                "started": "2026-12-01T23:00:00Z",
                "wall_seconds": 60.0,
                "load_average_after": [1, 1, 1],
                "machine": {"load_average": [0.5, 0.5, 0.5]},
            }
        ],  # fmt: skip
        "steps": steps([run(1, 1.7), run(2, 1.9), run(3, 1.0, rss=1100.0)], [run(r, 1.0) for r in (1, 2, 3)]),
    }
    (tmp_path / report_round2.HEADLINE_FILE).write_text(json.dumps(head))
    pooled = report_round2.pooled_ratios(tmp_path, "ours", "trl_distillation")
    assert sorted(pooled["ratios"]) == [1.0, 1.5, 1.7, 1.9, 2.0] and pooled["median"] == 1.7
    assert pooled["rss_max"] == pytest.approx(1.1)
    summary = report_round2.summary_block(tmp_path)
    fp32 = next(line for line in summary.splitlines() if line.startswith("| fp32"))
    # median 1.70x >= 1.6, but one repeat ran at 1.1x the peer's peak RSS: not met
    assert (
        "median **1.70x** over 5 repeats" in fp32
        and "full run: 2.00x, 1.50x; headline run: 1.70x, 1.90x, 1.00x" in fp32
    )
    assert fp32.endswith("| no |")
    block = report_round2.headline_block(tmp_path)
    assert (
        "| fp32: ours / trl_distillation | 2.00x, 1.50x | 1.70x, 1.90x, 1.00x | **1.70x** (1.00-2.00x), 5 |"
        in block
    )
