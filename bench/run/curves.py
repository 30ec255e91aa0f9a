"""A run's curves in the formats other tools read: TensorBoard event files and a tidy CSV.

Both are written at the run's flush points, in the training process, synchronously: a write
error surfaces there like any other (no background thread), and a crash loses at most what the
Sacred store also lacks. A resumed run hides the events logged after its checkpoint (a
TensorBoard purge marker) and rewrites curves.csv from the truncated store.
"""
from __future__ import annotations

import csv
import io
import json
import os
import socket
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

from bench.io import atomic_write_text


class EventLog:
    """Scalars buffered in memory and appended to one TensorBoard event file per process."""

    def __init__(self, logdir: Path, purge_from: int | None = None):
        self.path = Path(logdir) / (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                                    f"{os.getpid()}")
        self._pending = [Event(wall_time=time.time(), file_version="brain.Event:2")]
        if purge_from is not None:  # TensorBoard drops earlier events at steps >= this one
            self._pending.append(Event(wall_time=time.time(), step=purge_from,
                                       session_log=SessionLog(status=SessionLog.START)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._pending.append(Event(wall_time=time.time(), step=step,
                                   summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])))

    def flush(self) -> None:
        if not self._pending:
            return
        with open(self.path, "ab") as f:
            writer = RecordWriter(f)
            for event in self._pending:
                writer.write(event.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        self._pending = []


def write_curves_csv(metrics_json: Path, out: Path) -> None:
    """metrics.json (Sacred) -> out as tidy rows: step, metric, value."""
    try:
        metrics = json.loads(metrics_json.read_text())
    except FileNotFoundError:
        metrics = {}
    buf = io.StringIO()
    rows = csv.writer(buf)
    rows.writerow(["step", "metric", "value"])
    points = sorted((step, name, value) for name, series in metrics.items()
                    for step, value in zip(series["steps"], series["values"]))
    rows.writerows(points)
    atomic_write_text(out, buf.getvalue())
