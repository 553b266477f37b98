"""Finding where a training job can resume: its complete `checkpoint-N` folders in output_dir.

A job resumes only from what the same job wrote: `adopt_output_dir` records the job's
fingerprint (`FINGERPRINT_FILE`, see `jobs.job_fingerprint`) in output_dir when it starts and
first removes what a different job left there (checkpoints, metrics rows, the final model). A job
killed while saving leaves a partly written checkpoint; `last_complete_checkpoint` skips it. Also
the switch that makes every machine write its own checkpoints (the Trainer's save_on_each_node),
which the launchers set and `training_arguments` reads.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import socket
import zipfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SAVE_ON_EACH_NODE_ENV = "WRPO_SAVE_ON_EACH_NODE"
"""1 = every machine writes its own checkpoints (the Trainer's save_on_each_node); set by the launchers."""

FINGERPRINT_FILE = "job_fingerprint.json"
"""In output_dir: the fingerprint (and what it digests) of the job whose checkpoints and model are there."""

JOB_OUTPUTS = (
    "checkpoint-*", "runs", "metrics.jsonl", "README.md", "trainer_state.json", "*_results.json",
    "training_args.bin", "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model*.bin.index.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.*",
)  # fmt: skip
"""What a training job writes in output_dir (with the run's model card): removed when another job takes it.

Not listed, so kept: the WRPO reference cache (`quadruples_with_reference.parquet`, keyed by its
own inputs), the launchers' `job-STAGE.yaml`, and anything else a user put there.
"""


def recorded_job(output_dir: str | Path) -> dict[str, Any] | None:
    """The fingerprint record of the job that last started in output_dir, or None (none, or unreadable)."""
    try:
        record = json.loads((Path(output_dir) / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("fingerprint"), str) else None


def job_outputs(output_dir: str | Path) -> list[Path]:
    """The entries of output_dir that a training job wrote (`JOB_OUTPUTS`), sorted by name."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(
        path for path in folder.iterdir() if any(fnmatch.fnmatch(path.name, pat) for pat in JOB_OUTPUTS)
    )


def changed_settings(before: Any, after: Any) -> list[str]:
    """The entries that differ between two job identities, two levels deep (`training.beta`, `data.sha256`)."""
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return ["(all)"] if before != after else []
    names = []
    for key in sorted(set(before) | set(after), key=str):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            names += [
                f"{key}.{inner}"
                for inner in sorted(set(old) | set(new), key=str)
                if old.get(inner) != new.get(inner)
            ]
        elif old != new or (key in before) != (key in after):
            names.append(str(key))
    return names


def adopt_output_dir(output_dir: str | Path, fingerprint: str, identity: dict[str, Any]) -> list[str]:
    """Makes output_dir the job's with this fingerprint; the names of a different job's outputs it removed.

    When the recorded fingerprint is this one, nothing changes (a rerun resumes from its newest
    complete checkpoint). Otherwise (another job's record, or outputs without any record) those
    outputs are removed first, so the job trains from its start, and then the record is written
    (atomically: a concurrent reader sees the old record or the new one). Call it in one process
    per output_dir before any process of the job writes there.
    """
    folder = Path(output_dir)
    record = recorded_job(folder)
    if record is not None and record["fingerprint"] == fingerprint:
        return []
    stale = job_outputs(folder)
    if stale:
        if record is None:
            why = f"no {FINGERPRINT_FILE} says which job wrote them"
        else:
            changed = changed_settings(record.get("identity"), identity)
            why = f"they belong to job {record['fingerprint']} (changed: {', '.join(changed) or 'unknown'})"
        names = ", ".join(path.name for path in stale)
        logger.warning("%s: starting afresh, removing %s: %s", folder, names, why)
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / f".{FINGERPRINT_FILE}.{socket.gethostname()}.{os.getpid()}"
    scratch.write_text(json.dumps({"fingerprint": fingerprint, "identity": identity}, indent=1), "utf-8")
    os.replace(scratch, folder / FINGERPRINT_FILE)
    return [path.name for path in stale]


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
