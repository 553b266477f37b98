"""The storage layer: keys that cannot escape, secrets that never leak, manifests that decide what is
read, models moved through storage, and clear errors, on a local folder and on a real S3 server."""

import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from s3server import free_ports

from wrpo_core.schemas import PROMPTS, SAMPLES, DataError, schema_fingerprint
from wrpo_core.storage import (
    ManifestError,
    RunLayout,
    Storage,
    StorageError,
    redact,
    redact_options,
    resolve_storage_options,
    safe_key,
)


def samples_table(n: int, model: str = "m") -> pa.Table:
    return pa.table(
        {
            "prompt_id": [f"p{i // 2}" for i in range(n)],
            "model": [model] * n,
            "sample_index": pa.array([i % 2 for i in range(n)], pa.int32()),
            "text": [f"answer {i}" for i in range(n)],
            "finish_reason": ["stop"] * n,
            "prompt_tokens": pa.array([3] * n, pa.int32()),
            "completion_tokens": pa.array([2] * n, pa.int32()),
            "seed": pa.array(range(n), pa.int64()),
        }
    )


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def layout(request, tmp_path) -> RunLayout:
    """A run layout (4 rows per file) on a local folder, and on the SeaweedFS server."""
    if request.param == "local":
        return RunLayout(str(tmp_path / "run"), cache_dir=tmp_path / "cache", max_rows_per_file=4)
    server, prefix = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_prefix")
    return RunLayout(
        f"{prefix}/run", server.storage_options(), cache_dir=tmp_path / "cache", max_rows_per_file=4
    )


# --- keys and secrets -----------------------------------------------------------------------------


def test_keys_can_never_leave_the_root():
    assert safe_key("samples//src-a/./part-00000.parquet") == "samples/src-a/part-00000.parquet"
    for bad in (
        "../x",
        "a/../../b",
        "/etc/passwd",
        "s3://other/x",
        "file:///x",
        "C:\\x",
        "~/x",
        "",
        "a\x00b",
    ):
        with pytest.raises(StorageError, match="not allowed"):
            safe_key(bad)
    for bad_run in ("..", "a/b", "../up", ""):
        with pytest.raises(StorageError, match="not allowed"):
            RunLayout.for_run("/tmp/runs", bad_run)


def test_a_manifest_listing_a_key_outside_the_run_is_refused(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    (tmp_path / "secret.parquet").write_bytes(b"x")
    with pytest.raises(StorageError, match="not allowed"):
        layout.model("../x")
    layout.storage.write_json(
        "manifests/evil.json",
        {"stage": "evil", "datasets": {"samples/m": {"schema_fingerprint": schema_fingerprint(SAMPLES), "rows": 1,
                                                     "files": [{"key": "../secret.parquet", "rows": 1}]}}},
    )  # fmt: skip
    with pytest.raises(StorageError, match="not allowed"):
        layout.read_dataset("samples/m", SAMPLES)
    layout.storage.write_json(
        "manifests/evil.json",
        {
            "stage": "evil",
            "models": {"models/m": {"files": [{"key": "models/m/../../../secret.parquet", "bytes": 1}]}},
        },
    )
    with pytest.raises(StorageError, match="not allowed"):
        layout.model("m")


def test_redact_hides_secrets_urls_passwords_and_signatures(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    text = redact(
        "key s3cr3t-value, env env-secret-value, https://user:pa55word@host/x?X-Amz-Signature=abcdef&b=1",
        ["s3cr3t-value"],
    )
    assert text == "key ***, env ***, https://user:***@host/x?X-Amz-Signature=***&b=1"
    options = {
        "key": "AKIA",
        "secret": "s",
        "client_kwargs": {"aws_session_token": "t"},
        "endpoint_url": "http://h",
    }
    assert redact_options(options) == {
        "key": "***",  # an access key id is a credential too
        "secret": "***",
        "client_kwargs": {"aws_session_token": "***"},
        "endpoint_url": "http://h",
    }


def test_s3_options_have_short_timeouts_and_take_the_endpoint_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    options = resolve_storage_options("s3://b/p", {"region": "eu-west-1", "max_attempts": 5, "key": "k"})
    assert options["endpoint_url"] == "http://127.0.0.1:9"
    assert options["client_kwargs"] == {"region_name": "eu-west-1"}
    assert options["config_kwargs"]["retries"] == {"max_attempts": 5, "mode": "standard"}
    assert options["config_kwargs"]["connect_timeout"] == 5 and options["key"] == "k"
    assert resolve_storage_options("/local/path", {"x": 1}) == {"x": 1}  # other protocols untouched


def test_prefect_blocks_provide_storage_options(monkeypatch):
    prefect = pytest.importorskip("prefect")
    from prefect.blocks.core import Block
    from prefect.blocks.system import Secret
    from prefect.filesystems import RemoteFileSystem

    from tasks.blocks import block_options as _block_options
    from tasks.blocks import load_block_options

    remote = RemoteFileSystem(basepath="s3://b", settings={"key": "k", "secret": "block-secret"})
    assert _block_options(remote) == {"key": "k", "secret": "block-secret"}
    assert _block_options(Secret(value={"secret": "s2"})) == {"secret": "s2"}
    loaded = []
    monkeypatch.setattr(Block, "load", classmethod(lambda cls, name: loaded.append(name) or remote))
    options = resolve_storage_options(
        "s3://b/p", {"prefect_block": "remote-file-system/wrpo", "key": "mine"}, load_block=load_block_options
    )
    assert loaded == ["remote-file-system/wrpo"] and prefect
    assert options["secret"] == "block-secret" and options["key"] == "mine"  # config wins over the block


def test_storage_is_importable_and_usable_without_prefect(tmp_path):
    code = (
        "import sys; sys.modules['prefect'] = None\n"
        "from wrpo_core.storage import RunLayout, StorageError\n"
        f"RunLayout({str(tmp_path / 'r')!r}).storage.check()\n"
        "try:\n    RunLayout('s3://b/p', {'prefect_block': 'secret/x'})\n"
        "except StorageError as e:\n    print('ERR', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ERR storage option prefect_block='secret/x' needs Prefect" in result.stdout


# --- datasets and manifests ------------------------------------------------------------------------


def test_datasets_are_partitioned_with_deterministic_keys_and_read_only_from_the_manifest(layout):
    entry = layout.write_dataset("samples/m", samples_table(10), SAMPLES)
    assert [f["key"] for f in entry["files"]] == [f"samples/m/part-0000{i}.parquet" for i in range(3)]
    assert [f["rows"] for f in entry["files"]] == [4, 4, 2] and entry["rows"] == 10
    # A retry of the same stage overwrites the same keys; an orphan from an older attempt is ignored.
    layout.storage.write_table("samples/m/part-00009.parquet", samples_table(3, "orphan"), SAMPLES)
    layout.begin("sample-m")
    layout.write_dataset("samples/m", samples_table(10), SAMPLES)
    manifest = layout.commit("sample-m", {"samples": 10})
    assert manifest["datasets"]["samples/m"]["schema"] == "SAMPLES"
    table = layout.read_dataset("samples/m", SAMPLES)
    assert table.num_rows == 10 and set(table["model"].to_pylist()) == {"m"}
    assert layout.storage.list_files("samples/m") == [f"samples/m/part-0000{i}.parquet" for i in range(3)]
    # An orphan written after the manifest is never read either.
    layout.storage.write_table("samples/m/part-00005.parquet", samples_table(3, "late"), SAMPLES)
    assert layout.read_dataset("samples/m", SAMPLES).num_rows == 10


def test_written_data_is_readable_by_pyarrow_datasets_and_pandas(layout, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pd = pytest.importorskip("pandas")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # offline mode refuses even s3:// URLs
    layout.write_dataset("samples/m", samples_table(10), SAMPLES)
    layout.commit("sample-m", {})
    urls = layout.dataset_urls("samples/m")
    options = layout.storage.reader_options  # a fresh copy per call: readers may change what they get
    paths = [layout.storage.path(f"samples/m/part-0000{i}.parquet") for i in range(3)]
    assert ds.dataset(paths, filesystem=layout.storage.fs, format="parquet").count_rows() == 10
    folder = ds.dataset(layout.storage.path("samples/m"), filesystem=layout.storage.fs, format="parquet")
    assert folder.to_table().num_rows == 10
    loaded = datasets.load_dataset(  # datasets wants the options keyed by protocol
        "parquet", data_files=urls, storage_options={layout.storage.protocol: options()},
        cache_dir=str(tmp_path / "hf"), split="train",
    )  # fmt: skip
    assert loaded.num_rows == 10 and loaded.features["sample_index"].dtype == "int32"
    frame = pd.concat([pd.read_parquet(url, storage_options=options() or None) for url in urls])
    assert len(frame) == 10 and list(frame.columns) == SAMPLES.names


def test_files_written_elsewhere_are_listed_from_their_writers_entries_without_reading_them(
    layout, monkeypatch
):
    """Fan-out shards: the entry a worker returned is trusted as written; a bare key is read once."""
    written = [layout.storage.write_table(f"samples/m/part-0000{i}.parquet", samples_table(3), SAMPLES)
               for i in range(2)]  # fmt: skip
    reads = []
    real_read = layout.storage.read_bytes
    monkeypatch.setattr(layout.storage, "read_bytes", lambda key: reads.append(key) or real_read(key))
    entry = layout.register_dataset("samples/m", SAMPLES, [written[0], written[1]["key"]])
    assert reads == [written[1]["key"]]  # only the shard given by its key alone
    assert entry["files"] == written and entry["rows"] == 6
    with pytest.raises(StorageError, match="not inside the dataset folder"):
        layout.register_dataset("samples/other", SAMPLES, [written[0]])
    layout.commit("sample-m", {})
    monkeypatch.undo()
    assert layout.read_dataset("samples/m", SAMPLES).num_rows == 6  # the entries' sha256 match the files


def test_unfinished_stage_changed_file_and_other_schema_are_errors(layout):
    layout.write_dataset("samples/m", samples_table(5), SAMPLES)
    with pytest.raises(ManifestError, match="samples/m"):
        RunLayout(layout.root, storage=layout.storage).read_dataset("samples/m", SAMPLES)
    layout.commit("sample-m", {})
    with pytest.raises(DataError, match="expected PROMPTS"):
        layout.read_dataset("samples/m", PROMPTS)
    layout.storage.write_table("samples/m/part-00001.parquet", samples_table(1, "changed"), SAMPLES)
    with pytest.raises(DataError, match="differs from the one its manifest lists"):
        layout.read_dataset("samples/m", SAMPLES)


def test_a_stage_whose_input_changed_is_stale(layout):
    layout.write_dataset("samples/m", samples_table(4), SAMPLES)
    layout.commit("sample-m", {})
    layout.read_dataset("samples/m", SAMPLES)
    layout.commit("score-m", {})
    assert layout.changed_inputs(layout.read_manifest("score-m")) == []
    layout.begin("sample-m")
    layout.write_dataset("samples/m", samples_table(6), SAMPLES)
    layout.commit("sample-m", {})
    assert layout.changed_inputs(layout.read_manifest("score-m")) == ["samples/m"]


def test_models_go_to_storage_and_come_back_through_a_cache(layout, tmp_path, monkeypatch):
    folder = layout.model_dir("tiny")
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"o" * 100)
    (folder / "model.safetensors").write_bytes(b"w" * 1000)
    (folder / "README.md").write_text("card")
    entry = layout.save_model("tiny")
    layout.commit("train-tiny", {})
    # with the sums another machine checks its copy by (storage/model_folders.py)
    assert [f["key"] for f in entry["files"]] == [
        "models/tiny/README.md", "models/tiny/SHA256SUMS", "models/tiny/model.safetensors",
    ]  # fmt: skip
    if layout.storage.is_local:
        assert folder == layout.storage.local_path("models/tiny")  # trained in place: nothing copied
        assert layout.model("tiny") == str(folder)
        layout.commit("use-tiny", {})
        layout.begin("train-tiny")  # retrained: same file sizes, other weights
        layout.save_model("tiny")
        layout.commit("train-tiny", {})
        assert layout.changed_inputs(layout.read_manifest("use-tiny")) == ["models/tiny"]
        return
    assert layout.storage.list_files("models/tiny") == [
        "models/tiny/README.md",
        "models/tiny/SHA256SUMS",
        "models/tiny/model.safetensors",
    ]
    other = RunLayout(layout.root, storage=layout.storage, cache_dir=tmp_path / "elsewhere")
    local = other.model("tiny")
    assert (tmp_path / "elsewhere" / "models" / "tiny" / "model.safetensors").read_bytes() == b"w" * 1000
    assert not (tmp_path / "elsewhere" / "models" / "tiny" / "checkpoint-2").exists()
    monkeypatch.setattr(Storage, "download", lambda *a: pytest.fail("downloaded a cached model again"))
    assert other.model("tiny") == local


# --- errors on a real S3 server ------------------------------------------------------------------


def bad_storage(case: str, server, prefix: str) -> tuple[str, dict, str]:
    """(url, options, expected words) for one misconfiguration."""
    if case == "wrong secret":
        return prefix, server.storage_options(secret="wrong-" + server.secret_key), "access denied"
    if case == "unknown key":
        return prefix, server.storage_options(key="nobody"), "access denied"
    if case == "missing bucket":
        return "s3://no-such-bucket/runs", server.storage_options(), "bucket 'no-such-bucket' does not exist"
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    return prefix, server.storage_options(endpoint_url=endpoint), f"cannot reach the endpoint {endpoint}"


@pytest.mark.integration
@pytest.mark.parametrize("case", ["wrong secret", "unknown key", "missing bucket", "unreachable endpoint"])
def test_bad_storage_fails_fast_with_one_clear_error_naming_the_url(case, s3_server, s3_prefix):
    url, options, expected = bad_storage(case, s3_server, s3_prefix)
    storage = Storage.open(url, options)
    started = time.monotonic()
    with pytest.raises(StorageError) as error:
        storage.check()
    message = str(error.value)
    assert time.monotonic() - started < 10
    assert message.startswith(f"storage {url}: ") and expected in message
    assert s3_server.secret_key not in message and "wrong-" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # one error, no chain
    Storage.open(s3_prefix, s3_server.storage_options()).check()  # the right settings pass


@pytest.mark.integration
def test_credentials_and_endpoint_from_the_environment(s3_server, s3_prefix, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    storage = Storage.open(s3_prefix)
    storage.check()
    storage.write_json("x.json", {"note": f"holds {s3_server.secret_key}"})
    assert storage.read_json("x.json") == {"note": "holds ***"}  # secrets are redacted from artifacts
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-wrong-secret")
    with pytest.raises(StorageError, match="access denied") as error:
        Storage.open(s3_prefix).check()
    assert "env-wrong-secret" not in str(error.value)


def test_a_retrained_remote_model_with_the_same_file_sizes_is_downloaded_again(tmp_path):
    """Another machine's cached copy follows the manifest's save, not the files' sizes."""
    url = f"memory://retrain-{tmp_path.name}/run"
    trainer = RunLayout(url, cache_dir=tmp_path / "trainer")
    folder = trainer.model_dir("tiny")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"1" * 64)
    (folder / "extra.json").write_text("{}")
    trainer.save_model("tiny")
    trainer.commit("train-tiny", {})
    assert trainer.model("tiny") == str(folder)  # the trainer's own folder is this save: kept as is

    reader = RunLayout(url, cache_dir=tmp_path / "reader")
    cached = Path(reader.model("tiny"))
    assert (cached / "model.safetensors").read_bytes() == b"1" * 64
    trainer.begin("train-tiny")  # retrained: same names and sizes, other weights, one file fewer
    (folder / "model.safetensors").write_bytes(b"2" * 64)
    (folder / "extra.json").unlink()
    trainer.save_model("tiny")
    trainer.commit("train-tiny", {})
    again = RunLayout(url, cache_dir=tmp_path / "reader")
    assert Path(again.model("tiny")) == cached
    assert (cached / "model.safetensors").read_bytes() == b"2" * 64
    assert not (cached / "extra.json").exists()  # what the new save lacks is gone
