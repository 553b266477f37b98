"""Launching a training job with its configured launcher: torchrun on this machine, or Ray Train.

The job's `launch` section (a `LaunchConfig`) picks the launcher; `wrpo train sft|wrpo --config`
and the flow's training task come through here when it is set. `launch_job` streams the job's
log lines and per-step metrics to callbacks and raises `TrainingJobError` with the job's own
error text when it fails:

    result = launch_job("wrpo", job, on_log=logger.info, on_metrics=record_step)

`local` (`torchrun.py`) runs torchrun as a subprocess in its own process group; every rank runs
`wrpo_core.train.worker`, and the metrics come from `output_dir/metrics.jsonl`. `ray`
(`ray_train.py`) runs the same training function in Ray Train `TorchTrainer` workers, mirrors
every checkpoint to the run's storage and restores the newest one when a worker fails or the job
is rerun; the final model is stored there too.
"""

from __future__ import annotations

from wrpo_core.config import LaunchConfig
from wrpo_core.train.jobs import JobConfig, JobResult, LogCallback, MetricsCallback, Stage
from wrpo_core.train.ray_train import launch_ray
from wrpo_core.train.torchrun import launch_local


def launch_job(
    stage: Stage,
    job: JobConfig,
    *,
    config_path: str | None = None,
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
) -> JobResult:
    """Runs a training job with its configured launcher and waits for it.

    Log lines go to `on_log` and each new metrics.jsonl row to `on_metrics`, in the caller's
    thread, as they arrive. `config_path` is the job's YAML if it already exists as a file
    (torchrun children read it); else the job is written to `output_dir/job-STAGE.yaml`.
    Raises TrainingJobError carrying the job's own error if it fails.
    """
    launch = job.launch or LaunchConfig()
    if launch.launcher == "ray":
        return launch_ray(stage, job, on_log=on_log, on_metrics=on_metrics)
    return launch_local(stage, job, config_path=config_path, on_log=on_log, on_metrics=on_metrics)
