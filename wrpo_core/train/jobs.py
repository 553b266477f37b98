"""What a training job is and how one process runs it: its config, identity, result, errors and environment.

A job is a stage (`sft` or `wrpo`) and its job config. The launchers (`torchrun.py`,
`ray_train.py`) start processes marked with `LAUNCHED_ENV`; each of them runs the stage's
training function through `train_in_process` (and a WRPO job's reference pass through
`store_reference`). A failed job raises `TrainingJobError` with its own error text.

A job's fingerprint (`job_fingerprint`) digests what decides its result: the training settings,
the number of processes, the model's and the data's identity. `claim_output_dir` records it in
output_dir when the job starts, and a job whose fingerprint differs from the recorded one starts
afresh instead of resuming another job's checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from wrpo_core.config import ConfigError, LaunchConfig, SFTJobConfig, WRPOJobConfig
from wrpo_core.config.training import gradient_accumulation
from wrpo_core.locations import resolve_location
from wrpo_core.models import model_identity
from wrpo_core.storage.provenance import digest, file_sha256
from wrpo_core.train.checkpoints import SAVE_ON_EACH_NODE_ENV, adopt_output_dir

if TYPE_CHECKING:
    import numpy as np

Stage = Literal["sft", "wrpo"]
JobConfig = SFTJobConfig | WRPOJobConfig
LogCallback = Callable[[str], None]
MetricsCallback = Callable[[dict[str, Any]], None]

LAUNCHED_ENV = "WRPO_LAUNCHED"
"""Set to 1 in every process a launcher starts: `wrpo train` there trains instead of launching."""

ERROR_LINE = re.compile(
    r"^(?:error: \S|(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt)(?::|$))"
)
"""A line that states an error: the CLI's or worker's `error: ...`, or an exception's `Type: message`."""


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
        return next((line for line in reversed(lines) if ERROR_LINE.match(line)), None)

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


# --- a job's identity ---------------------------------------------------------------------------

RESULT_NEUTRAL_SETTINGS = frozenset(
    {"logging_steps", "save_steps", "save_total_limit", "gradient_checkpointing", "deepspeed", "report_to",
     "pack_prompt"}
)  # fmt: skip
"""Training settings left out of the fingerprint: when to log and save, where metrics also go,
recomputing activations and encoding a prompt once for its three responses (equal log-probs within
float tolerance, tests/test_packing.py) do not change the weights (the DeepSpeed config enters by
its content, not its path)."""


def data_identity(url: str) -> dict[str, Any]:
    """What identifies a job's data: the sha256 of its content (every file's, for a folder).

    FileNotFoundError naming the data when it does not exist.
    """
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(resolve_location(url))
    if not fs.exists(root):
        raise FileNotFoundError(f"data {url}: no such file")
    digests = {}
    for name in sorted(fs.find(root)) if fs.isdir(root) else [root]:
        if isinstance(fs, LocalFileSystem):
            value = file_sha256(name)
        else:
            hasher = hashlib.sha256()
            with fs.open(name, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(block)
            value = hasher.hexdigest()
        digests[name[len(root) :].lstrip("/")] = value
    return {"sha256": digests}


def job_identity(stage: Stage, job: JobConfig, world_size: int) -> dict[str, Any]:
    """What decides a job's result, as JSON: the digested part of `job_fingerprint`.

    The training settings (minus RESULT_NEUTRAL_SETTINGS; the gradient accumulation as derived
    for `world_size`), the number of processes (it splits the data and the ZeRO partitions a
    checkpoint holds), the DeepSpeed config's content, the model's and reference model's identity
    and the data's. The paths themselves are left out (a copied model or data file is the same
    job); `launch` is left out but for the number of processes (ports, Ray address and storage do
    not change the weights); so is the code version (a fix in the trainer does not restart a
    job: delete output_dir for that).
    """
    hp = job.training
    training = hp.model_dump(mode="json", exclude=set(RESULT_NEUTRAL_SETTINGS) | {"global_batch_size"})
    training["gradient_accumulation_steps"] = gradient_accumulation(hp, world_size)
    identity: dict[str, Any] = {
        "stage": stage,
        "training": training,
        "world_size": world_size,
        "deepspeed_config": file_sha256(hp.deepspeed) if hp.deepspeed else None,
        "trust_remote_code": job.trust_remote_code,
        "model": model_identity(job.model, revision=getattr(job, "revision", None)),
        "data": data_identity(job.data),
    }
    if isinstance(job, WRPOJobConfig) and job.reference_model not in (None, job.model):
        identity["reference_model"] = model_identity(job.reference_model)
    return identity


def process_world_size() -> int:
    """The processes of the job this process belongs to: WORLD_SIZE (torchrun, Ray Train), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def job_fingerprint(stage: Stage, job: JobConfig, world_size: int | None = None) -> str:
    """The job's fingerprint (see `job_identity`); `world_size` defaults to this process's job's."""
    size = process_world_size() if world_size is None else world_size
    return digest(job_identity(stage, job, size))


def claim_output_dir(stage: Stage, job: JobConfig, world_size: int | None = None) -> str:
    """Makes output_dir this job's before it trains; its fingerprint.

    A rerun of the same job keeps its checkpoints (and resumes from them); a changed job (another
    fingerprint, or outputs that no record vouches for) first has them removed, with its metrics
    rows and final model. One process per output_dir calls this before the job's processes write
    there: `train_in_process` (local rank 0), `launch_local` and `launch_ray` (before any process
    starts). `world_size` defaults to this process's job's (WORLD_SIZE); a launcher passes the
    planned one.
    """
    size = process_world_size() if world_size is None else world_size
    identity = job_identity(stage, job, size)
    fingerprint = digest(identity)
    adopt_output_dir(job.output_dir, fingerprint, identity)
    return fingerprint


def is_local_main_process() -> bool:
    """True in the first process of its machine (LOCAL_RANK 0 or unset)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def train_in_process(stage: Stage, job: JobConfig, *, claimed: bool = False) -> dict[str, float]:
    """Runs the stage's training function in this process (every rank of a launched job does this).

    The first process of each machine first claims output_dir for the job (`claim_output_dir`):
    a launcher has already done so, and then nothing changes; run in this process alone (or
    under a torchrun of its own), a changed job's old checkpoints are removed here. The other
    ranks wait for it in `run_training` before they look for a checkpoint. `claimed`: this
    process has just claimed it (the identity, with its hashes and hub look-ups, is not redone).
    """
    if is_local_main_process() and not claimed:
        claim_output_dir(stage, job)
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


def write_job_config(job: JobConfig, path: str | Path) -> str:
    """Writes a job config as YAML (what the launched processes read); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return str(path)


def store_reference(job: WRPOJobConfig) -> np.ndarray | None:
    """Computes the job's reference log-probs once per machine (the other local ranks then read them).

    Returns what `prepare_reference` returns: the log-probs, or None when the job needs none stored.
    """
    from wrpo_core.models import load_tokenizer
    from wrpo_core.train.wrpo import load_quadruples, prepare_reference

    tokenizer = load_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    return prepare_reference(job, load_quadruples(job.data), tokenizer)


def reference_job(job: WRPOJobConfig, *, where: str) -> dict[str, Any]:
    """`wrpo reference`: stores a WRPO job's reference log-probs with its data; what was stored.

    ConfigError (naming `where`, the job's file) for a job that trains without stored ones.
    """
    from wrpo_core.reference import REFERENCE_FILE

    if not job.training.precompute_reference:
        raise ConfigError(f"{where}: training.precompute_reference is false; nothing to precompute")
    logps = store_reference(job)
    return {"rows": None if logps is None else len(logps), "stored": f"{job.output_dir}/{REFERENCE_FILE}"}
