"""The Ray launcher: a training job on Ray Train `TorchTrainer` workers of a Ray cluster.

`launch_ray` runs the same training function as torchrun's workers in every Ray worker and
streams their log records and rank 0's metrics back through a Ray queue. Every checkpoint is
mirrored to the run's storage (`storage_path`/`run_name`); when a worker fails or the job is
rerun, the newest one is restored into `output_dir` so the Trainer resumes from it, and the
final model is stored there too (as `model`). The default run name ends in the job's
fingerprint, so a changed job gets a run of its own; every checkpoint carries the fingerprint
(`FINGERPRINT_FILE`), and one of another job is never restored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from wrpo_core.config import LaunchConfig, SFTJobConfig, WRPOJobConfig
from wrpo_core.config.training import planned_world_size
from wrpo_core.ray_env import forwarded_env, runtime_env
from wrpo_core.ray_logs import actor_ids_in, actor_output_tail
from wrpo_core.train.checkpoints import FINGERPRINT_FILE
from wrpo_core.train.jobs import (
    LAUNCHED_ENV,
    JobConfig,
    JobResult,
    LogCallback,
    MetricsCallback,
    Stage,
    TrainingJobError,
    claim_output_dir,
    job_fingerprint,
    needs_reference_pass,
    save_on_each_node,
    store_reference,
    train_in_process,
)
from wrpo_core.train.metrics import MAX_STEPS

logger = logging.getLogger(__name__)

FINAL_MODEL_DIR = "model"
"""Name of the final Hugging Face model in Ray storage (next to the `checkpoint-N` folders)."""


def ray_run_name(stage: Stage, job: JobConfig, fingerprint: str | None = None) -> str:
    """The run's name in Ray storage: `launch.run_name`, else stage, output folder, path hash, fingerprint.

    Ray restores the newest checkpoint of the run name, so a changed job (another fingerprint,
    computed here unless given) gets a fresh run.
    """
    launch = job.launch or LaunchConfig(launcher="ray")
    if launch.run_name:
        return launch.run_name
    if fingerprint is None:
        fingerprint = job_fingerprint(stage, job, planned_world_size(launch))
    digest = hashlib.sha1(str(Path(job.output_dir).resolve()).encode()).hexdigest()[:8]
    return f"wrpo-{stage}-{Path(job.output_dir).name}-{digest}-{fingerprint}"


def ray_worker_env(launch: LaunchConfig) -> dict[str, str]:
    """Environment variables for Ray workers: the driver's forwarded ones (ray_env.py), `launch.env`, the marker."""
    env = forwarded_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    return {**env, **launch.env, LAUNCHED_ENV: "1", **save_on_each_node(launch)}


def ray_trainer(
    stage: Stage, job: JobConfig, events: Any = None, *, use_gpu: bool = False, fingerprint: str | None = None
):
    """The Ray Train TorchTrainer for a job: workers, storage (see `ray_run_name`), retries, checkpoints kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    launch = job.launch or LaunchConfig(launcher="ray")
    keep = job.training.save_total_limit
    return TorchTrainer(
        _ray_train_loop,
        train_loop_config={"stage": stage, "job": job.model_dump(mode="json"), "events": events},
        scaling_config=ScalingConfig(
            num_workers=launch.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=launch.resources_per_worker or None,
        ),
        run_config=RunConfig(
            name=ray_run_name(stage, job, fingerprint),
            storage_path=launch.storage_path,
            failure_config=FailureConfig(max_failures=launch.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep + 1 if keep else None),
            worker_runtime_env={"env_vars": ray_worker_env(launch)},
        ),
    )


def launch_ray(
    stage: Stage,
    job: JobConfig,
    *,
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
) -> JobResult:
    """Runs a job on Ray Train workers (see `launch_job`); connects to `launch.ray_address` if needed.

    Worker log records and rank-0 metrics travel back through a Ray queue and reach the callbacks
    in this thread while `fit()` runs in another. output_dir here (where the final model and the
    metrics are kept) is first claimed for the job (`claim_output_dir`); a job whose inputs
    cannot be identified raises TrainingJobError before any worker starts.
    """
    import ray
    from ray.util.queue import Empty, Queue

    launch = job.launch or LaunchConfig(launcher="ray")
    try:
        fingerprint = claim_output_dir(stage, job, world_size=planned_world_size(launch))
    except (OSError, ValueError) as error:
        raise TrainingJobError(f"cannot identify the job's inputs: {error}") from error
    if not ray.is_initialized():
        # None = a local Ray of this process ("local"), never a cluster `ray start` left on the machine.
        # The forwarded variables reach the train controller too: it opens `storage_path`.
        ray.init(address=launch.ray_address or "local", log_to_driver=on_log is None,
                 runtime_env=runtime_env())  # fmt: skip
    use_gpu = launch.use_gpu if launch.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    events = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer = ray_trainer(stage, job, events, use_gpu=use_gpu, fingerprint=fingerprint)
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    rows: list[dict[str, Any]] = []
    tail: deque[str] = deque(maxlen=60)
    try:
        while True:
            alive = thread.is_alive()
            try:
                items = [events.get(timeout=0.5), *events.get_nowait_batch(events.qsize())]
            except Empty:
                items = []
            for kind, payload in items:
                if kind == "log":
                    tail.append(payload)
                    if on_log:
                        on_log(payload)
                else:
                    rows.append(payload)
                    if on_metrics:
                        on_metrics(payload)
            if not alive and not items:
                break
    finally:
        thread.join()
        ray.kill(events.actor)
    if "error" in outcome:
        error = outcome["error"]
        raise TrainingJobError(
            ray_error_text(error) + crashed_workers_output(error), log_tail=tail
        ) from error
    result = outcome["result"]
    summary = next((row for row in reversed(rows) if "train_runtime" in row), {})
    model_uri = checkpoint_uri(result.checkpoint) if result.checkpoint is not None else None
    return JobResult(output_dir=job.output_dir, metrics=rows, summary=summary, model_uri=model_uri)


def checkpoint_uri(checkpoint: Any) -> str:
    """A Ray checkpoint's location as a URL (`s3://bucket/...`) or a local path."""
    scheme = getattr(checkpoint.filesystem, "type_name", "local")
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def ray_error_text(error: BaseException) -> str:
    """The workers' own error from a Ray Train failure: `Type: message` of the lowest failed rank."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        failure = failures[min(failures)]
        failure = getattr(failure, "_base_exc", failure)  # Ray may wrap it with its traceback
        return f"{type(failure).__name__}: {failure}"
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def crashed_workers_output(error: BaseException, workers: int = 2) -> str:
    """The last lines of the Ray Train workers a failure names as dead (a C-level crash, an OOM kill).

    Their Python log records reach the driver through the queue while they live; what a dying process
    writes to its stderr (a native abort, a NCCL or CUDA error) only Ray's log files hold
    (`ray_logs.actor_output_tail`). Empty when the failure names no worker actor (a Python exception).
    """
    ids = actor_ids_in(str(getattr(error, "worker_failures", None) or error))  # WorkerGroupError
    failure = getattr(error, "controller_failure", None)  # ControllerError: a call to a dead worker
    if isinstance(getattr(failure, "actor_id", None), str):
        ids.append(failure.actor_id)
    ids = list(dict.fromkeys(ids))[:workers]
    return "".join(
        f"\nthe failed worker {actor}'s last lines: {actor_output_tail(actor, lines=50)}" for actor in ids
    )


class _QueueLogHandler(logging.Handler):
    """Sends a worker's log records to the driver's queue as `[rank R] message` lines."""

    def __init__(self, events: Any, rank: int):
        super().__init__(logging.INFO)
        self.events = events
        self.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("ray") or "/ray/" in record.name:  # Ray's own bookkeeping
            return
        try:
            self.events.put_nowait(("log", self.format(record)))
        except Exception:  # a full or gone queue must not break training
            self.handleError(record)


def _ray_callbacks(events: Any, rank: int) -> list:
    """Trainer callbacks of a Ray worker: rank-0 metrics to the queue, checkpoints to Ray storage."""
    import ray.train
    from ray.train.collective import barrier
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class ReportCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # The step a (resumed) job starts at and its total, as the in-process metrics file has it.
            if events is not None and state.is_world_process_zero:
                events.put_nowait(("metrics", {"step": state.global_step, "time": time.time(),
                                               MAX_STEPS: state.max_steps}))  # fmt: skip

        def on_log(self, args, state, control, logs=None, **kwargs):
            if events is not None and state.is_world_process_zero and logs:
                events.put_nowait(("metrics", {"step": state.global_step, "time": time.time(), **logs}))

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            barrier()  # every rank has written its shards and RNG state
            with tempfile.TemporaryDirectory(dir=args.output_dir) as scratch:
                checkpoint = None
                if ray.train.get_context().get_local_rank() == 0:  # one upload per machine
                    shutil.copy2(Path(args.output_dir) / FINGERPRINT_FILE, folder / FINGERPRINT_FILE)
                    checkpoint = ray.train.Checkpoint.from_directory(node_checkpoint(folder, rank, scratch))
                ray.train.report(
                    {"step": state.global_step}, checkpoint=checkpoint, checkpoint_dir_name=folder.name,
                    delete_local_checkpoint_after_upload=False,
                )  # fmt: skip

    return [ReportCallback()]


def node_checkpoint(folder: Path, rank: int, scratch: str) -> Path:
    """What a machine uploads of a checkpoint: all of it from rank 0's machine, else its shards only.

    Under ZeRO-3 only global rank 0 holds the gathered weights; the model files another machine
    writes (save_on_each_node) are not the model and must not overwrite rank 0's in storage.
    """
    if rank == 0:
        return folder
    target = Path(scratch) / folder.name
    shutil.copytree(
        folder, target, copy_function=_link_or_copy,
        ignore=shutil.ignore_patterns("model*.safetensors", "model.safetensors.index.json", "pytorch_model*"),
    )  # fmt: skip
    return target


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def ray_checkpoint_fingerprint(checkpoint: Any) -> str | None:
    """The job fingerprint a Ray checkpoint (or the stored final model) carries; None if it has none."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{FINGERPRINT_FILE}") as handle:
            record = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    return record.get("fingerprint") if isinstance(record, dict) else None


def check_ray_checkpoint(checkpoint: Any, fingerprint: str) -> None:
    """RuntimeError unless the checkpoint Ray would restore was written by this job (same fingerprint)."""
    stored = ray_checkpoint_fingerprint(checkpoint)
    if stored != fingerprint:
        written = f"by job {stored}" if stored else "without a job fingerprint"
        raise RuntimeError(
            f"Ray storage {checkpoint_uri(checkpoint)} holds a checkpoint written {written}, not by this job "
            f"({fingerprint}): a changed job needs a run of its own: leave launch.run_name unset (the default "
            "name ends in the job's fingerprint) or set a new one"
        )


def _restore_from_ray(output_dir: str, fingerprint: str) -> bool:
    """Copies Ray's newest checkpoint into output_dir unless it is there; True if the run had finished.

    RuntimeError when that checkpoint is another job's (`check_ray_checkpoint`).
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    check_ray_checkpoint(checkpoint, fingerprint)
    name = Path(checkpoint.path).name
    if name == FINAL_MODEL_DIR:
        return True
    target = Path(output_dir) / name
    if ray.train.get_context().get_local_rank() == 0 and not (target / "trainer_state.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        checkpoint.to_directory(str(target))
        logger.info("restored %s from Ray storage", name)
    return False


def _report_final_model(output_dir: str, rank: int, summary: dict[str, Any]) -> None:
    """Rank 0 uploads the final HF model (not the checkpoints) to the run's storage as `model`."""
    import ray.train

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = None
        if rank == 0:
            for item in Path(output_dir).iterdir():
                if item.is_file() and not item.name.startswith(("job-", "metrics", "quadruples")):
                    shutil.copy2(item, Path(scratch) / item.name)
            checkpoint = ray.train.Checkpoint.from_directory(scratch)
        ray.train.report(summary, checkpoint=checkpoint, checkpoint_dir_name=FINAL_MODEL_DIR)


def _ray_train_loop(config: dict[str, Any]) -> dict[str, float] | None:
    """Runs on every Ray Train worker: claim output_dir, restore, reference pass, training, final model upload."""
    import ray.train
    from ray.train.collective import barrier

    from wrpo_core.train.common import extra_callbacks

    os.environ[LAUNCHED_ENV] = "1"
    stage: Stage = config["stage"]
    job = (SFTJobConfig if stage == "sft" else WRPOJobConfig).model_validate(config["job"])
    events = config.get("events")
    context = ray.train.get_context()
    rank, local_rank = context.get_world_rank(), context.get_local_rank()
    handler = _QueueLogHandler(events, rank) if events is not None else None
    if handler:
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    try:
        Path(job.output_dir).mkdir(parents=True, exist_ok=True)
        world_size = context.get_world_size()
        if local_rank == 0:  # before anything is restored into output_dir, so a restored checkpoint stays
            fingerprint = claim_output_dir(stage, job, world_size=world_size)
        else:
            fingerprint = job_fingerprint(stage, job, world_size)
        barrier()
        finished = _restore_from_ray(job.output_dir, fingerprint)
        if finished:
            return None
        if needs_reference_pass(stage, job) and local_rank == 0:
            store_reference(job)
        barrier()
        with extra_callbacks(*_ray_callbacks(events, rank)):
            summary = train_in_process(stage, job, claimed=local_rank == 0)  # claimed above
        _report_final_model(
            job.output_dir, rank, {k: v for k, v in summary.items() if isinstance(v, int | float)}
        )
        return summary
    finally:
        if handler:
            logging.getLogger().removeHandler(handler)
