"""The one owner of a training job's per-step metrics: its `output_dir/metrics.jsonl`.

Rank 0 of a job appends one JSON row per logged step (`append_metrics_row`, called by the
trainers' `JsonlMetricsCallback`), and when training starts a row with the step it starts at and
the total (`MAX_STEPS`), so a follower can tell steps done of steps to do (`StepProgress`); a rerun drops the rows after the checkpoint it resumes from
(`trim_metrics`, `drop_rows_after_resume_point`); launchers and flows stream the new rows while
a job runs (`MetricsTail`, `follow_metrics`) and read them when it is done (`read_metrics`,
`final_metrics`). No torch here: launchers and the CLI import this quickly.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wrpo_core.train.checkpoints import checkpoint_step, last_complete_checkpoint

METRICS_FILE = "metrics.jsonl"
"""Per-step metrics of a job, in its output_dir (written by rank 0)."""

MAX_STEPS = "max_steps"
"""Key of the row logged when training starts: the optimizer steps the whole job runs (the Trainer's
`state.max_steps`, known only once it has counted the data when the config gives epochs)."""


def metrics_path(folder: str | Path) -> Path:
    """Where a job whose output_dir is `folder` logs its metrics."""
    return Path(folder) / METRICS_FILE


def parse_metrics_line(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl row, or None for a blank line or one torn by a killed job."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def trim_metrics(path: str | Path, last_step: int) -> None:
    """Drops metrics rows logged after `last_step` (a rerun logs those steps again) and torn lines."""
    path = Path(path)
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            row = parse_metrics_line(line)
            if row is not None and row.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            path.write_text("".join(kept), encoding="utf-8")


def append_metrics_row(path: str | Path, step: int, logs: dict[str, Any]) -> None:
    """Appends one logged step (with the wall time it was logged at) as a JSON line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, "time": time.time(), **logs}) + "\n")


def append_train_begin_row(path: str | Path, step: int, max_steps: int) -> None:
    """Appends the row of a (re)started training: the step it starts at and its total (`MAX_STEPS`)."""
    append_metrics_row(path, step, {MAX_STEPS: max_steps})


class StepProgress:
    """Turns a job's metrics rows into (steps done, total steps) calls of `on_progress`.

    The total is `max_steps` when the job's config gives one (> 0), else the `MAX_STEPS` of the row
    the job logs when training starts; rows before the total is known report nothing.
    """

    def __init__(self, on_progress: Callable[[int, int], None], max_steps: int | None = None):
        self.on_progress = on_progress
        self.total = max_steps if max_steps is not None and max_steps > 0 else None

    def __call__(self, row: dict[str, Any]) -> None:
        total = row.get(MAX_STEPS)
        if isinstance(total, int) and not isinstance(total, bool) and total > 0:
            self.total = total
        step = row.get("step")
        if self.total is not None and isinstance(step, int) and not isinstance(step, bool):
            self.on_progress(min(step, self.total), self.total)


def drop_rows_after_resume_point(output_dir: str | Path) -> None:
    """Drops the rows a rerun of the job in `output_dir` will log again (after its newest checkpoint)."""
    trim_metrics(metrics_path(output_dir), checkpoint_step(last_complete_checkpoint(output_dir)))


class MetricsTail:
    """Reads the rows appended to a metrics.jsonl file since it was created (or since `offset`)."""

    def __init__(self, path: str | Path, offset: int | None = None):
        self.path = Path(path)
        self.offset = (
            offset if offset is not None else (self.path.stat().st_size if self.path.exists() else 0)
        )

    def read_new(self) -> list[dict[str, Any]]:
        """Complete rows appended since the last call (a half-written last line waits for the next)."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        rows = (parse_metrics_line(line) for line in chunk[:end].decode("utf-8").splitlines())
        return [row for row in rows if row is not None]


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    """Every complete row of a job's metrics.jsonl, in order (torn lines skipped); [] if there is none."""
    path = metrics_path(folder)
    if not path.exists():
        return []
    rows = (parse_metrics_line(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [row for row in rows if row is not None]


def final_metrics(folder: str | Path) -> dict[str, Any]:
    """The last logged value of every metric in a job's metrics.jsonl (without `time`)."""
    logged: dict[str, Any] = {}
    for row in read_metrics(folder):
        logged.update(row)
    logged.pop("time", None)  # when the line was logged, not a metric
    return logged


def write_metrics(folder: str | Path, rows: Iterable[dict[str, Any]]) -> bool:
    """Writes `rows` as a job's metrics.jsonl unless that file exists; True if it wrote them.

    A Ray job's rows reach only the driver (through its queue); this keeps them with the model.
    """
    path = metrics_path(folder)
    rows = list(rows)
    if not rows or path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return True


@contextmanager
def follow_metrics(
    folder: str | Path, on_row: Callable[[dict[str, Any]], None], every_s: float = 2.0
) -> Iterator[None]:
    """Calls `on_row` for each row a job in `folder` logs while the block runs (the job runs inside it).

    The rows the job will log again (after its newest checkpoint) are dropped first, so the
    tail starts at the end of what stays; rows logged before are not replayed. A thread reads
    the new complete rows every `every_s` seconds and once more when the block ends, so the last
    rows are not missed. `on_row` runs in that thread.
    """
    drop_rows_after_resume_point(folder)
    tail, done = MetricsTail(metrics_path(folder)), threading.Event()

    def pump() -> None:
        while not done.wait(every_s):
            for row in tail.read_new():
                on_row(row)
        for row in tail.read_new():
            on_row(row)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)
