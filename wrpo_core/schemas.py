"""Arrow schemas of every table the pipeline stores, checked on every read and write.

| table        | column             | type    | null | meaning                                            |
|--------------|--------------------|---------|------|----------------------------------------------------|
| PROMPTS      | prompt_id          | string  | no   | sha256 hex of the raw prompt text                  |
|              | prompt             | string  | no   | the user prompt x                                  |
| SAMPLES      | prompt_id          | string  | no   | prompt the sample answers                          |
|              | model              | string  | no   | model that generated it (HF id or local name)      |
|              | sample_index       | int32   | no   | 0-based index among that model's samples           |
|              | text               | string  | no   | generated response                                 |
|              | finish_reason      | string  | no   | "stop" or "length"                                 |
|              | prompt_tokens      | int32   | no   | prompt length in the generator's tokens            |
|              | completion_tokens  | int32   | no   | response length in the generator's tokens          |
|              | seed               | int64   | no   | sampling seed                                      |
| SCORES       | prompt_id, model,  |         | no   | key of the scored sample (as in SAMPLES)           |
|              | sample_index       |         |      |                                                    |
|              | reward_model       | string  | no   | reward model that produced the score               |
|              | score              | float64 | no   | reward                                             |
| BEST_SOURCE  | prompt_id, prompt  | string  | no   | the prompt                                         |
|              | y_ws               | string  | no   | best-scored response across all source models      |
|              | y_ws_model         | string  | no   | model that wrote y_ws                              |
|              | y_ws_sample_index  | int32   | no   | its sample_index                                   |
|              | y_ws_score         | float64 | no   | its reward                                         |
| QUADRUPLES   | prompt_id, prompt  | string  | no   | the prompt                                         |
|              | y_ws, y_ws_model   | string  | no   | best source response and its model ("" = unknown)  |
|              | y_ws_score         | float64 | yes  | its reward (null = unknown, e.g. imported data)    |
|              | y_wt               | string  | no   | best Target-SFT response                           |
|              | y_wt_score         | float64 | yes  | its reward (null = unknown)                        |
|              | y_l                | string  | no   | worst Target-SFT response                          |
|              | y_l_score          | float64 | yes  | its reward (null = unknown)                        |
|              | ref_logp_ws/wt/l   | float64 | yes  | summed reference log-probs, filled by the trainer  |

A sample's finish_reason is "stop" when it ended with one of the model's end tokens (the end token
is counted in completion_tokens, not written to text) and "length" when max_new_tokens cut it;
selection leaves "length" samples out of y_ws / y_wt / y_l by default (see wrpo_core.selection).

Allowed values of a string column are stored in the field metadata key ``allowed_values``
(comma separated) and enforced by :func:`conform`.

A run stores each table as a folder of Parquet files (`part-NNNNN.parquet`) listed by its stage's
manifest; docs/storage.md shows the layout and how to read it with pyarrow, datasets and pandas.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


class DataError(ValueError):
    """Bad input data; the message names the file/table, row and field to fix."""


#: Characters of an input value an error message quotes before cutting it (see `quote`).
QUOTE_CHARS = 80


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """An input value as an error message quotes it: its repr, cut to `limit` characters when longer.

    A long value is shown as its first `limit` characters of repr, then "… (N characters)" with N the
    length of the value's repr, so a 300 KB prompt never fills a log line.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


class MissingInputError(DataError, FileNotFoundError):
    """An input file or folder that does not exist (a DataError, and a FileNotFoundError for callers)."""


def file_not_found(url: str, what: str = "file") -> MissingInputError:
    """The error for an input file that does not exist, naming it."""
    return MissingInputError(f"{url}: {what} not found")


def _req(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


PROMPTS = pa.schema([_req("prompt_id", pa.string()), _req("prompt", pa.string())])

SAMPLES = pa.schema(
    [
        _req("prompt_id", pa.string()),
        _req("model", pa.string()),
        _req("sample_index", pa.int32()),
        _req("text", pa.string()),
        pa.field("finish_reason", pa.string(), nullable=False, metadata={"allowed_values": "stop,length"}),
        _req("prompt_tokens", pa.int32()),
        _req("completion_tokens", pa.int32()),
        _req("seed", pa.int64()),
    ]
)

SCORES = pa.schema(
    [
        _req("prompt_id", pa.string()),
        _req("model", pa.string()),
        _req("sample_index", pa.int32()),
        _req("reward_model", pa.string()),
        _req("score", pa.float64()),
    ]
)

BEST_SOURCE = pa.schema(
    [
        _req("prompt_id", pa.string()),
        _req("prompt", pa.string()),
        _req("y_ws", pa.string()),
        _req("y_ws_model", pa.string()),
        _req("y_ws_sample_index", pa.int32()),
        _req("y_ws_score", pa.float64()),
    ]
)

QUADRUPLES = pa.schema(
    [
        _req("prompt_id", pa.string()),
        _req("prompt", pa.string()),
        _req("y_ws", pa.string()),
        _req("y_ws_model", pa.string()),
        pa.field("y_ws_score", pa.float64()),
        _req("y_wt", pa.string()),
        pa.field("y_wt_score", pa.float64()),
        _req("y_l", pa.string()),
        pa.field("y_l_score", pa.float64()),
        pa.field("ref_logp_ws", pa.float64()),
        pa.field("ref_logp_wt", pa.float64()),
        pa.field("ref_logp_l", pa.float64()),
    ]
)


SCHEMAS: dict[str, pa.Schema] = {
    "PROMPTS": PROMPTS,
    "SAMPLES": SAMPLES,
    "SCORES": SCORES,
    "BEST_SOURCE": BEST_SOURCE,
    "QUADRUPLES": QUADRUPLES,
}


def schema_name(schema: pa.Schema) -> str:
    """The name of one of the tables above ("custom" for any other schema), for manifests."""
    for name, known in SCHEMAS.items():
        if schema.equals(known):
            return name
    return "custom"


def _allowed_values(field: pa.Field) -> set[str] | None:
    raw = (field.metadata or {}).get(b"allowed_values")
    return set(raw.decode().split(",")) if raw else None


def conform(table: pa.Table, schema: pa.Schema, *, where: str) -> pa.Table:
    """Check `table` against `schema` and return it cast to exactly the schema's columns and types.

    Raises DataError naming `where` for a missing or extra column, an unsafe cast, a null in a
    non-nullable column (with the first offending row) or a value outside a column's allowed values.
    """
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise DataError(f"{where}: missing required column(s) {missing}; found {table.column_names}")
    extra = [name for name in table.column_names if name not in schema.names]
    if extra:
        raise DataError(f"{where}: unexpected column(s) {extra}; expected exactly {schema.names}")
    arrays = []
    for field in schema:
        column = table.column(field.name)
        try:
            column = column.cast(field.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise DataError(
                f"{where}: column '{field.name}' of type {table.schema.field(field.name).type} "
                f"cannot be cast safely to {field.type}: {exc}"
            ) from exc
        if not field.nullable and column.null_count:
            first = pc.index(pc.is_null(column), True).as_py()
            raise DataError(f"{where}: row {first}, column '{field.name}' is null (the column is required)")
        allowed = _allowed_values(field)
        if allowed is not None and len(column):
            bad = pc.invert(pc.is_in(column, value_set=pa.array(sorted(allowed), pa.string())))
            if pc.any(bad).as_py():
                first = pc.index(bad, True).as_py()
                raise DataError(
                    f"{where}: row {first}, column '{field.name}' has value {quote(column[first].as_py())}; "
                    f"allowed: {sorted(allowed)}"
                )
        arrays.append(column)
    # Table-level metadata (e.g. the settings reference log-probs were computed with) travels on.
    return pa.Table.from_arrays(arrays, schema=schema.with_metadata(table.schema.metadata or {}))


def atomic_write(url: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through fsspec so that `url` only ever holds a complete file.

    `write` receives a binary file object for a temporary name in the same folder; the temporary
    file is moved onto `url` afterwards and removed if `write` raises. Local parent folders are created.
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent, name = os.path.split(path.rstrip("/"))
    if isinstance(fs, LocalFileSystem) and parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}" if parent else f".{name}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as handle:
            write(handle)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_parquet(table: pa.Table, url: str, schema: pa.Schema) -> None:
    """Conform `table` to `schema` and write it atomically as Parquet to `url` (any fsspec URL)."""
    conformed = conform(table, schema, where=url)
    atomic_write(url, lambda handle: pq.write_table(conformed, handle))


def read_parquet(url: str, schema: pa.Schema) -> pa.Table:
    """Read a Parquet file from `url` (any fsspec URL) and conform it to `schema`."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as handle:
        try:
            table = pq.read_table(handle)
        except pa.ArrowInvalid as exc:
            raise DataError(f"{url}: not a readable Parquet file: {exc}") from exc
    return conform(table, schema, where=url)


def schema_fingerprint(schema: pa.Schema) -> str:
    """Short sha256 hex of the schema's serialized form, for manifests (changes when the schema does)."""
    return hashlib.sha256(schema.serialize().to_pybytes()).hexdigest()[:16]


def decode_line(raw: bytes, *, url: str, line: int) -> str:
    """One line of a text file decoded as UTF-8; a DataError names the file, line and byte column if not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{url}: line {line}: not UTF-8 (byte {raw[exc.start : exc.start + 1]!r} at column "
            f"{exc.start + 1}); save the file as UTF-8"
        ) from None


def open_input(url: str, what: str = "file") -> IO[bytes]:
    """An input file opened for binary reading (compression inferred from the suffix).

    A missing file, a folder or an unreadable one raises DataError naming it.
    """
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise file_not_found(url, what)
    if fs.isdir(path):
        raise DataError(f"{url}: is a folder, expected a {what}")
    try:
        return fsspec.open(url, "rb", compression="infer").open()
    except PermissionError as exc:
        raise DataError(f"{url}: {what} cannot be read: permission denied") from exc


def iter_jsonl(url: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line of a JSONL file at `url`.

    A missing file, bytes that are not UTF-8, invalid JSON or a line that is not a JSON object raise
    DataError naming the file and line. Compressed files (.gz, .bz2, .xz, .zst) are decompressed by suffix.
    """
    with open_input(url) as handle:
        for number, raw in enumerate(handle, start=1):
            line = decode_line(raw, url=url, line=number)
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{url}: line {number}: invalid JSON: {exc.msg} (column {exc.colno})"
                ) from exc
            if not isinstance(record, dict):
                raise DataError(
                    f"{url}: line {number}: expected a JSON object, got {type(record).__name__} {quote(record)}"
                )
            yield number, record
