"""Tests for wrpo_core.formats: the authors' released format, TRL's preference format, JSONL IO."""

from __future__ import annotations

import copy
import json
import os
import re

import pyarrow as pa
import pytest

from wrpo_core.formats import (
    from_authors_records,
    from_trl_records,
    read_jsonl,
    to_authors_records,
    to_trl_records,
    write_jsonl,
)
from wrpo_core.prompts import prompt_id_of
from wrpo_core.schemas import QUADRUPLES, DataError, conform

TEXT_COLUMNS = ["prompt_id", "prompt", "y_ws", "y_wt", "y_l"]

# Shape of the example row in the WRPO authors' README (texts shortened, real prompt id kept).
AUTHORS_ROW = {
    "prompt_id": "3ebac2832721f4ef8e9ead1bb19e251e5d21d60dbd9f89cae931fe4aac900058",
    "prompt": {"content": "Translate: kerro minulle ...\n", "role": "user"},
    "chosen": [
        {"content": 'Tell me the location of the "dave\'s seafood shack" restaurant.', "role": "assistant"},
        {
            "content": 'Here is the translated output:\n\nTell me the location of "Dave\'s Seafood Shack".',
            "role": "assistant",
        },
    ],
    "rejected": [
        {
            "content": "Here's the translation:\n\nTell me the location of \"Dave's Seafood Shack\".",
            "role": "assistant",
        }
    ],
}


def _quadruples() -> pa.Table:
    return conform(
        pa.table(
            {
                "prompt_id": ["id1", "id2"],
                "prompt": ["x1", "x2 ünïcode"],
                "y_ws": ["ws1", "ws2"],
                "y_ws_model": ["m", "m"],
                "y_ws_score": [1.0, 2.0],
                "y_wt": ["wt1", "wt2"],
                "y_wt_score": [0.5, 0.6],
                "y_l": ["l1", "l2"],
                "y_l_score": [0.1, 0.2],
                "ref_logp_ws": pa.nulls(2, pa.float64()),
                "ref_logp_wt": pa.nulls(2, pa.float64()),
                "ref_logp_l": pa.nulls(2, pa.float64()),
            }
        ),
        QUADRUPLES,
        where="fixture",
    )


def test_authors_export_order_is_source_then_target():
    (row, _) = to_authors_records(_quadruples())
    assert row == {
        "prompt_id": "id1",
        "prompt": {"role": "user", "content": "x1"},
        "chosen": [{"role": "assistant", "content": "ws1"}, {"role": "assistant", "content": "wt1"}],
        "rejected": [{"role": "assistant", "content": "l1"}],
    }


def test_authors_records_round_trip():
    records = [AUTHORS_ROW, {**AUTHORS_ROW, "prompt_id": "other"}]
    table = from_authors_records(records, where="a.jsonl")
    assert table.schema.equals(QUADRUPLES)
    assert table.column("y_ws").to_pylist()[0] == AUTHORS_ROW["chosen"][0]["content"]
    assert table.column("y_wt").to_pylist()[0] == AUTHORS_ROW["chosen"][1]["content"]
    assert table.column("y_ws_model").to_pylist() == ["", ""]
    assert table.column("y_ws_score").null_count == 2 and table.column("y_l_score").null_count == 2
    assert to_authors_records(table) == records


def test_authors_table_round_trip_on_text_columns():
    table = _quadruples()
    back = from_authors_records(to_authors_records(table), where="mem")
    assert back.select(TEXT_COLUMNS).equals(table.select(TEXT_COLUMNS))


def test_authors_import_accepts_plain_string_prompt_and_computes_missing_id():
    row = {k: v for k, v in AUTHORS_ROW.items() if k != "prompt_id"}
    row["prompt"] = "plain prompt"
    table = from_authors_records([row], where="w")
    assert table.column("prompt").to_pylist() == ["plain prompt"]
    assert table.column("prompt_id").to_pylist() == [prompt_id_of("plain prompt")]


def _broken(path: list, value) -> dict:
    row = copy.deepcopy(AUTHORS_ROW)
    target = row
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return row


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            _broken(["chosen"], AUTHORS_ROW["chosen"][:1]),
            "row 1, field 'chosen': expected a list of exactly 2",
        ),
        (
            _broken(["chosen"], "text"),
            "row 1, field 'chosen': expected a list of exactly 2 assistant message(s), got str",
        ),
        (
            _broken(["rejected"], AUTHORS_ROW["chosen"]),
            "row 1, field 'rejected': expected a list of exactly 1",
        ),
        (_broken(["chosen", 1, "role"], "user"), "row 1, field 'chosen[1]': message role is 'user'"),
        (_broken(["rejected", 0, "content"], None), "row 1, field 'rejected[0].content': expected a string"),
        (_broken(["prompt", "role"], "assistant"), "row 1, field 'prompt': message role is 'assistant'"),
        (_broken(["prompt", "content"], "  "), "row 1, field 'prompt': prompt is empty"),
        (_broken(["prompt_id"], 5), "row 1, field 'prompt_id': expected a non-empty string"),
        ({"prompt": "x", "chosen": []}, "row 1: missing field(s) ['rejected']"),
    ],
)
def test_authors_import_errors_name_where_row_and_field(row, expected):
    with pytest.raises(DataError, match=re.escape(f"data.jsonl: {expected}")):
        from_authors_records([AUTHORS_ROW, row], where="data.jsonl")


def test_trl_export_shape():
    (row, _) = to_trl_records(_quadruples())
    assert row == {
        "prompt_id": "id1",
        "prompt": [{"role": "user", "content": "x1"}],
        "chosen": [{"role": "assistant", "content": "wt1"}],
        "rejected": [{"role": "assistant", "content": "l1"}],
        "source_chosen": [{"role": "assistant", "content": "ws1"}],
    }


def test_trl_records_round_trip():
    records = to_trl_records(_quadruples())
    assert to_trl_records(from_trl_records(records, where="t")) == records


def test_trl_table_round_trip_on_text_columns():
    table = _quadruples()
    back = from_trl_records(to_trl_records(table), where="t")
    assert back.schema.equals(QUADRUPLES)
    assert back.select(TEXT_COLUMNS).equals(table.select(TEXT_COLUMNS))


def test_trl_and_authors_formats_agree():
    table = from_authors_records([AUTHORS_ROW], where="a")
    via_trl = from_trl_records(to_trl_records(table), where="t")
    assert via_trl.equals(table)


def test_trl_records_load_in_datasets():
    import datasets

    dataset = datasets.Dataset.from_list(to_trl_records(_quadruples()))
    assert dataset.column_names == ["prompt_id", "prompt", "chosen", "rejected", "source_chosen"]
    assert dataset[1]["chosen"] == [{"role": "assistant", "content": "wt2"}]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"source_chosen": None}, "row 0, field 'source_chosen': expected a list of exactly 1"),
        (
            {"chosen": [{"role": "assistant", "content": "a"}] * 2},
            "row 0, field 'chosen': expected a list of exactly 1",
        ),
        (
            {"prompt": [{"role": "user", "content": "a"}] * 2},
            "row 0, field 'prompt': expected a list of exactly 1 user",
        ),
        (
            {"prompt": [{"role": "system", "content": "a"}]},
            "row 0, field 'prompt[0]': message role is 'system'",
        ),
    ],
)
def test_trl_import_errors_name_where_row_and_field(change, expected):
    row = {**to_trl_records(_quadruples())[0], **change}
    with pytest.raises(DataError, match=re.escape(f"trl.jsonl: {expected}")):
        from_trl_records([row], where="trl.jsonl")


def test_trl_import_requires_source_chosen():
    row = to_trl_records(_quadruples())[0]
    del row["source_chosen"]
    with pytest.raises(DataError, match=re.escape("trl.jsonl: row 0: missing field(s) ['source_chosen']")):
        from_trl_records([row], where="trl.jsonl")


def test_jsonl_round_trip_local_utf8_and_atomic(tmp_path):
    url = str(tmp_path / "out" / "authors.jsonl")
    records = to_authors_records(_quadruples())
    write_jsonl(records, url)
    assert read_jsonl(url) == records
    assert "ünïcode" in (tmp_path / "out" / "authors.jsonl").read_text(encoding="utf-8")
    assert os.listdir(tmp_path / "out") == ["authors.jsonl"]


def test_jsonl_round_trip_memory_filesystem():
    url = "memory://wrpo-formats/trl.jsonl"
    records = to_trl_records(_quadruples())
    write_jsonl(records, url)
    assert read_jsonl(url) == records


def test_write_jsonl_failure_keeps_previous_file(tmp_path):
    url = str(tmp_path / "r.jsonl")
    write_jsonl([{"a": 1}], url)
    with pytest.raises(TypeError):
        write_jsonl([{"a": 2}, {"b": object()}], url)
    assert read_jsonl(url) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["r.jsonl"]


def test_read_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n\nnot json\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 3: invalid JSON")):
        read_jsonl(str(path))
