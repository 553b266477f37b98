"""The reference log-prob cache is reused only for the same data, reference weights, tokenizer, settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from toy_quadruples import WORDS as TOY_WORDS
from toy_quadruples import quadruples_table
from transformers import AutoModelForCausalLM, AutoTokenizer

import wrpo_core.train.wrpo as wrpo_module
from wrpo_core.config import WRPOConfig, WRPOJobConfig
from wrpo_core.models import model_identity
from wrpo_core.reference import REFERENCE_FILE, data_digest
from wrpo_core.schemas import QUADRUPLES, read_parquet
from wrpo_core.storage.layout import CACHED_SAVE_FILE
from wrpo_core.tokenization import encode_example
from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model
from wrpo_core.toy.tokenizer import build_char_tokenizer
from wrpo_core.train.wrpo import prepare_reference

WORDS = TOY_WORDS[:6]


def quadruples(y_wt: list[str] | None = None) -> pa.Table:
    return quadruples_table(WORDS, y_wt=y_wt)


@pytest.fixture()
def model_dir(tmp_path) -> str:
    """A tiny Llama (seed 0) of this test's own, so that a test can retrain it in place."""
    tokenizer = build_char_tokenizer()
    return save_tiny_model(build_tiny_llama(tokenizer, seed=0), tokenizer, tmp_path / "target-sft")


@pytest.fixture()
def calls(monkeypatch) -> dict[str, int]:
    """Counts the reference model loads and reference passes that prepare_reference makes."""
    counts = {"load": 0, "compute": 0}
    load, compute = wrpo_module.load_causal_lm, wrpo_module.compute_reference_logps

    def counted_load(*args, **kwargs):
        counts["load"] += 1
        return load(*args, **kwargs)

    def counted_compute(*args, **kwargs):
        counts["compute"] += 1
        return compute(*args, **kwargs)

    monkeypatch.setattr(wrpo_module, "load_causal_lm", counted_load)
    monkeypatch.setattr(wrpo_module, "compute_reference_logps", counted_compute)
    return counts


def job(model: str, out: Path, data: str = "quadruples.parquet", **training) -> WRPOJobConfig:
    hp = {"max_length": 64, "max_prompt_length": 32, "per_device_train_batch_size": 2, "bf16": False}
    return WRPOJobConfig(
        model=model, data=data, output_dir=str(out), training=WRPOConfig(**{**hp, **training})
    )


def independent_logps(model_dir: str, table: pa.Table, row: int, max_length: int = 64) -> list[float]:
    """Summed log-probs of y_ws, y_wt, y_l of one row, token by token from a full log-softmax."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    responses = [table[c][row].as_py() for c in ("y_ws", "y_wt", "y_l")]
    enc = encode_example(tokenizer, table["prompt"][row].as_py(), responses, max_length=max_length,
                         max_prompt_length=32)  # fmt: skip
    result = []
    for response in enc.response_ids:
        ids = torch.tensor([enc.prompt_ids + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0], -1)
        result.append(sum(logp[t - 1, ids[0, t]].item() for t in range(len(enc.prompt_ids), ids.shape[1])))
    return result


def test_the_same_job_reuses_its_cache_without_loading_the_model(tmp_path, model_dir, calls):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    first = prepare_reference(job(model_dir, tmp_path / "out"), quadruples(), tokenizer)
    assert calls == {"load": 1, "compute": 1}
    again = prepare_reference(job(model_dir, tmp_path / "out"), quadruples(), tokenizer)
    assert calls == {"load": 1, "compute": 1}  # reused: no model load, no reference pass
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(first[2], independent_logps(model_dir, quadruples(), 2), atol=1e-4)


def test_changed_responses_with_the_same_prompt_ids_are_recomputed(tmp_path, model_dir, calls):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepare_reference(job(model_dir, tmp_path / "out"), quadruples(), tokenizer)
    changed = quadruples(y_wt=["cba", "go", "eer", "esuoh", "mouse!", "nep"])
    assert changed["prompt_id"].equals(quadruples()["prompt_id"])
    logps = prepare_reference(job(model_dir, tmp_path / "out"), changed, tokenizer)
    assert calls == {"load": 2, "compute": 2}
    np.testing.assert_allclose(logps[4], independent_logps(model_dir, changed, 4), atol=1e-4)
    cache = read_parquet(str(tmp_path / "out" / REFERENCE_FILE), QUADRUPLES)  # overwritten
    assert cache["y_wt"].to_pylist() == changed["y_wt"].to_pylist()
    np.testing.assert_allclose(cache["ref_logp_wt"].to_numpy(), logps[:, 1])


def test_a_reference_model_retrained_at_the_same_path_is_recomputed(tmp_path, model_dir, calls):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before = prepare_reference(job(model_dir, tmp_path / "out"), quadruples(), tokenizer)
    retrained = build_tiny_llama(build_char_tokenizer(), seed=1)  # same architecture: same file sizes
    save_tiny_model(retrained, build_char_tokenizer(), model_dir)
    after = prepare_reference(job(model_dir, tmp_path / "out"), quadruples(), tokenizer)
    assert calls == {"load": 2, "compute": 2}
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after[0], independent_logps(model_dir, quadruples(), 0), atol=1e-4)


def test_changed_tokenization_settings_are_recomputed(tmp_path, model_dir, calls):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepare_reference(job(model_dir, tmp_path / "out"), quadruples(), tokenizer)
    long_words = quadruples(y_wt=[w * 9 for w in WORDS])  # truncated at max_length 48, not at 64
    prepare_reference(job(model_dir, tmp_path / "long"), long_words, tokenizer)
    assert calls["compute"] == 2
    shorter = prepare_reference(job(model_dir, tmp_path / "long", max_length=48), long_words, tokenizer)
    assert calls["compute"] == 3
    np.testing.assert_allclose(
        shorter[1], independent_logps(model_dir, long_words, 1, max_length=48), atol=1e-4
    )
    # Another chat template tokenizes the same texts differently.
    tokenizer.chat_template = tokenizer.chat_template.replace("<|end|>", "<|end|>\n")
    prepare_reference(job(model_dir, tmp_path / "out"), quadruples(), tokenizer)
    assert calls["compute"] == 4


def test_logps_stored_in_the_input_with_other_settings_are_refused_naming_them(tmp_path, model_dir, calls):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepare_reference(job(model_dir, tmp_path / "out"), quadruples(), tokenizer)
    stored = str(tmp_path / "out" / REFERENCE_FILE)
    table = read_parquet(stored, QUADRUPLES)
    # The same settings: the stored log-probs are used as they are (another job, e.g. the DPO baseline).
    reused = prepare_reference(job(model_dir, tmp_path / "dpo", data=stored), table, tokenizer)
    assert calls["compute"] == 1
    columns = [table[c].to_numpy() for c in ("ref_logp_ws", "ref_logp_wt", "ref_logp_l")]
    np.testing.assert_array_equal(reused, np.stack(columns, axis=1))
    with pytest.raises(ValueError, match=rf"{stored}: .*other settings.*max_length: 64 -> 48"):
        prepare_reference(job(model_dir, tmp_path / "dpo", data=stored, max_length=48), table, tokenizer)
    assert calls["compute"] == 1


def test_data_digest_covers_every_text_column_in_order():
    base = quadruples()
    digests = {data_digest(base)}
    for column in ("prompt", "y_ws", "y_wt", "y_l"):
        texts = base[column].to_pylist()
        texts[3] += "!"
        digests.add(
            data_digest(base.set_column(base.schema.get_field_index(column), column, pa.array(texts)))
        )
    swapped = base.take([1, 0, 2, 3, 4, 5])
    digests.add(data_digest(swapped))
    assert len(digests) == 6
    assert data_digest(base.drop_columns(["y_ws_score"])) == data_digest(base)  # scores do not matter


def test_model_identity_of_folders_and_hub_revisions(tmp_path, model_dir, monkeypatch):
    first = model_identity(model_dir)
    assert model_identity(model_dir) == first
    Path(model_dir, "README.md").write_text("a card written after training")
    assert model_identity(model_dir) == first  # only config, weights and code count
    weights = Path(model_dir, "model.safetensors")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert model_identity(model_dir) != first  # rewritten weights, same size

    # A download of a saved model from run storage is identified by its save, not by local times.
    Path(model_dir, CACHED_SAVE_FILE).write_text(json.dumps({"saved_id": "abc", "model": "m"}))
    saved = model_identity(model_dir)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 7))
    assert model_identity(model_dir) == saved
    Path(model_dir, CACHED_SAVE_FILE).write_text(json.dumps({"saved_id": "def", "model": "m"}))
    assert model_identity(model_dir) != saved

    # A hub id: the commit its revision resolves to, here from an offline cache.
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    repo = hub / "models--org--target-sft"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (repo / "refs" / "main").write_text("a" * 40)
    assert model_identity("org/target-sft") == {"hub": "org/target-sft", "revision": "a" * 40}
    (repo / "refs" / "main").write_text("b" * 40)
    assert model_identity("org/target-sft") == {"hub": "org/target-sft", "revision": "b" * 40}
    assert model_identity("org/target-sft", revision="a" * 40)["revision"] == "a" * 40
    with pytest.raises(
        FileNotFoundError, match="model org/missing: not a local folder, and its revision main"
    ):
        model_identity("org/missing")
