"""Launching a training job and watching it: torchrun on this machine, or Ray Train on a Ray cluster.

The job's `launch` section (a `LaunchConfig`) picks the launcher; `wrpo train sft|wrpo --config`
goes through here when it is set. The flow's training task calls `launch_job`, which streams the
job's log lines and per-step metrics to callbacks and raises `TrainingJobError` with the job's own
error text when it fails:

    result = launch_job("wrpo", job, on_log=logger.info, on_metrics=record_step)

`local` runs `torchrun ... -m wrpo_core.train.launch train STAGE --config FILE` (the `wrpo` CLI in
each worker, see `run_torchrun_worker`) as a subprocess in its own process group; the metrics
come from `output_dir/metrics.jsonl`. `ray` runs the same training
function in Ray Train `TorchTrainer` workers, mirrors every checkpoint to the run's storage
(`storage_path`/`run_name`) and, when a worker fails or the job is rerun, restores the newest one
into `output_dir` so the Trainer resumes from it; the final model is stored there too.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from wrpo_core.config import LaunchConfig, SFTJobConfig, WRPOJobConfig

logger = logging.getLogger(__name__)

Stage = Literal["sft", "wrpo"]
JobConfig = SFTJobConfig | WRPOJobConfig
LogCallback = Callable[[str], None]
MetricsCallback = Callable[[dict[str, Any]], None]

LAUNCHED_ENV = "WRPO_LAUNCHED"
"""Set to 1 in every process a launcher starts: `wrpo train` there trains instead of launching."""

WORKER_MODULE = "wrpo_core.train.launch"
"""What torchrun runs in each worker process: this module's `run_torchrun_worker` (`wrpo ARGS`)."""

METRICS_FILE = "metrics.jsonl"
"""Per-step metrics of a job, in its output_dir (written by rank 0)."""

SAVE_ON_EACH_NODE_ENV = "WRPO_SAVE_ON_EACH_NODE"
"""1 = every machine writes its own checkpoints (the Trainer's save_on_each_node); set by the launchers."""

FINAL_MODEL_DIR = "model"
"""Name of the final Hugging Face model in Ray storage (next to the `checkpoint-N` folders)."""

PROPAGATED_ENV = (
    "OMP_NUM_THREADS",
    "TORCH_EXTENSIONS_DIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)
"""Driver environment variables that Ray workers inherit (torchrun children inherit everything)."""

_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")
_ERROR_LINE = re.compile(
    r"^(?:error: \S|(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt)(?::|$))"
)
_FATAL_LINE = re.compile(r"^(?:terminate called\b|Fatal Python error: |what\(\): )")
"""Last words of a process that dies of a signal: C++ std::terminate, Python's fault handler."""
_LAUNCHER_NOISE = ("ChildFailedError", "torch.distributed.elastic")
_SUMMARY_FIELD = re.compile(r"^  (\w+)\s*: ?(.*)$")
_RANK_FIELD = re.compile(r"^(-?\d+) \(local_rank: (-?\d+)\)")
_EXITCODE_FIELD = re.compile(r"^(-?\d+)(?: \(pid: \d+\))?\s*(?:\((SIG\w+)\))?")


@dataclass(frozen=True)
class RankFailure:
    """The root cause entry of torchrun's ChildFailedError summary: the process that failed first."""

    rank: int
    local_rank: int
    exitcode: int
    signal: str | None = None
    """`SIGABRT` etc. when a signal ended the process (exitcode is then minus its number)."""
    error_file: str | None = None
    """The rank's recorded exception (`@record` in the worker); None when it wrote none."""
    traceback: tuple[str, ...] = ()
    """The recorded traceback's lines, or torchrun's one-line note (`Signal 6 (SIGABRT) received ...`)."""

    @property
    def exception(self) -> str | None:
        """The exception line of the recorded traceback (`Type: message`), if there is one."""
        if self.error_file is None:
            return None
        lines = [line.strip() for line in self.traceback if line.strip()]
        return next((line for line in reversed(lines) if _ERROR_LINE.match(line)), None)

    def describe(self) -> str:
        """How the rank ended: `rank 1, exit code 1` or `rank 1 killed by SIGABRT, exit code -6`."""
        how = f" killed by {self.signal}" if self.signal else ""
        return f"rank {self.rank}{how}, exit code {self.exitcode}"


class TrainingJobError(RuntimeError):
    """A training job that failed: `error` is the job's own error text, `log_tail` its last lines.

    `failure` is torchrun's root-cause entry (which rank, exit code or signal) when the job ran
    under torchrun and a worker failed.
    """

    def __init__(
        self,
        error: str,
        *,
        returncode: int | None = None,
        log_tail: Iterable[str] = (),
        failure: RankFailure | None = None,
    ):
        self.error = error
        self.returncode = returncode
        self.log_tail = list(log_tail)
        self.failure = failure
        code = f" (exit code {returncode})" if returncode is not None else ""
        super().__init__(f"training job failed{code}: {error}")


@dataclass
class JobResult:
    """What a finished job left: its output folder, streamed metrics rows, and summary."""

    output_dir: str
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    model_uri: str | None = None
    """Where the final HF model is: output_dir (local) or the run's storage (ray)."""


def save_on_each_node(launch: LaunchConfig) -> dict[str, str]:
    """The environment switch for Trainer's save_on_each_node: on unless output_dir is shared."""
    return {SAVE_ON_EACH_NODE_ENV: "0" if launch.shared_output_dir else "1"}


def inside_launched_job() -> bool:
    """True in a process that a launcher started (torchrun child or Ray worker)."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def train_in_process(stage: Stage, job: JobConfig) -> dict[str, float]:
    """Runs the stage's training function in this process (every rank of a launched job does this)."""
    if stage == "sft":
        from wrpo_core.train.sft import train_sft

        return train_sft(job)
    from wrpo_core.train.wrpo import train_wrpo

    return train_wrpo(job)


def needs_reference_pass(stage: Stage, job: JobConfig) -> bool:
    """True for a WRPO job that trains on stored reference log-probs (computed once, before training)."""
    if stage != "wrpo":
        return False
    return job.training.precompute_reference and job.training.loss_type != "simpo"


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


# --- a job's state on disk: checkpoints and metrics ------------------------------------------


def checkpoint_is_complete(path: Path) -> bool:
    """True when every process finished writing this checkpoint folder.

    Rank 0 writes trainer_state.json last, after DeepSpeed's closing barrier (so every ZeRO shard
    and `latest` are written); the other ranks may still be writing their RNG state then, so with
    several processes each rng_state_R.pth must be a whole file (torch.save writes a zip archive).
    """
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    shards = list(path.glob("global_step*/*optim_states.pt"))
    if not shards and not any(path.glob("global_step*")):
        return True  # not a DeepSpeed checkpoint
    if not (path / "latest").is_file():
        return False
    ranks = len(shards)
    return ranks <= 1 or all(zipfile.is_zipfile(path / f"rng_state_{rank}.pth") for rank in range(ranks))


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` folder that was completely written, or None.

    A job killed while saving leaves a partial folder, which is skipped (the Trainer's own
    `get_last_checkpoint` would pick it and fail to resume).
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            steps.append((int(match.group(1)), path))
    for _, path in sorted(steps, reverse=True):
        if checkpoint_is_complete(path):
            return str(path)
        logger.warning("skipping incomplete checkpoint %s", path)
    return None


def checkpoint_step(checkpoint: str | None) -> int:
    """The optimizer step of a `checkpoint-N` folder; 0 for None (training starts afresh)."""
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0


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


# --- the local launcher: torchrun ------------------------------------------------------------


def write_job_config(job: JobConfig, path: str | Path) -> str:
    """Writes a job config as YAML (what the launched processes read); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return str(path)


def torchrun_command(
    stage: Stage, config_path: str, launch: LaunchConfig, *, run_id: str = "wrpo"
) -> list[str]:
    """The torchrun command line for a job: each worker runs `wrpo train` via `run_torchrun_worker`.

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


class JobLogErrors:
    """What a job's log says about its failure, gathered line by line as the log streams.

    Three kinds of lines count: the first `error: ...` or exception line a worker printed, the
    first fatal message (`terminate called ...`, `Fatal Python error: ...`) of a process about to
    die of a signal, and torchrun's ChildFailedError summary, whose root cause names the rank
    that failed first, its exit code or signal, and its recorded traceback.
    """

    def __init__(self) -> None:
        self.exception: str | None = None
        self.fatal: str | None = None
        self._summary: list[str] | None = None

    def add(self, raw: str) -> None:
        """Takes one log line (rank prefixes such as `[rank0]: ` are removed)."""
        line = _RANK_PREFIX.sub("", raw.rstrip())
        if self._summary is not None:
            self._summary.append(line)
            return
        if line.startswith("Root Cause (first observed failure):"):
            self._summary = []
            return
        stripped = line.strip()
        launcher_noise = any(noise in stripped for noise in _LAUNCHER_NOISE)
        if self.exception is None and _ERROR_LINE.match(stripped) and not launcher_noise:
            self.exception = stripped.removeprefix("error: ")
        if self.fatal is None and _FATAL_LINE.match(stripped):
            self.fatal = stripped

    @property
    def root_cause(self) -> RankFailure | None:
        """torchrun's root-cause entry, once its summary has been read; else None."""
        return parse_root_cause(self._summary or [])

    def text(self) -> str | None:
        """The job's own error, said as precisely as the log allows; None if it says nothing.

        The failing rank's recorded exception comes first, then the first exception line in the
        log; a rank that a signal ended is named with the signal and its last fatal message.
        """
        failure = self.root_cause
        exception = (failure.exception if failure else None) or self.exception
        if failure is None:
            return exception or self.fatal
        if failure.signal:
            words = exception or self.fatal
            return f"{failure.describe()}" + (f"; last error in the log: {words}" if words else "")
        if exception:
            return f"{exception} ({failure.describe()})"
        return failure.describe() + (f"; last error in the log: {self.fatal}" if self.fatal else "")


def parse_root_cause(summary: list[str]) -> RankFailure | None:
    """The first entry after `Root Cause (first observed failure):` in torchrun's summary.

    An entry is `  name : value` lines (rank, exitcode, error_file, traceback); a recorded
    traceback continues on more-indented lines; a line of `=` or `-` ends the entry.
    """
    fields: dict[str, str] = {}
    traceback: list[str] = []
    for line in summary:
        if is_banner(line):
            break
        match = _SUMMARY_FIELD.match(line)
        if match and not traceback:
            fields[match.group(1)] = match.group(2).strip()
            if match.group(1) == "traceback":
                traceback.append(match.group(2).strip())
        elif traceback:
            traceback.append(line)
    rank = _RANK_FIELD.match(fields.get("rank", ""))
    exitcode = _EXITCODE_FIELD.match(fields.get("exitcode", ""))
    if not rank or not exitcode:
        return None
    error_file = fields.get("error_file")
    return RankFailure(
        rank=int(rank.group(1)),
        local_rank=int(rank.group(2)),
        exitcode=int(exitcode.group(1)),
        signal=exitcode.group(2),
        error_file=None if error_file in (None, "", "<N/A>") else error_file,
        traceback=tuple(traceback),
    )


def job_error_text(lines: Iterable[str]) -> str | None:
    """The job's own error in its log (see `JobLogErrors.text`); None if the log names none.

    Rank prefixes (`[rank0]: `) and the CLI's `error: ` are removed; torchrun's own
    ChildFailedError is never the answer, but its root cause tells which rank failed and how.
    """
    errors = JobLogErrors()
    for line in lines:
        errors.add(line)
    return errors.text()


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


def last_words(tail: list[str]) -> str:
    """The last line of a log that is not a banner of `=` or `-`; `no output` for an empty log."""
    for line in reversed(tail):
        if line.strip() and not is_banner(line):
            return line.strip()
    return "no output"


def is_banner(line: str) -> bool:
    """True for a line of only `=` or `-` (torchrun's summary frames)."""
    stripped = line.strip()
    return bool(stripped) and set(stripped) <= {"=", "-"}


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

    A WRPO job on several processes first stores its reference log-probs in one process
    (`wrpo reference`), so the ranks do not compute them concurrently. A rerun resumes from the
    newest complete checkpoint in output_dir (metrics rows after it are dropped, then streamed anew).
    """
    launch = job.launch or LaunchConfig()
    command, env = prepare_local(stage, job, config_path)
    config_path = command[-1]
    metrics_path = Path(job.output_dir) / METRICS_FILE
    if launch.nproc_per_node > 1 and job.training.deepspeed and not torch_cuda_available():
        # DeepSpeed JIT-builds its CPU communication op on first use; ranks building it at the
        # same time into one TORCH_EXTENSIONS_DIR can fail, so one process builds it first.
        run_subprocess([sys.executable, "-c", BUILD_CPU_COMM_OP], env, metrics_path, on_log=on_log)
    if needs_reference_pass(stage, job) and launch.nproc_per_node > 1:
        reference = [sys.executable, "-m", "wrpo_core.cli", "reference", "--config", config_path]
        run_subprocess(reference, env, metrics_path, on_log=on_log)
    # Rows after the checkpoint the job resumes from (all, if none) are dropped before the tail
    # starts, so the steps it runs again are streamed and kept once.
    trim_metrics(metrics_path, checkpoint_step(last_complete_checkpoint(job.output_dir)))
    rows = run_subprocess(command, env, metrics_path, on_log=on_log, on_metrics=on_metrics)
    summary = next((row for row in reversed(rows) if "train_runtime" in row), {})
    return JobResult(output_dir=job.output_dir, metrics=rows, summary=summary, model_uri=job.output_dir)


def run_torchrun_worker(argv: list[str]) -> NoReturn:
    """Entry point of every torchrun worker: runs `wrpo ARGV` here, then ends the process.

    A worker that returns ends through `exit_without_teardown`, not the interpreter's shutdown.
    There, a gloo work thread may still be releasing the tensors of a finished collective, which
    takes the GIL; Python (before 3.14) ends a thread that asks for the GIL while it finalizes
    with pthread_exit, whose unwind through a noexcept destructor calls std::terminate, and the
    worker dies of SIGABRT ("terminate called without an active exception") after it trained
    and saved everything. destroy_process_group() does not prevent it: DeepSpeed's ZeRO-3
    objects keep the groups, and so their threads, alive until the interpreter's teardown.
    An exception that escapes `wrpo` is recorded for torchrun's failure summary (`record`) and
    ends the process as usual.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    from wrpo_core.cli import main

    exit_without_teardown(record(main)(argv) or 0)


def exit_without_teardown(code: int) -> NoReturn:
    """Ends this process with `code` like sys.exit does, minus the interpreter's own teardown.

    The atexit handlers run (logging flushes its handlers) and stdout/stderr are flushed while
    every thread can still run; then os._exit ends all threads at once.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# --- the Ray launcher: Ray Train TorchTrainer ------------------------------------------------


def ray_run_name(stage: Stage, job: JobConfig) -> str:
    """The run's name in Ray storage: `launch.run_name`, else stage + output folder name + path hash."""
    launch = job.launch or LaunchConfig()
    if launch.run_name:
        return launch.run_name
    digest = hashlib.sha1(str(Path(job.output_dir).resolve()).encode()).hexdigest()[:8]
    return f"wrpo-{stage}-{Path(job.output_dir).name}-{digest}"


def ray_worker_env(launch: LaunchConfig) -> dict[str, str]:
    """Environment variables for Ray workers: the driver's PROPAGATED_ENV, the config's `env`, the marker."""
    env = {name: os.environ[name] for name in PROPAGATED_ENV if name in os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    return {**env, **launch.env, LAUNCHED_ENV: "1", **save_on_each_node(launch)}


def ray_trainer(stage: Stage, job: JobConfig, events: Any = None, *, use_gpu: bool = False):
    """The Ray Train TorchTrainer for a job: workers, storage, retries, checkpoints kept."""
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
            name=ray_run_name(stage, job),
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
    in this thread while `fit()` runs in another.
    """
    import ray
    from ray.util.queue import Empty, Queue

    launch = job.launch or LaunchConfig(launcher="ray")
    if not ray.is_initialized():
        ray.init(address=launch.ray_address, log_to_driver=on_log is None)
    use_gpu = launch.use_gpu if launch.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    events = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = ray_trainer(stage, job, events, use_gpu=use_gpu).fit()
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
        raise TrainingJobError(ray_error_text(outcome["error"]), log_tail=tail) from outcome["error"]
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
        def on_log(self, args, state, control, logs=None, **kwargs):
            if events is not None and state.is_world_process_zero and logs:
                events.put_nowait(("metrics", {"step": state.global_step, "time": time.time(), **logs}))

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            barrier()  # every rank has written its shards and RNG state
            with tempfile.TemporaryDirectory(dir=args.output_dir) as scratch:
                checkpoint = None
                if ray.train.get_context().get_local_rank() == 0:  # one upload per machine
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


def _restore_from_ray(output_dir: str) -> bool:
    """Copies Ray's newest checkpoint into output_dir unless it is there; True if the run had finished."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
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
    """Runs on every Ray Train worker: restore, reference pass, training, final model upload."""
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
        finished = _restore_from_ray(job.output_dir)
        if finished:
            return None
        if needs_reference_pass(stage, job) and local_rank == 0:
            _store_reference(job)
        barrier()
        with extra_callbacks(*_ray_callbacks(events, rank)):
            summary = train_in_process(stage, job)
        _report_final_model(
            job.output_dir, rank, {k: v for k, v in summary.items() if isinstance(v, int | float)}
        )
        return summary
    finally:
        if handler:
            logging.getLogger().removeHandler(handler)


def _store_reference(job: WRPOJobConfig) -> None:
    """Computes the job's reference log-probs once per machine (the other local ranks then read them)."""
    from wrpo_core.train.common import load_tokenizer
    from wrpo_core.train.wrpo import load_quadruples, prepare_reference

    tokenizer = load_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    prepare_reference(job, load_quadruples(job.data), tokenizer)


if __name__ == "__main__":  # a torchrun worker (see torchrun_command)
    from wrpo_core.train.launch import run_torchrun_worker

    run_torchrun_worker(sys.argv[1:])
