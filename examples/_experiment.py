"""Shared machinery of the experiment scripts (``examples/e1_*.py`` ... ``e4_*.py``).

An experiment is a list of :class:`Job` (one training run: a method, a seed, an agent config),
run by :func:`run_jobs` in a pool of worker processes (tiny models use one or two cores poorly, so
two single-threaded workers beat one two-threaded process on a 2-core machine). Every finished run
is appended to ``<out>/runs.jsonl`` at once, so an interrupted experiment resumes where it stopped
(runs already in the file are skipped). :func:`write_report` turns the runs into the published
artefacts: a markdown page, the raw JSON, and the plots.

Each run goes through the toolkit's own :class:`rl_distill.trainer.Trainer` with pre-built models:
the held-out metrics are the trainer's (``eval/...`` sampled, ``eval/greedy/...`` greedy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_distill.compare import mean_std

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass
class Job:
    """One training run of an experiment.

    Attributes:
        key: unique id within the experiment (also the run's folder name).
        method: the label the tables group by.
        seed: ``train.seed`` (sampling stream, batch order); the data split stays fixed.
        teacher: path of the teacher (``save_pretrained`` folder with tokenizer).
        student: path of the student's starting checkpoint.
        data: task spec for :func:`tiny_teachers.task_data`: ``task``, ``seed``, ``num_train``,
            ``num_eval`` and task options.
        agent: config section ``agent`` (with ``name``).
        train: config section ``train`` (``output_dir`` is set by the runner).
        eval: config section ``eval``.
        labels: extra fields copied into the result (problem length, alpha, ...).
        threads: torch threads of the worker.
        model: extra fields of config section ``model`` (e.g. ``student_layers`` when a ``build`` hook
            of :func:`run_job` derives the student from the teacher).
    """

    key: str
    method: str
    seed: int
    teacher: str
    student: str
    data: dict[str, Any]
    agent: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    model: dict[str, Any] = field(default_factory=dict)


def load_pair(teacher: str, student: str) -> tuple[Any, Any, Any]:
    """``(teacher, student, tokenizer)`` from two local folders, teacher frozen, student trainable."""
    from rl_distill.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(teacher)
    t = load_causal_lm(teacher, dtype="float32", device="cpu").eval().requires_grad_(False)
    s = load_causal_lm(student, dtype="float32", device="cpu").train()
    return t, s, tokenizer


def task_from_spec(spec: dict[str, Any]) -> Any:
    """The :class:`rl_distill.tasks.TaskData` of a job's ``data`` spec (same split as the teachers)."""
    sys.path.insert(0, str(HERE))
    from tiny_teachers import task_data

    spec = dict(spec)
    return task_data(spec.pop("task"), spec.pop("seed"), spec.pop("num_train"), spec.pop("num_eval"), **spec)


def run_job(
    job: Job,
    out_root: str,
    extra_eval: Callable[[Any, Job], dict[str, Any]] | None = None,
    *,
    build: Callable[[Job], tuple[tuple[Any, Any, Any], Any]] | None = None,
) -> dict[str, Any]:
    """Train one job with :class:`~rl_distill.trainer.Trainer`; return its result row.

    The row holds the job's identity, the held-out metrics before and after, the eval curve
    (every ``train.eval_every`` steps), the last training statistics and the wall time.

    Args:
        job: the run.
        out_root: folder of the runs' logs.
        extra_eval: called as ``extra_eval(trainer, job)`` after training; its result is stored
            under ``"extra"`` (experiment-specific metrics of the trained student).
        build: called as ``build(job)`` to make ``((teacher, student, tokenizer), task)`` (e.g. a student
            derived from the teacher); default: :func:`load_pair` of ``job.teacher`` and ``job.student``
            and :func:`task_from_spec` of ``job.data``.
    """
    import torch

    from rl_distill.config import config_from_dict
    from rl_distill.logger import read_jsonl
    from rl_distill.trainer import Trainer

    torch.set_num_threads(job.threads)
    out_dir = Path(out_root) / job.key.replace("|", "_").replace("=", "")
    if build is not None:
        models, task = build(job)
    else:
        models, task = load_pair(job.teacher, job.student), task_from_spec(job.data)
    raw = {
        "model": {"teacher": job.teacher, "device": "cpu", **job.model},
        "data": {"task": job.data["task"], "num_train": len(task.train), "num_eval": len(task.eval)},
        "agent": job.agent,
        "train": {
            "seed": job.seed,
            "tensorboard": False,
            "save_final": False,
            "threads": job.threads,
            **job.train,
            "output_dir": str(out_dir),
        },
        "eval": {"num_samples": 4, **job.eval},
    }
    trainer = Trainer(config_from_dict(raw), models=models, task=task)
    start = time.perf_counter()
    result = trainer.train()
    rows = read_jsonl(out_dir / "metrics.jsonl")
    curve = [
        {"step": r["step"], **{k: v for k, v in r.items() if k.startswith("eval/")}}
        for r in rows
        if any(k.startswith("eval/") for k in r)
    ]
    last_train = next((r for r in reversed(rows) if "train/loss" in r), {})
    extra = extra_eval(trainer, job) if extra_eval is not None else None
    return {
        "key": job.key,
        "method": job.method,
        "seed": job.seed,
        **job.labels,
        "before": result.before,
        "after": result.after,
        "curve": curve,
        "last_train": {k: v for k, v in last_train.items() if k.startswith(("train/", "rollout/"))},
        "train_seconds": result.seconds,
        "wall_seconds": time.perf_counter() - start,
        "extra": extra,
        "job": dataclasses.asdict(job),
    }


def die_with_parent() -> None:
    """Make this worker receive SIGTERM when its parent dies (Linux; elsewhere nothing).

    Without it, killing an experiment leaves its pool workers training on, orphaned.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def read_runs(path: Path) -> list[dict[str, Any]]:
    """The finished runs recorded in a ``runs.jsonl`` (a torn last line is ignored)."""
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs


def run_jobs(
    jobs: Sequence[Job],
    out: Path,
    *,
    workers: int = 2,
    runner: Callable[[Job, str], dict[str, Any]] = run_job,
) -> list[dict[str, Any]]:
    """Run the jobs not yet in ``out/runs.jsonl`` in ``workers`` processes; return all runs of ``jobs``.

    Each finished run is appended (one JSON line, flushed) as soon as it ends, so a killed experiment
    loses only the runs in flight. A failing run stops the experiment with its error.
    """
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("job keys must be unique")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = {r["key"] for r in read_runs(log)}
    todo = [j for j in jobs if j.key not in done]
    print(f"{len(jobs)} runs, {len(done & set(keys))} already in {log}, {len(todo)} to run", flush=True)
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as fh:

        def record(row: dict[str, Any], i: int) -> None:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            elapsed = time.perf_counter() - start
            print(f"[{i}/{len(todo)}] {row['key']}: {summary_line(row)} ({elapsed:.0f}s)", flush=True)

        if workers <= 1:
            for i, job in enumerate(todo, 1):
                record(runner(job, str(out / "runs")), i)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=die_with_parent
            ) as pool:
                futures = [pool.submit(runner, job, str(out / "runs")) for job in todo]
                for i, fut in enumerate(as_completed(futures), 1):
                    record(fut.result(), i)
    by_key = {r["key"]: r for r in read_runs(log)}
    return [by_key[k] for k in keys]


def summary_line(row: dict[str, Any]) -> str:
    """A one-line digest of a run's final metrics (the first few numeric ``after`` entries)."""
    after = row.get("after", {})
    keys = [k for k in ("eval/greedy/exact_match", "eval/reverse_kl", "eval/jsd") if k in after]
    keys = keys or list(after)[:3]
    return ", ".join(f"{k.removeprefix('eval/')}={after[k]:.4f}" for k in keys)


def group_stats(
    runs: Sequence[dict[str, Any]], by: Sequence[str], metric: Callable[[dict[str, Any]], float]
) -> dict[tuple[Any, ...], tuple[float, float, int]]:
    """``{group: (mean, sample std, n)}`` of ``metric(run)`` over the runs of each group (seeds)."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in by), []).append(metric(run))
    return {g: (*mean_std(v), len(v)) for g, v in groups.items()}


def fmt(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std`` with ``digits`` decimals."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def machine() -> str:
    """The machine, in words: CPU model, cores, torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


#: Repository folders whose paths a report may quote (found again in a path recorded in another checkout).
REPO_FOLDERS = ("artifacts", "runs", "docs", "examples")


def relative(path: str | Path) -> str:
    """``path`` relative to the repository (for reports), else as given.

    A path recorded in another checkout (a page rebuilt from its JSON elsewhere) is cut at its first
    repository folder (``artifacts/``, ``runs/``...), so the page does not depend on where it is rebuilt.
    """
    resolved = Path(path).resolve()
    if resolved.is_relative_to(REPO):
        return str(resolved.relative_to(REPO))
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part in REPO_FOLDERS and Path(path).is_absolute():
            return str(Path(*parts[i:]))
    return str(path)


def command_line() -> str:
    """The command that ran this experiment (for the report)."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def runs_to_train(jobs: Sequence[Job], out: Path) -> int:
    """How many of ``jobs`` are not yet in ``out/runs.jsonl`` (i.e. will train in this invocation)."""
    done = {r.get("key") for r in read_runs(Path(out) / "runs.jsonl")}
    return sum(1 for j in jobs if j.key not in done)


def _setting(text: Any) -> Any:
    """A value of a report's ``settings`` (recorded as ``str(value)``) back as a Python value."""
    if not isinstance(text, str):
        return text
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # paths, choices


def cached_report(args: Any, name: str) -> tuple[Any, dict[str, Any]]:
    """``(args, payload)`` for ``--report-only``: the raw JSON ``<args.results>/<name>.json`` of a
    finished experiment and the arguments it ran with.

    The returned namespace is ``args`` with every recorded setting of the run put back (so the page
    describes the run that made the data, not this invocation's defaults); ``results`` and ``name``
    stay as given. Nothing is trained.

    Raises:
        SystemExit: no such JSON.
    """
    path = Path(args.results) / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --report-only rebuilds a page from its raw JSON")
    payload = json.loads(path.read_text(encoding="utf-8"))
    restored = argparse.Namespace(**vars(args))
    for key, value in payload.get("settings", {}).items():
        if key in ("results", "name", "report_only") or not hasattr(args, key):
            continue
        current = getattr(args, key)
        value = _setting(value)
        if isinstance(current, Path) and isinstance(value, str):
            value = Path(value)
        setattr(restored, key, value)
    return restored, payload


def run_minutes(runs: Sequence[dict[str, Any]]) -> float:
    """The recorded time of the runs, summed over runs (``wall_seconds`` of each), in minutes."""
    return sum(r.get("wall_seconds", 0.0) for r in runs) / 60


def write_report(
    name: str,
    args: Any,
    *,
    title: str,
    body: str,
    data: dict[str, Any],
    start: float,
    trained: int | None = None,
    cached: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<args.results>/<name>.md`` (command, machine, seeds, time, body) and ``<name>.json`` (raw data).

    The time line says what happened in this invocation: when no run trained in it (every run was
    read from ``runs.jsonl``, or the page is rebuilt from its raw JSON with ``cached``), the page says
    "regenerated from cached runs; original run time N min", N being the recorded per-run times
    summed; otherwise it gives this invocation's wall time and how many runs trained in it.

    Args:
        name: base name of the files.
        args: the experiment's parsed arguments (``results``, ``seeds``; all of them are recorded
            under ``settings`` in the JSON).
        title: the page title.
        body: markdown after the header.
        data: the raw data (its ``runs`` give the summed run time).
        start: ``time.perf_counter()`` at the start of the invocation.
        trained: runs trained in this invocation (see :func:`runs_to_train`). ``None``: inferred, 0
            when the invocation was shorter than the shortest recorded run (no run can have trained
            in it), else unknown.
        cached: the raw JSON the page is rebuilt from (``--report-only``, see :func:`cached_report`):
            its command, machine and seeds head the page and the JSON is left as it is.

    Returns:
        The JSON payload.
    """
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - start
    runs = data.get("runs", [])
    minutes = run_minutes(runs)
    if cached is not None:
        trained = 0
    elif trained is None:
        shortest = min((r.get("wall_seconds", 0.0) for r in runs), default=0.0)
        trained = 0 if runs and seconds < shortest else None
    source = cached if cached is not None else {}
    command = source.get("command", command_line())
    where = source.get("machine") or machine()
    seeds = source.get("seeds", list(args.seeds))
    summed = "summed over runs (each on one worker; several workers in parallel)"
    if trained == 0:
        timing = f"- Time: regenerated from cached runs; original run time {minutes:.1f} min, {summed}\n"
    else:
        count = (
            ""
            if trained is None
            else f"; {trained} of {len(runs)} runs trained in it, the rest read from cache"
        )
        timing = (
            f"- Wall time of this invocation: {seconds / 60:.1f} min{count}; time of the runs, {summed}: "
            f"{minutes:.1f} min\n"
        )
    regenerated = (
        "- Page regenerated from the raw data by the same script with `--report-only` (no training)\n"
        if cached is not None
        else ""
    )
    header = (
        f"# {title}\n\n"
        f"- Command: `{command}`\n"
        f"- Machine: {where}\n"
        f"- Seeds: {', '.join(map(str, seeds))} (`train.seed`: sampling and batch order; data split fixed)\n"
        + timing
        + regenerated
        + f"- Raw data: [`{name}.json`]({name}.json)\n\n"
    )
    md = results_dir / f"{name}.md"
    md.write_text(header + body.rstrip() + "\n", encoding="utf-8")
    print(f"wrote {md}")
    if cached is not None:
        return cached
    payload = {
        "command": command,
        "machine": where,
        "seeds": list(args.seeds),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "invocation": {"seconds": seconds, "runs_trained": trained},
        **data,
    }
    (results_dir / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return payload


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
