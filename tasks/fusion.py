"""Thin Prefect tasks over wrpo_core's pipeline: one task run per stage, and the run's artifacts.

Resume and caching live in storage, not in Prefect's result store: every stage's manifest records
the digest of its settings and of its inputs, so a rerun of the same configuration (from any
process or machine that sees the storage) skips what is done, and another run's samples with the
same settings and inputs are copied. A task therefore returns quickly with outcome `skipped` or
`reused` instead of being a Prefect `Cached` state that only one machine's result folder knows.

A stage that reports progress (sampling, scoring, training) gets a progress artifact,
`progress-<run>-<stage>`, updated as shards, samples or steps finish (`StageProgress`).
"""

from __future__ import annotations

import contextvars
import re
import threading
import time
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.blocks import load_block_options
from wrpo_core.config import FusionConfig
from wrpo_core.pipeline import StageError, layout_for, pipeline_stage, run_pipeline_stage

RETRIES = 2


def progress_key(run_name: str, stage: str) -> str:
    """A stage's progress artifact key: `progress-<run>-<stage>` in Prefect's key alphabet (a-z, 0-9, -)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"progress-{run_name}-{stage}".lower())).strip("-")


class StageProgress:
    """A stage's progress callback `(done, total, unit)` as a Prefect progress artifact.

    The artifact is created at the first call (in this task run's context, whatever thread calls)
    and updated at most once per `every_s` seconds; a call that comes sooner is sent when that time
    is up, so the artifact never lags behind for long. `close(finished=True)` sends 100 %. A failed
    API call is logged as a warning: progress is for people watching, the stage goes on.
    """

    def __init__(self, key: str, stage: str, logger: Any, every_s: float = 1.0):
        self.key, self.stage, self.logger, self.every_s = key, stage, logger, every_s
        self._context = contextvars.copy_context()  # the task run's: links the artifact to it
        self._lock = threading.Lock()
        self._artifact: UUID | None = None
        self._latest: tuple[int, int, str] | None = None
        self._sent: tuple[int, int, str] | None = None
        self._sent_at = float("-inf")
        self._timer: threading.Timer | None = None

    def __call__(self, done: int, total: int, unit: str) -> None:
        with self._lock:
            self._latest = (done, total, unit)
            wait = self._sent_at + self.every_s - time.monotonic()
            if wait <= 0:
                self._send()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._send_later)
                self._timer.daemon = True
                self._timer.start()

    def _send_later(self) -> None:
        with self._lock:
            self._timer = None
            self._send()

    def close(self, *, finished: bool) -> None:
        """Sends the last state: 100 % when the stage `finished`, else where it stopped."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if finished and self._latest is not None:
                total, unit = self._latest[1], self._latest[2]
                self._latest = (total, total, unit)
            self._send()

    def _send(self) -> None:
        if self._latest is None or self._latest == self._sent:
            return
        done, total, unit = self._latest
        percent = min(100.0, 100.0 * done / total) if total > 0 else 100.0
        description = f"{self.stage}: {done} of {total} {unit} done"
        try:
            if self._artifact is None:
                self._artifact = self._context.run(
                    create_progress_artifact, percent, key=self.key, description=description
                )
            else:
                self._context.run(update_progress_artifact, self._artifact, percent, description=description)
        except Exception as error:
            self.logger.warning(
                "progress artifact %s not updated: %s: %s", self.key, type(error).__name__, error
            )
        self._sent, self._sent_at = self._latest, time.monotonic()


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: not for a permanent StageError (bad config or data); yes for anything else."""
    try:
        state.result()
    except StageError as error:
        return not error.permanent
    except Exception:
        return True
    return True


@task(
    name="fusion-stage",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_unless_permanent,
)
def run_fusion_stage(config: FusionConfig, stage: str, reuse_other_runs: bool = True) -> dict[str, Any]:
    """Runs one pipeline stage of the config's run (or skips / reuses it); returns its small summary.

    A training stage's log lines and per-step metrics rows go to this task run's log, whether it
    trains in this process or launches a torchrun / Ray Train job; sampling, scoring and training
    report their progress in a progress artifact (`StageProgress`).
    """
    logger = get_run_logger()
    layout = layout_for(config, load_block=load_block_options)
    on_metrics = lambda row: logger.info("metrics %s", row)  # noqa: E731
    progress = StageProgress(progress_key(config.run_name, stage), stage, logger)
    step = pipeline_stage(
        config, layout, stage, on_log=logger.info, on_metrics=on_metrics, on_progress=progress
    )
    finished = False
    try:
        outcome, summary = run_pipeline_stage(config, layout, step, reuse=reuse_other_runs)
        finished = True
    finally:
        progress.close(finished=finished)
    logger.info("stage %s: %s", stage, outcome)
    return {"stage": stage, "outcome": outcome, "summary": summary, "manifest": layout.storage.display(
        layout.manifest_key(stage))}  # fmt: skip
