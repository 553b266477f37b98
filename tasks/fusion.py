"""Thin Prefect tasks over wrpo_core's pipeline: one task run per stage, and the run's artifacts.

Resume and caching live in storage, not in Prefect's result store: every stage's manifest records
the digest of its settings and of its inputs, so a rerun of the same configuration (from any
process or machine that sees the storage) skips what is done, and another run's samples with the
same settings and inputs are copied. A task therefore returns quickly with outcome `skipped` or
`reused` instead of being a Prefect `Cached` state that only one machine's result folder knows.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from wrpo_core import stages
from wrpo_core.config import FusionConfig
from wrpo_core.train.common import METRICS_FILE
from wrpo_core.train.launch import MetricsTail

RETRIES = 2


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: not for a permanent StageError (bad config or data); yes for anything else."""
    try:
        state.result()
    except stages.StageError as error:
        return not error.permanent
    except Exception:
        return True
    return True


@contextlib.contextmanager
def streamed_metrics(folder: Path, logger: Any, every_s: float = 2.0) -> Iterator[None]:
    """Logs each new metrics.jsonl row of an in-process training run while it trains."""
    tail, done = MetricsTail(folder / METRICS_FILE), threading.Event()

    def pump() -> None:
        while not done.wait(every_s):
            for row in tail.read_new():
                logger.info("metrics %s", row)
        for row in tail.read_new():
            logger.info("metrics %s", row)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)


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
    """Runs one pipeline stage of the config's run (or skips / reuses it); returns its small summary."""
    logger = get_run_logger()
    layout = stages.layout_for(config)
    on_metrics = lambda row: logger.info("metrics %s", row)  # noqa: E731
    plan = stages.pipeline_stages(config, layout, on_log=logger.info, on_metrics=on_metrics)
    step = next(s for s in plan if s.name == stage)
    trains_here = stage in ("sft", "wrpo") and config.launch is None
    folder = layout.model_dir(stages.TARGET_SFT if stage == "sft" else "wrpo")
    with streamed_metrics(folder, logger) if trains_here else contextlib.nullcontext():
        outcome, summary = stages.run_pipeline_stage(config, layout, step, reuse=reuse_other_runs)
    logger.info("stage %s: %s", stage, outcome)
    return {"stage": stage, "outcome": outcome, "summary": summary, "manifest": layout.storage.display(
        layout.manifest_key(stage))}  # fmt: skip
