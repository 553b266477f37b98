"""The pipeline's training stages: Target-SFT, WRPO, and the DPO baseline, each a job of `wrpo_core.train`.

A stage builds the job's config from the run's config and layout, trains in this process or
launches it (torchrun / Ray Train, per `cfg.launch`), then publishes the model with its card.
Log lines, per-step metrics and progress (steps done of the total) reach the `TrainingHooks`
either way: a launched job streams them, an in-process one has its metrics file followed while it
trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from wrpo_core import actor_pools
from wrpo_core.config import FusionConfig, SFTJobConfig, WRPOConfig, WRPOJobConfig
from wrpo_core.pipeline.data import ProgressCallback, rows_of_split
from wrpo_core.pipeline.publishing import finish_model
from wrpo_core.pipeline.roles import FUSED, TARGET_SFT
from wrpo_core.reference import REFERENCE_FILE
from wrpo_core.schemas import BEST_SOURCE, QUADRUPLES
from wrpo_core.storage import RunLayout
from wrpo_core.train.jobs import (
    JobConfig,
    LogCallback,
    MetricsCallback,
    Stage,
    claim_output_dir,
    train_in_process,
)
from wrpo_core.train.launch import launch_job
from wrpo_core.train.metrics import StepProgress, follow_metrics, write_metrics


@dataclass(frozen=True)
class TrainingHooks:
    """Where a stage's log lines, per-step metrics rows and progress go (e.g. a Prefect run's log).

    `on_progress(done, total, unit)` is called as work finishes: optimizer steps of a training
    stage, shards (on Ray) or samples (inline) of a data stage.
    """

    on_log: LogCallback | None = None
    on_metrics: MetricsCallback | None = None
    on_progress: ProgressCallback | None = None


NO_HOOKS = TrainingHooks()


def _fetch_model(uri: str, folder: Path) -> None:
    """Copies a model a Ray job stored elsewhere (its storage path) into the stage's local folder."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.get(path.rstrip("/") + "/", str(folder), recursive=True)


def _rows_callback(job: JobConfig, hooks: TrainingHooks) -> MetricsCallback | None:
    """What receives a job's metrics rows: the `on_metrics` hook and, from the rows, `on_progress` in steps."""
    on_metrics, on_progress = hooks.on_metrics, hooks.on_progress
    if on_progress is None:
        return on_metrics
    progress = StepProgress(lambda done, total: on_progress(done, total, "steps"), job.training.max_steps)

    def on_row(row: dict) -> None:
        if on_metrics is not None:
            on_metrics(row)
        progress(row)

    return on_row


def _trains_elsewhere(cfg: FusionConfig, layout: RunLayout) -> bool:
    """A launched job on remote storage may run on machines that share no disk with this one: it gets
    storage URLs of its data and models (fetched and checked there), never paths of this machine."""
    return cfg.launch is not None and not layout.storage.is_local


def _job_table(layout: RunLayout, key: str, schema: pa.Schema, *, elsewhere: bool) -> str:
    return layout.table_file_url(key, schema) if elsewhere else layout.local_table_file(key, schema)


def train_job(stage: Stage, job: JobConfig, hooks: TrainingHooks = NO_HOOKS) -> dict[str, float]:
    """Trains in this process, or as a torchrun / Ray Train job when the config has a `launch` section.

    The run's shared Ray actor pools (the reward model's) are released first: training needs the GPUs.
    """
    actor_pools.release_pools()
    folder = Path(job.output_dir)
    on_row = _rows_callback(job, hooks)
    if job.launch is None:
        if on_row is None:
            return train_in_process(stage, job)
        claim_output_dir(stage, job)  # a changed job clears its old outputs before the tail starts
        with follow_metrics(folder, on_row):
            return train_in_process(stage, job, claimed=True)
    result = launch_job(stage, job, on_log=hooks.on_log, on_metrics=on_row)
    if result.model_uri and result.model_uri != job.output_dir:  # a Ray job stored it elsewhere: this one
        _fetch_model(result.model_uri, folder)
    write_metrics(folder, result.metrics)
    return {k: v for k, v in result.summary.items() if isinstance(v, int | float)}


def sft(cfg: FusionConfig, layout: RunLayout, hooks: TrainingHooks = NO_HOOKS) -> dict:
    """Target-SFT on (x, y_ws) of the SFT prompts; the model goes to `models/target-sft`."""
    pairs = rows_of_split(layout, layout.read_dataset(layout.best_source, BEST_SOURCE), "sft")
    layout.write_dataset(layout.sft_pairs, pairs, BEST_SOURCE)
    data = _job_table(layout, layout.sft_pairs, BEST_SOURCE, elsewhere=_trains_elsewhere(cfg, layout))
    job = SFTJobConfig(
        model=cfg.target.path, revision=cfg.target.revision, data=data,
        output_dir=str(layout.model_dir(TARGET_SFT)), trust_remote_code=cfg.target.trust_remote_code,
        training=cfg.sft, launch=cfg.launch,
    )  # fmt: skip
    metrics = train_job("sft", job, hooks)
    return finish_model(cfg, layout, TARGET_SFT, metrics, {"sft": job.training.model_dump(mode="json")})


def wrpo(
    cfg: FusionConfig,
    layout: RunLayout,
    hooks: TrainingHooks = NO_HOOKS,
    *,
    name: str = FUSED,
    training: WRPOConfig | None = None,
    data: str | None = None,
) -> dict:
    """WRPO training from Target-SFT (reference log-probs computed once, inside the job).

    `data` defaults to the run's quadruples; pass quadruples that already carry reference
    log-probs (e.g. another job's stored file) to skip the reference pass. The model goes to
    `models/<name>` with its lineage card.
    """
    elsewhere = _trains_elsewhere(cfg, layout)
    job = WRPOJobConfig(
        model=layout.model_url(TARGET_SFT) if elsewhere else layout.model(TARGET_SFT),
        data=data or _job_table(layout, layout.quadruples, QUADRUPLES, elsewhere=elsewhere),
        output_dir=str(layout.model_dir(name)), trust_remote_code=cfg.target.trust_remote_code,
        training=training or cfg.wrpo, launch=cfg.launch,
    )  # fmt: skip
    metrics = train_job("wrpo", job, hooks)
    return finish_model(cfg, layout, name, metrics, {"wrpo": job.training.model_dump(mode="json")})


def dpo_training(cfg: FusionConfig) -> WRPOConfig:
    """The DPO baseline's settings: the run's WRPO settings at alpha 0 (y_ws never weighs in)."""
    return cfg.wrpo.model_copy(update={"alpha": 0.0})


def wrpo_variant(
    cfg: FusionConfig, layout: RunLayout, name: str, settings: WRPOConfig, hooks: TrainingHooks = NO_HOOKS
) -> dict:
    """WRPO with other `settings` (alpha, beta, schedule) on the fused model's quadruples and stored
    reference log-probs, saved as `models/<name>`: the DPO baseline (alpha 0) and ablations."""
    data = f"{layout.model(FUSED)}/{REFERENCE_FILE}"
    return wrpo(cfg, layout, hooks, name=name, training=settings, data=data)
