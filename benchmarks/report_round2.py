"""The round-2 blocks of ``docs/results/performance.md`` (issue #18), computed from ``perf_round2.json``.

:mod:`benchmarks.report` renders these blocks with its own (round-1) ones; nothing is measured here.
Every number is read from ``benchmarks/results/perf_round2.json`` (written by
``benchmarks/perf_round2.py``) or derived from it by the formulas stated on the page. A section that
is missing from the JSON renders as "not measured".

Ratios between two configurations are taken **per repeat** (the two processes of repeat ``r`` ran
next to each other in the alternated order), then summarised by their median and min-max: the
headline is that median, never the best repeat.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.perf_round2 import PAIRS

RESULTS = Path(__file__).resolve().parent / "results"
FILE = "perf_round2.json"
#: A dedicated run of the two headline pairs only, with more repeats (same driver, ``--configs``);
#: its repeats are pooled with the full run's for the headline (:func:`pooled_ratios`).
HEADLINE_FILE = "perf_round2_headline.json"
#: The full run at commit b5cd513, where the engine also packed the trained student in every
#: ``generate`` call (``ours_unpacked`` rows: the same without packing); its steps are item 7's
#: evidence for not doing so. Nothing else on the page reads it.
PACKED_STUDENT_FILE = "perf_round2_packed_student.json"
#: The pairs the headline run repeats: fp32 and bf16 against DistillationTrainer.
HEADLINE_PAIRS = {"fp32": ("ours", "trl_distillation"), "bf16": ("ours_bf16", "trl_distillation_bf16")}

#: config -> label on the page
LABELS = {
    "ours": "**ours** fp32 (shipped default: `train.precision: fp32`)",
    "trl_distillation": "TRL DistillationTrainer, fp32 (matched)",
    "trl_gkd": "TRL GKDTrainer, fp32 (matched)",
    "ours_bf16": "ours bf16 (`train.precision: bf16` + `model.teacher_dtype: bfloat16`)",
    "trl_distillation_bf16": "TRL DistillationTrainer, `bf16=True` (matched bf16)",
    "trl_distillation_defaults": "TRL DistillationTrainer at its defaults (`bf16=True`, gradient checkpointing on)",
    "ours_recompute": "ours fp32, fused divergence gradient off (lever 1 off)",
    "ours_lambda0": "ours, supervised KD (lambda = 0, forward KL)",
    "trl_gkd_lambda0": "TRL GKDTrainer, lambda = 0",
    "ours_b16": "ours fp32, B = 16",
    "trl_distillation_b16": "TRL DistillationTrainer fp32, B = 16",
    "ours_t128": "ours fp32, 128 new tokens",
    "trl_distillation_t128": "TRL DistillationTrainer fp32, 128 new tokens",
}


def load(results: Path = RESULTS) -> dict[str, Any]:
    """``perf_round2.json`` (an empty dict when it does not exist yet)."""
    path = results / FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_headline(results: Path = RESULTS) -> dict[str, Any]:
    """``perf_round2_headline.json`` (an empty dict when there is none)."""
    path = results / HEADLINE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _ok_runs(data: dict[str, Any], config: str) -> list[dict[str, Any]]:
    return [r for r in data.get("steps", {}).get("runs", {}).get(config, []) if "error" not in r]


def config_summary(data: dict[str, Any], config: str) -> dict[str, Any] | None:
    """Pooled and per-repeat numbers of one configuration (None when it has no successful run)."""
    runs = _ok_runs(data, config)
    if not runs:
        return None
    steps = [s for r in runs for s in r["step_seconds"]]
    tokens = [t for r in runs for t in r["tokens_per_step"]]
    phases = [r["phase_median_seconds"] for r in runs if "phase_median_seconds" in r]
    return {
        "repeats": len(runs),
        "steps": len(steps),
        "median_step_seconds": statistics.median(steps),
        "per_repeat_median_step_seconds": [r["median_step_seconds"] for r in runs],
        "per_repeat_tokens_per_second": [r["tokens_per_second"] for r in runs],
        "tokens_per_second": sum(tokens) / sum(steps),
        "mean_tokens_per_step": sum(tokens) / len(tokens),
        "peak_rss_mib": statistics.median(r["peak_rss_steps_mib"] for r in runs),
        "per_repeat_peak_rss_mib": [r["peak_rss_steps_mib"] for r in runs],
        "load_before": [r.get("load_average_before", [None])[0] for r in runs],
        "phases": {k: statistics.median(p[k] for p in phases) for k in phases[0]} if phases else None,
    }


def pair_ratios(data: dict[str, Any], ours: str, peer: str) -> dict[str, Any] | None:
    """Per-repeat throughput ratios ``ours / peer`` (tokens/s of the two processes of each repeat)."""
    a = {r["repeat"]: r for r in _ok_runs(data, ours)}
    b = {r["repeat"]: r for r in _ok_runs(data, peer)}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    ratios = [a[k]["tokens_per_second"] / b[k]["tokens_per_second"] for k in common]
    rss = [a[k]["peak_rss_steps_mib"] / b[k]["peak_rss_steps_mib"] for k in common]
    return {"repeats": common, **_ratio_stats(ratios, rss)}


def _ratio_stats(ratios: list[float], rss: list[float]) -> dict[str, Any]:
    """Median and min-max of throughput ratios, median and max of peak-RSS ratios."""
    return {
        "ratios": ratios,
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rss_ratios": rss,
        "rss_median": statistics.median(rss),
        "rss_max": max(rss),
    }


def pooled_ratios(results: Path, ours: str, peer: str) -> dict[str, Any] | None:
    """:func:`pair_ratios` over the full run's repeats and the headline run's together (same code).

    Every repeat of both runs counts once; ``parts`` keeps each run's own ratios for the page. Without
    a headline run this is the full run's :func:`pair_ratios` (``parts`` has one entry).
    """
    parts = [
        (name, p)
        for name, p in (
            ("full run", pair_ratios(load(results), ours, peer)),
            ("headline run", pair_ratios(load_headline(results), ours, peer)),
        )
        if p is not None
    ]
    if not parts:
        return None
    ratios = [r for _, p in parts for r in p["ratios"]]
    rss = [r for _, p in parts for r in p["rss_ratios"]]
    return {**_ratio_stats(ratios, rss), "parts": parts}


def _pooled_spread(p: dict[str, Any]) -> str:
    """``median **X** over n repeats (min-max ...; full run: ..., headline run: ...)``."""
    parts = "; ".join(f"{name}: " + ", ".join(_x(r) for r in q["ratios"]) for name, q in p["parts"])
    return (
        f"median **{_x(p['median'])}** over {len(p['ratios'])} repeats (min-max {p['min']:.2f}-{_x(p['max'])}; "
        f"{parts})"
    )


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _spread(p: dict[str, Any]) -> str:
    return (
        f"median **{_x(p['median'])}** (min-max {p['min']:.2f}-{_x(p['max'])}; repeats: "
        + ", ".join(_x(r) for r in p["ratios"])
        + ")"
    )


NOT_MEASURED = "Not measured yet: `benchmarks/results/perf_round2.json` has no `{section}` section."


# --------------------------------------------------------------------------------------------
# Quality (bf16 vs fp32 held-out divergence)
# --------------------------------------------------------------------------------------------
def quality_facts(data: dict[str, Any], results: Path = RESULTS) -> dict[str, Any] | None:
    """``eval/jsd`` after the main job per precision and seed; seed 0 falls back to the round-1 JSONs."""
    q = data.get("quality")
    if q is None:
        return None
    after: dict[str, dict[int, float]] = {"fp32": {}, "bf16": {}}
    source: dict[str, dict[int, str]] = {"fp32": {}, "bf16": {}}
    for run in q["runs"]:
        after[run["precision"]][run["seed"]] = run["after"]["eval/jsd"]
        source[run["precision"]][run["seed"]] = "this round"
    for precision, name in (("fp32", "fp32_main_job.json"), ("bf16", "bf16_main_job.json")):
        path = results / name
        if 0 not in after[precision] and path.is_file():
            after[precision][0] = json.loads(path.read_text(encoding="utf-8"))["after"]["eval/jsd"]
            source[precision][0] = f"`{name}` (earlier code: before the fused gradient)"
    out: dict[str, Any] = {"after": after, "source": source}
    for precision, vals in after.items():
        v = list(vals.values())
        out[precision + "_stats"] = (
            {
                "n": len(v),
                "mean": statistics.fmean(v),
                "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                "min": min(v),
                "max": max(v),
            }  # fmt: skip
            if v
            else None
        )
    f, b = out["fp32_stats"], out["bf16_stats"]
    out["within"] = bool(f and b and f["n"] >= 2 and f["min"] <= b["mean"] <= f["max"])
    # lower is closer to the teacher: a bf16 mean under the fp32 range is no quality cost
    out["not_worse"] = bool(f and b and f["n"] >= 2 and b["mean"] <= f["max"])
    return out


def quality_block(results: Path = RESULTS) -> str:
    """Held-out JSD after the main job, fp32 against bf16, per seed."""
    data = load(results)
    q = quality_facts(data, results)
    if q is None:
        return NOT_MEASURED.format(section="quality")
    seeds = sorted(set(q["after"]["fp32"]) | set(q["after"]["bf16"]))
    lines = [
        "| seed | fp32 `eval/jsd` after 100 steps | bf16 `eval/jsd` after 100 steps | source |",
        "|---|---|---|---|",
    ]
    for s in seeds:
        cells = [f"{q['after'][p][s]:.4f}" if s in q["after"][p] else "not run" for p in ("fp32", "bf16")]
        src = "; ".join(sorted({q["source"][p][s] for p in ("fp32", "bf16") if s in q["source"][p]}))
        lines.append(f"| {s} | {cells[0]} | {cells[1]} | {src} |")
    for p in ("fp32", "bf16"):
        st = q[f"{p}_stats"]
        if st:
            lines.append(
                f"| **{p} mean ± std** (n = {st['n']}) | | | {st['mean']:.4f} ± {st['std']:.4f} (min-max "
                f"{st['min']:.4f}-{st['max']:.4f}) |"
            )
    f, b = q["fp32_stats"], q["bf16_stats"]
    if f and b:
        verdict = "inside" if q["within"] else ("below" if b["mean"] < f["min"] else "above")
        lines += [
            "",
            f"The bf16 mean ({b['mean']:.4f}) lies **{verdict}** the fp32 seeds' range "
            f"({f['min']:.4f}-{f['max']:.4f}); difference of the means {b['mean'] - f['mean']:+.4f}, fp32 seed std "
            f"{f['std']:.4f} (lower = closer to the teacher).",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
def summary_block(results: Path = RESULTS) -> str:
    """The issue's targets and what was measured."""
    data = load(results)
    if "steps" not in data:
        return NOT_MEASURED.format(section="steps")
    rows = ["| target (issue #18) | measured | met? |", "|---|---|---|"]

    def pair_row(target: str, ours: str, peer: str, bar: float, rss_bar: bool) -> None:
        pooled = (ours, peer) in HEADLINE_PAIRS.values()
        p = pooled_ratios(results, ours, peer) if pooled else pair_ratios(data, ours, peer)
        if p is None:
            rows.append(f"| {target} | not measured | — |")
            return
        met = p["median"] >= bar and (not rss_bar or p["rss_max"] <= 1.0)
        rss = f"; peak RSS {_x(p['rss_median'])} (max {_x(p['rss_max'])})"
        spread = _pooled_spread(p) if pooled else _spread(p)
        rows.append(f"| {target} | throughput {spread}{rss} | {'**yes**' if met else 'no'} |")

    pair_row(
        "fp32: >= 1.6x DistillationTrainer's throughput at <= its peak RSS",
        "ours",
        "trl_distillation",
        1.6,
        True,
    )
    pair_row("bf16: >= 2x DistillationTrainer's (both bf16)", "ours_bf16", "trl_distillation_bf16", 2.0, True)
    q = quality_facts(data, results)
    if q and q["fp32_stats"] and q["bf16_stats"]:
        f, b = q["fp32_stats"], q["bf16_stats"]
        rows.append(
            f"| bf16: held-out JSD after the main job within the fp32 seed spread | bf16 {b['mean']:.4f} ± "
            f"{b['std']:.4f} (n = {b['n']}) vs fp32 {f['mean']:.4f} ± {f['std']:.4f} (n = {f['n']}, range "
            f"{f['min']:.4f}-{f['max']:.4f}); "
            + (
                "inside the range"
                if q["within"]
                else ("below it (closer to the teacher)" if b["mean"] < f["min"] else "above it")
            )
            + f" | {'**yes**' if q['within'] else ('no quality cost (better than every fp32 seed), but not within the spread' if q['not_worse'] else 'no')} |"
        )
    else:
        rows.append("| bf16: held-out JSD within the fp32 seed spread | not measured | — |")
    p = pair_ratios(data, "ours", "trl_distillation_defaults")
    if p:
        rows.append(
            f"| each at its documented defaults (ours: fp32; TRL: bf16 + gradient checkpointing) | throughput "
            f"{_spread(p)}; peak RSS {_x(p['rss_median'])} | (reported) |"
        )
    pair_row(
        "supervised KD (lambda = 0): >= 1.5x GKDTrainer at lambda = 0",
        "ours_lambda0",
        "trl_gkd_lambda0",
        1.5,
        False,
    )
    env = data.get("env")
    if env:
        r = env["time_ratio_env_over_floor"]
        rows.append(
            f"| environment stepping at B = 8: <= 1.3x the bulk floor | {_x(r)} (median of {env['setup']['repeats']} "
            f"rounds) | {'**yes**' if r <= 1.3 else 'no'} |"
        )
    mem = data.get("memory")
    if mem:
        c = mem["summary"]["chunked"]
        worst = max(c["profiler"]["peak_extra_over_tensor"], c["rss"]["peak_extra_over_tensor"])
        rows.append(
            f"| JSD fwd+bwd peak extra memory <= 1.5x one (B, T, V) fp32 tensor, shipped defaults | "
            f"{_x(c['profiler']['peak_extra_over_tensor'])} (allocator), {_x(c['rss']['peak_extra_over_tensor'])} "
            f"(RSS) | {'**yes**' if worst <= 1.5 else 'no'} |"
        )
    dec = data.get("decode")
    if dec:
        rows.append(
            f"| decode per token against the bandwidth floor (fp32) | engine `generate` "
            f"{dec['fp32']['median_ms_per_token']['generate']:.1f} ms/token vs floor "
            f"{dec['floor_ms_per_token_fp32']:.1f} ms: **{_x(dec['fp32']['ratio_to_floor']['generate'])}** | (reported) |"
        )
    return "\n".join(rows)


def side_by_side_block(results: Path = RESULTS) -> str:
    """Every configuration: median s/step, every repeat, throughput, peak RSS, load."""
    data = load(results)
    if "steps" not in data:
        return NOT_MEASURED.format(section="steps")
    return _side_by_side(data)


def headline_block(results: Path = RESULTS) -> str:
    """The headline run (the two headline pairs, more repeats) and the pooled headline ratios."""
    data = load_headline(results)
    if "steps" not in data:
        return f"No headline run recorded (`benchmarks/results/{HEADLINE_FILE}`)."
    runs = [
        i
        for i in data.get("invocations", [])
        if "steps" in i.get("command", "") or "--configs" in i.get("command", "")
    ]
    inv = runs[-1] if runs else {}
    lines = [
        f"`{inv.get('command', '(command not recorded)')}` — started {inv.get('started', '?')}, "
        f"{inv.get('wall_seconds', 0) / 60:.1f} min; load average before "
        f"{inv.get('machine', {}).get('load_average')}, after {inv.get('load_average_after')}.",
        "",
        _side_by_side(data),
        "",
        "| comparison | full run (per repeat) | headline run (per repeat) | pooled median (min-max), n | peak RSS ratio (median, max) |",
        "|---|---|---|---|---|",
    ]
    for name, (a, b) in HEADLINE_PAIRS.items():
        p = pooled_ratios(results, a, b)
        if p is None:
            continue
        cells = dict(p["parts"])
        per = [
            ", ".join(_x(r) for r in cells[k]["ratios"]) if k in cells else "—"
            for k in ("full run", "headline run")
        ]
        lines.append(
            f"| {name}: {a} / {b} | {per[0]} | {per[1]} | **{_x(p['median'])}** ({p['min']:.2f}-{_x(p['max'])}), "
            f"{len(p['ratios'])} | {_x(p['rss_median'])}, {_x(p['rss_max'])} |"
        )
    return "\n".join(lines)


def _side_by_side(data: dict[str, Any]) -> str:
    lines = [
        "| configuration | median s/step (all steps) | per-repeat medians | generated tok/s | tokens/step | peak RSS (per repeat) | 1-min load before |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in data["steps"]["configs"]:
        s = config_summary(data, config)
        label = LABELS.get(config, config)
        if s is None:
            lines.append(f"| {label} | not measured | | | | | |")
            continue
        lines.append(
            f"| {label} | {s['median_step_seconds']:.3f} ({s['steps']}) | "
            + ", ".join(f"{v:.3f}" for v in s["per_repeat_median_step_seconds"])
            + f" | {s['tokens_per_second']:.1f} | {s['mean_tokens_per_step']:.0f} | {s['peak_rss_mib']:.0f} MiB ("
            + ", ".join(f"{v:.0f}" for v in s["per_repeat_peak_rss_mib"])
            + ") | "
            + ", ".join(f"{v}" for v in s["load_before"])
            + " |"
        )
    skipped = data["steps"].get("skipped", [])
    failed = [
        f"{c} repeat {r['repeat']}" for c, rs in data["steps"]["runs"].items() for r in rs if "error" in r
    ]
    if skipped or failed:
        lines += [
            "",
            "Not run (time budget): "
            + (", ".join(skipped) or "none")
            + ". Failed: "
            + (", ".join(failed) or "none")
            + ".",
        ]
    return "\n".join(lines)


def ratios_block(results: Path = RESULTS) -> str:
    """Per-repeat throughput ratios of the pairs the issue asks about, and the levers alone."""
    data = load(results)
    if "steps" not in data:
        return NOT_MEASURED.format(section="steps")
    lines = [
        "| comparison (first over second) | throughput ratio per repeat | median (min-max) | peak RSS ratio (median) |",
        "|---|---|---|---|",
    ]
    for name, (a, b) in PAIRS.items():
        p = pair_ratios(data, a, b)
        if p is None:
            lines.append(f"| {name} | not measured | | |")
            continue
        lines.append(
            f"| {name} | "
            + ", ".join(_x(r) for r in p["ratios"])
            + f" | **{_x(p['median'])}** ({p['min']:.2f}-"
            f"{_x(p['max'])}) | {_x(p['rss_median'])} |"
        )
    growth = []
    for tag, what in (("b16", "batch 4 -> 16"), ("t128", "32 -> 128 new tokens")):
        for who, base in (("ours", "ours"), ("trl_distillation", "trl_distillation")):
            big, small = config_summary(data, f"{who}_{tag}"), config_summary(data, base)
            if big and small:
                growth.append(
                    f"{'ours' if who == 'ours' else 'DistillationTrainer'} {what}: step time x"
                    f"{big['median_step_seconds'] / small['median_step_seconds']:.2f}, tokens/s x"
                    f"{big['tokens_per_second'] / small['tokens_per_second']:.2f}"
                )
    if growth:
        lines += ["", "Growth with batch and length (pooled medians): " + "; ".join(growth) + "."]
    return "\n".join(lines)


def _floor_model(data: dict[str, Any], config: str) -> dict[str, float] | None:
    """Per-phase floors (seconds) of one of our configurations, from the measured bandwidth and matmul peak."""
    fl, dec = data.get("floors"), data.get("decode")
    runs = _ok_runs(data, config)
    if not (fl and dec and runs):
        return None
    spec = runs[0]["spec"]
    bf16 = spec.get("precision") == "bf16"
    bw = fl["bandwidth_gb_per_s"] * 1e9
    mm = fl["matmul_bfloat16_gflops" if bf16 else "matmul_float32_gflops"] * 1e9
    b, t, p = spec["batch_size"], spec["max_new_tokens"], dec["prompt_width"]
    v, h = dec["vocab"], dec["hidden_size"]
    s_layers = dec["student_parameters"] - dec["student_embedding_parameters"]
    t_layers = dec["teacher_parameters"] - dec["teacher_embedding_parameters"]
    head = v * h  # tied: the embedding matrix is the LM head
    wbytes = 2 if bf16 else 4
    # forward FLOPs: 2 x layer parameters per fed token (P + T - 1) + the LM head at the T kept positions
    fwd_student = 2 * s_layers * b * (p + t - 1) + 2 * head * b * t
    fwd_teacher = 2 * t_layers * b * (p + t - 1) + 2 * head * b * t
    return {
        "generate": t * dec["student_parameters"] * wbytes / bw,
        "teacher": max(fwd_teacher / mm, dec["teacher_parameters"] * wbytes / bw),
        "student_forward": fwd_student / mm,
        # read teacher and student logits, write the gradient (fp32); and at least 6 exp/log per element
        # (two log-softmaxes, the log-mixture's exp + log1p, pT and pS), at the measured exp rate
        "divergence": max(3 * b * t * v * 4 / bw, 6 * b * t * v / (fl["exp_gelem_per_s"] * 1e9)),
        # backward = 2 x forward FLOPs; clip + fused AdamW stream parameters, gradient, two moments (fp32)
        "backward_and_step": 2 * fwd_student / mm + dec["student_parameters"] * 4 * 8 / bw,
    }


PHASE_LABELS = {
    "generate": "generate (student, KV cache)",
    "teacher": "teacher score (inference mode)",
    "student_forward": "student forward with gradient",
    "divergence": "divergence (with the fused gradient: value and student-logit gradient)",
    "backward_and_step": "backward + clip + AdamW step",
}


def phases_block(results: Path = RESULTS) -> str:
    """Our phase medians (fp32, bf16, lever 1 off) against the floors."""
    data = load(results)
    configs = [c for c in ("ours", "ours_bf16", "ours_recompute") if config_summary(data, c)]
    if not configs or "floors" not in data or "decode" not in data:
        return NOT_MEASURED.format(section="steps/floors/decode")
    fl = data["floors"]
    head = " | ".join(f"{c} s (floor s, ratio)" for c in configs)
    lines = [f"| phase | {head} |", "|---|" + "---|" * len(configs)]
    totals = dict.fromkeys(configs, 0.0)
    floor_totals = dict.fromkeys(configs, 0.0)
    for key, label in PHASE_LABELS.items():
        cells = []
        for c in configs:
            got = config_summary(data, c)["phases"][key]
            floor = _floor_model(data, c)[key]
            totals[c] += got
            floor_totals[c] += floor
            cells.append(f"{got:.3f} ({floor:.3f}, {got / floor:.1f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| **sum of phases** | "
        + " | ".join(
            f"**{totals[c]:.3f}** ({floor_totals[c]:.3f}, {totals[c] / floor_totals[c]:.1f}x)"
            for c in configs
        )
        + " |"
    )
    lines += [
        "",
        f"Measured floors' denominators (`floors` section): memory bandwidth {fl['bandwidth_gb_per_s']:.1f} GB/s "
        f"(copy {fl['copy_gb_per_s']:.1f} GB/s read+write, sum {fl['read_gb_per_s']:.1f} GB/s read; the larger is "
        f"used), matmul {fl['matmul_float32_gflops']:.0f} GFLOP/s fp32 and {fl['matmul_bfloat16_gflops']:.0f} "
        f"GFLOP/s bf16 ({fl['matmul_size']}^3), exp {fl['exp_gelem_per_s']:.2f} G elements/s ({fl['threads']} "
        "threads). With the fused gradient off (`ours_recompute`) the divergence row is its forward only and the "
        "recomputing backward falls in the backward row.",
    ]
    return "\n".join(lines)


def _layers_lever(data: dict[str, Any], fused: dict[str, Any] | None) -> str:
    """Lever 3's second half, the decoder layers' few-row products (empty when not measured)."""
    m = data["decode"]["fp32"]["median_ms_per_token"]
    lay = config_summary(data, "ours_linear_layers")
    pair = pair_ratios(data, "ours", "ours_linear_layers")
    if "generate_linear_layers" not in m or not (fused and lay and pair):
        return ""
    ratio = data["decode"]["fp32"]["ratio_to_floor"]
    return (
        " The same product in the **decoder layers' linear maps** at 2-4 rows "
        "(`skinny_decoder_layers`; the layer table in section 3): per-token decode "
        f"{m['generate']:.1f} ms with it vs {m['generate_linear_layers']:.1f} ms "
        f"({_x(ratio['generate_linear_layers'])}) without; end to end, step {fused['median_step_seconds']:.3f} s vs "
        f"{lay['median_step_seconds']:.3f} s (`ours_linear_layers`), throughput ratio per repeat {_spread(pair)}. "
        "Kept (shipped, `RolloutEngine(skinny_layers=True)`; config `train.few_row_products`)."
    )


def decode_block(results: Path = RESULTS) -> str:
    """Per-token decode against the bandwidth floor, dynamic and static KV cache."""
    data = load(results)
    dec = data.get("decode")
    if dec is None:
        return NOT_MEASURED.format(section="decode")
    optional = [
        (key, label)
        for key, label in (
            ("generate_linear_head", "engine `generate`, `F.linear` head (`skinny_head=False`)"),
            (
                "generate_linear_layers",
                "engine `generate`, `F.linear` decoder layers (`skinny_layers=False`)",
            ),
        )
        if key in dec["fp32"]["median_ms_per_token"]
    ]
    lines = [
        "| precision | floor ms/token (weights / bandwidth) | engine `generate` (sampling incl.) | "
        + "".join(f"{label} | " for _, label in optional)
        + "greedy loop, dynamic cache, `F.linear` throughout | greedy loop, static cache | prefill ms |",
        "|---|---|---|---|---|---|" + "---|" * len(optional),
    ]
    for p in ("fp32", "bf16"):
        d = dec[p]
        m, r = d["median_ms_per_token"], d["ratio_to_floor"]
        static = (
            f"{m['static']:.1f} ({_x(r['static'])})"
            if "static" in m
            else f"fails: `{d['static_cache_error'][:90]}`"
        )
        extra = "".join(f"{m[key]:.1f} ({_x(r[key])}) | " for key, _ in optional)
        lines.append(
            f"| {p}{' autocast' if p == 'bf16' else ''} | {dec[f'floor_ms_per_token_{p}']:.1f} | "
            f"{m['generate']:.1f} ({_x(r['generate'])}) | {extra}{m['dynamic']:.1f} ({_x(r['dynamic'])}) | "
            f"{static} | {m['prefill']:.0f} |"
        )
    diff = dec["fp32"]["static_vs_dynamic_max_abs_logit_diff"]
    lines += [
        "",
        f"Student: {dec['student_parameters'] / 1e6:.1f}M parameters, {dec['student_weight_bytes_fp32'] / 1e6:.0f} MB "
        f"in fp32; B = {dec['batch_size']}, prompt width {dec['prompt_width']}, {dec['new_tokens']} new tokens. "
        "Static against dynamic cache, last logits after the greedy loop: max abs difference "
        + (f"{diff:.1e}" if diff is not None else "n/a")
        + " (not bit-identical).",
    ]
    head = dec.get("head")
    if head:
        counts = sorted({int(k.rsplit("_", 1)[1]) for k in head["ms"]})
        lines += [
            "",
            f"The output head alone ({head['shape'][0]} x {head['shape'][1]}, ms per product, median of "
            f"{head['repeats']}): `F.linear(h, W)` (every Hugging Face `lm_head`) against the few-row product "
            "`(W @ h.T).T` (`rl_distill/rollout/skinny_head.py`)"
            + (
                " and the oneDNN-packed product (`rl_distill/rollout/packed.py`): linear vs transposed vs packed "
                "(F.linear over the best of the other two)."
                if any("packed" in c for c in head["ms"].values())
                else "."
            ),
            "",
            "| dtype | " + " | ".join(f"{n} row{'s' if n > 1 else ''}" for n in counts) + " |",
            "|---|" + "---|" * len(counts),
        ]
        for dtype in ("float32", "bfloat16"):
            cells = []
            for n in counts:
                cells.append(_product_cell(head["ms"][f"{dtype}_{n}"], ".1f"))
            lines.append(f"| {dtype} | " + " | ".join(cells) + " |")
    layers = dec.get("layers")
    if layers:
        counts = layers["rows"]
        lines += [
            "",
            f"The decoder layers' linear maps alone (float32, ms per product; one timed call is a product with "
            f"that projection in each of the {layers['layers']} layers in turn, so the weights stream from memory "
            f"as in a decode step; median of {layers['repeats']}): `F.linear` against `(W @ h.T).T`"
            + (
                " and the packed product."
                if any("packed" in c.get("1", {}) for c in layers["ms"].values())
                else "."
            ),
            "",
            "| projection (out x in) | "
            + " | ".join(f"{n} row{'s' if n > 1 else ''}" for n in counts)
            + " |",
            "|---|" + "---|" * len(counts),
        ]
        for name, cells in layers["ms"].items():
            row = [_product_cell(cells[str(n)], ".3f") for n in counts]
            lines.append(
                f"| `{name}` ({cells['shape'][0]} x {cells['shape'][1]}) | " + " | ".join(row) + " |"
            )
    lines += _head_input_table(dec.get("head_input"))
    return "\n".join(lines)


def _product_cell(c: dict[str, float], fmt: str) -> str:
    """``linear vs transposed (ratio)``, or with a packed column ``linear vs transposed vs packed (ratio to the best)``."""
    if "packed" not in c:
        return f"{c['linear']:{fmt}} vs {c['transposed']:{fmt}} ({c['linear'] / c['transposed']:.2f}x)"
    best = min(c["transposed"], c["packed"])
    return (
        f"{c['linear']:{fmt}} vs {c['transposed']:{fmt}} vs {c['packed']:{fmt}} ({c['linear'] / best:.2f}x)"
    )


#: What each slice of :func:`benchmarks.perf_round2.measure_head_input` is, for the table.
HEAD_INPUT_SLICES = {
    "score": "prompt + completion forward (the student's gradient forward; the teacher's, after its prefix cache, is narrower), `[:, -T:]`",
    "prefill": "prefill, `[:, -1:]`",
    "prefill_1row": "prefill of one prompt, `[:, -1:]`",
}


def _head_input_table(head_input: dict[str, Any] | None) -> list[str]:
    """The head on the strided ``logits_to_keep`` slice against a dense copy (``decode.head_input``)."""
    if not head_input:
        return []
    lines = [
        "",
        f"The output head ({head_input['shape'][0]} x {head_input['shape'][1]}) on the hidden states Hugging Face "
        "hands it (`h[:, -k:, :]` for `logits_to_keep=k`, a strided view) against a dense copy of them, copy "
        f"included (what `dense_head_input` does; ms per product, median of {head_input['repeats']}):",
        "",
        "| slice (hidden states, kept positions) | float32: strided vs dense | bfloat16: strided vs dense |",
        "|---|---|---|",
    ]
    for name, facts in head_input["slices"].items():
        cells = []
        for dtype in ("float32", "bfloat16"):
            c = head_input["ms"][f"{name}_{dtype}"]
            cells.append(f"{c['strided']:.1f} vs {c['dense']:.1f} ({c['strided'] / c['dense']:.1f}x)")
        shape = " x ".join(str(n) for n in facts["hidden"])
        lines.append(
            f"| {HEAD_INPUT_SLICES.get(name, name)} ({shape}, {facts['kept']}) | " + " | ".join(cells) + " |"
        )
    return lines


def memory_block(results: Path = RESULTS) -> str:
    """JSD(0.5) fwd+bwd peak extra memory on the current code."""
    data = load(results)
    mem = data.get("memory")
    if mem is None:
        return NOT_MEASURED.format(section="memory")
    labels = {
        "chunked": "`chunked`: `generalized_jsd` as shipped (fused gradient, 2**19-element chunks)",
        "recompute": "`recompute`: the same, fused gradient off (the recomputing backward before #18)",
        "naive_logaddexp": "`naive_logaddexp` (log_softmax, logaddexp, full autograd)",
    }
    sh = mem["shape"]
    lines = [
        f"B = {sh['B']}, T = {sh['T']}, V = {sh['V']}: one (B, T, V) fp32 tensor = {mem['tensor_mib']:.0f} MiB (the "
        "student-logit gradient alone is 1.00x).",
        "",
        "| variant | allocator | RSS (default glibc) | time fwd+bwd (RSS run) |",
        "|---|---|---|---|",
    ]
    for v, label in labels.items():
        s = mem["summary"].get(v)
        if s is None:
            continue
        lines.append(
            f"| {label} | {_x(s['profiler']['peak_extra_over_tensor'])} ({s['profiler']['peak_extra_mib']:.0f} MiB) | "
            f"{_x(s['rss']['peak_extra_over_tensor'])} ({s['rss']['peak_extra_mib']:.0f} MiB) | "
            f"{s['rss']['median_seconds']:.2f} s |"
        )
    return "\n".join(lines)


def env_block(results: Path = RESULTS) -> str:
    """``env_overhead`` at B = 8 on the current code."""
    data = load(results)
    env = data.get("env")
    if env is None:
        return NOT_MEASURED.format(section="env")
    f, e, s = env["floor"], env["env"], env["setup"]
    return "\n".join(
        [
            "| path | median s per round | real tokens | tokens/s | split |",
            "|---|---|---|---|---|",
            f"| floor: `engine.rollout` | {f['seconds']:.3f} | {f['tokens']:.0f} | {f['tokens_per_s']:.1f} | student "
            f"{f['student']:.3f} s + teacher {f['teacher']:.3f} s |",
            f"| env: student + `env.step` | {e['seconds']:.3f} | {e['tokens']:.0f} | {e['tokens_per_s']:.1f} | student "
            f"{e['student']:.3f} s + env.step {e['env_step']:.3f} s |",
            "",
            f"Env / floor, time per token: **{_x(env['time_ratio_env_over_floor'])}** (B = {s['batch_size']}, "
            f"{s['max_new_tokens']} new tokens, {s['student_layers']}-layer student, median of {s['repeats']} rounds "
            f"after {s['warmup']} warm-up; 1-minute load average before {env['machine']['load_average_before_after'][0][0]:.2f}, "
            f"after {env['machine']['load_average_before_after'][1][0]:.2f}).",
            *_env_bf16_lines(data.get("env_bf16"), env),
            *_env_variant_lines(data, env),
        ]
    )


#: The environment teacher's step variants measured apart (``env_overhead --teacher-step``).
ENV_VARIANTS = (
    ("env_products", "with only the products native (PyTorch operations around them, one call per product)"),
    ("env_onednn", "without the native kernel (the fused step with oneDNN's packed products)"),
    ("env_forward", "without the fused step (the model's own forward, per-module packed weights)"),
)


def _env_variant_lines(data: dict[str, Any], env: dict[str, Any]) -> list[str]:
    """Sections ``env_products`` / ``env_onednn`` / ``env_forward``: the benchmark with a lever of the step off."""
    cells = []
    for name, label in ENV_VARIANTS:
        v = data.get(name)
        if v is None:
            continue
        cells.append(
            f"{label} (section `{name}`): env.step {v['env']['env_step']:.3f} s per round against "
            f"{env['env']['env_step']:.3f} s, env / floor **{_x(v['time_ratio_env_over_floor'])}**"
        )
    if not cells:
        return []
    return [
        "",
        "The same run with one lever of the environment teacher's step switched off: "
        + "; ".join(cells)
        + ".",
    ]


def _env_bf16_lines(bf16: dict[str, Any] | None, fp32: dict[str, Any]) -> list[str]:
    """The ``env_bf16`` section (teacher stored in bfloat16 on both paths), next to the float32 run."""
    if bf16 is None:
        return []
    f, e = bf16["floor"], bf16["env"]
    return [
        "",
        f"With the teacher stored in bfloat16 on both paths (`model.teacher_dtype: bfloat16`, section `env_bf16`): "
        f"floor {f['seconds']:.3f} s per round (teacher {f['teacher']:.3f} s), env {e['seconds']:.3f} s (env.step "
        f"{e['env_step']:.3f} s); env / floor **{_x(bf16['time_ratio_env_over_floor'])}**; the environment's "
        f"throughput {e['tokens_per_s']:.1f} tokens/s against {fp32['env']['tokens_per_s']:.1f} with the float32 teacher.",
    ]


def meta_block(results: Path = RESULTS) -> str:
    """The commands, machine and load of the recorded run."""
    data = load(results)
    inv = data.get("invocations")
    if not inv:
        return NOT_MEASURED.format(section="invocations")
    lines = []
    for m in inv:
        mach = m["machine"]
        lines.append(
            f"- `{m['command']}` — started {m['started']}, {m.get('wall_seconds', float('nan')) / 60:.1f} min; "
            f"{mach['cpu']}, {mach['cpu_count']} cores, {mach['memory_gib']} GiB, torch {mach['torch']}, "
            f"transformers {mach['transformers']}, trl {mach['trl']}, {mach['torch_threads']} threads; load average "
            f"before {mach['load_average']}, after {m.get('load_average_after')}; other busy processes before: "
            f"{len(m.get('cpu_hogs_before', []))}"
        )
    return "\n".join(lines)


BLOCKS = {
    "r2_meta": meta_block,
    "r2_summary": summary_block,
    "r2_side_by_side": side_by_side_block,
    "r2_ratios": ratios_block,
    "r2_headline": headline_block,
    "r2_phases": phases_block,
    "r2_decode": decode_block,
    "r2_quality": quality_block,
    "r2_memory": memory_block,
    "r2_env": env_block,
}


def levers_block(results: Path = RESULTS) -> str:
    """Each lever's measured effect alone (issue #18's list)."""
    data = load(results)
    if "steps" not in data:
        return NOT_MEASURED.format(section="steps")
    out = []
    fused, rec = config_summary(data, "ours"), config_summary(data, "ours_recompute")
    p1 = pair_ratios(data, "ours", "ours_recompute")
    if fused and rec and p1:
        fp, rp = fused["phases"], rec["phases"]
        out.append(
            "1. **Fused divergence gradient** (in the library since this round, every divergence, teacher without "
            f"gradient): step {fused['median_step_seconds']:.3f} s with it vs {rec['median_step_seconds']:.3f} s "
            f"without (`ours_recompute`); throughput ratio per repeat {_spread(p1)}; divergence + backward/step "
            f"phases {fp['divergence'] + fp['backward_and_step']:.3f} s vs {rp['divergence'] + rp['backward_and_step']:.3f} "
            f"s; peak RSS {fused['peak_rss_mib']:.0f} vs {rec['peak_rss_mib']:.0f} MiB. Kept (shipped)."
        )
    bf, p2 = config_summary(data, "ours_bf16"), pair_ratios(data, "ours_bf16", "ours")
    if fused and bf and p2:
        fp, bp = fused["phases"], bf["phases"]
        cells = ", ".join(f"{k.replace('_', ' ')} {fp[k]:.3f} -> {bp[k]:.3f} s" for k in PHASE_LABELS)
        out.append(
            f"2. **bf16** (`train.precision: bf16` + bf16 teacher): step {fused['median_step_seconds']:.3f} -> "
            f"{bf['median_step_seconds']:.3f} s; throughput ratio bf16/fp32 per repeat {_spread(p2)}; peak RSS "
            f"{fused['peak_rss_mib']:.0f} -> {bf['peak_rss_mib']:.0f} MiB; by phase: {cells}. Quality: section 4. "
            "The shipped default stays `fp32` (opt-in `bf16`)."
        )
    dec = data.get("decode")
    if dec:
        m = dec["fp32"]["median_ms_per_token"]
        ratio = dec["fp32"]["ratio_to_floor"]
        static = f"static cache {m['static']:.1f} ms/token" if "static" in m else "static cache: failed"
        if "generate_linear_head" in m:
            lin, p3 = config_summary(data, "ours_linear_head"), pair_ratios(data, "ours", "ours_linear_head")
            step = (
                f"; end to end, step {fused['median_step_seconds']:.3f} s with it vs {lin['median_step_seconds']:.3f} s "
                f"without (`ours_linear_head`), throughput ratio per repeat {_spread(p3)}"
                if fused and lin and p3
                else ""
            )
            out.append(
                "3. **Decoding: the few-row output head** (`rl_distill/rollout/skinny_head.py`, in the engine's "
                "decode loop and the environment's incremental scorer, float32 on CPU): the engine's per-token "
                f"decode {m['generate']:.1f} ms/token ({_x(ratio['generate'])} the bandwidth floor of "
                f"{dec['floor_ms_per_token_fp32']:.1f} ms) vs {m['generate_linear_head']:.1f} ms/token "
                f"({_x(ratio['generate_linear_head'])}) with the model's `F.linear` head{step}. Kept (shipped, "
                f"`RolloutEngine(skinny_head=True)`; config `train.few_row_products`).{_layers_lever(data, fused)} Not kept: a {static} (no faster, "
                "not bit-identical). "
                "`torch.compile` of the one-token step was not tried (compiling on 2 cores costs minutes per "
                "shape, more than a run's whole decode)."
            )
        else:
            out.append(
                f"3. **Decoding**: the engine's per-token decode is {_x(ratio['generate'])} the "
                f"bandwidth floor in fp32 ({m['generate']:.1f} vs {dec['floor_ms_per_token_fp32']:.1f} ms/token); the bare "
                f"one-token forwards with the dynamic cache {m['dynamic']:.1f} ms/token, {static} (its logits are not "
                "bit-identical to the dynamic cache's). `torch.compile` of the one-token step was not tried."
            )
    nopc, p4 = config_summary(data, "ours_no_prefix_cache"), pair_ratios(data, "ours", "ours_no_prefix_cache")
    if fused and nopc and p4:
        out.append(
            "4. **Teacher prompt reuse** (`rl_distill/rollout/prefix_cache.py`: the frozen teacher's KV cache of the "
            "prompt prefix every row shares, here SmolLM2's system turn, computed once and reused by every scoring "
            f"forward): step {fused['median_step_seconds']:.3f} s with it vs {nopc['median_step_seconds']:.3f} s "
            f"without (`ours_no_prefix_cache`); throughput ratio per repeat {_spread(p4)}; teacher phase "
            f"{fused['phases']['teacher']:.3f} s vs {nopc['phases']['teacher']:.3f} s. Kept (shipped, "
            "`RolloutEngine(teacher_prefix_cache=True)`; config `train.teacher_prefix_cache`)."
        )
    else:
        out.append(
            "4. **Teacher prompt reuse** (KV cache of a shared system prompt): not measured in this run."
        )
    dense, p5 = (
        config_summary(data, "ours_dense_embedding_grad"),
        pair_ratios(data, "ours", "ours_dense_embedding_grad"),
    )
    if fused and dense and p5:
        out.append(
            "5. **The student's embedding gradient, sparse** (`sparse_grad_embeddings` in `rl_distill/rollout/engine.py`: "
            "with tied input/output embeddings the lookup's gradient is added into the output head's dense gradient "
            "in place instead of as a second dense (V, d) tensor): peak RSS "
            f"{fused['peak_rss_mib']:.0f} MiB with it vs {dense['peak_rss_mib']:.0f} MiB without "
            f"(`ours_dense_embedding_grad`, peak RSS ratio {p5['rss_median']:.2f}x); step {fused['median_step_seconds']:.3f} "
            f"vs {dense['median_step_seconds']:.3f} s, throughput ratio per repeat {_spread(p5)}. Kept (shipped, "
            "`RolloutEngine(sparse_embedding_grad=True)`; config `train.sparse_embedding_grad`)."
        )
    head_lines = []
    for dense_name, strided_name, label in (
        ("ours", "ours_strided_head", "fp32"),
        ("ours_bf16", "ours_bf16_strided_head", "bf16"),
    ):
        on, off, pair = (
            config_summary(data, dense_name),
            config_summary(data, strided_name),
            pair_ratios(data, dense_name, strided_name),
        )
        if on and off and pair:
            head_lines.append(
                f"{label}: step {on['median_step_seconds']:.3f} s with it vs {off['median_step_seconds']:.3f} s without "
                f"(`{strided_name}`), throughput ratio per repeat {_spread(pair)}; teacher phase "
                f"{on['phases']['teacher']:.3f} vs {off['phases']['teacher']:.3f} s"
            )
    if head_lines:
        out.append(
            "6. **The head's input, dense** (`dense_head_input` in `rl_distill/rollout/skinny_head.py`: the teacher's "
            "scoring, the student's gradient forward and the prefills hand the output head a dense copy of the "
            "strided `logits_to_keep` slice; the head-input table in section 3): "
            + "; ".join(head_lines)
            + ". Kept (shipped, `RolloutEngine(dense_head_input=True)`; config `train.dense_head_input`)."
        )
    out += _packed_lever(results)
    out += _fused_step_lever(data)
    out += _fused_student_lever(results)
    return "\n".join(out)


def _fused_student_lever(results: Path) -> list[str]:
    """Item 9: the trained student's ``generate`` through the fused step (full run and headline run pooled)."""
    pooled = pooled_ratios(results, "ours", "ours_unfused")
    if pooled is None:
        return []
    phases = []
    for label, data in (("full run", load(results)), ("headline run", load_headline(results))):
        on, off = config_summary(data, "ours"), config_summary(data, "ours_unfused")
        if on and off:
            phases.append(
                f"{label}: step {on['median_step_seconds']:.3f} vs {off['median_step_seconds']:.3f} s, generate "
                f"phase {on['phases']['generate']:.3f} vs {off['phases']['generate']:.3f} s, peak RSS "
                f"{on['peak_rss_mib']:.0f} vs {off['peak_rss_mib']:.0f} MiB"
            )
    return [
        "9. **The trained student's decode through the fused step** (item 8's step and kernel, for the student: "
        "its weights are packed anew in each `generate` of at least 16 new tokens and the copies dropped after "
        "the call; not under bf16 autocast, where the model's own "
        "forward runs in bf16): with it (`ours`) vs without (`ours_unfused`, the model's forward with the "
        f"few-row products), throughput ratio per repeat {_pooled_spread(pooled)}; "
        + "; ".join(phases)
        + ". Kept (shipped, `RolloutEngine(fused_step=True)`, config `train.fused_decode_step`). It supersedes "
        "the few-row products of item 3 in the student's decode steps (they still serve its prefill and models "
        "the fused step does not support), so item 3's end-to-end rows now compare paths that decode alike."
    ]


def _fused_step_lever(data: dict[str, Any]) -> list[str]:
    """Item 8: the fused decode step, the native kernel and the native layers (sections env, env_products,
    env_onednn, env_forward)."""
    env, onednn, forward = data.get("env"), data.get("env_onednn"), data.get("env_forward")
    products = data.get("env_products")
    if not (env and onednn and forward):
        return []
    tokens = env["setup"]["max_new_tokens"]

    def per_step(d: dict[str, Any]) -> str:
        return f"{d['env']['env_step'] / tokens * 1e3:.0f} ms"

    used = env["setup"].get("native_kernel_used")
    layers = env["setup"].get("native_layers_used")
    shipped = (
        "the fused step with every decoder layer in one native call"
        if layers
        else "the fused step with the native kernel"
    )
    products_cell = (
        ""
        if products is None
        else f", the fused step with only its products native {per_step(products)} "
        f"({_x(products['time_ratio_env_over_floor'])})"
    )
    return [
        "8. **The environment teacher's fused decode step and the native kernels** "
        "(`rl_distill/rollout/fused_step.py`: the one-token step of a Llama-family model from its own "
        "weights, with q/k/v and gate/up fused into one packed product each, the keys and values appended to the "
        "model's own cache; `rl_distill/rollout/native.py` + `few_rows.c`: a float32 product over a panel-packed "
        "weight, 8 rows x 48 columns of accumulators, and, built on it, whole decoder layers in one call per step "
        "(norms, rotary embedding, cache write, attention, SiLU, residual adds; one parallel region), compiled "
        "on first use). Measured in section 6's benchmark, env.step per token "
        f"(B = {env['setup']['batch_size']}, SmolLM2 teacher): the model's forward {per_step(forward)} "
        f"(env / floor {_x(forward['time_ratio_env_over_floor'])}), the fused step with oneDNN's products "
        f"{per_step(onednn)} ({_x(onednn['time_ratio_env_over_floor'])})"
        + products_cell
        + f", {shipped} {per_step(env)} ({_x(env['time_ratio_env_over_floor'])})"
        + ("" if used else " (the native kernel was not available in that run)")
        + ". Kept (shipped): `RolloutEngine(fused_step=True)`, config `train.fused_decode_step`; the kernel is "
        "used wherever it builds and passes its check (`RL_DISTILL_NATIVE_KERNELS=0` switches it off); "
        "bfloat16 teachers take oneDNN's bfloat16 products and PyTorch operations. The environment's teacher is "
        "frozen and packed once; both paths of this benchmark sample the student through the same step (item 9)."
    ]


def _packed_lever(results: Path) -> list[str]:
    """Item 7: the oneDNN-packed weights; the trained student packed per call was measured and not kept."""
    data = load(results)
    trial_path = results / PACKED_STUDENT_FILE
    trial = json.loads(trial_path.read_text(encoding="utf-8")) if trial_path.is_file() else {}
    env = data.get("env")
    dec = trial.get("decode") or {}
    heads = dec.get("head", {}).get("ms", {})
    if not heads or "packed" not in next(iter(heads.values())):
        return []
    layers = dec.get("layers", {}).get("ms", {})

    def layer_sum(rows: str, key: str) -> float:
        return sum(cells[rows][key] for cells in layers.values()) * dec["layers"]["layers"]

    cells = []
    for dtype in ("float32", "bfloat16"):
        for n in (4, 8):
            c = heads.get(f"{dtype}_{n}")
            if c:
                cells.append(
                    f"{dtype} {n} rows {c['linear']:.1f} / {c['transposed']:.1f} / {c['packed']:.1f} ms"
                )
    layer_text = (
        "; the student's 6 decoder layers' products per token, float32 at 8 rows: "
        f"{layer_sum('8', 'linear'):.2f} / {layer_sum('8', 'transposed'):.2f} / {layer_sum('8', 'packed'):.2f} ms"
        if layers and all("packed" in c.get("8", {}) for c in layers.values())
        else ""
    )
    line = (
        "7. **Packed weights** (`rl_distill/rollout/packed.py`: oneDNN reorders a weight once into its blocked "
        "layout and the 1-16-row decode products read that copy). Measured alone in the decode section of the "
        f"run in `benchmarks/results/{PACKED_STUDENT_FILE}` (same driver; `F.linear` / transposed / packed): the "
        "output head "
        + ", ".join(cells)
        + layer_text
        + ". "
        + "Kept for frozen models, packed once (`RolloutEngine(packed_weights=True)`, config "
        "`train.packed_weights`): the environment's incremental teacher"
        + (f" (section 6: env / floor {_x(env['time_ratio_env_over_floor'])})" if env else "")
        + " and the teacher sampling SeqKD data."
    )
    parts = []
    for label, on_name, off_name in (
        ("fp32", "ours", "ours_unpacked"),
        ("bf16", "ours_bf16", "ours_bf16_unpacked"),
    ):
        on, off = config_summary(trial, on_name), config_summary(trial, off_name)
        pair = pair_ratios(trial, on_name, off_name)
        if on and off and pair:
            parts.append(
                f"{label}: step {on['median_step_seconds']:.3f} s packed vs {off['median_step_seconds']:.3f} s not "
                f"(throughput ratio per repeat {_spread(pair)}), generate phase {on['phases']['generate']:.3f} vs "
                f"{off['phases']['generate']:.3f} s, peak RSS {on['peak_rss_mib']:.0f} vs {off['peak_rss_mib']:.0f} MiB"
            )
    if parts:
        commit = trial.get("invocations", [{}])[-1].get("machine", {}).get("commit", "?")
        line += (
            " Not kept for the trained student: packed anew in every `generate` call (its weights change at every "
            f"update), measured in a full run at commit {commit} (`benchmarks/results/{PACKED_STUDENT_FILE}`): "
            + "; ".join(parts)
            + ". Repacking the 6-layer student (about 0.1 s) costs about as much as its products gain at B = 4: "
            "slower in fp32, within the noise in bf16, for more memory."
        )
    return [line]


BLOCKS["r2_levers"] = levers_block
