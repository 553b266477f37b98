"""The local launcher: a training job under torchrun on this machine, as a watched subprocess.

`launch_local` runs `torchrun ... -m wrpo_core.train.worker train STAGE --config FILE` in its own
process group, streams its log lines and the new rows of `output_dir/metrics.jsonl` to callbacks,
and raises `TrainingJobError` with the job's own error (read from its log) when it fails. A rerun
of the same job resumes from the newest complete checkpoint in output_dir; a changed job starts
afresh (`claim_output_dir`, decided here before any rank starts).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wrpo_core.config import LaunchConfig
from wrpo_core.config.training import planned_world_size
from wrpo_core.train.joblog import JobLogErrors, last_words
from wrpo_core.train.jobs import (
    LAUNCHED_ENV,
    JobConfig,
    JobResult,
    LogCallback,
    MetricsCallback,
    Stage,
    TrainingJobError,
    claim_output_dir,
    needs_reference_pass,
    save_on_each_node,
    write_job_config,
)
from wrpo_core.train.metrics import METRICS_FILE, MetricsTail, drop_rows_after_resume_point
from wrpo_core.train.worker import WORKER_MODULE

logger = logging.getLogger(__name__)


def torchrun_command(
    stage: Stage, config_path: str, launch: LaunchConfig, *, run_id: str = "wrpo"
) -> list[str]:
    """The torchrun command line for a job: each worker runs `WORKER_MODULE train STAGE --config FILE`.

    On one machine without a configured `master_port`, torchrun's rendezvous store binds port 0
    itself, so no other process can take a port between choosing and binding it; across
    machines (or with a port set) the rendezvous uses the configured address.
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launch.nproc_per_node}"]
    command.append(f"--nnodes={launch.nnodes}")
    if launch.nnodes == 1 and launch.master_port:
        command += [f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}"]
    else:
        port = launch.master_port or (0 if launch.nnodes == 1 else 29500)
        endpoint = f"{launch.master_addr}:{port}"
        command += ["--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}"]
    return [*command, "-m", WORKER_MODULE, "train", stage, "--config", config_path]


def launched_env(launch: LaunchConfig) -> dict[str, str]:
    """Environment of the launched processes: ours, the config's `env`, unbuffered output, the marker."""
    env = {
        **os.environ,
        **launch.env,
        LAUNCHED_ENV: "1",
        "PYTHONUNBUFFERED": "1",
        **save_on_each_node(launch),
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class LocalJob:
    """A started subprocess job (torchrun or a single process) in its own process group."""

    process: subprocess.Popen
    metrics: MetricsTail
    command: list[str]
    _lines: queue.Queue = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, command: list[str], env: dict[str, str], metrics_path: str | Path) -> LocalJob:
        """Starts `command` with stdout+stderr piped; metrics rows count from now on."""
        tail = MetricsTail(metrics_path)
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", start_new_session=True,
        )  # fmt: skip
        job = cls(process=process, metrics=tail, command=command)
        threading.Thread(target=job._pump, daemon=True).start()
        return job

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n").split("\r")[-1])
        self._lines.put(None)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signals torchrun's process group and every worker's (torchrun gives each its own session)."""
        import psutil

        try:
            workers = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            workers = []
        groups = {self.process.pid}
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(worker.pid))
        groups.discard(os.getpgrp())  # never our own group
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (torchrun then stops its workers), then SIGKILL to all of them after `grace_s`."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.process.wait()

    def watch(
        self, on_log: LogCallback | None = None, on_metrics: MetricsCallback | None = None
    ) -> tuple[int, list[dict[str, Any]], JobLogErrors, list[str]]:
        """Streams lines and metrics until the process ends: (returncode, rows, errors, log tail).

        `errors` is what the whole log said about a failure (`errors.text()`). If a callback
        raises (or the caller is interrupted) the process group is stopped first.
        """
        rows: list[dict[str, Any]] = []
        tail: deque[str] = deque(maxlen=60)
        errors = JobLogErrors()
        try:
            done = False
            while not done:
                try:
                    line = self._lines.get(timeout=0.5)
                except queue.Empty:
                    line = ""
                if line is None:
                    done = True
                elif line:
                    tail.append(line)
                    errors.add(line)
                    if on_log:
                        on_log(line)
                self._emit_metrics(rows, on_metrics)
            returncode = self.process.wait()
            self._emit_metrics(rows, on_metrics)
        finally:
            self.stop()
        return returncode, rows, errors, list(tail)

    def _emit_metrics(self, rows: list[dict[str, Any]], on_metrics: MetricsCallback | None) -> None:
        for row in self.metrics.read_new():
            rows.append(row)
            if on_metrics:
                on_metrics(row)


def run_subprocess(
    command: list[str],
    env: dict[str, str],
    metrics_path: str | Path,
    *,
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
) -> list[dict[str, Any]]:
    """Runs a command as a watched job; returns its metrics rows or raises TrainingJobError."""
    job = LocalJob.start(command, env, metrics_path)
    returncode, rows, errors, tail = job.watch(on_log, on_metrics)
    if returncode != 0:
        text = errors.text() or last_words(tail)
        raise TrainingJobError(text, returncode=returncode, log_tail=tail, failure=errors.root_cause)
    return rows


def prepare_local(
    stage: Stage, job: JobConfig, config_path: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The torchrun command and environment for a job (writing its YAML if it has no file yet)."""
    launch = job.launch or LaunchConfig()
    if config_path is None:
        config_path = write_job_config(job, Path(job.output_dir) / f"job-{stage}.yaml")
    run_id = hashlib.sha1(str(Path(job.output_dir).resolve()).encode()).hexdigest()[:12]
    return torchrun_command(stage, config_path, launch, run_id=run_id), launched_env(launch)


BUILD_CPU_COMM_OP = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_local(
    stage: Stage,
    job: JobConfig,
    *,
    config_path: str | None = None,
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
) -> JobResult:
    """Runs a job under torchrun on this machine (see `launch_job`).

    Before any process starts, output_dir is claimed for the job (`claim_output_dir`): a changed
    job's checkpoints, metrics rows and model are removed here, so no rank removes what another
    writes and the metrics tail starts on the right file. A WRPO job on several processes then
    stores its reference log-probs in one process (`WORKER_MODULE reference`), so the ranks do not
    compute them concurrently. A rerun of the same job resumes from the newest complete checkpoint
    in output_dir (metrics rows after it are dropped, then streamed anew).
    """
    launch = job.launch or LaunchConfig()
    try:
        claim_output_dir(stage, job, world_size=planned_world_size(launch))
    except (OSError, ValueError) as error:  # a missing input: the ranks fail on it and report it
        logger.warning("cannot identify the job's inputs (%s); its processes will report it", error)
    command, env = prepare_local(stage, job, config_path)
    config_path = command[-1]
    metrics_path = Path(job.output_dir) / METRICS_FILE
    if launch.nproc_per_node > 1 and job.training.deepspeed and not torch_cuda_available():
        # DeepSpeed JIT-builds its CPU communication op on first use; ranks building it at the
        # same time into one TORCH_EXTENSIONS_DIR can fail, so one process builds it first.
        run_subprocess([sys.executable, "-c", BUILD_CPU_COMM_OP], env, metrics_path, on_log=on_log)
    if needs_reference_pass(stage, job) and launch.nproc_per_node > 1:
        reference = [sys.executable, "-m", WORKER_MODULE, "reference", "--config", config_path]
        run_subprocess(reference, env, metrics_path, on_log=on_log)
    # Rows after the checkpoint the job resumes from (all, if none) are dropped before the tail
    # starts, so the steps it runs again are streamed and kept once.
    drop_rows_after_resume_point(job.output_dir)
    rows = run_subprocess(command, env, metrics_path, on_log=on_log, on_metrics=on_metrics)
    summary = next((row for row in reversed(rows) if "train_runtime" in row), {})
    return JobResult(output_dir=job.output_dir, metrics=rows, summary=summary, model_uri=job.output_dir)
