"""One logging facade: ``record(key, value)`` then ``dump(step)``, to JSONL and TensorBoard.

Keys follow a fixed vocabulary of prefixes: ``rollout/`` (reward components, lengths),
``train/`` (loss, divergence, grad norm, lr), ``eval/`` (held-out metrics), ``time/`` (speeds).
Every value is indexed by the global step; hyper-parameters are logged once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PREFIXES = ("rollout/", "train/", "eval/", "time/")


class MetricsLogger:
    """Buffer scalar metrics and write them per step to ``metrics.jsonl`` and TensorBoard.

    Args:
        log_dir: folder for ``metrics.jsonl`` and the TensorBoard event files; None keeps
            metrics in memory only (``history``).
        tensorboard: also write TensorBoard events.
    """

    def __init__(self, log_dir: str | Path | None, *, tensorboard: bool = True) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._buffer: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._jsonl = None
        self._tb = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.log_dir))

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
