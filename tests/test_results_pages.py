"""The published numbers cannot drift from the raw JSON they come from.

For each results page under ``docs/results/`` with a committed raw JSON, and for the README's
"## Results" table: the numbers are parsed out of the markdown and compared with values computed
here, independently of the scripts that wrote them, from the JSON files (``docs/results/*.json``
and ``benchmarks/results/*.json``). Each experiment page must also come out byte-identical when its
script rebuilds it with ``--report-only``, and ``performance.md``'s generated blocks must equal
``benchmarks/report.py``'s rendering. Nothing here trains or measures anything.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from rl_distill.compare import mean_std

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "results"
BENCH = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --- helpers ------------------------------------------------------------------------------------
def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def raw(name: str) -> dict:
    return json.loads((DOCS / name).read_text(encoding="utf-8"))


def bench(name: str) -> dict:
    return json.loads((BENCH / name).read_text(encoding="utf-8"))


def readme_results() -> str:
    """The README's "## Results" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Results\n")
    end = text.find("\n## ", start + 5)
    return text[start : end if end > 0 else None]


def table_rows(md: str, header_start: str) -> dict[str, list[str]]:
    """The markdown table whose header line starts with ``header_start``: first cell -> other cells."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def stats(values) -> tuple[float, float]:
    return mean_std(list(values))


def grab(pattern: str, text: str) -> tuple[str, ...]:
    """The groups of the first match of ``pattern`` in ``text`` (fails when there is none)."""
    m = re.search(pattern, text, re.S)
    assert m is not None, f"{pattern!r} not found"
    return m.groups()


def span(values, digits: int = 3) -> str:
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}-{hi}"


def load_example(name: str):
    path = ROOT / "examples" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_pages_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def by_method(runs, key="method"):
    out: dict = {}
    for r in runs:
        out.setdefault(r[key], []).append(r)
    return out


# --- values computed from the JSON --------------------------------------------------------------
def e1_facts(name: str = "e1_on_vs_off_policy.json") -> dict:
    """E1's numbers recomputed from its JSON: per-method accuracy, paired on-policy gains, exposure bias."""
    data = raw(name)
    grid = [r for r in data["runs"] if r["phase"] == "grid"]
    sweep = [r for r in data["runs"] if r["phase"] == "sweep"]
    groups = by_method(grid)

    def matrix(runs, decoding):
        return [
            [int(c) for c in r["extra"][decoding]["correct"]] for r in sorted(runs, key=lambda r: r["seed"])
        ]

    def summary(rows):
        n = len(rows[0])
        per_problem = [statistics.fmean(row[i] for row in rows) for i in range(n)]
        per_seed = [statistics.fmean(row) for row in rows]
        half = 1.959964 * statistics.stdev(per_problem) / n**0.5
        return statistics.fmean(per_problem), half, statistics.stdev(per_seed) if len(rows) > 1 else None

    acc = {(m, d): summary(matrix(rs, d)) for m, rs in groups.items() for d in ("greedy", "sampled")}
    single = {
        who: {d: summary([[int(c) for c in data[who][d]["correct"]]]) for d in ("greedy", "sampled")}
        for who in ("start", "teacher")
    }
    gain = {}
    for div in ("fkl", "rkl", "jsd0.5"):
        on, off = (
            by_method(groups.get(f"gkd_l1_{div}", []), "seed"),
            by_method(groups.get(f"gkd_l0_{div}", []), "seed"),
        )
        seeds = sorted(set(on) & set(off))
        for d in ("greedy", "sampled"):
            per_seed = [
                statistics.fmean(a - b for a, b in zip(matrix(on[s], d)[0], matrix(off[s], d)[0]))
                for s in seeds
            ]
            gain[(div, d)] = (statistics.fmean(per_seed), per_seed)
    totals = {
        k: (sum(v["agree"]) / sum(v["count"]) if sum(v["count"]) else 0.0, sum(v["count"]))
        for k, v in data["exposure_bias"]["positions"].items()
    }
    chosen = {}
    for lmbda in (0.0, 1.0):
        runs = [r for r in sweep if r["lmbda"] == lmbda]
        best = max(r["after"]["eval/greedy/exact_match"] for r in runs)
        chosen[f"{lmbda:g}"] = min(r["lr"] for r in runs if r["after"]["eval/greedy/exact_match"] == best)
    return {
        "data": data,
        "grid": grid,
        "sweep": sweep,
        "groups": groups,
        "acc": acc,
        "single": single,
        "gain": gain,
        "totals": totals,
        "chosen": chosen,
        "minutes": sum(r["wall_seconds"] for r in data["runs"]) / 60,
    }


def ci_cell(mean: float, half: float, sd: float | None = None) -> str:
    """An E1 accuracy cell: mean [95% interval over problems] (± std over seeds; none for one model)."""
    spread = f" (± {sd:.3f})" if sd is not None else ""
    return f"{mean:.3f} [{max(0.0, mean - half):.3f}, {min(1.0, mean + half):.3f}]{spread}"


E1_DIVERGENCES = {"fkl": "forward KL", "rkl": "reverse KL", "jsd0.5": "JSD(0.5)"}


def e1_headline_phrases() -> list[str]:
    """The E1 phrases experiments.md and the README quote: start vs teacher, the exposure-bias ratio and
    the on-policy gains, as the E1 page's gain table prints them (itself checked against the JSON)."""
    f = e1_facts()
    gains = table_rows(doc("e1_on_vs_off_policy.md"), "| divergence | greedy gain")
    seeds = {len(rs) for rs in f["groups"].values()}
    t = f["totals"]
    base, off = 1 - t["teacher_forced@result"][0], 1 - t["own_off_path@result"][0]
    phrases = [
        f"start {f['single']['start']['greedy'][0]:.3f} greedy vs teacher {f['single']['teacher']['greedy'][0]:.3f}",
        f"{min(seeds)} seeds",
        f"{off / base:.1f}x as often on the result tokens of its own off-path prefixes as on the teacher's "
        f"({off:.3f} vs {base:.3f})",
    ]
    for div, label in E1_DIVERGENCES.items():
        phrases.append(f"{label} {gains[div][0]} greedy, {gains[div][2]} sampled")
    return phrases


def throughput(data: dict, peer: str = "trl_gkd") -> float:
    s = data["summary"]
    return s["ours"]["tokens_per_second"] / s[peer]["tokens_per_second"]


HISTORY = ("vs_trl.json", "vs_trl_fused_adamw.json", "onpolicy_overhead.json", "vs_trl_final.json")


def perf_facts() -> dict:
    runs = [bench(n) for n in HISTORY]
    ratios = [throughput(d) for d in runs]
    rss = [
        d["summary"]["ours"]["peak_rss_steps_mib"] / d["summary"]["trl_gkd"]["peak_rss_steps_mib"]
        for d in runs
    ]
    final = bench("vs_trl_final.json")["summary"]
    mem = bench("divergence_memory.json")["summary"]
    over = bench("onpolicy_overhead.json")
    return {
        "ratios": ratios,
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rss": rss,
        "after": ratios[2:],  # the two runs on the code after the sampler/optimizer changes
        "ours": final["ours"]["median_step_seconds"],
        "gkd": final["trl_gkd"]["median_step_seconds"],
        "dist": final["trl_distillation"]["median_step_seconds"],
        "mem_current": mem["chunked:10"]["profiler"]["peak_extra_over_tensor"],
        "mem_current_rss": mem["chunked:10"]["rss"]["peak_extra_over_tensor"],
        "mem_old": mem["chunked"]["profiler"]["peak_extra_over_tensor"],
        "naive": mem["naive_logaddexp"]["profiler"]["peak_extra_over_tensor"],
        "onpolicy": over["summary"]["ours"]["median_step_seconds"]
        / over["summary"]["ours_lambda0"]["median_step_seconds"],
    }


# --- every experiment page is what its script makes of its JSON ---------------------------------
PAGES = [
    ("e1_on_vs_off_policy", "e1_on_vs_off_policy", []),
    ("e2_factuality", "e2_factuality", []),
    ("e3_estimators", "e3_estimators", []),
    ("e4_smollm2", "e4_smollm2", []),
]


@pytest.mark.parametrize(("script", "name", "extra"), PAGES, ids=[p[1] for p in PAGES])
def test_page_is_rebuilt_identically_from_its_json(tmp_path, script, name, extra):
    shutil.copy(DOCS / f"{name}.json", tmp_path / f"{name}.json")
    before = (tmp_path / f"{name}.json").read_bytes()
    load_example(script).main(["--report-only", "--results", str(tmp_path), *extra])
    assert (tmp_path / f"{name}.md").read_text(encoding="utf-8") == doc(f"{name}.md")
    assert (tmp_path / f"{name}.json").read_bytes() == before  # --report-only never rewrites the data


@pytest.mark.parametrize("name", [p[1] for p in PAGES])
def test_page_header_time_comes_from_the_recorded_runs(name):
    md, data = doc(f"{name}.md"), raw(f"{name}.json")
    assert "Wall time of this invocation: 0.0 min" not in md
    (minutes,) = grab(r"regenerated from cached runs; original run time ([\d.]+) min", md)
    assert minutes == f"{sum(r['wall_seconds'] for r in data['runs']) / 60:.1f}"
    assert f"Command: `{data['command']}`" in md and f"Machine: {data['machine']}" in md


def test_write_report_says_when_nothing_trained(tmp_path):
    import argparse
    import time

    sys.path.insert(0, str(ROOT / "examples"))
    import _experiment as exp

    args = argparse.Namespace(results=tmp_path, seeds=[0])
    runs = [{"key": "a", "wall_seconds": 90.0}, {"key": "b", "wall_seconds": 30.0}]
    exp.write_report("x", args, title="T", body="b", data={"runs": runs}, start=time.perf_counter())
    md = (tmp_path / "x.md").read_text()
    assert "regenerated from cached runs; original run time 2.0 min" in md  # inferred: no run fits in 0 s
    exp.write_report(
        "y", args, title="T", body="b", data={"runs": runs}, start=time.perf_counter() - 60, trained=1
    )
    md = (tmp_path / "y.md").read_text()
    assert "Wall time of this invocation: 1.0 min; 1 of 2 runs trained in it" in md and "2.0 min" in md
    assert json.loads((tmp_path / "y.json").read_text())["invocation"]["runs_trained"] == 1


# --- E1 -----------------------------------------------------------------------------------------
def test_e1_tables_match_the_runs():
    f = e1_facts()
    md = doc("e1_on_vs_off_policy.md")
    rows = table_rows(md, "| method | lr | greedy accuracy |")
    for who in ("start", "teacher"):
        cells = rows["student start" if who == "start" else "teacher"]
        assert cells[1:3] == [
            ci_cell(*f["single"][who]["greedy"][:2]),
            ci_cell(*f["single"][who]["sampled"][:2]),
        ]
    for method, runs in f["groups"].items():
        cells = rows[method]
        assert cells[0] == f"{runs[0]['lr']:g}" and all(r["lr"] == runs[0]["lr"] for r in runs)
        assert cells[1] == ci_cell(*f["acc"][(method, "greedy")]), method
        assert cells[2] == ci_cell(*f["acc"][(method, "sampled")]), method
        steps = statistics.fmean(
            r["extra"]["greedy"]["step_correct"] / r["extra"]["greedy"]["step_written"] for r in runs
        )
        assert cells[3] == f"{steps:.3f}" and cells[5] == str(len(runs))
    # the six GKD arms have all 5 seeds; SeqKD those that fit the time budget, the rest named on the page
    assert {m: len(rs) for m, rs in f["groups"].items() if m != "seqkd"} == {
        f"gkd_l{lm}_{d}": 5 for lm in (0, 1) for d in E1_DIVERGENCES
    }
    seqkd_seeds = {r["seed"] for r in f["groups"]["seqkd"]}
    for key in f["data"]["not_run"]:
        assert f"`{key.removeprefix('grid|')}`" in md and key.startswith("grid|seqkd|")
        assert int(key.rsplit("=", 1)[1]) not in seqkd_seeds
    assert len(seqkd_seeds) + len(f["data"]["not_run"]) == 5
    assert len(f["data"]["start"]["greedy"]["correct"]) >= 1000
    # the learning rates: chosen on the validation split, used by the grid
    assert f["data"]["chosen_lr"] == f["chosen"]
    sweep = table_rows(md, "| lambda | lr |")
    for r in f["sweep"]:
        assert sweep[f"{r['lmbda']:g}"] is not None
    marked = [line for line in md.splitlines() if line.startswith("| ") and line.endswith("| **yes** |")]
    assert sorted(line.split(" | ")[1] for line in marked) == sorted(f"{v:g}" for v in f["chosen"].values())
    for method, runs in f["groups"].items():
        lmbda = "1" if method.startswith("gkd_l1") else "0"
        assert runs[0]["lr"] == f["chosen"][lmbda], method
    # exposure bias: the totals are the per-position sums
    eb = table_rows(md, "| prefixes | tokens |")
    labels = {
        "teacher_forced": "teacher's prefixes (teacher-forced)",
        "own": "student's own prefixes, all",
        "own_on_path": "own prefixes still on the teacher's path",
        "own_off_path": "own prefixes off the teacher's path",
    }
    for kind, label in labels.items():
        agree, tokens = f["totals"][kind]
        assert eb[label][:2] == [str(tokens), f"{agree:.3f}"], kind
        agree, tokens = f["totals"][kind + "@result"]
        assert eb[label][3:5] == [str(tokens), f"{agree:.3f}"], kind


def test_e1_findings_state_what_the_json_says():
    f = e1_facts()
    md = doc("e1_on_vs_off_policy.md")
    gains = table_rows(md, "| divergence | greedy gain")
    words = {}
    for (div, d), (mean, per_seed) in f["gain"].items():
        cells = gains[div]
        col = 0 if d == "greedy" else 2
        lo, hi = (float(v) for v in grab(r"\[([-+\d.]+), ([-+\d.]+)\]", cells[col]))
        assert cells[col].startswith(f"{mean:+.3f} [") and lo <= mean + 5e-4 and mean - 5e-4 <= hi
        sd = statistics.stdev(per_seed)
        assert cells[col + 1] == f"{mean:+.3f} ± {2.776 * sd / 5**0.5:.3f}"  # t(0.975, 4 df), 5 seeds
        words[(div, d)] = "higher" if lo > 0 else "lower" if hi < 0 else "no detectable difference"
        assert f"{div} {cells[col]} ({words[(div, d)]})" in md
    higher = sum(w == "higher" for w in words.values())
    lower = sum(w == "lower" for w in words.values())
    assert f"on-policy data is detectably better in {higher}" in md
    assert f"detectably worse in {lower}" in md
    t = f["totals"]
    for suffix, what in (("", "tokens"), ("@result", "result tokens (after `=`)")):
        assert (
            f"{1 - t['teacher_forced' + suffix][0]:.3f} of the {what} of the teacher's completions and on "
            f"{1 - t['own' + suffix][0]:.3f} of its own ({1 - t['own_on_path' + suffix][0]:.3f} while its prefix "
            f"is still the teacher's, {1 - t['own_off_path' + suffix][0]:.3f} once it has left it"
        ) in md


# --- E2, E3, E4 ---------------------------------------------------------------------------------
def e2_methods(runs) -> dict[str, list[dict]]:
    return by_method(runs)


def test_e2_tables_match_the_runs():
    data, md = raw("e2_factuality.json"), doc("e2_factuality.md")
    rlef = next(r["alpha"] for r in data["runs"] if r["method"] == "RLEF*")
    for decoding, header in (("sampled", "## Sampled"), ("greedy", "## Greedy")):
        rows = table_rows(md[md.index(header) :], "| model | hallucination (reward's checker) |")
        for point in ("teacher", "student before"):
            metrics = data["reference_points"][point]
            assert rows[point][0] == f"{metrics[f'{decoding}/hallucination_rate']:.3f}"
            assert rows[point][1] == f"{metrics[f'{decoding}/claim_hallucination']:.3f}"
        for method, runs in e2_methods(data["runs"]).items():
            name = (
                f"RLEF* (KL to the start, alpha = {rlef})"
                if method == "RLEF*"
                else f"student, {method.replace('=', ' = ')}"
            )
            cells = rows[name]
            assert cells[0] == pm(*stats(r["extra"][f"{decoding}/hallucination_rate"] for r in runs))
            assert cells[1] == pm(*stats(r["extra"][f"{decoding}/claim_hallucination"] for r in runs))
            assert cells[5] == pm(*stats(r["extra"][f"{decoding}/rouge2_multi"] for r in runs))
            assert cells[-1] == str(len(runs))
    # The sweep: the chosen lr obeys the stated rule on the validation numbers.
    sweep = data["sweep"]
    teacher_val = data["reference_points"]["teacher (validation)"]["sampled/rouge2_multi"]
    allowed = [row for row in sweep["table"] if row["rouge2_multi"] >= 0.9 * teacher_val]
    assert sweep["lr"] == min(allowed, key=lambda row: row["claim_hallucination"])["lr"]
    assert f"| {sweep['lr']:g} (chosen) |" in md
    # The paired comparisons: recomputed from the runs, seed by seed.
    by = {(r["method"], r["seed"]): r["extra"]["sampled/claim_hallucination"] for r in data["runs"]}
    for method, comp in data["comparisons"]["vs_rl_only"].items():
        seeds = comp["claim"]["seeds"]
        diffs = [by[(method, s)] - by[("alpha=0.0", s)] for s in seeds]
        assert comp["claim"]["diffs"] == pytest.approx(diffs)
        assert f"{sum(diffs) / len(diffs):+.3f} (seeds {', '.join(f'{d:+.3f}' for d in diffs)})" in md


def e2_headline_phrases() -> list[str]:
    """The E2 numbers experiments.md and the README quote, from the JSON."""
    data = raw("e2_factuality.json")
    runs, points = e2_methods(data["runs"]), data["reference_points"]

    def claim(method: str) -> tuple[float, float]:
        return stats(r["extra"]["sampled/claim_hallucination"] for r in runs[method])

    mixed = [claim(m)[0] for m in runs if m.startswith("alpha=") and 0 < float(m[6:]) < 1]
    rouge0 = stats(r["extra"]["sampled/rouge2_multi"] for r in runs["alpha=0.0"])[0]
    start = points["student before"]
    return [
        f"lr {data['sweep']['lr']:g}",
        f"{start['sampled/claim_hallucination']:.3f} -> {pm(*claim('alpha=0.0'))}",
        f"ROUGE-2 {start['sampled/rouge2_multi']:.3f} -> {rouge0:.3f}",
        f"alpha 0.25-0.75 {span(mixed)}",
        f"RLEF* {claim('RLEF*')[0]:.3f}",
        f"GKD alone {claim('alpha=1.0')[0]:.3f}",
        f"teacher {points['teacher']['sampled/claim_hallucination']:.3f}",
    ]


def test_e3_tables_match_the_runs():
    data, md = raw("e3_estimators.json"), doc("e3_estimators.md")
    rows = table_rows(md, "| method | reverse KL |")
    for method, runs in by_method(data["runs"]).items():
        assert rows[method][0] == pm(*stats(r["after"]["eval/reverse_kl"] for r in runs))
        assert rows[method][4] == pm(*stats(r["after"]["eval/greedy/exact_match"] for r in runs))
    var = table_rows(md, "| method | relative variance |")
    for method, v in data["variance"].items():
        assert var[method][0] == f"{v['relative_variance']:.2f}"


def wilson95(successes: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval, written out independently of the E4 script."""
    z = 1.959964
    p, z2 = successes / n, z * z
    centre, half = (
        (p + z2 / (2 * n)) / (1 + z2 / n),
        z * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5 / (1 + z2 / n),
    )
    return max(0.0, centre - half), min(1.0, centre + half)


def test_e4_tables_match_the_runs():
    data, md = raw("e4_smollm2.json"), doc("e4_smollm2.md")
    teacher, warm, n = data["teacher"], data["warm"], data["teacher"]["n"]
    assert n >= 200 and len(warm["warm"]["greedy_per_prompt"]) == n

    def acc(p):
        lo, hi = wilson95(p * n, n)
        return f"{p:.3f} [{lo:.3f}, {hi:.3f}]"

    rows = table_rows(md, "| model | greedy accuracy [95% CI] |")
    assert rows["teacher (SmolLM2-135M-Instruct, 30 layers)"][0] == acc(teacher["accuracy"])
    assert teacher["accuracy"] == sum(teacher["per_prompt"]) / n
    assert rows["chance: always the most frequent answer"][0] == acc(teacher["chance"]["most_frequent"])
    start = warm["warm"]
    assert rows["student after warm-up (start of every run)"][:2] == [
        acc(start["greedy"]),
        f"{start['sampled']:.3f}",
    ]
    for alpha, runs in by_method(data["runs"], "alpha").items():
        label = {1.0: "on-policy GKD (alpha=1)", 0.0: "RL only (alpha=0)"}.get(
            alpha, f"RL + GKD (alpha={alpha:g})"
        )
        mean, sd = stats(r["extra"]["greedy"] for r in runs)
        lo, hi = wilson95(mean * n, n)
        assert rows[label][0] == f"{mean:.3f} ± {sd:.3f} [{lo:.3f}, {hi:.3f}]"
        sampled = [r["extra"]["sampled"] for r in runs]
        assert rows[label][1] == ("-" if None in sampled else pm(*stats(sampled)))
    changes = table_rows(md, "| run | greedy change [95% CI] |")
    for r in data["runs"]:
        diffs = [
            a - b for a, b in zip(r["extra"]["greedy_per_prompt"], start["greedy_per_prompt"], strict=True)
        ]
        mean, sd = stats(diffs)
        half = 1.959964 * sd / n**0.5
        cell = changes[f"alpha={r['alpha']:g}, seed {r['seed']}"][0]
        assert cell == f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"
        assert r["extra"]["greedy"] == pytest.approx(sum(r["extra"]["greedy_per_prompt"]) / n)
    divs = table_rows(md, "| model | JSD(0.5) |")
    assert divs["warm student (start)"][2] == f"{data['runs'][0]['before']['eval/reverse_kl']:.3f}"
    for alpha, runs in by_method(data["runs"], "alpha").items():
        label = {1.0: "on-policy GKD (alpha=1)", 0.0: "RL only (alpha=0)"}.get(
            alpha, f"RL + GKD (alpha={alpha:g})"
        )
        assert divs[label][2] == pm(*stats(r["after"]["eval/reverse_kl"] for r in runs))


def e4_headline_phrases() -> list[str]:
    """The E4 numbers the README row and experiments.md quote, as the JSON gives them."""
    e4 = raw("e4_smollm2.json")
    teacher, warm = e4["teacher"], e4["warm"]
    greedy = [r["extra"]["greedy"] for r in e4["runs"]]
    phrases = [
        f"teacher {teacher['accuracy']:.3f} greedy on {teacher['n']} held-out prompts",
        f"chance {max(teacher['chance'].values()):.3f}",
        f"warm-up {warm['fresh']['greedy']:.3f} -> {warm['warm']['greedy']:.3f}",
        f"after training {span(greedy)}",
    ]
    if "No run moved the accuracy beyond its 95% interval" in doc("e4_smollm2.md"):
        phrases.append("pipeline check")
    return phrases


# --- experiments.md -----------------------------------------------------------------------------
def test_experiments_summary_numbers():
    md = " ".join(doc("experiments.md").split())  # prose wraps anywhere
    for phrase in e1_headline_phrases():
        assert phrase in md, phrase
    # E2, E3, E4
    for phrase in e2_headline_phrases():
        assert phrase in md, phrase
    e3 = raw("e3_estimators.json")
    gkd = stats(r["after"]["eval/reverse_kl"] for r in e3["runs"] if r["method"] == "gkd_rkl")
    assert f"0.221 -> {pm(*gkd)}" in md
    var = e3["variance"]
    rein = [
        var[m]["relative_variance"] / var["gkd_rkl"]["relative_variance"]
        for m in var
        if m.startswith("reinforce")
    ]
    assert f"{min(rein):.1f}-{max(rein):.1f}x" in md
    greedy = {
        m: stats(r["after"]["eval/greedy/exact_match"] for r in rs)[0]
        for m, rs in by_method(e3["runs"]).items()
    }
    assert f"0.711 -> {min(v for m, v in greedy.items() if m != 'ppo'):.2f}-{max(greedy.values()):.2f}" in md
    for phrase in e4_headline_phrases():
        assert phrase in md, phrase


# --- README "## Results" --------------------------------------------------------------------------
def test_readme_performance_headline():
    """The README quotes round 2's medians over the per-repeat ratios with their min-max, from the JSON."""
    from benchmarks import report_round2

    row = next(line for line in readme_results().splitlines() if line.startswith("| performance |"))
    data = report_round2.load()

    def phrase(ours: str, peer: str) -> str:
        p = report_round2.pair_ratios(data, ours, peer)
        return f"{p['median']:.2f}x"[:-1], f"{p['min']:.2f}-{p['max']:.2f}x", f"{p['rss_median']:.2f}x"

    # The two headline pairs: the median over every repeat of the full run and the headline run.
    fp32 = report_round2.pooled_ratios(report_round2.RESULTS, "ours", "trl_distillation")
    n, spread = len(fp32["ratios"]), f"{fp32['min']:.2f}-{fp32['max']:.2f}x"
    assert (
        f"median **{fp32['median']:.2f}x** its throughput in fp32 over {n} repeats (min-max {spread}) at "
        f"{fp32['rss_median']:.2f}x its peak RSS, the 1.6x target {'met' if fp32['median'] >= 1.6 else 'missed'}"
    ) in row
    bf16 = report_round2.pooled_ratios(report_round2.RESULTS, "ours_bf16", "trl_distillation_bf16")
    assert (
        f"**{bf16['median']:.2f}x** with both in bf16 ({len(bf16['ratios'])} repeats, {bf16['min']:.2f}-"
        f"{bf16['max']:.2f}x), the 2x target {'met' if bf16['median'] >= 2.0 else 'missed'}"
    ) in row
    med, spread, rss = phrase("ours", "trl_gkd")
    assert f"GKDTrainer {med}x ({spread}) at {rss} its peak RSS" in row
    assert "best" not in row
    env = data["env"]["time_ratio_env_over_floor"]
    verdict = "met" if round(env, 2) <= 1.3 else "missed"
    assert f"the environment at B=8 costs {env:.2f}x its batched floor (1.3x target {verdict})" in row
    page = doc("performance.md")
    for number in re.findall(r"\d+\.\d+", row.split(" | ")[-1]):
        assert number in page, number


def test_readme_experiments_headline():
    row = next(line for line in readme_results().splitlines() if line.startswith("| experiments E1-E4"))
    f = e1_facts()
    for phrase in e1_headline_phrases():
        assert phrase in row, phrase
    # E2
    for phrase in e2_headline_phrases():
        assert phrase in row, phrase
    ref = raw("e2_factuality.json")["reference_points"]
    teach = f["data"]["teacher_report"]["teacher"]["metrics"]["accuracy"]
    assert f"arithmetic {teach:.1%}" in row
    assert f"{ref['teacher']['sampled/hallucination_rate']:.0%} sampled hallucination rate" in row
    # E3
    var = raw("e3_estimators.json")["variance"]
    rein = [var[m]["relative_variance"] for m in var if m.startswith("reinforce")]
    assert grab(
        r"([\d.]+)-([\d.]+)x lower relative variance than REINFORCE \(([\d.]+) vs ([\d.-]+); PPO ([\d.]+)\)",
        row,
    ) == (
        f"{min(rein) / var['gkd_rkl']['relative_variance']:.1f}",
        f"{max(rein) / var['gkd_rkl']['relative_variance']:.1f}",
        f"{var['gkd_rkl']['relative_variance']:.2f}",
        span(rein, 1),
        f"{var['ppo']['relative_variance']:.1f}",
    )
    e3 = raw("e3_estimators.json")
    gkd = stats(r["after"]["eval/reverse_kl"] for r in e3["runs"] if r["method"] == "gkd_rkl")
    assert grab(r"beyond its seed spread \(([\d.]+) -> ([\d.]+)\)", row) == (
        f"{e3['runs'][0]['before']['eval/reverse_kl']:.3f}",
        f"{gkd[0]:.3f}",
    )
    # "beyond its seed spread": every other method ends less than one of its std below the start
    start = e3["runs"][0]["before"]["eval/reverse_kl"]
    for method, runs in by_method(e3["runs"]).items():
        mu, sd = stats(r["after"]["eval/reverse_kl"] for r in runs)
        assert (start - mu > sd) == (method == "gkd_rkl"), method
    # E4
    for phrase in e4_headline_phrases():
        assert phrase in row, phrase


def test_readme_rows_without_json_are_marked_and_match_their_pages():
    text = readme_results()
    main = next(line for line in text.splitlines() if line.startswith("| main job |"))
    env = next(line for line in text.splitlines() if line.startswith("| environment overhead |"))
    assert "raw JSON was not committed" in env
    # The main job's row, the README's table and foundation.md's current section: from main_job.json.
    job = raw("main_job.json")
    b, a = job["summary"]["before"], job["summary"]["after"]
    total = job["summary"]["total_seconds"]
    assert f"held-out JSD(0.5) {b['eval/jsd']:.4f} -> {a['eval/jsd']:.4f} in 100 steps, {total:.0f} s" in main
    assert "docs/results/main_job.json" in main
    foundation = doc("foundation.md")
    for key, name in (
        ("eval/jsd", "JSD(0.5)"),
        ("eval/forward_kl", "forward KL(pT‖pS)"),
        ("eval/reverse_kl", "reverse KL(pS‖pT)"),
        ("eval/teacher_logprob", "teacher log-prob per student token"),
    ):
        assert f"| {name} | {b[key]:.4f} | {a[key]:.4f} |" in foundation, key
    steps = job["median_step_seconds"]
    assert (
        f"Training loop {job['summary']['train_seconds']:.1f} s (median step {steps['time/step']:.2f} s"
        in foundation
    )
    assert f"whole job {total:.1f} s" in foundation
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"| JSD(0.5) (the training divergence) | {b['eval/jsd']:.4f} | {a['eval/jsd']:.4f} |" in readme
    assert f"| forward KL  KL(pT‖pS) | {b['eval/forward_kl']:.3f} | {a['eval/forward_kl']:.3f} |" in readme
    assert f"| reverse KL  KL(pS‖pT) | {b['eval/reverse_kl']:.3f} | {a['eval/reverse_kl']:.3f} |" in readme
    assert (
        f"Training took {job['summary']['train_seconds']:.0f} s (median step {steps['time/step']:.2f} s)"
        in readme
    )
    b8, b32 = grab(r"at B = 8 on SmolLM2: ([\d.]+)x, re-measured .* B = 32: ([\d.]+)x in round 1", env)
    overhead = doc("env_overhead.md")
    assert f"**{b32}x**" in overhead and "were not committed" in overhead
    from benchmarks import report_round2

    assert f"**{b8}x** (B = 8" in report_round2.env_block()  # round 2's block, generated from the JSON
    assert report_round2.env_block().strip() in overhead


# --- performance.md -----------------------------------------------------------------------------
def test_performance_blocks_are_generated_from_the_json():
    from benchmarks import report

    page = doc("performance.md")
    assert report.render(page) == page, "run `python -m benchmarks.report`"
    for name in report.BLOCKS:
        assert report.block_pattern(name).search(page), name


def test_performance_headline_is_the_median_over_the_recorded_runs():
    page = doc("performance.md")
    p = perf_facts()
    summary = page[page.index("## Round 1 summary") : page.index("## H1.")]
    median, lo, hi = grab(
        r"median \*\*([\d.]+)x\*\* generated tokens/s over the 4 recorded runs \(min-max ([\d.]+)-([\d.]+)x\)",
        summary,
    )
    assert (median, lo, hi) == (f"{p['median']:.2f}", f"{p['min']:.2f}", f"{p['max']:.2f}")
    listed = grab(r"GKDTrainer's was ([\d.]+)x, ([\d.]+)x, ([\d.]+)x, ([\d.]+)x", summary)
    assert list(listed) == [f"{r:.2f}" for r in p["ratios"]]
    current, current_rss, old = grab(
        r"`chunked:10` variant\): \*\*([\d.]+)x\*\* \(allocator\) / \*\*([\d.]+)x\*\* \(RSS\); the old 2\*\*22 default: ([\d.]+)x",
        summary,
    )
    assert (current, current_rss, old) == (
        f"{p['mem_current']:.2f}",
        f"{p['mem_current_rss']:.2f}",
        f"{p['mem_old']:.2f}",
    )
    # every row measured with the old chunk says so
    rows = [
        line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| target")
    ]
    assert len(rows) == 4
    for line in rows:
        assert "not re-measured on the current code" in line, line
    history = table_rows(page, "| run | code |")
    for name, ratio in zip(HISTORY, p["ratios"]):
        assert history[f"`{name}`"][5].startswith(f"{ratio:.2f}x")
    memory = table_rows(page[page.index("## H3.") :], "| variant | allocator |")  # round 1's table
    shipped = next(k for k in memory if k.startswith("`chunked`:"))
    assert "**old** default chunk (2**22" in shipped
    assert "**current** default" in next(k for k in memory if "chunked:10" in k)


def test_performance_chunk_default_matches_the_library():
    import rl_distill.divergences as div

    assert div.DEFAULT_CHUNK_ELEMENTS == 2**19  # the page's "current default"; re-measure when it changes
    v = bench("divergence_memory.json")["shape"]["V"]
    assert div.DEFAULT_CHUNK_ELEMENTS // v == 10  # the `chunked:10` variant is the current default's chunk


def test_performance_raw_rows_name_only_patches_that_ran():
    """``inverse_cdf_sampling`` did something only before 07b5d6f (``vs_trl.json``); rows that name it
    after that were deleted (issue #12), and no row names a patch that never existed."""
    before_07b5d6f = {"vs_trl.json"}
    # small_chunks: 2**20 vs the then 2**22; recompute_grad: the library's fused gradient off (issue #18)
    known = {"fused_jsd", "small_chunks", "inverse_cdf_sampling", "recompute_grad"}
    for path in sorted(BENCH.glob("*.json")):
        for runs in json.loads(path.read_text(encoding="utf-8")).get("runs", {}).values():
            for run in runs if isinstance(runs, list) else []:
                patches = set(run.get("patches", []))
                assert patches <= known, (path.name, patches)
                if "inverse_cdf_sampling" in patches:
                    assert path.name in before_07b5d6f, path.name


def test_performance_round2_headline_is_the_median_of_per_repeat_ratios():
    """Round 2 (issue #18): the summary quotes the median over repeats of the paired ratios, with min-max."""
    data_file = BENCH / "perf_round2.json"
    if not data_file.is_file():
        pytest.skip("perf_round2.json not recorded yet")
    summary = doc("performance.md").split("## Summary", 1)[1].split("## 1.", 1)[0]

    def ratios_of(path: Path, ours: str, peer: str) -> list[float]:
        if not path.is_file():
            return []
        steps = json.loads(path.read_text(encoding="utf-8"))["steps"]["runs"]
        a, b = ({r["repeat"]: r for r in steps.get(c, []) if "error" not in r} for c in (ours, peer))
        return [a[k]["tokens_per_second"] / b[k]["tokens_per_second"] for k in sorted(set(a) & set(b))]

    # The headline pairs pool the full run's repeats with the headline run's (same code).
    for ours, peer in (("ours", "trl_distillation"), ("ours_bf16", "trl_distillation_bf16")):
        parts = {
            "full run": ratios_of(data_file, ours, peer),
            "headline run": ratios_of(BENCH / "perf_round2_headline.json", ours, peer),
        }
        ratios = [r for rs in parts.values() for r in rs]
        expected = (
            f"median **{statistics.median(ratios):.2f}x** over {len(ratios)} repeats (min-max {min(ratios):.2f}-"
            f"{max(ratios):.2f}x; "
            + "; ".join(f"{name}: " + ", ".join(f"{r:.2f}x" for r in rs) for name, rs in parts.items() if rs)
            + ")"
        )
        assert expected in summary, (ours, peer, expected)
    assert "best" not in summary


def test_env_overhead_page_carries_the_generated_block():
    from benchmarks import report

    page = doc("env_overhead.md")
    assert report.render(page, names=("r2_env",)) == page, "run `python -m benchmarks.report`"


def test_lora_precision_page_is_generated_from_its_json():
    from benchmarks import report_lora

    assert report_lora.main(["--check"]) == 0


def test_readme_lora_row_matches_the_committed_json():
    data = bench("lora_memory.json")
    main_job = json.loads((BENCH / "bf16_main_job.json").read_text(encoding="utf-8"))
    fp32 = json.loads((BENCH / "fp32_main_job.json").read_text(encoding="utf-8"))
    by = {r["variant"]: r for r in data["variants"]}
    row = next(line for line in readme_results().splitlines() if line.startswith("| LoRA and bf16"))
    expected = [
        f"trains {by['lora']['trainable_params']:,} of {by['lora']['total_params']:,} parameters",
        f"optimizer state {by['lora']['optimizer_state_mib']:.1f} vs {by['full']['optimizer_state_mib']:.1f} MiB",
        f"RSS after warm-up {by['lora']['rss_after_warmup_mib']:.0f} vs {by['full']['rss_after_warmup_mib']:.0f} MiB",
        f"JSD {main_job['before']['eval/jsd']:.4f} -> {main_job['after']['eval/jsd']:.4f}",
        f"fresh clone: {fp32['before']['eval/jsd']:.4f} -> {fp32['after']['eval/jsd']:.4f})",
    ]
    for text in expected:
        assert text in row, text
