"""The numbers of ``docs/results/performance.md``, computed from the raw JSON in ``benchmarks/results/``.

The page's tables and its headline live between markers::

    <!-- generated: NAME (python -m benchmarks.report) -->
    ...
    <!-- end generated: NAME -->

and ``python -m benchmarks.report`` rewrites every such block from the JSON (nothing is measured;
``--check`` only reports blocks that differ). ``tests/test_results_pages.py`` checks that the page
and the README headline agree with :func:`headline` and :func:`blocks`.

Round 2 (issue #18, ``perf_round2.json``, and ``perf_round2_headline.json`` for the two headline pairs
repeated more often): the ``r2_*`` blocks of :mod:`benchmarks.report_round2`, also the ``r2_env`` block of ``docs/results/env_overhead.md``. Round 1 (the other blocks, kept as
history under the page's "History" headings): every measurement there was taken with the divergence
chunk default of the time (2**22 elements; 2**19 since) and before the fused divergence gradient;
the blocks say so.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import report_round2

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results" / "performance.md"
ENV_PAGE = ROOT / "docs" / "results" / "env_overhead.md"

#: The note on every block measured before the chunk default changed.
STALE = "measured with the old 2**22-element divergence chunk default (now 2**19); not re-measured on the current code; see issue #13"

#: The recorded runs that timed both ours and TRL GKDTrainer, in the order they ran, with the code
#: state each ran on (provenance from the commit history, not from the JSON) and whether that code
#: already had the inverse-CDF sampler and fused AdamW of commit 07b5d6f.
HISTORY: tuple[tuple[str, str, bool], ...] = (
    ("vs_trl.json", "before 07b5d6f (`torch.multinomial`)", False),
    ("vs_trl_fused_adamw.json", "07b5d6f's engine landed mid-run", False),
    ("onpolicy_overhead.json", "after 07b5d6f", True),
    ("vs_trl_final.json", "HEAD e99c689 (after 07b5d6f)", True),
)

OPTIMIZERS = {"adamw": "torch default AdamW (for-loop)", "adamw_fused": "fused AdamW"}

START = "<!-- generated: {name} (python -m benchmarks.report) -->"
END = "<!-- end generated: {name} -->"


def load(name: str, results: Path = RESULTS) -> dict[str, Any]:
    """A raw benchmark JSON of ``results`` by file name."""
    return json.loads((results / name).read_text(encoding="utf-8"))


def throughput_ratio(data: dict[str, Any], peer: str = "trl_gkd") -> float:
    """Our generated tokens/s over ``peer``'s (all tokens / all timed seconds, pooled over repeats)."""
    s = data["summary"]
    return s["ours"]["tokens_per_second"] / s[peer]["tokens_per_second"]


def rss_ratio(data: dict[str, Any], peer: str = "trl_gkd") -> float:
    """Our peak RSS during the steps over ``peer``'s (medians over repeats)."""
    s = data["summary"]
    return s["ours"]["peak_rss_steps_mib"] / s[peer]["peak_rss_steps_mib"]


def history(results: Path = RESULTS) -> list[dict[str, Any]]:
    """One row per run of :data:`HISTORY`: step times, throughput and RSS ratios against GKDTrainer."""
    rows = []
    for name, code, current in HISTORY:
        data = load(name, results)
        s = data["summary"]
        rows.append(
            {
                "file": name,
                "code": code,
                "after_07b5d6f": current,
                "optimizer": data["spec"]["optimizer"],
                "ours": s["ours"]["median_step_seconds"],
                "trl_gkd": s["trl_gkd"]["median_step_seconds"],
                "trl_distillation": s.get("trl_distillation", {}).get("median_step_seconds"),
                "ratio": throughput_ratio(data),
                "rss_ratio": rss_ratio(data),
            }
        )
    return rows


def headline(results: Path = RESULTS) -> dict[str, Any]:
    """The numbers the summary and the README quote.

    ``ratio_median`` / ``ratio_min`` / ``ratio_max``: our throughput over GKDTrainer's over the
    recorded runs of :data:`HISTORY`; ``final``: the last run's step times and ratios; ``memory``:
    the JSD(0.5) extra-memory multiples; ``onpolicy``: on-policy over supervised-KD step time.
    """
    rows = history(results)
    ratios = [r["ratio"] for r in rows]
    final = load("vs_trl_final.json", results)
    fs = final["summary"]
    mem = load("divergence_memory.json", results)["summary"]
    over = load("onpolicy_overhead.json", results)
    return {
        "runs": len(rows),
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios_after_07b5d6f": [r["ratio"] for r in rows if r["after_07b5d6f"]],
        "ratios_before_07b5d6f": [r["ratio"] for r in rows if not r["after_07b5d6f"]],
        "rss_ratio_min": min(r["rss_ratio"] for r in rows),
        "rss_ratio_max": max(r["rss_ratio"] for r in rows),
        "final": {
            "ours": fs["ours"]["median_step_seconds"],
            "trl_gkd": fs["trl_gkd"]["median_step_seconds"],
            "trl_distillation": fs["trl_distillation"]["median_step_seconds"],
            "ours_recommended": fs["ours_recommended"]["median_step_seconds"],
            "ratio": throughput_ratio(final),
            "rss_ratio": rss_ratio(final),
            "ours_rss": fs["ours"]["peak_rss_steps_mib"],
            "trl_gkd_rss": fs["trl_gkd"]["peak_rss_steps_mib"],
            "trl_distillation_rss": fs["trl_distillation"]["peak_rss_steps_mib"],
            "ours_recommended_rss": fs["ours_recommended"]["peak_rss_steps_mib"],
            "distillation_ratio": throughput_ratio(final, "trl_distillation"),
            "distillation_rss_ratio": rss_ratio(final, "trl_distillation"),
        },
        "memory": {
            "current_allocator": mem["chunked:10"]["profiler"]["peak_extra_over_tensor"],
            "current_rss": mem["chunked:10"]["rss"]["peak_extra_over_tensor"],
            "old_allocator": mem["chunked"]["profiler"]["peak_extra_over_tensor"],
            "old_rss": mem["chunked"]["rss"]["peak_extra_over_tensor"],
            "naive": mem["naive_logaddexp"]["profiler"]["peak_extra_over_tensor"],
        },
        "onpolicy": {
            "ratio": over["ratios"]["ours"]["onpolicy_over_supervised_step_time"],
            "onpolicy": over["ratios"]["ours"]["onpolicy_median_step_seconds"],
            "supervised": over["ratios"]["ours"]["supervised_median_step_seconds"],
            "trl_ratio": over["ratios"]["trl_gkd"]["onpolicy_over_supervised_step_time"],
            "paper": over["paper_reported_ratio"],
        },
    }


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _list(values: list[float]) -> str:
    return ", ".join(_x(v) for v in values)


def summary_block(results: Path = RESULTS) -> str:
    """The summary table and the paragraph on the run-to-run spread."""
    h = headline(results)
    f, m, o = h["final"], h["memory"], h["onpolicy"]
    after, before = h["ratios_after_07b5d6f"], h["ratios_before_07b5d6f"]
    met = "yes" if all(r >= 1.5 for r in after) else "no"
    return f"""| target | result | met? |
|---|---|---|
| on-policy GKD throughput >= 1.5x TRL `GKDTrainer`, at no more memory | median **{_x(h["ratio_median"])}** generated tokens/s over the {h["runs"]} recorded runs (min-max {h["ratio_min"]:.2f}-{_x(h["ratio_max"])}); peak RSS {h["rss_ratio_min"]:.2f}-{_x(h["rss_ratio_max"])} in every run; last run {f["ours"]:.3f} vs {f["trl_gkd"]:.3f} s/step | {met} on the code after 07b5d6f ({_list(after)}); no before it ({_list(before)}); {STALE} |
| second peer: TRL `DistillationTrainer` (last run) | {_x(f["distillation_ratio"])} its throughput ({f["ours"]:.3f} vs {f["trl_distillation"]:.3f} s/step), **{_x(f["distillation_rss_ratio"])} its peak RSS** ({f["ours_rss"]:.0f} vs {f["trl_distillation_rss"]:.0f} MiB) | faster; more memory (with the H2 prototypes: {_x(f["ours_recommended_rss"] / f["trl_distillation_rss"])}); {STALE} |
| JSD(0.5) forward+backward, B=8, T=256, V=49152: peak extra <= 1.5x one (B,T,V) fp32 tensor | current default chunk (2**19 elements = 10 rows at this V, the `chunked:10` variant): **{_x(m["current_allocator"])}** (allocator) / **{_x(m["current_rss"])}** (RSS); the old 2**22 default: {_x(m["old_allocator"])} / {_x(m["old_rss"])} | **yes** at the current chunk (measured as the 10-row variant before the default changed; not re-measured on the current code; see issue #13); no at the old one |
| on-policy over supervised-KD step time (paper: {o["paper"][0]}-{o["paper"][1]}x) | **{_x(o["ratio"])}** ({o["onpolicy"]:.3f} vs {o["supervised"]:.3f} s) | close to the paper's range; TRL: {_x(o["trl_ratio"])}; {STALE} |

Over the {h["runs"]} recorded runs that timed both ours and `GKDTrainer` (table in H1), our throughput
over GKDTrainer's was {_list(h["ratios"])}: median **{_x(h["ratio_median"])}**, min-max
{h["ratio_min"]:.2f}-{_x(h["ratio_max"])}. The runs differ in code and optimizer (the lower two ran before
commit 07b5d6f, inverse-CDF sampling and fused AdamW), so the spread mixes those changes with
run-to-run noise; the ratio within one run is what to compare."""


def vs_trl_block(results: Path = RESULTS) -> str:
    """The last vs-TRL run: one row per method, then the ratios and our phase medians."""
    data = load("vs_trl_final.json", results)
    patches = data["runs"]["ours_recommended"][0]["patches"]
    removed = " (2**20 elements; removed since, see H2)" if "small_chunks" in patches else ""
    s, labels = (
        data["summary"],
        {
            "ours": "**ours** (GKDAgent, as shipped then)",
            "trl_gkd": "TRL GKDTrainer",
            "trl_distillation": "TRL DistillationTrainer",
            "ours_recommended": "ours + prototypes " + " + ".join(f"`{p}`" for p in patches) + removed,
        },
    )
    steps = sum(len(r["step_seconds"]) for r in data["runs"]["ours"])
    lines = [
        "Measured with the old 2**22-element divergence chunk default; not re-measured on the current code (2**19); see issue #13.",
        "",
        f"| method | median s/step ({steps} steps) | per-run medians | generated tok/s | peak RSS during steps | RSS after setup |",
        "|---|---|---|---|---|---|",
    ]
    for method, label in labels.items():
        m = s[method]
        lines.append(
            f"| {label} | {m['median_step_seconds']:.3f} | "
            + ", ".join(f"{v:.3f}" for v in m["per_run_median_step_seconds"])
            + f" | {m['tokens_per_second']:.1f} | {m['peak_rss_steps_mib']:.0f} MiB | {m['rss_after_setup_mib']:.0f} MiB |"
        )
    rec = s["ours_recommended"]
    phases = s["ours"]["phase_median_seconds"]
    lines += [
        "",
        f"Ratios: ours/GKDTrainer throughput **{_x(throughput_ratio(data))}**, peak RSS {_x(rss_ratio(data))}; "
        f"ours/DistillationTrainer throughput {_x(throughput_ratio(data, 'trl_distillation'))}, peak RSS "
        f"{_x(rss_ratio(data, 'trl_distillation'))}; with the prototypes "
        f"{_x(rec['tokens_per_second'] / s['trl_gkd']['tokens_per_second'])} and "
        f"{_x(rec['tokens_per_second'] / s['trl_distillation']['tokens_per_second'])} throughput, peak RSS "
        f"{_x(rec['peak_rss_steps_mib'] / s['trl_gkd']['peak_rss_steps_mib'])} and "
        f"{_x(rec['peak_rss_steps_mib'] / s['trl_distillation']['peak_rss_steps_mib'])}. Our phase medians: "
        f"generation {phases['generate']:.3f} s, teacher {phases['teacher']:.3f} s, student update "
        f"(forward, divergence, backward, clip, AdamW) {phases['student_update']:.3f} s.",
    ]
    return "\n".join(lines)


def history_block(results: Path = RESULTS) -> str:
    """Every recorded run with both ours and GKDTrainer, and the median ratio over them."""
    rows = history(results)
    lines = [
        "| run | code | optimizer (all methods) | ours | GKDTrainer | Distillation | ours/GKD throughput | ours/GKD peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dist = "—" if r["trl_distillation"] is None else f"{r['trl_distillation']:.3f} s"
        verdict = "" if r["ratio"] >= 1.5 else " (missed)"
        lines.append(
            f"| `{r['file']}` | {r['code']} | {OPTIMIZERS.get(r['optimizer'], r['optimizer'])} | {r['ours']:.3f} s | "
            f"{r['trl_gkd']:.3f} s | {dist} | {_x(r['ratio'])}{verdict} | {_x(r['rss_ratio'])} |"
        )
    ratios = [r["ratio"] for r in rows]
    lines += [
        "",
        f"Median over these {len(rows)} runs: **{_x(statistics.median(ratios))}** (min-max "
        f"{min(ratios):.2f}-{_x(max(ratios))}). All of them: {STALE}.",
    ]
    return "\n".join(lines)


PHASES = (
    ("1 generate (student, KV cache)", "generate: student, KV cache, {tokens} tokens", True),
    (
        "1a generate: model forward",
        "&nbsp;&nbsp; of which model forward (prefill + {decode} decode calls)",
        False,
    ),
    ("1b generate: sampling + loop", "&nbsp;&nbsp; of which sampling and loop", False),
    (
        "2 teacher score (inference mode)",
        "teacher score (inference mode), logits at the {tokens} completion positions",
        True,
    ),
    ("2a teacher: model forward", "&nbsp;&nbsp; of which teacher forward", False),
    ("3 student forward (grad)", "student forward with gradient", True),
    ("4 divergence forward", "JSD forward (chunked; old 2**22 chunk, 85 rows)", True),
    ("5 divergence backward", "JSD backward (recomputes every chunk; old 2**22 chunk)", True),
    ("6 student backward", "student backward", True),
    ("7 clip_grad_norm_", "`clip_grad_norm_`", True),
    ("8 optimizer.step", "AdamW step (fused)", True),
)


def profile_block(results: Path = RESULTS) -> str:
    """One on-policy step, phase by phase (``profile_step.json``)."""
    data = load("profile_step.json", results)
    tokens = data["spec"]["max_new_tokens"]
    lines = [
        "Measured with the old 2**22-element divergence chunk default (85 rows at V = 49152); the JSD rows are not re-measured on the current code (2**19: 10 rows); see issue #13.",
        "",
        "| phase | seconds | share | peak extra RSS |",
        "|---|---|---|---|",
    ]
    for key, label, top in PHASES:
        p = data["phases"][key]
        text = label.format(tokens=tokens, decode=tokens - 1)
        if top:
            rss = max(0.0, p["peak_extra_rss_mib"])
            lines.append(f"| {text} | {p['median_seconds']:.3f} | {p['share_of_step']:.1%} | {rss:.0f} MiB |")
        else:
            lines.append(f"| {text} | {p['median_seconds']:.3f} | | |")
    lines.append(f"| **sum** | **{data['sum_of_phase_medians_seconds']:.3f}** | | |")
    return "\n".join(lines)


def profile_notes_block(results: Path = RESULTS) -> str:
    """The update time and top operators of ``profile_step.json``."""
    data = load("profile_step.json", results)
    ops = data["top_operators"]
    return (
        f"`agent.update()` on the next {data['update_seconds']['n']} batches: median "
        f"{data['update_seconds']['median']:.3f} s (measured after the phases; it also builds the stats). Top "
        f"operators (torch.profiler, one `update()`): `{ops[0]['op']}` {ops[0]['share']:.0%} of self CPU time; "
        f"everything else is below {max(o['share'] for o in ops[1:]):.1%} each."
    )


def experiments_block(results: Path = RESULTS) -> str:
    """The cheap-win experiments of ``profile_step.json``."""
    data = load("profile_step.json", results)
    e, tokens = data["experiments"], data["spec"]["max_new_tokens"]
    smp, opt, div, tlp = (
        e["sampling"],
        e["optimizer"],
        e["divergence_step_shape"],
        e["teacher_token_logprobs"],
    )
    # The stored JSON predates the engine-based sampling experiment: there "current" is torch.multinomial.
    old = "inverse CDF instead of multinomial" in smp
    cur = smp["current"] if old else smp["torch.multinomial (before 07b5d6f)"]
    icdf = smp["inverse CDF instead of multinomial"] if old else smp["current"]
    lean = smp["lean (one log-softmax)"]
    loop, foreach, fused = (
        opt["adamw for-loop (default on CPU)"],
        opt["adamw foreach=True"],
        opt["adamw fused=True"],
    )
    clip0, clip1 = opt["clip_grad_norm_ foreach=False"], opt["clip_grad_norm_ foreach=True"]
    base = div["chunked, default (85 rows)"]["median_seconds"]
    rows = {n: div[f"chunked, {n} rows"]["median_seconds"] for n in (16, 32, 64)}
    one = div["chunked, one chunk (chunk_size=0)"]["median_seconds"]
    f85, f32 = div["fused gradient in forward, 85 rows"], div["fused gradient in forward, 32 rows"]
    temp_mib = tlp["rows"] * div["vocab"] * 4 / 2**20
    grad_diff = f"{f85['max_abs_grad_diff_vs_default']:.0e}".replace("e-0", "e-")
    ms = lambda a, b: f"{(a - b) * 1000:.0f}"  # noqa: E731
    return "\n".join(
        [
            "| experiment | current (then) | alternative | gain |",
            "|---|---|---|---|",
            f"| sampling arithmetic, {tokens} tokens of ({data['spec']['batch_size']}, {div['vocab']}) | `torch.multinomial`: "
            f"{cur['per_token_ms']:.2f} ms/token ({cur['median_seconds'] * 1000:.0f} ms/step; CPU `multinomial` draws B x V "
            f"exponentials) | inverse CDF (float64 cumsum + B uniforms + `searchsorted`): {icdf['per_token_ms']:.2f} ms/token "
            f"| **-{ms(cur['median_seconds'], icdf['median_seconds'])} ms/step** (applied in 07b5d6f) |",
            f"| same, one log-softmax reused for sampling | {smp['current']['per_token_ms']:.2f} ms/token | "
            f"{lean['per_token_ms']:.2f} ms/token | -{ms(smp['current']['median_seconds'], lean['median_seconds'])} "
            "ms/step (negligible) |",
            f"| AdamW on the student ({opt['parameters'] / 1e6:.1f}M parameters) | for-loop (torch default on CPU): "
            f"{loop['median_seconds']:.3f} s, +{loop['peak_extra_rss_mib']:.0f} MiB temporaries | `foreach=True`: "
            f"{foreach['median_seconds']:.3f} s, +{foreach['peak_extra_rss_mib']:.0f} MiB; `fused=True`: "
            f"{fused['median_seconds']:.3f} s, +{fused['peak_extra_rss_mib']:.0f} MiB | "
            f"**-{ms(loop['median_seconds'], fused['median_seconds'])} ms/step** with fused (applied in 07b5d6f) |",
            f"| `clip_grad_norm_` | {clip0['median_seconds'] * 1000:.1f} ms | `foreach=True`: "
            f"{clip1['median_seconds'] * 1000:.1f} ms | none on CPU |",
            f"| JSD fwd+bwd at the step shape ({div['rows']} x {div['vocab']}) | old default chunk (2**22: 85 rows): "
            f"{base:.3f} s | 16 rows: {rows[16]:.3f} s; 32: {rows[32]:.3f}; 64: {rows[64]:.3f}; one chunk: {one:.3f} "
            f"(the current default's 10 rows: not measured; see issue #13) | -{ms(base, rows[16])} ms at 16 rows |",
            f"| same, analytic gradient written in the forward chunk loop (prototype `FusedGradJSD`, in the library since #18) | {base:.3f} s (old "
            f"85-row chunk) | {f85['median_seconds']:.3f} s (85 rows), {f32['median_seconds']:.3f} s (32 rows); gradient "
            f"equal to {grad_diff} | **-{ms(base, f85['median_seconds'])} ms/step** |",
            f"| teacher token log-probs ({tlp['rows']} x {div['vocab']}) | `log_softmax` + gather: "
            f"{tlp['log_softmax + gather (current)']['median_seconds'] * 1000:.1f} ms | gather - `logsumexp`: "
            f"{tlp['gather - logsumexp']['median_seconds'] * 1000:.1f} ms | none (saves one ({tlp['rows']}, "
            f"{div['vocab']}) fp32 temporary, {temp_mib:.0f} MiB) |",
        ]
    )


def divergence_block(results: Path = RESULTS) -> str:
    """Peak extra memory of JSD(0.5) forward + backward per variant (``divergence_memory.json``)."""
    data = load("divergence_memory.json", results)
    v = data["shape"]["V"]
    labels = {
        "chunked": f"`chunked`: `generalized_jsd` with the **old** default chunk (2**22 elements = {2**22 // v} rows), as shipped when measured",
        "chunked:21": "`chunked:21` (`chunk_size=21` = 2**20 elements)",
        "chunked:10": f"**`chunked:10`** (2**19 elements = {2**19 // v} rows: the **current** default's chunk at this V)",
        "fused_grad": "`fused_grad` (prototype, 85 rows)",
        "fused_grad:21": "`fused_grad:21` (prototype, 21 rows)",
        "naive_logaddexp": "`naive_logaddexp` (log_softmax, logaddexp, full autograd)",
        "naive_stack": "`naive_stack` (TRL GKDTrainer's formula: `torch.stack` + `logsumexp`, `F.kl_div`)",
    }
    lines = [
        "| variant | allocator | RSS (mmap threshold 64 KiB) | RSS (default glibc) | time fwd+bwd (default glibc run) |",
        "|---|---|---|---|---|",
    ]
    for variant, label in labels.items():
        s = data["summary"][variant]
        lines.append(
            f"| {label} | {_x(s['profiler']['peak_extra_over_tensor'])} ({s['profiler']['peak_extra_mib']:.0f} MiB) | "
            f"{_x(s['rss_mmap']['peak_extra_over_tensor'])} | {_x(s['rss']['peak_extra_over_tensor'])} "
            f"({s['rss']['peak_extra_mib']:.0f} MiB) | {s['rss']['median_seconds']:.2f} s |"
        )
    return "\n".join(lines)


def onpolicy_block(results: Path = RESULTS) -> str:
    """On-policy over supervised-KD step time (``onpolicy_overhead.json``)."""
    data = load("onpolicy_overhead.json", results)
    s, r = data["summary"], data["ratios"]
    on, sup = s["ours"]["phase_median_seconds"], s["ours_lambda0"].get("phase_median_seconds", {})
    sup_phases = ", ".join(
        f"{k.replace('student_update', 'update')} {v:.3f}" for k, v in sup.items() if k != "generate"
    )
    on_phases = ", ".join(f"{k.replace('student_update', 'update')} {v:.3f}" for k, v in on.items())
    return "\n".join(
        [
            f"{STALE[0].upper()}{STALE[1:]}; torch default AdamW for every method.",
            "",
            "| method | on-policy s/step | supervised s/step | ratio |",
            "|---|---|---|---|",
            f"| ours | {s['ours']['median_step_seconds']:.3f} ({on_phases}) | "
            f"{s['ours_lambda0']['median_step_seconds']:.3f} ({sup_phases}) | "
            f"**{_x(r['ours']['onpolicy_over_supervised_step_time'])}** |",
            f"| TRL GKDTrainer (`lmbda` 1 vs 0; at 0 it trains JSD(0.5) on the dataset replies, "
            f"{r['trl_gkd']['supervised_tokens_per_step']:.0f} tokens/step incl. its end-of-turn tokens) | "
            f"{s['trl_gkd']['median_step_seconds']:.3f} | {s['trl_gkd_lambda0']['median_step_seconds']:.3f} | "
            f"{_x(r['trl_gkd']['onpolicy_over_supervised_step_time'])} |",
        ]
    )


BLOCKS = {
    **report_round2.BLOCKS,
    "summary": summary_block,
    "vs_trl": vs_trl_block,
    "history": history_block,
    "profile": profile_block,
    "profile_notes": profile_notes_block,
    "experiments": experiments_block,
    "divergence_memory": divergence_block,
    "onpolicy": onpolicy_block,
}


#: page -> the blocks it carries (None: every block of :data:`BLOCKS`)
PAGES: dict[Path, tuple[str, ...] | None] = {PAGE: None, ENV_PAGE: ("r2_env",)}


def blocks(results: Path = RESULTS, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """The generated blocks ``names`` (default: every block of the performance page), by name."""
    return {name: BLOCKS[name](results) for name in (names or tuple(BLOCKS))}


def block_pattern(name: str) -> re.Pattern[str]:
    """The marked block ``name`` in the page (group 1: its content)."""
    return re.compile(
        re.escape(START.format(name=name)) + r"\n(.*?)\n" + re.escape(END.format(name=name)), re.S
    )


def render(text: str, results: Path = RESULTS, names: tuple[str, ...] | None = None) -> str:
    """``text`` (the page) with every marked block (of ``names``; default all) rewritten from the JSON.

    Raises:
        ValueError: a block's markers are missing.
    """
    for name, content in blocks(results, names).items():
        pattern = block_pattern(name)
        if not pattern.search(text):
            raise ValueError(f"block {name!r} not marked in the page")
        text = pattern.sub(
            lambda _m, n=name, c=content: f"{START.format(name=n)}\n{c}\n{END.format(name=n)}", text
        )
    return text


def main(argv: list[str] | None = None) -> int:
    """Rewrite the page's generated blocks (``--check``: exit 1 when any differs, write nothing)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--page", type=Path, default=None, help="one page (default: every page of PAGES)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = p.parse_args(argv)
    pages = {args.page: PAGES.get(args.page)} if args.page is not None else PAGES
    status = 0
    for page, names in pages.items():
        old = page.read_text(encoding="utf-8")
        new = render(old, args.results, names)
        if args.check:
            if new != old:
                print(f"{page}: generated blocks differ from {args.results}", file=sys.stderr)
                status = 1
            continue
        page.write_text(new, encoding="utf-8")
        print(f"wrote {page}")
    return status


if __name__ == "__main__":
    sys.exit(main())
