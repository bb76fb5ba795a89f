"""One logging facade: ``record(key, value)`` then ``dump(step)``, to JSONL and TensorBoard.

Keys follow a fixed vocabulary of prefixes: ``rollout/`` (reward components, lengths),
``train/`` (loss, divergence, approx_kl, clip fraction, grad norm, lr, skipped steps), ``eval/``
(held-out divergences to the teacher, verifier accuracy, factuality), ``time/`` (step time,
tokens/s). Every value is indexed by the global step; hyper-parameters are logged once.

A resumed run passes ``resume_step``: rows logged after that step by the interrupted run (which
the resumed run is about to redo) are dropped from ``metrics.jsonl`` and purged from TensorBoard.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rl_distill.checkpoint import atomic_write_text

PREFIXES = ("rollout/", "train/", "eval/", "time/")


class MetricsLogger:
    """Buffer scalar metrics and write them per step to ``metrics.jsonl`` and TensorBoard.

    Args:
        log_dir: folder for ``metrics.jsonl`` and the TensorBoard event files; None keeps
            metrics in memory only (``history``).
        tensorboard: also write TensorBoard events.
        resume_step: continue a run whose state is that of this step (drop later rows).
    """

    def __init__(
        self, log_dir: str | Path | None, *, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._buffer: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._jsonl = None
        self._tb = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_jsonl(self.log_dir / "metrics.jsonl", resume_step)
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)

    def record(self, key: str, value: float) -> None:
        """Buffer one scalar; the key must start with one of :data:`PREFIXES`."""
        if not key.startswith(PREFIXES):
            raise ValueError(f"metric key {key!r} must start with one of {PREFIXES}")
        self._buffer[key] = float(value)

    def record_dict(self, values: dict[str, float]) -> None:
        """Buffer several scalars."""
        for key, value in values.items():
            self.record(key, value)

    def dump(self, step: int) -> dict[str, float]:
        """Write the buffered values at ``step`` and clear the buffer; returns what was written."""
        row = dict(self._buffer)
        self._buffer.clear()
        if not row:
            return row
        self.history.append({"step": step, **row})
        if self._jsonl is not None:
            clean = {k: (v if math.isfinite(v) else None) for k, v in row.items()}
            self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        return row

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        """Write the run's configuration once (``hparams.json`` and a TensorBoard text entry)."""
        if self.log_dir is None:
            return
        text = json.dumps(hparams, indent=2, default=str)
        (self.log_dir / "hparams.json").write_text(text + "\n", encoding="utf-8")
        if self._tb is not None:
            self._tb.add_text("hparams", "```\n" + text + "\n```", 0)

    def close(self) -> None:
        """Flush and close the backends."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_jsonl(path: str | Path, max_step: int) -> None:
    """Drop the rows of a JSONL log whose ``step`` is greater than ``max_step`` (atomic, fsync'd rewrite)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a JSONL log (a truncated last line is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class Progress:
    """A progress bar with step, loss, tokens/s and ETA; on a non-TTY, about ten plain lines instead.

    Args:
        total: the last step.
        initial: the step training starts from (a resumed run).
        enabled: False for processes other than the main one.
    """

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True) -> None:
        self.total, self.initial = total, initial
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", disable=not self.tty, dynamic_ncols=True
        )

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Advance to ``step`` and show the latest loss and speed."""
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        self.bar.update(1)
        if self.tty or not self.enabled:
            return
        if step % max(1, self.total // 10) == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(step - self.initial, 1) * (self.total - step)
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:.0f} tok/s  "
                f"elapsed {elapsed:.0f}s  eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return time.perf_counter() - self.start

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
