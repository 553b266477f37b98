"""Tests for wrpo_core.prompts: prompt ids, ingest from every supported source, the SFT split."""

from __future__ import annotations

import gzip
import hashlib
import json
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wrpo_core.prompts import IngestReport, load_prompts, prompt_id_of, split_prompts
from wrpo_core.schemas import PROMPTS, DataError

# The example row of the WRPO authors' released data (SLIT-AI/WRPO README): its prompt_id is the
# sha256 of this exact text, trailing newline included.
AUTHORS_PROMPT = (
    "Given the task definition and input, reply with output. The provided file includes inquiries about "
    "restaurants in Finnish, and we ask you to translate those to English language. Please bear in mind the "
    "following guidelines while doing the translation: 1) We are looking for the most naturally written and "
    "formal form of each sentence in your language. We are *NOT* looking for colloquial forms of the sentence. "
    "We are looking for formal form which is how you would type your queries in a text-based virtual "
    "assistant. 2) The words between quotation marks *SHOULD NOT* be translated. We expect you to keep those "
    "values intact and include the quotation marks around them as well. 3) The fully capitalized words like "
    "DATE_0, or DURATION_0 *SHOULD NOT* be translated. Please keep them as they are in the translations. 4) "
    "Please do not localize measurement units like miles to kilometers during your translation. miles should "
    "be translated to its equivalent in your language. 6) Note the input is all lowercased except for fully "
    "capitalized special placeholders (e.g. NUMBER, DATE, TIME). Please do the same in your translations."
    '\n\nkerro minulle " dave \'s seafood shack " -ravintolan sijainti.\n'
)
AUTHORS_PROMPT_ID = "3ebac2832721f4ef8e9ead1bb19e251e5d21d60dbd9f89cae931fe4aac900058"


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_prompt_id_matches_authors_released_row():
    assert prompt_id_of(AUTHORS_PROMPT) == AUTHORS_PROMPT_ID


def test_prompt_id_is_raw_bytes_without_normalizing():
    assert prompt_id_of("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert prompt_id_of("abc ") != prompt_id_of("abc")
    assert prompt_id_of("é") == hashlib.sha256("é".encode()).hexdigest()


def test_load_jsonl_all_prompt_shapes_and_report(tmp_path):
    rows = [
        {"prompt_id": AUTHORS_PROMPT_ID, "prompt": {"role": "user", "content": AUTHORS_PROMPT}},
        {"instruction": "write a poem", "prompt_id": "wrong-id"},
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi there"}]},
        {"prompt": "plain string"},
        {"prompt": "plain string", "extra": 1},
    ]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    table, report = load_prompts(path)
    assert table.schema.equals(PROMPTS)
    assert table.column("prompt").to_pylist() == [AUTHORS_PROMPT, "write a poem", "hi there", "plain string"]
    assert table.column("prompt_id").to_pylist()[0] == AUTHORS_PROMPT_ID
    assert table.column("prompt_id").to_pylist()[1] == prompt_id_of("write a poem")
    assert report == IngestReport(rows_read=5, kept=4, duplicates=1, prompt_id_mismatches=1, sources=[path])


def test_load_jsonl_prompt_field_and_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "q1", "prompt": "ignored"}\n\n{"question": "q2"}\n', encoding="utf-8")
    table, report = load_prompts(str(path), prompt_field="question")
    assert table.column("prompt").to_pylist() == ["q1", "q2"]
    assert report.rows_read == 2


def test_load_jsonl_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 3: invalid JSON")):
        load_prompts(str(path))


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"prompt": "   \n"}, "prompt", "empty or whitespace only"),
        ({"prompt": 7}, "prompt", "must be a string, got int"),
        ({"prompt": {"role": "assistant", "content": "x"}}, "prompt", "role is 'assistant'"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "no message with role 'user'"),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": ""}]},
            "messages[1].content",
            "empty",
        ),
    ],
)
def test_load_jsonl_bad_prompt_names_file_line_and_field(tmp_path, row, field, problem):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(
        DataError, match=re.escape(f"{path}: line 2, field '{field}'") + ".*" + re.escape(problem)
    ):
        load_prompts(path)


def test_load_jsonl_row_without_prompt_field(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"question": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{path}: line 1: no recognisable prompt field")):
        load_prompts(path)


def test_load_jsonl_missing_explicit_field(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{path}: line 1, field 'question': missing or null")):
        load_prompts(path, prompt_field="question")


def test_load_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"instruction": "b"}]), encoding="utf-8")
    table, _ = load_prompts(str(path))
    assert table.column("prompt").to_pylist() == ["a", "b"]


def test_load_json_bad_row_uses_zero_based_index(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": ""}]), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: row 1, field 'prompt'")):
        load_prompts(str(path))


def test_load_json_not_a_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"prompt": "a"}', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: expected a JSON list of objects, got dict")):
        load_prompts(str(path))


def test_load_parquet_with_message_struct_and_extra_columns(tmp_path):
    path = str(tmp_path / "p.parquet")
    table = pa.table(
        {
            "prompt_id": [AUTHORS_PROMPT_ID, "x"],
            "prompt": [{"role": "user", "content": AUTHORS_PROMPT}, {"role": "user", "content": "second"}],
            "all_generated_responses": [["r1", "r2"], ["r3"]],
        }
    )
    pq.write_table(table, path)
    out, report = load_prompts(path)
    assert out.column("prompt").to_pylist() == [AUTHORS_PROMPT, "second"]
    assert report.prompt_id_mismatches == 1
    assert report.sources == [path]


def test_load_parquet_without_prompt_column_names_columns(tmp_path):
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: no prompt column") + r".*found \['text'\]"):
        load_prompts(path)


def test_load_saved_dataset(tmp_path):
    path = str(tmp_path / "ds")
    datasets.Dataset.from_dict({"instruction": ["a", "b", "a"], "other": [1, 2, 3]}).save_to_disk(path)
    table, report = load_prompts(path)
    assert table.column("prompt").to_pylist() == ["a", "b"]
    assert (report.rows_read, report.duplicates, report.sources) == (3, 1, [path])


def test_load_saved_dataset_bad_row_uses_zero_based_index(tmp_path):
    path = str(tmp_path / "ds")
    datasets.Dataset.from_dict({"prompt": ["a", "b", " "]}).save_to_disk(path)
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2, field 'prompt'")):
        load_prompts(path)


def test_load_saved_dataset_dict_splits(tmp_path):
    path = str(tmp_path / "dd")
    datasets.DatasetDict(
        {
            "train_prefs": datasets.Dataset.from_dict({"prompt": ["t1", "t2"]}),
            "test_prefs": datasets.Dataset.from_dict({"prompt": ["s1", "t1"]}),
        }
    ).save_to_disk(path)
    all_splits, report = load_prompts(path)
    # sorted split order: test_prefs before train_prefs; t1 in train_prefs is a duplicate
    assert all_splits.column("prompt").to_pylist() == ["s1", "t1", "t2"]
    assert report.duplicates == 1
    assert report.sources == [f"{path}[test_prefs]", f"{path}[train_prefs]"]
    one, _ = load_prompts(path, split="train_prefs")
    assert one.column("prompt").to_pylist() == ["t1", "t2"]
    with pytest.raises(
        DataError,
        match=re.escape(f"{path}: split 'nope' not found; available splits: ")
        + r"\['test_prefs', 'train_prefs'\]",
    ):
        load_prompts(path, split="nope")


def test_load_saved_dataset_dict_error_names_split(tmp_path):
    path = str(tmp_path / "dd")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["ok", None]})}).save_to_disk(path)
    with pytest.raises(
        DataError, match=re.escape(f"{path} [split train]: row 1") + ".*no recognisable prompt field"
    ):
        load_prompts(path)


def test_load_plain_folder_and_unknown_suffix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=re.escape(f"{tmp_path / 'empty'}: folder is not a datasets.save_to_disk")
    ):
        load_prompts(str(tmp_path / "empty"))
    other = tmp_path / "p.csv"
    other.write_text("prompt\na\n")
    with pytest.raises(DataError, match=re.escape(f"{other}: unsupported prompt source")):
        load_prompts(str(other))
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_prompts(str(tmp_path / "missing.txt"))


def _prompts(n: int) -> pa.Table:
    texts = [f"prompt {i}" for i in range(n)]
    return pa.table({"prompt_id": [prompt_id_of(t) for t in texts], "prompt": texts})


def test_split_sizes_disjoint_and_complete():
    sft, pref = split_prompts(_prompts(300))
    assert (sft.num_rows, pref.num_rows) == (100, 200)
    sft_ids, pref_ids = set(sft.column("prompt_id").to_pylist()), set(pref.column("prompt_id").to_pylist())
    assert not sft_ids & pref_ids
    assert sft_ids | pref_ids == set(_prompts(300).column("prompt_id").to_pylist())
    assert sft.schema.equals(PROMPTS) and pref.schema.equals(PROMPTS)


def test_split_independent_of_row_order_and_depends_on_seed():
    table = _prompts(50)
    reversed_table = table.take(pa.array(list(range(49, -1, -1))))
    a_sft, a_pref = split_prompts(table, sft_fraction=0.4, seed=7)
    b_sft, b_pref = split_prompts(reversed_table, sft_fraction=0.4, seed=7)
    assert a_sft.equals(b_sft) and a_pref.equals(b_pref)
    c_sft, _ = split_prompts(table, sft_fraction=0.4, seed=8)
    assert set(c_sft.column("prompt_id").to_pylist()) != set(a_sft.column("prompt_id").to_pylist())


def test_split_ranks_by_seeded_hash():
    table = _prompts(10)
    sft, _ = split_prompts(table, sft_fraction=0.3, seed=42)
    ranked = sorted(
        table.column("prompt_id").to_pylist(), key=lambda p: hashlib.sha256(f"42:{p}".encode()).hexdigest()
    )
    assert sft.column("prompt_id").to_pylist() == ranked[:3]


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="sft_fraction must be strictly between 0 and 1"):
        split_prompts(_prompts(3), sft_fraction=fraction)


def test_split_rejects_duplicate_ids():
    table = pa.table({"prompt_id": ["a", "b", "a"], "prompt": ["x", "y", "x"]})
    with pytest.raises(DataError, match="row 2, column 'prompt_id' repeats 'a'"):
        split_prompts(table)


def test_load_gzipped_jsonl(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "zipped"}\n'))
    table, _ = load_prompts(str(path))
    assert table.column("prompt").to_pylist() == ["zipped"]
