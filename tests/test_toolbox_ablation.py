"""Smoke test of the toolbox ablation (examples/toolbox_ablation.py --quick): page, JSON, diagnostics, resume."""

import torch
from test_examples import load_example

torch.set_num_threads(1)


def test_valid_sequence_reward_is_the_labs_success_event():
    ablation = load_example("toolbox_ablation")
    reward = ablation.ValidSequenceReward(["abcd", "fedc"])
    assert reward([">"] * 4, ["abcd", "fedc", "abce", "abc"]) == [1.0, 1.0, 0.0, 0.0]


def test_toolbox_ablation_quick_writes_page_json_and_diagnostics(tmp_path, capsys):
    ablation = load_example("toolbox_ablation")
    argv = ["--quick", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    payload = ablation.main(argv)
    res = tmp_path / "res"
    for suffix in (".md", ".json", ".png"):
        assert (res / f"toolbox_ablation{suffix}").is_file(), suffix
    arms = set(ablation.ARMS) - set(ablation.CUT)
    assert {r["method"] for r in payload["runs"]} == arms

    # Each technique's own diagnostic is logged, in range.
    by_arm = {r["method"]: r["diagnostics"] for r in payload["runs"]}
    rejected = by_arm["reject"]["rollout/filter/rejected_fraction"]
    assert 0.0 <= rejected["mean"] <= 1.0 and rejected["steps"] == 2
    assert 0.0 <= by_arm["tip_filter"]["rollout/tip_kept_fraction"]["mean"] <= 1.0
    assert by_arm["tip_weight"]["rollout/tip_weight_mean"]["mean"] >= 0.0
    assert [p[1] for p in by_arm["warmup"]["lmbda"]["trace"]] == [0.0, 1.0]  # warm-up, then on-policy
    assert {p[1] for p in by_arm["baseline"]["lmbda"]["trace"]} == {1.0}
    assert 0.0 <= by_arm["beta_ext2"]["rollout/external_reward"]["mean"] <= 1.0
    # The rejection threshold was chosen on the validation seed only.
    chosen = payload["reject_selection"]["chosen"]["4"]
    assert chosen in [c["max_perplexity"] for c in payload["reject_selection"]["candidates"]["4"]]
    assert 100 not in {r["seed"] for r in payload["runs"]}

    # The page is rendered from the JSON alone: --report-only gives the same page.
    page = (res / "toolbox_ablation.md").read_text()
    assert "## Verdicts" in page and "Model name" in page and "load average" in page
    base = payload["analysis"]["cells"]["baseline"]["4"]["expected_errors"]
    assert f"{base[0]:.3f} ± {base[1]:.3f}" in page
    ablation.main([*argv, "--report-only"])
    assert (res / "toolbox_ablation.md").read_text() == page

    # Resume: a second invocation trains nothing.
    capsys.readouterr()
    ablation.main(argv)
    out = capsys.readouterr().out
    assert "[1/" not in out and out.count("0 to run") == 3
