"""Finding where a training job can resume: its complete `checkpoint-N` folders in output_dir.

A job killed while saving leaves a partly written checkpoint; these functions skip it. Also the
switch that makes every machine write its own checkpoints (the Trainer's save_on_each_node),
which the launchers set and `training_arguments` reads.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

SAVE_ON_EACH_NODE_ENV = "WRPO_SAVE_ON_EACH_NODE"
"""1 = every machine writes its own checkpoints (the Trainer's save_on_each_node); set by the launchers."""


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
