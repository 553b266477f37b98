"""A corpus of bad inputs, each refused the way a user needs: exit code, a message naming the file and
the line/row/field, no traceback, and (for pipeline runs) nothing committed to the run's storage.

Also the truncation that respects a model's real limits (`tokenization.model_max_positions`,
`sampling.common.prompt_token_budget`) and the shortened quoting of long input values.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from wrpo_core.cli import main
from wrpo_core.config import ConfigError
from wrpo_core.formats import from_trl_records, read_jsonl, to_trl_records
from wrpo_core.sampling.common import SamplingReport, encode_prompts
from wrpo_core.schemas import quote
from wrpo_core.tokenization import PositionLimit, encode_example, model_max_positions, prompt_text

AUTHORS_ROW = {
    "prompt_id": "p0",
    "prompt": {"role": "user", "content": "reverse: ab"},
    "chosen": [{"role": "assistant", "content": "ba"}, {"role": "assistant", "content": "b a"}],
    "rejected": [{"role": "assistant", "content": "zz"}],
}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Runs `wrpo argv` through cli.main; (exit code, stderr), asserting no traceback was printed."""
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def _run_config(tmp_path: Path, fusion_config, prompts: Path) -> Path:
    cfg = fusion_config.model_copy(
        update={"prompts": fusion_config.prompts.model_copy(update={"path": str(prompts)})}
    )
    path = tmp_path / "fusion.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _nothing_committed(tmp_path: Path) -> bool:
    """No stage manifest anywhere under the run storage (a stage commits by writing its manifest last)."""
    return not [p for p in (tmp_path / "runs").rglob("*") if "manifest" in str(p.relative_to(tmp_path))]


# --- prompt files, through `wrpo run --config` --------------------------------------------------------


def _jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


PROMPT_CASES = {
    "not-utf8-jsonl": (
        "p.jsonl",
        _jsonl({"prompt": "a"}) + b'{"prompt": "caf\xe9"}\n',
        ["line 2", "not UTF-8"],
    ),
    "not-utf8-json": ("p.json", b'[\n{"prompt": "a"},\n{"prompt": "caf\xe9"}\n]', ["line 3", "not UTF-8"]),
    "empty-file": ("p.jsonl", b"", ["no prompts"]),
    "blank-lines-only": ("p.jsonl", b"\n  \n\n", ["no prompts"]),
    "all-empty-prompts": (
        "p.jsonl",
        _jsonl({"prompt": ""}, {"prompt": " "}),
        ["line 1", "field 'prompt'", "empty"],
    ),
    "broken-json-line": (
        "p.jsonl",
        _jsonl({"prompt": "a"}) + b'{"prompt": "b"\n',
        ["line 2", "invalid JSON"],
    ),
    "wrong-field": ("p.jsonl", _jsonl({"text": "a"}), ["line 1", "no recognisable prompt field", "'text'"]),
    "wrong-role": (
        "p.jsonl",
        _jsonl({"prompt": {"role": "system", "content": "a"}}),
        ["line 1", "field 'prompt'"],
    ),
    "json-array-of-strings": ("p.json", b'["a", "b"]', ["row 0", "expected a JSON object"]),
    "json-not-a-list": ("p.json", b'{"prompt": "a"}', ["expected a JSON list"]),
    "too-few-for-split": ("p.jsonl", _jsonl({"prompt": "only one"}), ["1 prompt(s)", "split.sft_fraction"]),
}


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_bad_prompt_file_refused_at_ingest_nothing_committed(case, tmp_path, fusion_config, capsys):
    name, content, expected = PROMPT_CASES[case]
    prompts = tmp_path / name
    prompts.write_bytes(content)
    code, err = _cli(["run", "--config", str(_run_config(tmp_path, fusion_config, prompts))], capsys)
    assert code == 2
    assert str(prompts) in err and "stage ingest" in err
    for text in expected:
        assert text in err
    assert _nothing_committed(tmp_path)


def test_parquet_without_the_prompt_field(tmp_path, fusion_config, capsys):
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["a", "b"]}), prompts)
    code, err = _cli(["run", "--config", str(_run_config(tmp_path, fusion_config, prompts))], capsys)
    assert code == 2
    assert f"{prompts}: no prompt column" in err and "'question'" in err
    assert _nothing_committed(tmp_path)


def test_missing_prompt_file(tmp_path, fusion_config, capsys):
    prompts = tmp_path / "absent.jsonl"
    code, err = _cli(["run", "--config", str(_run_config(tmp_path, fusion_config, prompts))], capsys)
    assert code == 2
    assert f"{prompts}: prompt source not found" in err
    assert _nothing_committed(tmp_path)


def test_huge_prompt_value_is_quoted_shortened(tmp_path, fusion_config, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(_jsonl({"prompt": {"role": "x" * 300_000, "content": "a"}}))
    code, err = _cli(["run", "--config", str(_run_config(tmp_path, fusion_config, prompts))], capsys)
    assert code == 2
    assert f"{prompts}: line 1, field 'prompt'" in err
    assert "(300002 characters)" in err and len(err) < 1000
    assert _nothing_committed(tmp_path)


def test_quote_cuts_long_values_and_keeps_short_ones():
    assert quote("abc") == "'abc'"
    long = quote("y" * 1000)
    assert long == "'" + "y" * 79 + "… (1002 characters)"


# --- authors' and TRL files ---------------------------------------------------------------------------


def _wrpo_job(tmp_path: Path, data: Path, model: str) -> Path:
    job = {"model": model, "data": str(data), "output_dir": str(tmp_path / "out"),
           "training": {"max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                        "beta": 1.0, "max_length": 64, "max_prompt_length": 32}}  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _broken_role() -> dict:
    row = json.loads(json.dumps(AUTHORS_ROW))
    row["chosen"][1]["role"] = "user"
    return row


AUTHORS_CASES = {
    "wrong-role": (_jsonl(AUTHORS_ROW, _broken_role()), ["line 2", "field 'chosen[1]'", "role is 'user'"]),
    "missing-field": (
        _jsonl({k: v for k, v in AUTHORS_ROW.items() if k != "rejected"}),
        ["line 1", "missing field(s) ['rejected']"],
    ),
    "blank-line-then-missing-content": (
        b"\n" + _jsonl({**AUTHORS_ROW, "rejected": [{"role": "assistant"}]}),
        ["line 2", "field 'rejected[0].content'", "missing"],
    ),
    "not-utf8": (_jsonl(AUTHORS_ROW) + b'{"prompt": "\xff"}\n', ["line 2", "not UTF-8"]),
    "empty": (b"", ["no rows"]),
}


@pytest.mark.parametrize("case", sorted(AUTHORS_CASES))
def test_train_wrpo_on_a_bad_authors_file(case, tmp_path, tiny_model_dir, capsys):
    content, expected = AUTHORS_CASES[case]
    data = tmp_path / "authors.jsonl"
    data.write_bytes(content)
    code, err = _cli(["train", "wrpo", "--config", str(_wrpo_job(tmp_path, data, tiny_model_dir))], capsys)
    assert code == 2
    assert str(data) in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_trl_file_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "trl.jsonl"
    (record,) = to_trl_records(
        from_trl_records([{"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}],
                           "rejected": [{"role": "assistant", "content": "b"}],
                           "source_chosen": [{"role": "assistant", "content": "c"}]}], where="mem")
    )  # fmt: skip
    broken = {**record, "source_chosen": []}
    path.write_bytes(b"\n\n" + _jsonl(record, broken))
    with pytest.raises(
        ValueError, match=r"trl\.jsonl: line 4, field 'source_chosen': expected a list of exactly 1"
    ):
        from_trl_records(read_jsonl(str(path)), where=str(path))
    path.write_bytes(b"\n")
    with pytest.raises(ValueError, match=r"trl\.jsonl: no rows"):
        from_trl_records(read_jsonl(str(path)), where=str(path))


def test_export_of_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.parquet"
    code, err = _cli(["export", "--to", "trl", str(missing), str(tmp_path / "out.jsonl")], capsys)
    assert code == 2
    assert f"error: {missing}: quadruples Parquet file not found" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_export_of_a_file_that_is_not_parquet(tmp_path, capsys):
    data = tmp_path / "authors.jsonl"
    data.write_bytes(_jsonl(AUTHORS_ROW))
    code, err = _cli(["export", "--to", "authors", str(data), str(tmp_path / "out.jsonl")], capsys)
    assert code == 2
    assert f"{data}: not a readable Parquet file" in err


# --- every command on missing files and bad names -----------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["config", "check", "{missing}"],
        ["config", "check", "--rules", "{missing}"],
        ["train", "sft", "--config", "{missing}"],
        ["train", "wrpo", "--config", "{missing}"],
        ["reference", "--config", "{missing}"],
        ["run", "--config", "{missing}"],
        ["sources", "list", "--config", "{missing}"],
        ["sources", "discover", "--config", "{missing}", "--rules", "{missing}"],
    ],
    ids=lambda argv: "-".join(a for a in argv if not a.startswith("{")),
)
def test_commands_on_a_missing_file(argv, tmp_path, capsys):
    missing = str(tmp_path / "absent.yaml")
    code, err = _cli([a.replace("{missing}", missing) for a in argv], capsys)
    assert code == 2
    assert f"error: {missing}" in err and "not found" in err


@pytest.mark.parametrize("name", ["a/b", "../x", ""])
def test_sources_add_with_a_bad_name(name, tmp_path, capsys):
    storage = tmp_path / "registry-storage"
    code, err = _cli(
        ["sources", "add", name, "some/model", "--storage", str(storage), "--event", "never"], capsys
    )
    assert code == 2
    assert err.startswith("error: ") and "name" in err
    assert not list(storage.rglob("*.json"))


# --- truncation to what the model holds ---------------------------------------------------------------


def test_model_positions_config_wins_tokenizer_is_the_fallback():
    tokenizer = SimpleNamespace(model_max_length=300)
    assert model_max_positions(SimpleNamespace(max_position_embeddings=512), tokenizer) == PositionLimit(
        512, "max_position_embeddings 512 of the model config"
    )
    assert (
        model_max_positions(SimpleNamespace(n_positions=1024, max_position_embeddings=2048)).positions == 1024
    )
    assert model_max_positions(SimpleNamespace(), tokenizer).positions == 300
    assert model_max_positions(SimpleNamespace(), SimpleNamespace(model_max_length=int(1e30))) is None


def test_sampling_prompt_cut_to_model_positions_minus_response_budget(toy_tokenizer):
    long_prompt = "abcdefghij" * 200  # ~2000 tokens of the character tokenizer: more than 512 positions
    full = toy_tokenizer(prompt_text(toy_tokenizer, long_prompt), add_special_tokens=False)["input_ids"]
    assert len(full) > 512
    report = SamplingReport()
    ((_, ids), (_, short)) = encode_prompts(
        toy_tokenizer, ["long", "short"], [long_prompt, "hi"], max_prompt_tokens=1800, report=report,
        limit=PositionLimit(512, "test"), max_new_tokens=100, model_name="toy",
    )  # fmt: skip
    assert ids == list(full[-(512 - 100) :])  # cut from the left to the room the model has
    assert len(short) < 20
    assert (report.prompts_truncated, report.max_prompt_tokens) == (1, 412)
    # The configured limit still applies when it is the smaller one.
    report = SamplingReport()
    ((_, ids), _) = encode_prompts(
        toy_tokenizer, ["long", "short"], [long_prompt, "hi"], max_prompt_tokens=50, report=report,
        limit=PositionLimit(512, "test"), max_new_tokens=100, model_name="toy",
    )  # fmt: skip
    assert len(ids) == 50 and report.prompts_truncated == 1


def test_sampling_refuses_a_model_too_small_for_the_template_and_a_response(toy_tokenizer):
    with pytest.raises(
        ConfigError, match=r"model toy: holds 6 positions \(pos\); keeping 3 for the response"
    ):
        encode_prompts(
            toy_tokenizer, ["p"], ["hi"], max_prompt_tokens=1800, report=SamplingReport(),
            limit=PositionLimit(6, "pos"), max_new_tokens=510, model_name="toy",
        )  # fmt: skip


def test_a_length_limit_as_long_as_the_context_keeps_half_for_prompts_and_stops_at_the_context(
    tiny_model_dir,
):
    """The authors' max_new_tokens 4096 on a model of 512 positions (as on a 4k model): prompts get
    half the context, and every sample ends inside the context (cut ones are 'length')."""
    from wrpo_core.config import ModelSpec
    from wrpo_core.sampling import load_sampler

    spec = ModelSpec(path=tiny_model_dir, name="tiny", sampling={"n": 1, "max_new_tokens": 4096})
    sampler = load_sampler(spec, device="cpu", progress=False)
    prompts = ["reverse: " + "abcdefgh" * 80, "upper: short"]
    table, report = sampler.sample(["p0", "p1"], prompts)
    assert report.prompts_truncated == 1
    assert max(table["prompt_tokens"].to_pylist()) <= 256
    totals = [
        p + c
        for p, c in zip(
            table["prompt_tokens"].to_pylist(), table["completion_tokens"].to_pylist(), strict=True
        )
    ]
    assert max(totals) <= 512 and set(table["finish_reason"].to_pylist()) <= {"stop", "length"}


def test_training_lengths_clipped_to_model_positions(toy_tokenizer):
    prompt, response = "abcdefghij" * 60, "xyz" * 100
    fitted = encode_example(
        toy_tokenizer, prompt, [response], max_length=2048, max_prompt_length=1800, max_positions=512
    )
    assert len(fitted.prompt_ids) + len(fitted.response_ids[0]) <= 512
    assert fitted.prompt_truncated
    unclipped = encode_example(toy_tokenizer, prompt, [response], max_length=2048, max_prompt_length=1800)
    assert len(unclipped.prompt_ids) + len(unclipped.response_ids[0]) > 512


def test_sampling_counts_reach_the_per_source_statistics(fusion_config, tmp_path):
    from wrpo_core.pipeline import layout_for, pipeline_stage, run_pipeline_stage

    layout = layout_for(fusion_config)
    names = ["ingest", "split", "sample-src-a", "score-src-a", "sample-src-b", "score-src-b", "select-source"]
    summaries = {name: run_pipeline_stage(fusion_config, layout, pipeline_stage(fusion_config, layout, name))[1]
                 for name in names}  # fmt: skip
    rows = {row["model"]: row for row in summaries["select-source"]["per_model"]}
    for model in ("src-a", "src-b"):
        sampled = summaries[f"sample-{model}"]
        assert rows[model]["prompts_truncated"] == sampled["prompts_truncated"] == 0
        assert rows[model]["prompts_skipped_empty"] == sampled["prompts_skipped_empty"] == 0
        assert sampled["max_prompt_tokens"] == 512 - 8  # the tiny model holds 512 positions; 8 new tokens
