"""Tests for wrpo_core.schemas: conform, atomic Parquet IO, fingerprints, JSONL reading."""

from __future__ import annotations

import os
import re

import fsspec
import pyarrow as pa
import pytest

from wrpo_core import schemas
from wrpo_core.schemas import (
    BEST_SOURCE,
    PROMPTS,
    QUADRUPLES,
    SAMPLES,
    SCORES,
    DataError,
    conform,
    iter_jsonl,
    read_parquet,
    schema_fingerprint,
    write_parquet,
)


def _samples(**overrides) -> pa.Table:
    data = {
        "prompt_id": ["p1", "p2"],
        "model": ["m", "m"],
        "sample_index": [0, 1],
        "text": ["a", "b"],
        "finish_reason": ["stop", "length"],
        "prompt_tokens": [3, 4],
        "completion_tokens": [5, 6],
        "seed": [1, 2],
    }
    data.update(overrides)
    return pa.table(data)


def test_schemas_have_expected_columns_and_nullability():
    assert PROMPTS.names == ["prompt_id", "prompt"]
    assert SAMPLES.field("sample_index").type == pa.int32()
    assert SAMPLES.field("seed").type == pa.int64()
    assert SCORES.field("score").type == pa.float64()
    assert BEST_SOURCE.field("y_ws_sample_index").type == pa.int32()
    assert not any(f.nullable for s in (PROMPTS, SAMPLES, SCORES, BEST_SOURCE) for f in s)
    nullable = {f.name for f in QUADRUPLES if f.nullable}
    assert nullable == {"y_ws_score", "y_wt_score", "y_l_score", "ref_logp_ws", "ref_logp_wt", "ref_logp_l"}


def test_conform_casts_reorders_and_sets_schema():
    table = _samples().select(list(reversed(SAMPLES.names)))
    out = conform(table, SAMPLES, where="t")
    assert out.schema.equals(SAMPLES)
    assert out.column("sample_index").type == pa.int32()
    assert out.column("text").to_pylist() == ["a", "b"]


def test_conform_missing_column_names_column_and_where():
    with pytest.raises(DataError, match=r"where\.parquet: missing required column\(s\) \['seed'\]"):
        conform(_samples().drop_columns(["seed"]), SAMPLES, where="where.parquet")


def test_conform_extra_column_is_an_error():
    table = _samples().append_column("junk", pa.array([1, 2]))
    with pytest.raises(DataError, match=r"t: unexpected column\(s\) \['junk'\]"):
        conform(table, SAMPLES, where="t")


def test_conform_unsafe_cast_names_column():
    table = _samples(sample_index=[0, 2**40])
    with pytest.raises(
        DataError, match="t: column 'sample_index' of type int64 cannot be cast safely to int32"
    ):
        conform(table, SAMPLES, where="t")


def test_conform_null_in_required_column_names_row():
    table = _samples(text=["a", None])
    with pytest.raises(DataError, match=r"t: row 1, column 'text' is null"):
        conform(table, SAMPLES, where="t")


def test_conform_allows_nulls_in_nullable_columns():
    row = {name: ["x"] for name in QUADRUPLES.names}
    for name in ("y_ws_score", "y_wt_score", "y_l_score", "ref_logp_ws", "ref_logp_wt", "ref_logp_l"):
        row[name] = [None]
    out = conform(pa.table(row), QUADRUPLES, where="q")
    assert out.column("ref_logp_l").null_count == 1
    assert out.column("y_ws_score").type == pa.float64()


def test_conform_rejects_unknown_finish_reason():
    with pytest.raises(DataError, match=r"t: row 1, column 'finish_reason' has value 'eos'"):
        conform(_samples(finish_reason=["stop", "eos"]), SAMPLES, where="t")


def test_parquet_round_trip_creates_parent_dirs(tmp_path):
    url = str(tmp_path / "a" / "b" / "samples.parquet")
    write_parquet(_samples(), url, SAMPLES)
    out = read_parquet(url, SAMPLES)
    assert out.equals(conform(_samples(), SAMPLES, where="x"))
    assert os.listdir(tmp_path / "a" / "b") == ["samples.parquet"]


def test_parquet_round_trip_on_memory_filesystem():
    url = "memory://wrpo-test/prompts.parquet"
    table = pa.table({"prompt_id": ["i"], "prompt": ["hello"]})
    write_parquet(table, url, PROMPTS)
    assert read_parquet(url, PROMPTS).column("prompt").to_pylist() == ["hello"]
    fsspec.filesystem("memory").rm("/wrpo-test", recursive=True)


def test_write_parquet_rejects_bad_table_and_leaves_nothing(tmp_path):
    url = str(tmp_path / "p.parquet")
    with pytest.raises(DataError, match=re.escape(f"{url}: missing required column")):
        write_parquet(pa.table({"prompt_id": ["i"]}), url, PROMPTS)
    assert not os.path.exists(url)


def test_crash_during_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    url = str(tmp_path / "p.parquet")
    write_parquet(pa.table({"prompt_id": ["old"], "prompt": ["old"]}), url, PROMPTS)

    def boom(table, handle):
        handle.write(b"PAR1 half")
        raise RuntimeError("crash")

    monkeypatch.setattr(schemas.pq, "write_table", boom)
    with pytest.raises(RuntimeError, match="crash"):
        write_parquet(pa.table({"prompt_id": ["new"], "prompt": ["new"]}), url, PROMPTS)
    monkeypatch.undo()
    assert read_parquet(url, PROMPTS).column("prompt_id").to_pylist() == ["old"]
    assert os.listdir(tmp_path) == ["p.parquet"]


def test_read_parquet_checks_schema(tmp_path):
    url = str(tmp_path / "s.parquet")
    write_parquet(_samples(), url, SAMPLES)
    with pytest.raises(DataError, match=re.escape(f"{url}: missing required column")):
        read_parquet(url, SCORES)


def test_read_parquet_garbage_names_file(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable Parquet file")):
        read_parquet(str(path), PROMPTS)


def test_schema_fingerprint_is_stable_and_distinguishes_schemas():
    fp = schema_fingerprint(SAMPLES)
    assert fp == schema_fingerprint(pa.schema(list(SAMPLES)))
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp != schema_fingerprint(SCORES)
    assert schema_fingerprint(PROMPTS) != schema_fingerprint(
        pa.schema([pa.field("prompt_id", pa.string()), pa.field("prompt", pa.string())])
    )


def test_iter_jsonl_skips_blank_lines_and_reports_line_numbers(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    assert list(iter_jsonl(str(path))) == [(1, {"a": 1}), (4, {"a": 2})]


def test_iter_jsonl_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 2: invalid JSON")):
        list(iter_jsonl(str(path)))


def test_iter_jsonl_non_object_names_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 1: expected a JSON object, got list")):
        list(iter_jsonl(str(path)))
