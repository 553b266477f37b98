"""Prompt ingest (JSONL, JSON, Parquet, `datasets.save_to_disk` folders) and the SFT/preference split.

A prompt's id is the sha256 hex of its raw UTF-8 text, as in UltraFeedback and
princeton-nlp/llama3-ultrafeedback-armorm; ids found in the input are only compared, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from wrpo_core.config import PromptsConfig
from wrpo_core.locations import resolve_location
from wrpo_core.schemas import (
    PROMPTS,
    DataError,
    conform,
    decode_line,
    file_not_found,
    iter_jsonl,
    open_input,
    quote,
)

#: Fields searched for the prompt, in order, when no `prompt_field` is given.
PROMPT_FIELDS = ("prompt", "instruction", "messages")

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def prompt_id_of(text: str) -> str:
    """The prompt id: sha256 hex of the raw prompt text, byte for byte (no stripping or normalizing)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class IngestReport:
    """What `load_prompts` read, kept and collapsed."""

    rows_read: int = 0
    kept: int = 0
    duplicates: int = 0
    prompt_id_mismatches: int = 0
    sources: list[str] = field(default_factory=list)


def _prompt_text(value: Any, *, where: str, field_name: str) -> str:
    """The prompt text inside a field value: a string, a {role, content} dict or a message list."""
    if isinstance(value, list):
        position = next(
            (i for i, m in enumerate(value) if isinstance(m, dict) and m.get("role") == "user"), None
        )
        if position is None:
            raise DataError(f"{where}, field '{field_name}': message list has no message with role 'user'")
        value = value[position]
        field_name = f"{field_name}[{position}]"
    if isinstance(value, dict):
        role = value.get("role", "user")
        if role != "user":
            raise DataError(f"{where}, field '{field_name}': message role is {quote(role)}, expected 'user'")
        if "content" not in value:
            raise DataError(f"{where}, field '{field_name}': message dict has no 'content'")
        value = value["content"]
        field_name = f"{field_name}.content"
    if not isinstance(value, str):
        raise DataError(f"{where}, field '{field_name}': prompt must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}, field '{field_name}': prompt is empty or whitespace only")
    return value


def _row_prompt(row: dict[str, Any], *, where: str, prompt_field: str | None) -> str:
    if prompt_field is not None:
        if row.get(prompt_field) is None:
            raise DataError(f"{where}, field '{prompt_field}': missing or null")
        return _prompt_text(row[prompt_field], where=where, field_name=prompt_field)
    for name in PROMPT_FIELDS:
        if row.get(name) is not None:
            return _prompt_text(row[name], where=where, field_name=name)
    raise DataError(
        f"{where}: no recognisable prompt field (looked for {list(PROMPT_FIELDS)}; found {quote(sorted(row))}); "
        "pass prompt_field="
    )


def _base_name(path: str) -> str:
    name = path.rstrip("/").lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _rows_of_table(table: pa.Table, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for index, row in enumerate(table.to_pylist()):
        yield f"{where}: row {index}", row


def _wanted_columns(names: list[str], prompt_field: str | None, where: str) -> list[str]:
    """Columns to read from a columnar source: the candidate prompt columns plus prompt_id."""
    candidates = (prompt_field,) if prompt_field else PROMPT_FIELDS
    if not any(name in names for name in candidates):
        raise DataError(
            f"{where}: no prompt column (looked for {list(candidates)}; found {quote(names)}); pass prompt_field="
        )
    return [name for name in names if name == "prompt_id" or name in candidates]


def _iter_rows(
    path: str, *, prompt_field: str | None, split: str | None, report: IngestReport
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location for errors, row dict) for every row of the input."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    name = _base_name(path)
    if not fs.exists(fs_path):
        raise file_not_found(path, "prompt source")
    if fs.isdir(fs_path):
        yield from _iter_saved_dataset(path, prompt_field=prompt_field, split=split, report=report)
    elif name.endswith(".jsonl"):
        report.sources.append(path)
        for line, row in iter_jsonl(path):
            yield f"{path}: line {line}", row
    elif name.endswith(".json"):
        report.sources.append(path)
        with open_input(path, "prompt file") as handle:
            raw = handle.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:  # name the line (and byte) that is not UTF-8
            number = raw.count(b"\n", 0, exc.start) + 1
            decode_line(raw.split(b"\n")[number - 1], url=path, line=number)
            raise
        try:
            data = json.loads(text.removeprefix("\ufeff"))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from exc
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        for index, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: row {index}: expected a JSON object, got {type(row).__name__} {quote(row)}"
                )
            yield f"{path}: row {index}", row
    elif name.endswith(".parquet"):
        report.sources.append(path)
        with fs.open(fs_path, "rb") as handle:
            try:
                parquet = pq.ParquetFile(handle)
            except pa.ArrowInvalid as exc:
                raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
            columns = _wanted_columns(parquet.schema_arrow.names, prompt_field, path)
            table = parquet.read(columns=columns)
        yield from _rows_of_table(table, path)
    else:
        raise DataError(
            f"{path}: unsupported prompt source; "
            "use .jsonl, .json, .parquet or a datasets.save_to_disk folder"
        )


def _iter_saved_dataset(
    path: str, *, prompt_field: str | None, split: str | None, report: IngestReport
) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets  # heavy import, only needed for save_to_disk folders

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise DataError(
            f"{path}: folder is not a datasets.save_to_disk output (Dataset or DatasetDict): {exc}"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        available = sorted(loaded)
        if split is not None and split not in loaded:
            raise DataError(f"{path}: split {split!r} not found; available splits: {available}")
        names = [split] if split is not None else available
        parts = [(name, loaded[name]) for name in names]
    else:
        if split is not None:
            raise DataError(f"{path}: split={split!r} given but the folder holds one Dataset, not splits")
        parts = [(None, loaded)]
    for split_name, dataset in parts:
        where = path if split_name is None else f"{path} [split {split_name}]"
        report.sources.append(path if split_name is None else f"{path}[{split_name}]")
        columns = _wanted_columns(dataset.column_names, prompt_field, where)
        table = dataset.select_columns(columns).with_format("arrow")[:]
        yield from _rows_of_table(table, where)


def load_prompts(
    path: str, *, prompt_field: str | None = None, split: str | None = None
) -> tuple[pa.Table, IngestReport]:
    """Read prompts from a file or saved dataset into a PROMPTS table, deduplicated by prompt id.

    The prompt is taken from `prompt_field`, else from the first present of `prompt` (string or
    {role, content} dict), `instruction`, `messages` (first user message). Duplicates keep the first row.
    """
    report = IngestReport()
    ids: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    for where, row in _iter_rows(path, prompt_field=prompt_field, split=split, report=report):
        report.rows_read += 1
        text = _row_prompt(row, where=where, prompt_field=prompt_field)
        pid = prompt_id_of(text)
        given = row.get("prompt_id")
        if given is not None and given != pid:
            report.prompt_id_mismatches += 1
        if pid in seen:
            report.duplicates += 1
            continue
        seen.add(pid)
        ids.append(pid)
        texts.append(text)
    report.kept = len(ids)
    if not ids:
        raise DataError(
            f"{path}: no prompts: the input holds no rows"
            + (f" (split {split!r})" if split is not None else "")
            + "; a run needs at least one prompt"
        )
    table = pa.table({"prompt_id": pa.array(ids, pa.string()), "prompt": pa.array(texts, pa.string())})
    return conform(table, PROMPTS, where=path), report


def read_prompts(section: PromptsConfig) -> tuple[pa.Table, IngestReport]:
    """The prompts a config section names (its path resolved where it lives), cut to its `limit`."""
    table, report = load_prompts(
        resolve_location(section.path), prompt_field=section.prompt_field, split=section.split
    )
    return (table if section.limit is None else table.slice(0, section.limit)), report


def split_size(n: int, sft_fraction: float) -> int:
    """How many of `n` prompts `split_prompts` gives to SFT: round(n * sft_fraction)."""
    return round(n * sft_fraction)


def split_prompts(
    table: pa.Table, *, sft_fraction: float = 1 / 3, seed: int = 42
) -> tuple[pa.Table, pa.Table]:
    """Split prompts into (sft, preference) tables, deterministic by seed and independent of row order.

    Prompts are ranked by sha256(f"{seed}:{prompt_id}"); the first round(n * sft_fraction) go to SFT.
    Both outputs are in rank order.
    """
    if not 0 < sft_fraction < 1:
        raise ValueError(f"sft_fraction must be strictly between 0 and 1, got {sft_fraction}")
    table = conform(table, PROMPTS, where="split_prompts input")
    ids = table.column("prompt_id").to_pylist()
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        first_dup = next((i, pid) for i, pid in enumerate(ids) if pid in seen or seen.add(pid))
        raise DataError(
            f"split_prompts input: row {first_dup[0]}, column 'prompt_id' repeats {first_dup[1]!r}; "
            "deduplicate first (load_prompts does)"
        )
    keys = [hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest() for pid in ids]
    order = sorted(range(len(ids)), key=keys.__getitem__)
    n_sft = split_size(len(ids), sft_fraction)
    return table.take(pa.array(order[:n_sft], pa.int64())), table.take(pa.array(order[n_sft:], pa.int64()))


__all__ = ["PROMPT_FIELDS", "IngestReport", "load_prompts", "prompt_id_of", "split_prompts", "split_size"]
