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
from benchmarks import divergence_memory, onpolicy_overhead, profile_step, vs_trl  # noqa: E402
from benchmarks._methods import BenchSpec, aggregate, run_method  # noqa: E402
from benchmarks._patches import FusedGradJSD, apply_patches, fused_jsd  # noqa: E402

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


def test_fused_grad_jsd_matches_the_library():
    from rl_distill.divergences import generalized_jsd

    torch.manual_seed(0)
    t, s0 = torch.randn(10, 37) * 3, torch.randn(10, 37) * 3
    t[0, 5] = float("-inf")  # a zero-probability teacher token
    for temp in (1.0, 0.7):
        s1 = s0.clone().requires_grad_(True)
        ref = generalized_jsd(t[None], s1[None], beta=0.3, temperature=temp, reduction="token")[0]
        (ref * torch.arange(10.0)).sum().backward()
        s2 = s0.clone().requires_grad_(True)
        index = (torch.arange(10),)
        got = FusedGradJSD.apply(t, s2, index, 0.3, temp, 3)
        (got * torch.arange(10.0)).sum().backward()
        torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["rss", "profiler"])
def test_divergence_memory_variants_agree(method):
    results = {
        v: divergence_memory.measure(v, 2, 8, 64, beta=0.5, method=method, threads=2)
        for v in ("chunked", "chunked:3", "fused_grad", "naive_stack", "naive_logaddexp")
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


@pytest.mark.parametrize("module", [vs_trl, profile_step, divergence_memory, onpolicy_overhead])
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


def test_fused_jsd_sequence_reduction_with_mask_matches_the_library():
    from rl_distill.divergences import generalized_jsd

    torch.manual_seed(1)
    t, s0 = torch.randn(3, 5, 17), torch.randn(3, 5, 17)
    mask = torch.rand(3, 5) > 0.3
    mask[2] = False  # an empty sequence gives 0
    s1, s2 = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    ref = generalized_jsd(t, s1, mask, beta=0.5, reduction="sequence")
    got = fused_jsd(t, s2, mask, beta=0.5, reduction="sequence", chunk_rows=2)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    (ref * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    (got * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-7)


def _graph_nodes(t: torch.Tensor) -> set[str]:
    """Class names of the autograd nodes behind ``t``."""
    names, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_fused_jsd_patch_gives_the_agents_loss_and_gradient(monkeypatch):
    """The patched GKD agent takes the fused path and gets the unpatched loss and gradient."""
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
    # Several chunks per rollout, and both paths must follow the library's default chunk.
    monkeypatch.setattr(div, "DEFAULT_CHUNK_ELEMENTS", 3 * vocab)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor], set[str]]:
        student.zero_grad(set_to_none=True)
        loss, _ = agent.loss(rollouts)
        nodes = _graph_nodes(loss)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()], nodes

    ref_loss, ref_grads, ref_nodes = loss_and_grads()
    undo = apply_patches(["fused_jsd"])
    try:
        loss, grads, nodes = loss_and_grads()
    finally:
        undo()
    assert gkd.divergence is div.divergence  # undone
    assert "_ChunkedRowsBackward" in ref_nodes and "FusedGradJSDBackward" not in ref_nodes
    assert "FusedGradJSDBackward" in nodes and "_ChunkedRowsBackward" not in nodes  # the patch fired
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


def test_fused_jsd_default_chunk_is_the_librarys(monkeypatch):
    import rl_distill.divergences as div
    from benchmarks._patches import default_chunk_rows

    assert default_chunk_rows(49152) == div.DEFAULT_CHUNK_ELEMENTS // 49152
    monkeypatch.setattr(div, "DEFAULT_CHUNK_ELEMENTS", 2**20)
    assert default_chunk_rows(49152) == 21 and default_chunk_rows(2**21) == 1


def test_fused_jsd_patch_leaves_other_calls_to_the_library():
    import rl_distill.agents.gkd as gkd
    from rl_distill.divergences import generalized_jsd

    torch.manual_seed(2)
    t0, s0, mask = torch.randn(2, 4, 11), torch.randn(2, 4, 11), torch.ones(2, 4, dtype=torch.bool)
    undo = apply_patches(["fused_jsd"])
    try:
        t, s = t0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        out = gkd.divergence("jsd", t, s, mask, beta=0.5, reduction="sequence")  # a teacher with grad
        assert "FusedGradJSDBackward" not in _graph_nodes(out)
        out.sum().backward()
        assert t.grad is not None and t.grad.abs().sum() > 0
        s64 = s0.double().requires_grad_(True)  # float64 stays float64, as in the library
        got = gkd.divergence("jsd", t0.double(), s64, mask, beta=0.5, reduction="batch")
        assert got.dtype == torch.float64 and "FusedGradJSDBackward" in _graph_nodes(got)
        torch.testing.assert_close(got, generalized_jsd(t0.double(), s0.double(), mask, beta=0.5))
        with pytest.raises(ValueError, match="shape"):
            gkd.divergence("jsd", t0, s0[..., :5], mask)
    finally:
        undo()


def test_fused_grad_jsd_backward_runs_once():
    t, s = torch.randn(1, 3, 7), torch.randn(1, 3, 7, requires_grad=True)
    loss = fused_jsd(t, s, torch.ones(1, 3, dtype=torch.bool), beta=0.5, reduction="batch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_removed_patches_are_unknown():
    for name in ("inverse_cdf_sampling", "small_chunks"):
        with pytest.raises(ValueError, match="unknown patch"):
            apply_patches([name])


def test_ours_recommended_runs():
    import rl_distill.agents.gkd as gkd
    import rl_distill.divergences as div

    res = run_method("ours_recommended", TINY)
    assert res["method"] == "ours_recommended" and res["patches"] == ["fused_jsd"]
    assert len(res["step_seconds"]) == TINY.steps
    assert gkd.divergence is div.divergence  # undone after the run
