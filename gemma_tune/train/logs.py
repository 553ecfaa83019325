"""Where a run's metrics go: `metrics.jsonl` (one JSON object per logged row), `metrics.csv` (the same
rows, fixed columns) and TensorBoard event files under `tensorboard/` (written with the tensorboard
package's record writer on a plain file, so no backend imports TensorFlow for it).

A row is `{"step": int, "split": "train" | "eval", <metric>: float, ...}`, the metrics the run's method
names (`csv_columns`). On resume, rows after the
resumed step are dropped (`truncate_after`) so the files read as one uninterrupted run; a torn last line
of metrics.jsonl is dropped with them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

from gemma_tune.errors import UserError
from gemma_tune.rundir import atomic_write_text

log = logging.getLogger("gemma_tune")

RUN_COLUMNS = ("learning_rate", "tokens", "tokens_per_s", "mfu", "peak_memory_gib", "elapsed_s")


def csv_columns(method) -> tuple[str, ...]:
    """metrics.csv's columns for a run of `method`: step and split, the method's metrics, the run's figures."""
    return ("step", "split") + method.metrics + method.eval_metrics + RUN_COLUMNS


class EventFile:
    """One TensorBoard event file, written with tensorboard's RecordWriter on a plain Python file
    (tensorboard's EventFileWriter opens files through `tf.io.gfile`, which imports TensorFlow)."""

    def __init__(self, logdir: Path):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self._writer = RecordWriter(open(logdir / name, "wb"))  # noqa: SIM115 - closed by close()
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add_event(self, event) -> None:
        self._writer.write(event.SerializeToString())

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsSink:
    """Appends rows to metrics.jsonl / metrics.csv (`columns`) and scalars to TensorBoard; keeps them in `rows`."""

    def __init__(self, run_dir: Path, columns: tuple[str, ...], tensorboard: bool = True):
        self.run_dir, self.columns = Path(run_dir), columns
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        self.rows: list[dict] = self._read_jsonl()
        self._tb = None
        if tensorboard:
            try:
                self._tb = EventFile(self.run_dir / "tensorboard")
            except ImportError:  # tensorboard is an optional extra
                self._tb = None

    def _read_jsonl(self) -> list[dict]:
        """The rows logged so far. A torn last line (a run killed while appending it) is dropped with a
        warning (the file is rewritten without it on resume); a damaged line before it is a UserError."""
        if not self.jsonl.exists():
            return []
        lines = [(n, line) for n, line in enumerate(self.jsonl.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip()]
        rows = []
        for n, line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                if n != lines[-1][0]:
                    raise UserError("this line is not a JSON metrics row; the file is damaged: repair or remove "
                                    "the line (rows after the resumed step are rewritten anyway)",
                                    where=f"{self.jsonl}:{n}") from None
                log.warning("%s:%d: dropped a torn last line (a run stopped while writing it)", self.jsonl, n)
        return rows

    def truncate_after(self, step: int) -> None:
        """Keep only rows up to `step` (a resumed run rewrites what came after its checkpoint)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self._rewrite()

    def reset(self) -> None:
        self.rows = []
        self._rewrite()

    def _rewrite(self) -> None:
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv, table.getvalue())

    def write(self, row: dict) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        new_file = not self.csv.exists()
        with open(self.csv, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self._tb is not None:
            self._scalars(row)

    def _scalars(self, row: dict) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=f"{row['split']}/{k}", simple_value=float(v))
                  for k, v in row.items() if k not in ("step", "split") and isinstance(v, (int, float))]
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(row["step"]),
                                           summary=summary_pb2.Summary(value=values)))
        self._tb.flush()

    def history(self) -> dict[str, list]:
        """name -> values per logged step: train metrics under their names (with `step`), eval metrics
        as `eval_<name>` (with `eval_step`)."""
        out: dict[str, list] = {}
        for row in self.rows:
            prefix = "" if row["split"] == "train" else f"{row['split']}_"
            for key, value in row.items():
                if key != "split":
                    out.setdefault(prefix + key, []).append(value)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
