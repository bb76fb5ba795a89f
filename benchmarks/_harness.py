"""Shared pieces of the benchmarks: machine facts, memory probes, models, prompts, subprocess runs.

Memory is read from the kernel: ``VmRSS`` (resident set now) and ``VmHWM`` (its high-water mark)
in ``/proc/self/status``. Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the
current RSS, so a peak can be measured over one phase of a process (after models are loaded, say)
instead of over its whole life. Where that is not possible (not Linux) the functions fall back to
``resource.getrusage(...).ru_maxrss``, the whole-life peak, and say so.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

#: ``--model tiny``: a 4-layer width-32 Llama on a character tokenizer (tests and smoke runs).
TINY = "tiny"
#: A minimal chat template for the character tokenizer, so chat-based peers (TRL) accept it.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


# --------------------------------------------------------------------------------------------
# Machine and environment
# --------------------------------------------------------------------------------------------
def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where unavailable)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def busy_processes(patterns: Sequence[str] = ("pytest",)) -> list[str]:
    """Command lines of other processes matching any of ``patterns`` (a quiet-machine check)."""
    found = []
    own = {os.getpid(), os.getppid()}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmd and any(p in cmd for p in patterns):
            found.append(f"{entry.name}: {cmd[:160]}")
    return found


def _proc_cpu_ticks() -> dict[int, tuple[int, str]]:
    ticks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        ticks[int(entry.name)] = (int(fields[11]) + int(fields[12]), cmd)  # utime + stime
    return ticks


def cpu_hogs(interval: float = 1.0, threshold: float = 0.2) -> list[str]:
    """Other processes that used more than ``threshold`` of a core over the next ``interval`` seconds.

    What the benchmarks record before each measured process (with the load average): the machine
    is shared, and a busy neighbour on 2 cores changes step times several-fold.
    """
    import time

    if not Path("/proc").is_dir():
        return []
    own = os.getpid()
    hz = os.sysconf("SC_CLK_TCK")
    first = _proc_cpu_ticks()
    time.sleep(interval)
    second = _proc_cpu_ticks()
    hogs = []
    for pid, (ticks, cmd) in second.items():
        if pid == own or pid not in first:
            continue
        share = (ticks - first[pid][0]) / hz / interval
        if share > threshold:
            hogs.append(f"{pid} {100 * share:.0f}% {cmd[:120]}")
    return hogs


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total_gib() -> float | None:
    """Physical memory in GiB (None where unavailable)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError):
        return None


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What a result must be reported with: machine, versions, threads, load."""
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_total_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "trl": package_version("trl"),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "load_average": load_average(),
        "other_pytest_processes": len(busy_processes()),
        "commit": git_commit(),
    }


def git_commit() -> str | None:
    """The checkout's short commit hash, ``+`` when it has uncommitted changes (None outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident set size of this process now."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """High-water mark of the resident set (since the last :func:`reset_peak_rss`, else process start)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def lifetime_peak_rss_bytes() -> int:
    """``ru_maxrss``: the peak over the whole life of the process (never reset)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs``). Returns False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------
def set_threads(threads: int) -> None:
    """``torch.set_num_threads`` (every method of a benchmark runs with the same count)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def build_models(
    model: str, student_layers: int, *, device: str = "cpu", dtype: str = "float32"
) -> tuple[Any, Any, Any]:
    """Teacher, kept-layer student and shared tokenizer.

    Args:
        model: a built-in name or path (default teacher ``smollm2-135m-instruct``), or ``"tiny"``
            for a 4-layer width-32 Llama on the character tokenizer (with a small chat template).
        student_layers: decoder layers the student keeps (evenly spaced; at most the teacher's).
        device: ``cpu``, ``cuda``...
        dtype: ``float32`` or ``bfloat16`` (both models).

    Returns:
        ``(teacher, student, tokenizer)``; the teacher is in eval mode, the student in train mode.
    """
    from rl_distill.models import (
        char_tokenizer,
        load_causal_lm,
        load_tokenizer,
        make_kept_layer_student,
        resolve_dtype,
        tiny_llama,
    )

    if model == TINY:
        tokenizer = char_tokenizer()
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
        teacher = tiny_llama(len(tokenizer), hidden_size=32, num_layers=4, seed=1)
        teacher = teacher.to(device=device, dtype=resolve_dtype(dtype))
    else:
        tokenizer = load_tokenizer(model)
        teacher = load_causal_lm(model, dtype=dtype, device=device)
    teacher.eval()
    num_layers = min(student_layers, teacher.config.num_hidden_layers)
    student = make_kept_layer_student(teacher, num_layers=num_layers).train()
    return teacher, student, tokenizer


def benchmark_prompts(n: int, *, seed: int = 0) -> list[str]:
    """``n`` distinct prompts of the built-in ``instructions`` task (its deterministic train split)."""
    from rl_distill.tasks import load_task

    return [ex.prompt for ex in load_task("instructions", seed=seed, num_train=n, num_eval=1).train]


_FILLER = (
    " The river runs past the old mill and turns toward the hills, where the morning light falls on the"
    " fields. Farmers walk along the road with their dogs, and the children count the birds that sit on"
    " the fence. In the evening the air is cool, the sky turns red, and the village grows quiet again."
)


def reference_texts(tokenizer: Any, n: int, num_tokens: int) -> list[str]:
    """``n`` English reference replies of exactly ``num_tokens`` tokens each (checked by re-encoding).

    Windows of a fixed filler text, cut at token boundaries; a window whose decoded text does not
    re-encode to the same length is skipped. Used as the fixed sequences of supervised KD
    (lambda = 0) and as the (unused at lambda = 1) assistant replies TRL's dataset needs.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    ids = tokenizer(_FILLER * (2 + num_tokens // 16), add_special_tokens=False)["input_ids"]
    out: list[str] = []
    start = 0
    while len(out) < n:
        if start + num_tokens > len(ids):
            start = 0
            if not out:
                raise ValueError("cannot cut reference texts of that length from the filler text")
        text = tokenizer.decode(ids[start : start + num_tokens]).strip()
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == num_tokens:
            out.append(text)
        start += 7
    return out


# --------------------------------------------------------------------------------------------
# Statistics, files, subprocesses
# --------------------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, mean, min, max and count of a list of numbers."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0}
    return {
        "median": statistics.median(vals),
        "mean": statistics.fmean(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def write_json(path: str | Path | None, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (folders created); no-op for None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def run_module_json(
    module: str,
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python -m module *argv --out TMP`` from the repository root in a fresh process; return its JSON.

    Raises:
        RuntimeError: if the process fails (its stderr tail is included).
    """
    with tempfile.TemporaryDirectory(prefix="rl_distill_bench_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, *argv, "--out", str(out)]
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
        proc = subprocess.run(
            cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}"
            )
        return json.loads(out.read_text())
