"""Reference log-probs: one batched, length-sorted pass of the frozen Target-SFT over the quadruples.

Stored in the quadruples' ref_logp_ws / ref_logp_wt / ref_logp_l columns, so WRPO training
holds only the policy model. What they were computed from travels in the Parquet metadata
(`reference_settings`: the data's text, the reference model's weights, the tokenizer, the
length limits and the precision) and is compared before training uses them: a job's own cache
(`REFERENCE_FILE`) is recomputed when anything differs, log-probs stored in the input data are
refused with the settings that differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from wrpo_core.logprobs import grouped_logps
from wrpo_core.models import model_identity
from wrpo_core.packing import PackedResponseCollator, choose_collator, packed_length
from wrpo_core.storage.provenance import digest
from wrpo_core.tokenization import end_of_turn_id

logger = logging.getLogger(__name__)

REF_COLUMNS = ("ref_logp_ws", "ref_logp_wt", "ref_logp_l")
TEXT_COLUMNS = ("prompt", "y_ws", "y_wt", "y_l")
METADATA_KEY = b"wrpo.reference"
REFERENCE_FILE = "quadruples_with_reference.parquet"


def data_digest(table: pa.Table) -> str:
    """Digest of every text the reference log-probs score: prompt, y_ws, y_wt, y_l, row by row, in order."""
    hasher = hashlib.sha256()
    for name in TEXT_COLUMNS:
        hasher.update(f"\0{name}\0".encode())
        for value in table.column(name).to_pylist():
            encoded = b"\xff" if value is None else value.encode()  # no utf-8 text is the single byte 0xff
            hasher.update(len(encoded).to_bytes(8, "little"))
            hasher.update(encoded)
    return hasher.hexdigest()[:16]


def weights_identity(path: str, *, revision: str | None = None) -> str:
    """A digest of what identifies the reference model's weights (`wrpo_core.models.model_identity`)."""
    return digest(model_identity(path, revision=revision))


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """Digest of what tokenization depends on: chat template, special tokens, end of turn, vocabulary."""
    return digest(
        {
            "chat_template": tokenizer.chat_template,
            "special_tokens": tokenizer.special_tokens_map,
            "special_ids": sorted(tokenizer.all_special_ids),
            "end_of_turn": end_of_turn_id(tokenizer),
            "vocab": digest(sorted(tokenizer.get_vocab().items())),
        }
    )


def reference_settings(
    *,
    reference_model: str,
    table: pa.Table,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    dtype: torch.dtype | str,
    autocast_dtype: torch.dtype | None,
) -> dict[str, object]:
    """Everything reference log-probs depend on; stored with them and compared on use."""
    return {
        "reference_model": reference_model,
        "reference_weights": weights_identity(reference_model),
        "data": data_digest(table),
        "tokenizer": tokenizer_identity(tokenizer),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "dtype": str(dtype).removeprefix("torch."),
        "autocast": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
    }


def settings_difference(stored: dict[str, object], settings: dict[str, object]) -> str:
    """The settings that differ, as 'name: stored -> now' (empty when none do)."""
    names = sorted(set(stored) | set(settings))
    return ", ".join(
        f"{name}: {stored.get(name)!r} -> {settings.get(name)!r}"
        for name in names
        if stored.get(name) != settings.get(name)
    )


@torch.inference_mode()
def compute_reference_logps(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    pad_token_id: int,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    pack_prompt: bool = True,
) -> np.ndarray:
    """Summed reference log-probs of [y_ws, y_wt, y_l] for every example, shape (rows, 3).

    Examples are batched longest-first so padding is minimal; results come back in row order.
    `autocast_dtype` (e.g. bf16) should match the policy's mixed precision during training, so
    that the implicit rewards start at exactly zero. `pack_prompt` encodes each prompt once for
    its responses (`wrpo_core.packing`) when the model supports it (else logged, and one row per
    response); the values agree with the unpacked pass up to float rounding.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    prompt_ids, response_ids = list(dataset["prompt_ids"]), list(dataset["response_ids"])  # decoded once
    examples = list(zip(prompt_ids, response_ids, strict=True))
    longest = max((len(p) + max(map(len, rs)) for p, rs in examples), default=0)  # one row, unpacked
    collate = choose_collator(
        [model], pad_token_id=pad_token_id, pack=pack_prompt, max_length=longest, where="reference log-probs"
    )
    packed = isinstance(collate, PackedResponseCollator)
    lengths = [packed_length(p, rs) if packed else len(p) + max(map(len, rs)) for p, rs in examples]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    result = np.empty((len(dataset), 3), dtype=np.float64)
    for start in tqdm(range(0, len(order), batch_size), desc="reference log-probs", disable=not progress):
        index = order[start : start + batch_size]
        batch = collate([{"prompt_ids": prompt_ids[i], "response_ids": response_ids[i]} for i in index])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logps, _ = grouped_logps(model, batch)
        result[index] = logps.double().cpu().numpy()
    if not np.isfinite(result).all():
        bad = int(np.argwhere(~np.isfinite(result))[0][0])
        raise ValueError(f"reference log-prob of row {bad} is not finite: {result[bad].tolist()}")
    return result


def attach_reference(table: pa.Table, logps: np.ndarray, settings: dict[str, object]) -> pa.Table:
    """The quadruples with the ref_logp_* columns filled and the settings recorded in the metadata."""
    if logps.shape != (table.num_rows, 3):
        raise ValueError(f"expected reference log-probs of shape ({table.num_rows}, 3), got {logps.shape}")
    for j, name in enumerate(REF_COLUMNS):
        column = pa.array(logps[:, j], type=pa.float64())
        table = table.set_column(table.schema.get_field_index(name), name, column)
    metadata = dict(table.schema.metadata or {})
    metadata[METADATA_KEY] = json.dumps(settings, sort_keys=True).encode()
    return table.replace_schema_metadata(metadata)


def _stored_settings(schema: pa.Schema) -> dict[str, object] | None:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return None if raw is None else json.loads(raw)


def stored_reference(table: pa.Table, settings: dict[str, object], *, where: str) -> np.ndarray | None:
    """The stored reference log-probs if all are present and were computed with `settings`, else None.

    Raises when they are present but were computed with other settings (naming the settings that
    differ), or only partly filled.
    """
    columns = [table.column(name) for name in REF_COLUMNS]
    nulls = sum(c.null_count for c in columns)
    if nulls == 3 * table.num_rows:
        return None
    if nulls:
        raise ValueError(
            f"{where}: reference log-probs are only partly filled ({nulls} nulls); recompute them"
        )
    stored = _stored_settings(table.schema)
    if stored is not None and stored != settings:
        raise ValueError(
            f"{where}: reference log-probs were computed with other settings than this job's "
            f"({settings_difference(stored, settings)}); recompute them (drop the ref_logp_* columns) "
            "or match the settings"
        )
    return np.stack([c.to_numpy(zero_copy_only=False) for c in columns], axis=1).astype(np.float64)


def cached_reference(path: str | Path, settings: dict[str, object], *, rows: int) -> np.ndarray | None:
    """A job's cached reference log-probs when `path` holds them for exactly `settings`, else None.

    None (and a log line saying why) when the file is missing, was computed with other settings,
    has another number of rows or is not completely filled: the caller recomputes and overwrites it.
    """
    path = Path(path)
    if not path.exists():
        return None
    stored = _stored_settings(pq.read_schema(path))
    if stored != settings:
        changed = "no settings recorded" if stored is None else settings_difference(stored, settings)
        logger.info("%s: recomputing the reference log-probs (%s)", path, changed)
        return None
    cached = pq.read_table(path, columns=list(REF_COLUMNS))
    if cached.num_rows != rows or any(cached.column(name).null_count for name in REF_COLUMNS):
        logger.info("%s: recomputing the reference log-probs (incomplete: %d rows)", path, cached.num_rows)
        return None
    logger.info("%s: reusing the reference log-probs (same data, model, tokenizer and settings)", path)
    return np.stack([cached.column(n).to_numpy(zero_copy_only=False) for n in REF_COLUMNS], axis=1).astype(
        np.float64
    )
