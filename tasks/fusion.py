"""Thin Prefect tasks over wrpo_core's pipeline: one task run per stage, and the run's artifacts.

Resume and caching live in storage, not in Prefect's result store: every stage's manifest records
the digest of its settings and of its inputs, so a rerun of the same configuration (from any
process or machine that sees the storage) skips what is done, and another run's samples with the
same settings and inputs are copied. A task therefore returns quickly with outcome `skipped` or
`reused` instead of being a Prefect `Cached` state that only one machine's result folder knows.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.blocks import load_block_options
from wrpo_core.config import FusionConfig
from wrpo_core.pipeline import StageError, layout_for, pipeline_stage, run_pipeline_stage

RETRIES = 2


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
    trains in this process or launches a torchrun / Ray Train job.
    """
    logger = get_run_logger()
    layout = layout_for(config, load_block=load_block_options)
    on_metrics = lambda row: logger.info("metrics %s", row)  # noqa: E731
    step = pipeline_stage(config, layout, stage, on_log=logger.info, on_metrics=on_metrics)
    outcome, summary = run_pipeline_stage(config, layout, step, reuse=reuse_other_runs)
    logger.info("stage %s: %s", stage, outcome)
    return {"stage": stage, "outcome": outcome, "summary": summary, "manifest": layout.storage.display(
        layout.manifest_key(stage))}  # fmt: skip
