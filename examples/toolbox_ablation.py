"""The distillation toolbox, one option at a time, on the OPD lab (issue #14).

The OPD lab (``examples/opd_lab.py``, ``docs/results/opd_lab.md``) found its on-policy arms unstable
at T = 40: from the warm start only ~9% of student samples are teacher sequences, so on-policy
training spends most of its updates on prefixes that already hold a mistake. This script adds the
toolbox's options, one at a time, to the lab's plain on-policy GKD JSD(0.5) arm (lambda = 1) and
measures each with the lab's exact metrics:

- ``warmup``: ``lmbda: {preset: warmup_then_onpolicy}`` (10% lambda 0, a 30% ramp, then 1);
- ``industrial``: ``lmbda: {preset: industrial}`` (20% lambda 0, 40% mixed 0.3 -> 0.7, then 1);
- ``tip_weight`` / ``tip_filter``: token importance weighting, or the filter at threshold 0.3;
- ``reject``: flawed-prefix rejection by student perplexity (``reject: {max_perplexity: ...}``),
  the threshold picked on validation seed 100 only, among candidates from the warm-start samples'
  perplexity there (the clean/flawed midpoint and two quantiles);
- ``beta_ext0.5`` / ``beta_ext2``: reward extrapolation with the lab's verifier reward (1 when the
  completion is one of the teacher's two length-T sequences, else 0); beta_ext = 0 is the baseline;
- ``minillm`` (teacher_mix 0.2, length-normalised) against the lab's ``reinforce_rkl`` arm.

Same warm start, step budget and learning rates as the lab's tuned arms (read from
``docs/results/opd_lab.json`` when it exists; the lab's validated values otherwise); nothing is tuned
on the reported seeds.

    python examples/toolbox_ablation.py            # the grid (about 10-15 min on 2 shared cores)
    python examples/toolbox_ablation.py --quick    # seconds: the smoke test's grid

Runs are appended to ``runs/toolbox_ablation/runs.jsonl`` and skipped on restart. Writes
``docs/results/toolbox_ablation.md``, ``.json`` (every number of the page comes from it) and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import opd_lab  # noqa: E402
from _experiment import REPO, Job, pyplot, read_runs, run_jobs, runs_to_train, write_report  # noqa: E402

BASELINE = "baseline"
#: Arm -> (agent, config overrides, the lab arm whose tuned learning rate it uses).
ARMS: dict[str, tuple[str, dict[str, Any], str]] = {
    BASELINE: ("gkd", {"lmbda": 1.0, "divergence": "jsd", "beta": 0.5}, "gkd_l1_jsd0.5"),
    "warmup": (
        "gkd",
        {"lmbda": {"preset": "warmup_then_onpolicy"}, "divergence": "jsd", "beta": 0.5},
        "gkd_l1_jsd0.5",
    ),
    "industrial": (
        "gkd",
        {"lmbda": {"preset": "industrial"}, "divergence": "jsd", "beta": 0.5},
        "gkd_l1_jsd0.5",
    ),
    "tip_weight": (
        "gkd",
        {"lmbda": 1.0, "divergence": "jsd", "beta": 0.5, "token_weighting": "tip_weight"},
        "gkd_l1_jsd0.5",
    ),
    "tip_filter": (
        "gkd",
        {
            "lmbda": 1.0,
            "divergence": "jsd",
            "beta": 0.5,
            "token_weighting": "tip_filter",
            "tip_threshold": 0.3,
        },
        "gkd_l1_jsd0.5",
    ),
    # max_perplexity is filled in per T from the validation seed (select_reject_threshold).
    "reject": ("gkd", {"lmbda": 1.0, "divergence": "jsd", "beta": 0.5}, "gkd_l1_jsd0.5"),
    "beta_ext0.5": (
        "gkd",
        {"lmbda": 1.0, "divergence": "jsd", "beta": 0.5, "beta_ext": 0.5},
        "gkd_l1_jsd0.5",
    ),
    "beta_ext2": ("gkd", {"lmbda": 1.0, "divergence": "jsd", "beta": 0.5, "beta_ext": 2.0}, "gkd_l1_jsd0.5"),
    "reinforce": (*opd_lab.METHODS["reinforce_rkl"], "reinforce_rkl"),
    "minillm": (
        "minillm",
        {"samples_per_prompt": 4, "teacher_mix": 0.2, "length_normalize": True, "baseline": "leave_one_out"},
        "reinforce_rkl",  # the lab has no MiniLLM arm: the lr of the other reverse-KL policy gradient
    ),
}
#: Cut from the default grid to fit 20 minutes on 2 shared cores (run them with ``--arms``): none, the
#: 10 arms x 2 lengths x 3 seeds take about 14 minutes there.
CUT: tuple[str, ...] = ()
#: Technique -> (arm, the arm it is compared with): one verdict each.
COMPARISONS: dict[str, tuple[str, str]] = {
    "lambda schedule warmup_then_onpolicy": ("warmup", BASELINE),
    "lambda schedule industrial": ("industrial", BASELINE),
    "TIP weighting": ("tip_weight", BASELINE),
    "TIP filter (0.3)": ("tip_filter", BASELINE),
    "flawed-prefix rejection": ("reject", BASELINE),
    "reward extrapolation beta_ext 0.5": ("beta_ext0.5", BASELINE),
    "reward extrapolation beta_ext 2": ("beta_ext2", BASELINE),
    "MiniLLM vs REINFORCE": ("minillm", "reinforce"),
}
#: Lab learning rates when ``docs/results/opd_lab.json`` is missing (its validated choice).
LAB_LRS = {"gkd_l1_jsd0.5": 3e-3, "reinforce_rkl": 1e-3}
#: Per-step diagnostics recorded (when an agent logs them).
DIAGNOSTICS = (
    "lmbda",
    "rollout/on_policy_fraction",
    "rollout/filter/rejected_fraction",
    "rollout/filter/dropped_fraction",
    "train/skipped",
    "rollout/tip_kept_fraction",
    "rollout/tip_weight_mean",
    "rollout/tip_sequences_fraction",
    "rollout/external_reward",
    "train/importance_weight",
    "train/is_clipfrac",
)
#: Two-sided 95% Student-t quantiles by degrees of freedom (the paired-delta interval).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


class ValidSequenceReward:
    """The lab's verifier: 1.0 when a completion is one of the teacher's sequences of length T, else 0.0.

    The lab's "success" as a reward (the probability of this event is the ``success`` metric).
    """

    def __init__(self, valid: list[str]) -> None:
        self.valid = set(valid)

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        del prompts, metadata
        return [float(c in self.valid) for c in completions]


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
def build_agent(
    name: str, overrides: dict[str, Any], engine: Any, lr: float, length: int, seed: int, reward: Any
) -> Any:
    """A GKD, MiniLLM or REINFORCE agent over ``engine``'s student with Adam at ``lr``."""
    import torch

    from rl_distill.agents import AGENTS

    agent_cls, config_cls = AGENTS[name]
    optimizer = torch.optim.Adam(engine.student.parameters(), lr=lr)
    config = config_cls(**overrides, max_new_tokens=length)
    kwargs = {"reward": reward} if config.uses_reward else {}
    return agent_cls(engine, optimizer, config, generator=torch.Generator().manual_seed(seed), **kwargs)


def prompts_for(overrides: dict[str, Any], references: list[str], tokens: int, length: int) -> list[Any]:
    """One step's prompts: ``tokens // length`` sequences in all (k samples per prompt count k times)."""
    from rl_distill.tasks import Example

    n = max(1, tokens // length // overrides.get("samples_per_prompt", 1))
    return [Example(opd_lab.PROMPT, reference=references[i % len(references)]) for i in range(n)]


def warm_started(job: Job) -> dict[str, Any]:
    """The lab's student after its supervised warm start (identical to ``opd_lab.run_one``'s)."""
    import torch

    from rl_distill.models import tiny_llama
    from rl_distill.rollout import RolloutEngine

    torch.set_num_threads(job.threads)
    length, train = int(job.labels["T"]), job.train
    tokenizer, teacher = opd_lab.make_lab()
    prompt_ids = tokenizer(opd_lab.PROMPT, add_special_tokens=True)["input_ids"]
    references = [tokenizer.decode(teacher.config.phrase(m, length)) for m in range(teacher.config.num_modes)]
    torch.manual_seed(job.seed)
    student = tiny_llama(len(tokenizer), seed=job.seed, **opd_lab.STUDENT).train()
    engine = RolloutEngine(student, teacher, tokenizer)
    warm_name, warm_cfg = opd_lab.METHODS["supervised_kd"]
    warm = opd_lab.make_agent(warm_name, warm_cfg, engine, train["warm_lr"], length, job.seed)
    warm_batch = opd_lab.batch_for(warm_name, warm_cfg, references, train["tokens_per_step"], length)
    for _ in range(train["warm_steps"]):
        warm.update(warm_batch)
    return {"engine": engine, "prompt_ids": prompt_ids, "references": references, "length": length}


def run_one(job: Job, out_root: str) -> dict[str, Any]:
    """A warm-start probe (``kind=probe``) or one training run of an arm (``kind`` ``val`` or ``test``)."""
    del out_root  # nothing is written per run: the row is the record
    start = time.perf_counter()
    lab = warm_started(job)
    body = probe(job, lab) if job.labels["kind"] == "probe" else train(job, lab)
    return {
        "key": job.key,
        "method": job.method,
        "seed": job.seed,
        **job.labels,
        **body,
        "wall_seconds": time.perf_counter() - start,
        "job": {"agent": job.agent, "train": job.train},
    }


def probe(job: Job, lab: dict[str, Any]) -> dict[str, Any]:
    """Perplexity of warm-start samples, clean (a teacher sequence) or flawed: the scale of ``reject``."""
    import torch

    from rl_distill.filters import sequence_perplexity
    from rl_distill.rollout import SamplingConfig

    engine, length = lab["engine"], lab["length"]
    sampling = SamplingConfig(max_new_tokens=length, temperature=1.0)
    rollout = engine.generate(
        [opd_lab.PROMPT] * job.train["probe_samples"],
        sampling,
        generator=torch.Generator().manual_seed(job.seed),
    )
    ppl = sequence_perplexity(rollout.logprobs, rollout.completion_mask).tolist()
    clean = [text in lab["references"] for text in engine.decode(rollout)]
    return {"perplexity": ppl, "clean": clean}


def train(job: Job, lab: dict[str, Any]) -> dict[str, Any]:
    """Train one arm from the warm start (schedules driven by progress), evaluate exactly, keep diagnostics."""
    from rl_distill.models.process_lm import exact_student_metrics

    engine, length, references, tr = lab["engine"], lab["length"], lab["references"], job.train
    student, teacher = engine.student, engine.teacher

    def evaluate(continuations: int) -> Any:
        return exact_student_metrics(
            student, teacher, lab["prompt_ids"], length, continuations=continuations, seed=job.seed
        )

    before = evaluate(tr["curve_continuations"])
    name, overrides = job.agent["name"], {k: v for k, v in job.agent.items() if k != "name"}
    agent = build_agent(
        name, overrides, engine, tr["lr"], length, job.seed + 1, ValidSequenceReward(references)
    )
    batch = prompts_for(overrides, references, tr["tokens_per_step"], length)
    stats, curve, final = opd_lab.train_loop(agent, batch, tr, evaluate, before)
    steps = [{k: float(row[k]) for k in DIAGNOSTICS if k in row} for row in stats]
    for row, raw in zip(steps, stats):
        if "train/lmbda" in raw:  # the schedule's value at that step (logged by the agent)
            row["lmbda"] = float(raw["train/lmbda"])
    return {
        "after": {"eval/expected_errors": final.expected_errors, "eval/success": final.success},
        "metrics": final.to_dict(),
        "before": opd_lab._curve_point(before),
        "curve": curve,
        "diagnostics": summarise_steps(steps, tr["trace_window"]),
        "empty_steps": getattr(agent, "empty_steps", 0),
    }


def summarise_steps(steps: list[dict[str, float]], window: int) -> dict[str, Any]:
    """Per diagnostic: its mean over the steps that logged it, and a trace of window means."""
    out: dict[str, Any] = {}
    for key in DIAGNOSTICS:
        vals = [(i, s[key]) for i, s in enumerate(steps) if key in s]
        if not vals:
            continue
        trace = []
        for lo in range(0, len(steps), window):
            chunk = [v for i, v in vals if lo <= i < lo + window]
            trace.append([lo + 1, sum(chunk) / len(chunk) if chunk else math.nan])
        out[key] = {"mean": sum(v for _, v in vals) / len(vals), "steps": len(vals), "trace": trace}
    return out


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
def lab_settings() -> tuple[argparse.Namespace, dict[str, float], str]:
    """The lab's budget (``opd_lab.parse_args`` defaults) and tuned learning rates, with their source."""
    lab = opd_lab.parse_args([])
    path = REPO / "docs" / "results" / "opd_lab.json"
    if path.is_file():
        chosen = json.loads(path.read_text(encoding="utf-8"))["selection"]["chosen"]
        return lab, {m: float(chosen[m]) for m in LAB_LRS}, "docs/results/opd_lab.json (selection.chosen)"
    return lab, dict(LAB_LRS), "the lab's validated values (opd_lab.json not found)"


def make_job(
    args: argparse.Namespace, kind: str, arm: str, length: int, seed: int, extra: dict[str, Any]
) -> Job:
    """One run: ``kind`` is ``probe`` (warm-start perplexities), ``val`` (reject threshold) or ``test``."""
    name, overrides, lr_of = ARMS[arm]
    agent = {"name": name, **overrides, **extra}
    lr = args.lrs[lr_of]
    extra_key = ",".join(f"{k}={v}" for k, v in sorted(extra.items()))
    return Job(
        # The key names everything that changes the result, so a resumed grid never reuses a stale run.
        key=(
            f"{kind}|{arm}|{extra_key}|T={length}|seed={seed}|lr={lr:g}|steps={args.steps}"
            f"|tok={args.tokens_per_step}|warm={args.warm_steps}@{args.warm_lr:g}|cont={args.continuations}"
            + (f"|n={args.probe_samples}" if kind == "probe" else "")
        ),
        method=arm,
        seed=seed,
        teacher="process_lm:bimodal",
        student="tiny_llama:" + ",".join(f"{k}={v}" for k, v in opd_lab.STUDENT.items()),
        data={"prompt": opd_lab.PROMPT, "chars": opd_lab.CHARS},
        agent=agent,
        train={
            "steps": args.steps,
            "lr": lr,
            "tokens_per_step": args.tokens_per_step,
            "warm_steps": args.warm_steps,
            "warm_lr": args.warm_lr,
            "continuations": args.continuations,
            "curve_points": args.curve_points,
            "curve_continuations": args.curve_continuations,
            "trace_window": args.trace_window,
            "probe_samples": args.probe_samples,
        },
        labels={"T": length, "lr": lr, "kind": kind, "extra": extra},
        threads=1,
    )


def candidate_thresholds(probes: list[dict[str, Any]], quantiles: list[float]) -> dict[int, list[float]]:
    """Per T, from the warm-start samples of the validation seed: the ``quantiles`` of their perplexity,
    and the midpoint between the largest clean and the smallest flawed perplexity (when they separate)."""
    out = {}
    for p in probes:
        ppl = sorted(p["perplexity"])
        cands = [ppl[min(len(ppl) - 1, int(q * len(ppl)))] for q in quantiles]
        clean = [x for x, c in zip(p["perplexity"], p["clean"]) if c]
        flawed = [x for x, c in zip(p["perplexity"], p["clean"]) if not c]
        if clean and flawed and max(clean) < min(flawed):
            cands.insert(0, (max(clean) + min(flawed)) / 2)
        out[p["T"]] = [round(c, 4) for c in cands]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    lab, lrs, source = lab_settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny grid for the smoke test (seconds)")
    p.add_argument("--arms", nargs="+", default=[a for a in ARMS if a not in CUT], choices=list(ARMS))
    p.add_argument("--lengths", type=int, nargs="+", default=[20, 40], help="sequence lengths T")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="reported seeds")
    p.add_argument("--val-seed", type=int, default=100, help="seed of the rejection threshold's choice")
    p.add_argument(
        "--reject-quantiles",
        type=float,
        nargs="+",
        default=[0.5, 0.8],
        help="candidate max_perplexity: these quantiles of the warm-start samples' perplexity (val seed)",
    )
    p.add_argument(
        "--probe-samples", type=int, default=256, help="warm-start samples of the perplexity probe"
    )
    p.add_argument("--steps", type=int, default=lab.steps)
    p.add_argument("--tokens-per-step", type=int, default=lab.tokens_per_step)
    p.add_argument("--warm-steps", type=int, default=lab.warm_steps)
    p.add_argument("--warm-lr", type=float, default=lab.warm_lr)
    p.add_argument("--continuations", type=int, default=lab.continuations)
    p.add_argument("--curve-points", type=int, default=lab.curve_points)
    p.add_argument("--curve-continuations", type=int, default=lab.curve_continuations)
    p.add_argument("--trace-window", type=int, default=10, help="steps per point of the diagnostics' traces")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "toolbox_ablation")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--name", default="toolbox_ablation")
    p.add_argument("--report-only", action="store_true", help="rewrite the page from the existing JSON")
    args = p.parse_args(argv)
    args.lrs, args.lr_source = lrs, source
    if args.quick:
        args.lengths, args.seeds, args.probe_samples = [4], [0, 1], 16
        args.steps, args.warm_steps, args.tokens_per_step = 2, 2, 16
        args.continuations, args.curve_points, args.curve_continuations = 2, 1, 1
        args.trace_window, args.workers = 1, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.report_only:
        payload = json.loads((args.results / f"{args.name}.json").read_text(encoding="utf-8"))
        write_page(payload, args.results, args.name)
        return payload
    load_start = opd_lab.system_load()
    arms, trained, val_trained = list(args.arms), 0, 0
    cached = {r["key"] for r in read_runs(args.out / "runs.jsonl")}
    reject: dict[str, Any] = {}
    if "reject" in arms:
        probe_jobs = [make_job(args, "probe", "reject", n, args.val_seed, {}) for n in args.lengths]
        val_trained += runs_to_train(probe_jobs, args.out)
        probes = run_jobs(probe_jobs, args.out, workers=args.workers, runner=run_one)
        candidates = candidate_thresholds(probes, args.reject_quantiles)
        val_jobs = [
            make_job(args, "val", "reject", n, args.val_seed, {"reject": {"max_perplexity": c}})
            for n in args.lengths
            for c in candidates[n]
        ]
        val_trained += runs_to_train(val_jobs, args.out)
        val_runs = run_jobs(val_jobs, args.out, workers=args.workers, runner=run_one)
        reject = select_reject_threshold(probes, val_runs, candidates, args.reject_quantiles)
        print("reject thresholds:", reject["chosen"], flush=True)
    jobs = [
        make_job(
            args,
            "test",
            arm,
            n,
            s,
            {"reject": {"max_perplexity": reject["chosen"][str(n)]}} if arm == "reject" else {},
        )
        for n in sorted(args.lengths, reverse=True)  # longest first: the pool ends on short runs
        for arm in arms
        for s in args.seeds
    ]
    trained += runs_to_train(jobs, args.out)
    runs = run_jobs(jobs, args.out, workers=args.workers, runner=run_one)
    data = {
        "setup": {
            "arms": {a: {"agent": ARMS[a][0], **ARMS[a][1], "lr_of": ARMS[a][2]} for a in arms},
            "comparisons": {k: list(v) for k, v in COMPARISONS.items() if set(v) <= set(arms)},
            "lrs": args.lrs,
            "lr_source": args.lr_source,
            "lengths": args.lengths,
            "cut": [a for a in ARMS if a not in arms],
            "steps": args.steps,
            "tokens_per_step": args.tokens_per_step,
            "warm_steps": args.warm_steps,
            "warm_lr": args.warm_lr,
            "continuations": args.continuations,
            "val_seed": args.val_seed,
            "student": opd_lab.STUDENT,
        },
        "reject_selection": reject,
        "analysis": analyse(runs, arms),
        "system": {"lscpu": opd_lab.lscpu(), "load_start": load_start, "load_end": opd_lab.system_load()},
        "runs": [{k: v for k, v in r.items() if k != "job"} for r in runs],
    }
    data["invocations"] = previous_invocations(args.results / f"{args.name}.json", cached)
    current = {
        "runs_trained": trained,
        "validation_runs_trained": val_trained,
        "load_start": load_start,
        "load_end": data["system"]["load_end"],
    }
    if trained or val_trained or not data["invocations"]:
        data["invocations"].append(current)
    payload = write_report(
        args.name,
        args,
        title="Toolbox ablation on the OPD lab",
        body="",
        data=data,
        start=start,
        trained=trained,
    )
    current["seconds"] = payload["invocation"]["seconds"]
    payload["header"] = (args.results / f"{args.name}.md").read_text(encoding="utf-8").strip()
    raw = args.results / f"{args.name}.json"
    raw.write_text(json.dumps(opd_lab._rounded(payload), indent=1) + "\n", encoding="utf-8")
    payload = json.loads(raw.read_text(encoding="utf-8"))
    write_page(payload, args.results, args.name)
    return payload


def previous_invocations(path: Path, cached: set[str]) -> list[dict[str, Any]]:
    """The invocations recorded in an earlier JSON of this grid, if this one reused all of its runs.

    The grid is resumable: an invocation trains only the runs missing from ``runs.jsonl``, so the
    grid's wall time is the sum over the invocations that trained its runs. ``cached``: the run keys
    that were in ``runs.jsonl`` when this invocation started (a run trained again voids the history).
    """
    if not path.is_file():
        return []
    prev = json.loads(path.read_text(encoding="utf-8"))
    if not prev.get("runs") or not {r["key"] for r in prev["runs"]} <= cached:
        return []
    if "invocations" in prev:
        # An invocation that trained nothing only regenerated the page.
        return [
            i for i in prev["invocations"] if i.get("runs_trained") != 0 or i.get("validation_runs_trained")
        ]
    inv = prev.get("invocation", {})  # a JSON from before the history was kept
    return [{**inv, "load_start": prev["system"]["load_start"], "load_end": prev["system"]["load_end"]}]


def select_reject_threshold(
    probes: list[dict[str, Any]],
    val_runs: list[dict[str, Any]],
    candidates: dict[int, list[float]],
    quantiles: list[float],
) -> dict[str, Any]:
    """Per T, the candidate ``max_perplexity`` with the fewest expected errors on the validation seed."""
    out: dict[str, Any] = {"quantiles": quantiles, "candidates": {}, "chosen": {}, "scale": {}}
    for p in probes:
        t = p["T"]
        clean = [x for x, c in zip(p["perplexity"], p["clean"]) if c]
        flawed = [x for x, c in zip(p["perplexity"], p["clean"]) if not c]
        out["scale"][str(t)] = {
            "clean_fraction": len(clean) / len(p["clean"]),
            "median_clean": _median(clean),
            "median_flawed": _median(flawed),
            "max_clean": max(clean, default=math.nan),
            "min_flawed": min(flawed, default=math.nan),
            "samples": len(p["clean"]),
        }
        rows = []
        for c in candidates[t]:
            run = next(r for r in val_runs if r["T"] == t and r["extra"]["reject"]["max_perplexity"] == c)
            diag = run["diagnostics"].get("rollout/filter/rejected_fraction", {})
            trace = diag.get("trace", [[0, math.nan]])
            rows.append(
                {
                    "max_perplexity": c,
                    "expected_errors": run["metrics"]["expected_errors"],
                    "rejected_fraction": diag.get("mean", math.nan),
                    "rejected_first": trace[0][1],
                    "rejected_last": trace[-1][1],
                    "empty_steps": run["empty_steps"],
                }
            )
        out["candidates"][str(t)] = rows
        out["chosen"][str(t)] = min(rows, key=lambda r: (r["expected_errors"], r["max_perplexity"]))[
            "max_perplexity"
        ]
    return out


# ---------------------------------------------------------------------------------------------
# Analysis: every number of the page is computed here from the runs
# ---------------------------------------------------------------------------------------------
METRICS = ("expected_errors", "success", "reverse_kl", "forward_kl", "min_coverage", "eps_teacher")


def _median(values: list[float]) -> float:
    vals = sorted(values)
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def paired_delta(arm: list[float], base: list[float]) -> dict[str, float]:
    """Mean of ``arm - base`` (paired by seed) with a 95% Student-t interval over the seeds."""
    diffs = [a - b for a, b in zip(arm, base)]
    mean, std, n = opd_lab._mean_std(diffs)
    half = T95.get(int(n) - 1, 1.96) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def analyse(runs: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Mean ± std per arm and T, paired deltas against each comparison's reference, diagnostics."""
    lengths = sorted({r["T"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["method"], r["T"], r["seed"]): r for r in runs}
    scalars = {k: opd_lab.run_scalars(r) for k, r in by.items()}
    cells: dict[str, Any] = {}
    for arm in arms:
        cells[arm] = {}
        for t in lengths:
            rows = [scalars[(arm, t, s)] for s in seeds if (arm, t, s) in scalars]
            cell = {k: opd_lab._mean_std([row[k] for row in rows]) for k in METRICS}
            cell["per_seed_errors"] = [row["expected_errors"] for row in rows]
            cell["dropped_mode"] = sum(row["min_coverage"] < 0.1 for row in rows)
            diags: dict[str, Any] = {}
            for key in DIAGNOSTICS:
                got = [
                    by[(arm, t, s)]["diagnostics"][key]
                    for s in seeds
                    if key in by[(arm, t, s)]["diagnostics"]
                ]
                if got:
                    trace = [
                        [p[0], opd_lab._mean_std([g["trace"][i][1] for g in got])[0]]
                        for i, p in enumerate(got[0]["trace"])
                    ]
                    diags[key] = {"mean": opd_lab._mean_std([g["mean"] for g in got]), "trace": trace}
            cell["diagnostics"] = diags
            cell["empty_steps"] = opd_lab._mean_std([float(by[(arm, t, s)]["empty_steps"]) for s in seeds])
            cells[arm][str(t)] = cell
    deltas: dict[str, Any] = {}
    for technique, (arm, ref) in COMPARISONS.items():
        if arm not in arms or ref not in arms:
            continue
        deltas[technique] = {}
        for t in lengths:
            pair = [s for s in seeds if (arm, t, s) in scalars and (ref, t, s) in scalars]
            deltas[technique][str(t)] = {
                k: paired_delta(
                    [scalars[(arm, t, s)][k] for s in pair], [scalars[(ref, t, s)][k] for s in pair]
                )
                for k in ("expected_errors", "success", "reverse_kl")
            }
    return {"arms": arms, "lengths": lengths, "seeds": seeds, "cells": cells, "deltas": deltas}


# ---------------------------------------------------------------------------------------------
# The page and the plot (rendered from the JSON payload only)
# ---------------------------------------------------------------------------------------------
def _ms(ms: list[float], digits: int = 3) -> str:
    mean, std, _ = ms
    return "n/a" if mean != mean else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _delta(d: dict[str, float], digits: int = 3) -> str:
    if d["mean"] != d["mean"]:
        return "n/a"
    interval = "" if d["lo"] != d["lo"] else f" [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"
    return f"{d['mean']:+.{digits}f}{interval}"


def diagnostic_text(cell: dict[str, Any]) -> str:
    """A technique's own logged diagnostics of one cell, in words."""
    d = cell["diagnostics"]
    parts = []
    if "lmbda" in d and any(p[1] != 1.0 for p in d["lmbda"]["trace"]):
        trace, n = d["lmbda"]["trace"], len(d["lmbda"]["trace"])
        picks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
        parts.append(
            "lmbda (window from step) " + ", ".join(f"{trace[i][0]}: {trace[i][1]:.2f}" for i in picks)
        )
    if "rollout/filter/rejected_fraction" in d:
        parts.append(f"rejected {_ms(d['rollout/filter/rejected_fraction']['mean'], 2)} of samples")
        parts.append(f"steps with every sample rejected (no update) {_ms(cell['empty_steps'], 1)}")
    if "rollout/tip_kept_fraction" in d:
        parts.append(f"TIP kept {_ms(d['rollout/tip_kept_fraction']['mean'], 2)} of tokens")
    if "rollout/tip_weight_mean" in d:
        parts.append(f"TIP mean weight {_ms(d['rollout/tip_weight_mean']['mean'], 3)}")
    if "rollout/external_reward" in d:
        trace = d["rollout/external_reward"]["trace"]
        parts.append(f"reward {trace[0][1]:.2f} → {trace[-1][1]:.2f} (first → last window)")
    if "train/importance_weight" in d:
        parts.append(f"IS weight {_ms(d['train/importance_weight']['mean'], 2)}")
    return "; ".join(parts) or "-"


#: A run "collapsed" when a sample is a teacher sequence with probability below this.
COLLAPSE = 0.5


def collapsed(payload: dict[str, Any], arm: str, t: int) -> tuple[int, int]:
    """``(runs with final success < COLLAPSE, runs)`` of an arm at T (from the JSON's runs)."""
    rs = [r for r in payload["runs"] if r["method"] == arm and r["T"] == t and r["kind"] == "test"]
    return sum(r["metrics"]["success"] < COLLAPSE for r in rs), len(rs)


def curve(payload: dict[str, Any], arm: str, t: int) -> list[dict[str, float]]:
    """Per evaluation step: mean expected errors over seeds and how many seeds had success < COLLAPSE."""
    rs = [r for r in payload["runs"] if r["method"] == arm and r["T"] == t and r["kind"] == "test"]
    out = []
    for i, point in enumerate(rs[0]["curve"]):
        errs = [r["curve"][i]["expected_errors"] for r in rs]
        low = sum(r["curve"][i]["success"] < COLLAPSE for r in rs)
        out.append({"step": point["step"], "errors": sum(errs) / len(errs), "collapsed": low, "n": len(rs)})
    return out


def lower_in(payload: dict[str, Any], arm: str, ref: str, t: int) -> tuple[int, int]:
    """``(seeds where arm has fewer expected errors than ref, paired seeds)`` at T (from the JSON's runs)."""
    errs = {
        (r["method"], r["seed"]): r["metrics"]["expected_errors"]
        for r in payload["runs"]
        if r["T"] == t and r["kind"] == "test"
    }
    seeds = [s for (m, s) in errs if m == arm and (ref, s) in errs]
    return sum(errs[(arm, s)] < errs[(ref, s)] for s in seeds), len(seeds)


def verdict(technique: str, payload: dict[str, Any]) -> str:
    """One line per technique: where the paired 95% interval of the error delta excludes 0, and the numbers."""
    a = payload["analysis"]
    arm, ref = payload["setup"]["comparisons"][technique]
    parts, effects = [], []
    for t in a["lengths"]:
        d = a["deltas"][technique][str(t)]["expected_errors"]
        cx, cy = a["cells"][arm][str(t)], a["cells"][ref][str(t)]
        (kx, n), (ky, _) = collapsed(payload, arm, t), collapsed(payload, ref, t)
        low, pairs = lower_in(payload, arm, ref, t)
        if d["lo"] == d["lo"] and d["hi"] < 0:
            effects.append(f"lowers errors at T={t}")
        elif d["lo"] == d["lo"] and d["lo"] > 0:
            effects.append(f"raises errors at T={t}")
        elif pairs > 1 and low in (0, pairs):
            effects.append(
                f"{'lower' if low else 'higher'} in all {pairs} seeds at T={t}, interval includes 0"
            )
        else:
            effects.append(f"no effect within seed spread at T={t}")
        parts.append(
            f"T={t}: errors {_ms(cx['expected_errors'])} vs {_ms(cy['expected_errors'])}, Δ {_delta(d)}, "
            f"lower in {low}/{pairs} seeds; success < {COLLAPSE:g} in {kx}/{n} vs {ky}/{n} seeds; "
            f"a mode dropped in {cx['dropped_mode']}/{n} vs {cy['dropped_mode']}/{n}"
        )
    head = "; ".join(effects)
    return f"- **{technique}** (`{arm}` vs `{ref}`): **{head}**. " + ". ".join(parts) + "."


def _curve_text(payload: dict[str, Any], arm: str, t: int) -> str:
    return ", ".join(
        f"{p['step']}: {p['errors']:.2f} ({p['collapsed']}/{p['n']})" for p in curve(payload, arm, t)
    )


def reading(payload: dict[str, Any]) -> list[str]:
    """The mechanisms behind the verdicts, each with its numbers from the JSON (claims checked on the data)."""
    a, setup = payload["analysis"], payload["setup"]
    arms, cells, long = a["arms"], a["cells"], max(a["lengths"])
    out = []
    base = curve(payload, BASELINE, long)
    mid, n = base[1:-1], base[-1]["n"]
    recovers = bool(mid) and max(p["collapsed"] for p in mid) == n and base[-1]["collapsed"] == 0
    out.append(
        f"- **The baseline is itself unstable at T={long}**"
        + (" — it collapses and recovers within the budget" if recovers else "")
        + f": mean expected errors by step (seeds with success < {COLLAPSE:g}) {_curve_text(payload, BASELINE, long)}. "
        "Every verdict compares arms at the last step only, so it also measures where each arm is in such a "
        "cycle when the budget ends."
    )
    schedules = [x for x in ("warmup", "industrial") if x in arms]
    if schedules:
        out.append(
            "- **The lambda schedules**: while lambda < 1 they train on teacher references too; at "
            f"T={long}, by step (seeds with success < {COLLAPSE:g}): "
            + "; ".join(f"`{x}` {_curve_text(payload, x, long)}" for x in schedules)
            + ". Compare the baseline above: the on-policy phase, and its collapse, come later, with fewer "
            "steps left to recover."
        )
    tips = [x for x in ("tip_weight", "tip_filter") if x in arms]
    if tips:
        out.append(
            "- **TIP**: "
            + "; ".join(
                f"`{x}` at T={t}: {diagnostic_text(cells[x][str(t)])}, success {_ms(cells[x][str(t)]['success'])} "
                f"vs {_ms(cells[BASELINE][str(t)]['success'])}"
                for x in tips
                for t in a["lengths"]
            )
            + ". The teacher is near-deterministic, so the score is about KL(pT || pS) = -log pS(correct): "
            "the weighting moves the loss onto the tokens the student already gets wrong."
        )
    rej = payload.get("reject_selection") or {}
    if "reject" in arms and rej:
        key = str(long)
        cands = rej["candidates"][key]
        val = next(c for c in cands if c["max_perplexity"] == rej["chosen"][key])
        others = [c for c in cands if c is not val]
        d = cells["reject"][key]
        trace = d["diagnostics"]["rollout/filter/rejected_fraction"]["trace"]
        errs = curve(payload, "reject", long)
        window = payload["settings"].get("trace_window", "")
        out.append(
            f"- **Rejection** (T={long}): the chosen threshold {rej['chosen'][key]:g} lies between the "
            "probe's clean and flawed samples, so it rejects every flawed sample: at first most of them "
            f"({val['rejected_first']:.2f} in the first {window} steps on seed {setup['val_seed']}, "
            f"{trace[0][1]:.2f} on the reported seeds). On seed {setup['val_seed']} the kept clean samples "
            f"sufficed and the rejected fraction fell to {val['rejected_last']:.2f} by the last window. On the "
            f"reported seeds it rose to {trace[-1][1]:.2f}: {_ms(d['empty_steps'], 1)} of {setup['steps']} "
            "steps had every sample rejected, hence no update, and the student stays where it is (mean errors "
            + ", ".join(f"step {p['step']}: {p['errors']:.2f}" for p in errs[1:])
            + "). The looser candidates did the same on the validation seed ("
            + "; ".join(
                f"{c['max_perplexity']:g}: rejected {c['rejected_last']:.2f} in the last window, "
                f"{c['empty_steps']} steps without update"
                for c in others
            )
            + "). The baseline goes through the same collapse and recovers by training on its own flawed "
            "samples (first bullet); rejection withholds exactly those."
        )
    ext = [x for x in ("beta_ext0.5", "beta_ext2") if x in arms]
    if ext:
        out.append(
            "- **Reward extrapolation**: the reward is 0 for every sample until some sample is a teacher sequence, "
            "so the leave-one-out advantage is 0 and the arm follows the baseline step for step until then "
            f"(T={long}: "
            + "; ".join(f"`{x}` {_curve_text(payload, x, long)}" for x in ext)
            + "). Once it pays, it rewards either phrasing and the student settles on one: smaller-mode share "
            + "; ".join(
                f"`{x}` {_ms(cells[x][str(t)]['min_coverage'], 2)} at T={t} (dropped {cells[x][str(t)]['dropped_mode']}/{n})"
                for x in ext
                for t in a["lengths"]
            )
            + f", baseline {_ms(cells[BASELINE][str(long)]['min_coverage'], 2)} at T={long}."
        )
    if "minillm" in arms and "reinforce" in arms:
        m, r = cells["minillm"][str(long)], cells["reinforce"][str(long)]
        out.append(
            f"- **MiniLLM vs REINFORCE** at T={long}: `minillm` {_curve_text(payload, 'minillm', long)}; "
            f"`reinforce` {_curve_text(payload, 'reinforce', long)}. Smaller-mode share {_ms(m['min_coverage'], 2)} "
            f"vs {_ms(r['min_coverage'], 2)} (dropped {m['dropped_mode']}/{n} vs {r['dropped_mode']}/{n}); "
            f"MiniLLM's exact single-step term and its {setup['arms']['minillm']['teacher_mix']:.0%} teacher "
            "tokens in the samples (likely both) keep its "
            "samples on the teacher's paths, where REINFORCE's sampled reverse-KL return seeks one mode."
        )
    return out


def invocation_lines(payload: dict[str, Any]) -> list[str]:
    """The wall time of the grid over the invocations that trained it (it is resumable)."""
    invs = payload.get("invocations", [])

    def trained(i: dict[str, Any]) -> str:
        if i.get("runs_trained") is None:
            return "runs trained: not recorded"
        return (
            f"{i['runs_trained']} reported runs and {i.get('validation_runs_trained', 0)} validation runs "
            "(perplexity probe, rejection threshold) trained"
        )

    if len(invs) == 1:
        return [f"- In this invocation: {trained(invs[0])}; all in the wall time above"]
    parts = [
        f"{i['seconds'] / 60:.1f} min ({trained(i)}; load at start `{i['load_start'].split('load average: ')[-1]}`)"
        for i in invs
    ]
    total = sum(i["seconds"] for i in invs) / 60
    return [f"- Wall time of the grid: {total:.1f} min over {len(invs)} invocations: " + "; ".join(parts)]


def write_page(payload: dict[str, Any], results: Path, name: str) -> Path:
    """Render ``<results>/<name>.md`` and ``<name>.png`` from the JSON payload."""
    a, setup, system, rej = (
        payload["analysis"],
        payload["setup"],
        payload["system"],
        payload["reject_selection"],
    )
    arms, lengths, cells = a["arms"], a["lengths"], a["cells"]
    lines = [payload["header"], ""]
    lines += ["- `lscpu`: " + "; ".join(system["lscpu"])] if system["lscpu"] else []
    lines += [
        f"- Load (`uptime`, the machine is shared): start `{system['load_start']}`; end `{system['load_end']}`",
        *invocation_lines(payload),
        f"- Reported seeds {', '.join(map(str, a['seeds']))}; learning rates from {setup['lr_source']}: "
        + ", ".join(f"`{k}` {v:g}" for k, v in setup["lrs"].items())
        + f"; the rejection threshold chosen on validation seed {setup['val_seed']} only.",
        "",
        "## Setup",
        "",
        f"The OPD lab's task, teacher, student ({setup['student']}) and warm start ({setup['warm_steps']} "
        f"supervised-KD steps at lr {setup['warm_lr']:g}, identical for every arm of a seed and T), then "
        f"{setup['steps']} steps of {setup['tokens_per_step']} completion tokens each (k samples per prompt "
        "count k times), Adam, the lab's exact metrics (`exact_student_metrics`, "
        f"{setup['continuations']} continuations per first-mistake event). The lambda schedules follow "
        "training progress (`agent.set_progress(step, steps)` before every update, as the trainer does).",
        "",
        "| arm | agent | configuration | lr (from the lab's arm) |",
        "|---|---|---|---|",
    ]
    for arm in arms:
        cfg = dict(setup["arms"][arm])
        agent, lr_of = cfg.pop("agent"), cfg.pop("lr_of")
        desc = ", ".join(f"{k}={v}" for k, v in cfg.items())
        if arm == "reject":
            desc += (
                ", reject={max_perplexity: "
                + ", ".join(f"{v:g} at T={t}" for t, v in rej["chosen"].items())
                + "}"
            )
        lines.append(f"| `{arm}` | {agent} | {desc} | {setup['lrs'][lr_of]:g} (`{lr_of}`) |")
    lines += [
        "",
        "Reward of the `beta_ext` arms: the lab's verifier, 1 when the sampled completion is one of the "
        "teacher's two sequences of length T (the lab's *success* event), else 0; leave-one-out baseline over "
        "the batch. `beta_ext = 0` is the baseline itself (the reward term has weight 0 and is never computed).",
        "",
        "## Verdicts",
        "",
        "Criterion: the paired difference in expected errors per sequence (arm − reference, same seed) and its "
        f"95% Student-t interval over the {len(a['seeds'])} seeds; an effect is claimed only where the interval "
        "excludes 0.",
        "",
        *[verdict(t, payload) for t in setup["comparisons"]],
        "",
        "### What happened (training curves and diagnostics below)",
        "",
        *reading(payload),
        "",
    ]
    for t in lengths:
        lines += [
            f"## T = {t}",
            "",
            "Mean ± std over seeds; Δ = paired difference vs the reference (`baseline`; MiniLLM vs `reinforce`) "
            "with its 95% t interval. Modes dropped: seeds where the smaller phrasing gets < 10% of the valid mass.",
            "",
            "| arm | expected errors | Δ errors [95%] | success | Δ success | KL(s‖t) | KL(t‖s) | smaller-mode share (dropped) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm in arms:
            c = cells[arm][str(t)]
            tech = next((k for k, v in setup["comparisons"].items() if v[0] == arm), None)
            d = a["deltas"][tech][str(t)] if tech else None
            lines.append(
                f"| `{arm}` | {_ms(c['expected_errors'])} | {_delta(d['expected_errors']) if d else '—'} | "
                f"{_ms(c['success'])} | {_delta(d['success']) if d else '—'} | {_ms(c['reverse_kl'], 2)} | "
                f"{_ms(c['forward_kl'], 3)} | {_ms(c['min_coverage'], 2)} ({c['dropped_mode']}/{len(a['seeds'])}) |"
            )
        lines += ["", "Diagnostics each technique logs (mean over steps, then mean ± std over seeds):", ""]
        lines += ["| arm | diagnostics |", "|---|---|"]
        lines += [f"| `{arm}` | {diagnostic_text(cells[arm][str(t)])} |" for arm in arms]
        steps = [p["step"] for p in curve(payload, BASELINE, t)]
        lines += [
            "",
            f"During training: mean expected errors over seeds (in brackets, seeds with success < {COLLAPSE:g}) "
            "at each evaluation step after the warm start:",
            "",
            "| arm | " + " | ".join(f"step {k}" for k in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for arm in arms:
            cells_txt = [f"{p['errors']:.2f} ({p['collapsed']}/{p['n']})" for p in curve(payload, arm, t)]
            lines.append(f"| `{arm}` | " + " | ".join(cells_txt) + " |")
        lines.append("")
    lines += [f"![expected errors per arm]({name}.png)", ""]
    if rej:
        lines += [
            "## Rejection threshold (validation seed only)",
            "",
            f"Warm-start student, validation seed {setup['val_seed']}: perplexity of its samples (exp of the "
            "mean negative log-probability per token, the filter's `sequence_perplexity`). Candidates: the "
            "midpoint between the largest clean and the smallest flawed perplexity (where they separate), and "
            f"the {', '.join(f'{q:g}' for q in rej['quantiles'])} quantiles of the perplexity; each trained on the "
            "validation seed, the one with the fewest expected errors chosen.",
            "",
            "| T | clean samples | perplexity clean: median, max / flawed: min, median | candidate: expected errors "
            "(rejected fraction) | chosen |",
            "|---|---|---|---|---|",
        ]
        for t, scale in rej["scale"].items():
            cands = "; ".join(
                f"{c['max_perplexity']:g}: {c['expected_errors']:.3f} ({c['rejected_fraction']:.2f})"
                for c in rej["candidates"][t]
            )
            lines.append(
                f"| {t} | {scale['clean_fraction']:.2f} of {scale['samples']} | {scale['median_clean']:.3f}, "
                f"{scale['max_clean']:.3f} / {scale['min_flawed']:.3f}, {scale['median_flawed']:.3f} | {cands} | "
                f"{rej['chosen'][t]:g} |"
            )
        lines.append("")
    lines += [
        "## Notes",
        "",
        f"- {len(a['seeds'])} seeds: the intervals are wide (t quantile {T95.get(len(a['seeds']) - 1, 1.96):.2f} "
        f'for {len(a["seeds"]) - 1} degrees of freedom); "no effect" means none resolved at this size, not that '
        "the option does nothing.",
        "- `baseline` is the lab's `gkd_l1_jsd0.5` arm (same configuration, warm start, seeds and lr), "
        "`reinforce` its `reinforce_rkl` arm; MiniLLM reuses REINFORCE's lr, not tuned.",
        (
            "- Cut to fit the time budget: "
            + ", ".join(f"`{c}`" for c in setup["cut"])
            + " (run them with `--arms`)."
            if setup["cut"]
            else "- Nothing was cut: every requested arm, at T = "
            + " and ".join(str(t) for t in lengths)
            + f", {len(a['seeds'])} seeds each, fit the time budget."
        ),
        "- Rejected samples are dropped without resampling (`reject_resample: 0`), so the rejection arm trains "
        "on fewer sequences per step than the others.",
        "",
    ]
    page = results / f"{name}.md"
    page.write_text("\n".join(lines), encoding="utf-8")
    plot(payload, results / f"{name}.png")
    print(f"wrote {page}")
    return page


def plot(payload: dict[str, Any], path: Path) -> None:
    """Expected errors per arm (one dot per seed, bar = mean), one panel per T; lambda schedules."""
    plt = pyplot()
    a = payload["analysis"]
    arms, lengths, cells = a["arms"], a["lengths"], a["cells"]
    fig, axes = plt.subplots(1, len(lengths) + 2, figsize=(5 * len(lengths) + 9, 4), squeeze=False)
    for ax, t in zip(axes[0], lengths):
        for i, arm in enumerate(arms):
            c = cells[arm][str(t)]
            ax.scatter([i] * len(c["per_seed_errors"]), c["per_seed_errors"], s=14, color="C0", alpha=0.7)
            ax.hlines(c["expected_errors"][0], i - 0.3, i + 0.3, color="C3")
        ax.axhline(cells[BASELINE][str(t)]["expected_errors"][0], ls="--", color="grey", lw=0.8)
        ax.set_xticks(range(len(arms)), arms, rotation=40, ha="right", fontsize=7)
        ax.set(yscale="log", ylabel="expected errors per sequence", title=f"T = {t} (dots: seeds, bar: mean)")
    ax, long = axes[0][-2], max(lengths)
    for i, arm in enumerate(arms):
        points = curve(payload, arm, long)
        style = "--" if i >= 10 else "-"  # the default colour cycle has 10 colours
        ax.plot([p["step"] for p in points], [p["errors"] for p in points], style, marker=".", label=arm)
    ax.set(xlabel="training step", ylabel="expected errors (mean over seeds)", yscale="log")
    ax.set_title(f"T = {long} during training")
    ax.legend(fontsize=6)
    ax = axes[0][-1]
    for arm in arms:
        lam = cells[arm][str(long)]["diagnostics"].get("lmbda")
        if lam and (arm == BASELINE or len({p[1] for p in lam["trace"]}) > 1):
            label = "constant 1 (other GKD arms)" if arm == BASELINE else arm
            ax.plot([p[0] for p in lam["trace"]], [p[1] for p in lam["trace"]], marker=".", label=label)
    ax.set(
        xlabel="training step",
        ylabel="lambda (window mean)",
        title="on-policy fraction lambda",
        ylim=(-0.05, 1.05),
    )
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
