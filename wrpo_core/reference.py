"""Reference log-probs: one batched, length-sorted pass of the frozen Target-SFT over the quadruples.

Stored in the quadruples' ref_logp_ws / ref_logp_wt / ref_logp_l columns, so WRPO training
holds only the policy model. The tokenization settings they were computed with travel in the
Parquet metadata and are checked before training uses them.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from wrpo_core.logprobs import grouped_logps
from wrpo_core.tokenization import ResponseCollator

REF_COLUMNS = ("ref_logp_ws", "ref_logp_wt", "ref_logp_l")
METADATA_KEY = b"wrpo.reference"
REFERENCE_FILE = "quadruples_with_reference.parquet"


def reference_settings(reference_model: str, max_length: int, max_prompt_length: int) -> dict[str, object]:
    """What reference log-probs depend on besides the data; stored with them and compared on use."""
    return {
        "reference_model": reference_model,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
    }


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
) -> np.ndarray:
    """Summed reference log-probs of [y_ws, y_wt, y_l] for every example, shape (rows, 3).

    Examples are batched longest-first so padding is minimal; results come back in row order.
    `autocast_dtype` (e.g. bf16) should match the policy's mixed precision during training, so
    that the implicit rewards start at exactly zero.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    collate = ResponseCollator(pad_token_id=pad_token_id)
    prompt_ids, response_ids = list(dataset["prompt_ids"]), list(dataset["response_ids"])  # decoded once
    lengths = [len(p) + max(len(r) for r in rs) for p, rs in zip(prompt_ids, response_ids, strict=True)]
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


def stored_reference(table: pa.Table, settings: dict[str, object], *, where: str) -> np.ndarray | None:
    """The stored reference log-probs if all are present and were computed with `settings`, else None.

    Raises when they are present but were computed with other settings, or only partly filled.
    """
    columns = [table.column(name) for name in REF_COLUMNS]
    nulls = sum(c.null_count for c in columns)
    if nulls == 3 * table.num_rows:
        return None
    if nulls:
        raise ValueError(
            f"{where}: reference log-probs are only partly filled ({nulls} nulls); recompute them"
        )
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is not None:
        stored = json.loads(raw)
        if stored != settings:
            raise ValueError(
                f"{where}: reference log-probs were computed with {stored}, but this job uses {settings}; "
                "recompute them (drop the ref_logp_* columns) or match the settings"
            )
    return np.stack([c.to_numpy(zero_copy_only=False) for c in columns], axis=1).astype(np.float64)
