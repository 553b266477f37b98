"""Models handed to other machines by storage URL: fetched into each machine's cache, checked by content.

Stands for a Ray node or Ray Train worker with no disk shared with the driver (issue 14): it gets
`s3://.../models/target-sft` and must load exactly the save the run recorded, not a stale or cut
copy. memory:// storage plays the object store; two cache folders play two machines.
"""

import hashlib
from pathlib import Path

import pyarrow as pa
import pytest

from wrpo_core.locations import resolve_model_location
from wrpo_core.models import model_identity
from wrpo_core.schemas import PROMPTS
from wrpo_core.storage import RunLayout, Storage, StorageError, digest
from wrpo_core.storage.model_folders import (
    SUMS_FILE,
    fetch_model_folder,
    is_storage_url,
    parse_sums,
)


def saved_model(tmp_path: Path, weights: bytes = b"1" * 64) -> tuple[RunLayout, str]:
    layout = RunLayout(f"memory://folders-{tmp_path.name}/run", cache_dir=tmp_path / "driver")
    folder = layout.model_dir("tiny")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "tokenizer.json").write_text("{}")
    layout.begin("train-tiny")
    layout.save_model("tiny")
    layout.commit("train-tiny", {})
    return layout, layout.model_url("tiny")


def test_storage_urls_are_told_from_paths_and_hub_ids():
    assert is_storage_url("s3://bucket/runs/x/models/target-sft") and is_storage_url("memory://b/m")
    assert not is_storage_url("/tmp/model") and not is_storage_url("file:///tmp/model")
    assert not is_storage_url("meta-llama/Meta-Llama-3-8B-Instruct") and not is_storage_url(
        "toy-world:demo/x"
    )


def test_a_saved_model_carries_sums_of_every_file(tmp_path):
    layout, url = saved_model(tmp_path)
    text = Storage.open(url).read_bytes(SUMS_FILE).decode()
    sums = parse_sums(text, "here")
    assert sorted(sums) == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert sums["model.safetensors"] == hashlib.sha256(b"1" * 64).hexdigest()  # independent hash
    entry = layout.entry(layout.model_key("tiny"))[1]
    assert f"{layout.model_key('tiny')}/{SUMS_FILE}" in {f["key"] for f in entry["files"]}


def test_each_machine_fetches_its_own_checked_copy_and_reuses_it(tmp_path):
    _, url = saved_model(tmp_path)
    node_a = fetch_model_folder(url, tmp_path / "node-a")
    node_b = fetch_model_folder(url, tmp_path / "node-b")
    assert node_a != node_b and (node_a / "model.safetensors").read_bytes() == b"1" * 64
    assert (node_b / "sub" / "tokenizer.json").read_text() == "{}"
    stamp = (node_a / "model.safetensors").stat().st_mtime_ns
    assert fetch_model_folder(url, tmp_path / "node-a") == node_a  # reused, not downloaded again
    assert (node_a / "model.safetensors").stat().st_mtime_ns == stamp
    # Identified by its sums, read from storage (no download), the same on every machine.
    sums = Storage.open(url).read_bytes(SUMS_FILE).decode()
    assert model_identity(url) == {"url": url, "sha256sums": digest(sums)}


def test_loaders_resolve_a_model_url_to_this_machines_cache(tmp_path, monkeypatch):
    _, url = saved_model(tmp_path)
    monkeypatch.setenv("WRPO_CACHE", str(tmp_path / "this-machine"))
    local = Path(resolve_model_location(url))
    assert local.parent == tmp_path / "this-machine" / "models" and (local / "config.json").is_file()


def test_a_retrained_model_is_fetched_again_and_its_identity_changes(tmp_path):
    _, url = saved_model(tmp_path)
    before = model_identity(url)
    copy = fetch_model_folder(url, tmp_path / "node")
    _, again = saved_model(tmp_path, weights=b"2" * 64)  # same names and sizes, other weights
    assert again == url and model_identity(url) != before
    assert (fetch_model_folder(url, tmp_path / "node") / "model.safetensors").read_bytes() == b"2" * 64
    assert copy == fetch_model_folder(url, tmp_path / "node")


def test_a_corrupt_upload_is_refused_not_loaded(tmp_path):
    _, url = saved_model(tmp_path)
    Storage.open(url).write_bytes("model.safetensors", b"X" * 64)  # changed after its sums were written
    with pytest.raises(
        StorageError, match=r"1 downloaded file\(s\) do not match its SHA256SUMS \(model.safetensors\)"
    ):
        fetch_model_folder(url, tmp_path / "node")
    marker = list((tmp_path / "node" / "models").glob(f"*/{SUMS_FILE}"))
    assert marker == []  # the copy never claims to be complete


def test_a_folder_without_sums_is_named(tmp_path):
    storage = Storage.open(f"memory://nosums-{tmp_path.name}/m")
    storage.write_bytes("config.json", b"{}")
    with pytest.raises(FileNotFoundError, match=r"no SHA256SUMS in the folder.*sha256sum \* > SHA256SUMS"):
        fetch_model_folder(storage.url_of(), tmp_path / "node")
    with pytest.raises(StorageError, match=r"line 1 is not"):
        parse_sums("abc  ../x\n", "somewhere")


def test_a_dataset_is_handed_over_as_one_file_url(tmp_path):
    layout = RunLayout(
        f"memory://tables-{tmp_path.name}/run", cache_dir=tmp_path / "driver", max_rows_per_file=2
    )
    table = pa.table({"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"]})
    layout.begin("ingest")
    layout.write_dataset("prompts", table, PROMPTS)
    layout.commit("ingest", {})
    layout.begin("next")
    url = layout.table_file_url("prompts", PROMPTS)  # three rows in two parts: one combined copy
    assert url.startswith("memory://") and url.endswith("jobs/prompts.parquet")
    from wrpo_core.schemas import read_parquet

    assert read_parquet(url, PROMPTS)["prompt_id"].to_pylist() == ["a", "b", "c"]
    assert "prompts" in layout.record.inputs
