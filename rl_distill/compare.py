"""Compare agents or configs on the same seeds: a markdown table and a learning-curve plot.

Each config runs once per seed (``train.seed``; the data split and the evaluation sampler stay
fixed), in ``<out>/<config name>/seed-<s>/``. The table reports the mean ± sample standard deviation
over seeds of every final ``eval/`` metric; the plot shows one metric against the step (mean over
seeds, with a ±1 std band), from each run's ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rl_distill.config import load_config
from rl_distill.logger import read_jsonl
from rl_distill.trainer import Trainer

#: What :func:`compare` writes at the top of ``out_dir``.
RESULT_FILES = ("comparison.md", "comparison.json", "learning_curve.png")


@dataclass
class RunSummary:
    """One config across seeds.

    Attributes:
        name: the config's label (file stem, made unique).
        config_path: the YAML file.
        final: per seed, the final held-out metrics.
        curves: per seed, ``[(step, value), ...]`` of the plotted metric.
    """

    name: str
    config_path: Path
    final: dict[int, dict[str, float]] = field(default_factory=dict)
    curves: dict[int, list[tuple[int, float]]] = field(default_factory=dict)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """File stems, suffixed ``-2``, ``-3`` ... where two configs share one."""
    seen: dict[str, int] = {}
    labels = []
    for path in paths:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        labels.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return labels


def run_config(
    path: Path, name: str, seeds: Sequence[int], *, out_dir: Path, metric: str, overrides: Sequence[str]
) -> RunSummary:
    """Train ``path`` once per seed and collect final metrics and the ``metric`` curve."""
    summary = RunSummary(name=name, config_path=path)
    for seed in seeds:
        run_dir = out_dir / name / f"seed-{seed}"
        config = load_config(path, [*overrides, f"train.seed={seed}"])
        config.train = dataclasses.replace(config.train, output_dir=str(run_dir))
        trainer = Trainer(config)
        result = trainer.train()
        summary.final[seed] = result.after
        rows = read_jsonl(run_dir / "metrics.jsonl")
        summary.curves[seed] = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
        del trainer
        gc.collect()
    return summary


def markdown_table(runs: Sequence[RunSummary], seeds: Sequence[int]) -> str:
    """Rows: configs; columns: the final ``eval/`` metrics all runs share; cells: mean ± std."""
    keys = sorted(set.intersection(*(set(m) for r in runs for m in r.final.values())))
    header = "| config | " + " | ".join(f"`{k}`" for k in keys) + " |"
    lines = [
        f"Final held-out metrics, mean ± std over seeds {', '.join(map(str, seeds))} (n = {len(seeds)}).",
        "",
        header,
        "|---|" + "---|" * len(keys),
    ]
    for run in runs:
        cells = []
        for key in keys:
            mean, std = mean_std([run.final[s][key] for s in seeds])
            cells.append(f"{mean:.4f} ± {std:.4f}")
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: Sequence[RunSummary], metric: str, path: Path) -> None:
    """Mean ``metric`` against the step per config, with a ±1 std band over seeds (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run in runs:
        by_step: dict[int, list[float]] = {}
        for curve in run.curves.values():
            for step, value in curve:
                by_step.setdefault(step, []).append(value)
        steps = sorted(by_step)
        stats = [mean_std(by_step[s]) for s in steps]
        means = [m for m, _ in stats]
        ax.plot(steps, means, marker="o", label=run.name)
        ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(
    config_paths: Sequence[str | Path],
    seeds: Sequence[int],
    *,
    out_dir: str | Path,
    metric: str = "eval/jsd",
    overrides: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Run every config on every seed; write ``comparison.md``, ``comparison.json`` and ``learning_curve.png``.

    Args:
        config_paths: YAML configs (different agents or settings).
        seeds: values of ``train.seed``.
        out_dir: folder for the runs and the results.
        metric: the metric plotted against the step (an ``eval/`` key).
        overrides: ``section.field=value`` overrides applied to every config.

    Returns:
        The paths of the markdown table and of the plot.

    Raises:
        ValueError: no configs or seeds, repeated seeds, an ``out_dir`` that already holds a comparison,
            or a metric no run logged.
    """
    if not config_paths or not seeds:
        raise ValueError("compare needs at least one config and one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    paths = [Path(p) for p in config_paths]
    for path in paths:
        load_config(path, list(overrides))  # fail on a bad config before any training
    out = Path(out_dir).expanduser()
    labels = unique_labels(paths)
    previous = [
        str(p.relative_to(out))
        for p in [*(out / f for f in RESULT_FILES), *(out / name for name in labels)]
        if p.exists()
    ]
    if previous:
        raise ValueError(
            f"--out {str(out)!r} already holds a comparison ({', '.join(previous)}); its runs and curves would "
            "mix with the new ones: choose another --out or remove the folder"
        )
    runs = [
        run_config(path, name, seeds, out_dir=out, metric=metric, overrides=overrides)
        for path, name in zip(paths, labels)
    ]
    if not any(curve for run in runs for curve in run.curves.values()):
        raise ValueError(f"no run logged the metric {metric!r}; pick an eval/ key from metrics.jsonl")
    table, plot = out / "comparison.md", out / "learning_curve.png"
    table.write_text(markdown_table(runs, seeds), encoding="utf-8")
    data = {r.name: {"config": str(r.config_path), "final": r.final, "curves": r.curves} for r in runs}
    (out / "comparison.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    plot_curves(runs, metric, plot)
    return table, plot
