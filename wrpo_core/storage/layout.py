"""A run's folder on storage: artifact keys, Parquet datasets, models and per-stage manifests.

    layout = RunLayout("s3://bucket/runs/my-run", {"endpoint_url": "http://127.0.0.1:8333"})
    layout.write_dataset("samples/src-a", table, SAMPLES)
    layout.commit("sample-src-a", {"samples": 48})   # the stage's manifest, written LAST
    layout.read_dataset("samples/src-a", SAMPLES)    # only the files that manifest lists

A run's folder (see docs/storage.md):

    <run root>/prompts/{all,sft,preference}/part-NNNNN.parquet
              samples/<model>/part-NNNNN.parquet       scores/<model>/part-NNNNN.parquet
              selection/{best_source,sft_pairs,quadruples}/part-NNNNN.parquet
              models/<name>/...                         (Hugging Face folder with README.md card)
              reports/...                               manifests/<stage>.json

A stage is done only when `manifests/<stage>.json` exists. It lists every file the stage wrote
(relative keys, bytes, rows, sha256), each dataset's schema fingerprint, the datasets and models
the stage read (with digests, so a changed input makes it stale), the config hash and the code
version. Keys are deterministic, so a retried stage overwrites its files instead of adding more;
files no manifest lists (left by a crashed attempt) are never read and are removed once the
stage's manifest is written.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from wrpo_core.schemas import DataError, conform, schema_fingerprint, schema_name
from wrpo_core.storage.errors import ManifestError, StorageError
from wrpo_core.storage.filesystem import Storage, cache_root
from wrpo_core.storage.keys import safe_key, safe_name
from wrpo_core.storage.model_folders import SUMS_FILE, sums_text
from wrpo_core.storage.options import BlockLoader
from wrpo_core.storage.provenance import code_version, digest

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
DEFAULT_ROWS_PER_FILE = 200_000
CACHED_SAVE_FILE = ".wrpo-saved-id.json"
"""In a cached download of a model: which save (the manifest entry's `saved_id`) the files are."""
IO_THREADS = 4  # partitions written or read at once


@dataclass
class StageRecord:
    """What the running stage has written and read so far; becomes its manifest on commit."""

    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)


def default_cache_dir(storage: Storage) -> Path:
    """Local working folder of a run on remote storage: $WRPO_CACHE (or ~/.cache/wrpo-fusion)/runs/..."""
    base = cache_root()
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", storage.root.rsplit("/", 1)[-1])[:40]
    return base / "runs" / f"{tail}-{digest(storage.url_of())[:10]}"


class RunLayout:
    """A run's folder on storage: artifact keys, Parquet datasets, models and per-stage manifests.

    The stage currently running accumulates what it writes and reads in `record`; `commit` turns
    that into the stage's manifest. Run concurrent stages on separate RunLayout objects (`fork`).
    """

    prompts = "prompts/all"
    best_source = "selection/best_source"
    sft_pairs = "selection/sft_pairs"
    quadruples = "selection/quadruples"
    reports = "reports"

    def __init__(
        self,
        root: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        cache_dir: str | Path | None = None,
        max_rows_per_file: int = DEFAULT_ROWS_PER_FILE,
        storage: Storage | None = None,
        load_block: BlockLoader | None = None,
    ):
        self.storage = storage or Storage.open(root, storage_options, load_block=load_block)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(self.storage)
        if max_rows_per_file < 1:
            raise ValueError(f"max_rows_per_file must be >= 1, got {max_rows_per_file}")
        self.max_rows_per_file = max_rows_per_file
        self.record = StageRecord()
        self._index: dict[str, tuple[str, dict[str, Any]]] | None = None
        self._manifest_cache: dict[str, tuple[str, dict[str, Any]]] = {}

    @classmethod
    def for_run(
        cls, base_url: str, run_id: str, storage_options: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> RunLayout:
        """The layout of run `run_id` under `base_url` (`<base_url>/<run_id>`)."""
        return cls(f"{base_url.rstrip('/')}/{safe_name(run_id, 'run id')}", storage_options, **kwargs)

    def fork(self) -> RunLayout:
        """The same run with an empty record, for a stage running concurrently with others."""
        return RunLayout(
            self.root,
            storage=self.storage,
            cache_dir=self.cache_dir,
            max_rows_per_file=self.max_rows_per_file,
        )

    @property
    def root(self) -> str:
        return self.storage.url

    # keys

    def split(self, name: str) -> str:
        return f"prompts/{safe_name(name, 'split')}"

    def samples(self, model: str) -> str:
        return f"samples/{safe_name(model, 'model name')}"

    def scores(self, model: str) -> str:
        return f"scores/{safe_name(model, 'model name')}"

    def model_key(self, name: str) -> str:
        return f"models/{safe_name(name, 'model name')}"

    def manifest_key(self, stage: str) -> str:
        return f"manifests/{safe_name(stage, 'stage name')}.json"

    def url_of(self, key: str) -> str:
        return self.storage.url_of(key)

    # manifests

    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest, or None when the stage has not completed."""
        data = self.storage.read_bytes_if_exists(self.manifest_key(stage))
        return None if data is None else json.loads(data)

    def is_done(self, stage: str) -> bool:
        return self.read_manifest(stage) is not None

    def manifests(self) -> dict[str, dict[str, Any]]:
        """Every completed stage's manifest, by stage name (one listing; unchanged ones come from memory)."""
        found = {}
        for key, tag in self.storage.list_versions("manifests").items():
            if key.endswith(".json") and not key.rsplit("/", 1)[-1].startswith("."):
                cached = self._manifest_cache.get(key)
                if cached is None or cached[0] != tag:
                    cached = (tag, self.storage.read_json(key))
                    self._manifest_cache[key] = cached
                found[cached[1]["stage"]] = cached[1]
        return found

    def index(self, *, refresh: bool = False) -> dict[str, tuple[str, dict[str, Any]]]:
        """Dataset and model keys of all completed stages -> (stage, manifest entry)."""
        if self._index is None or refresh:
            self._index = {}
            for stage, manifest in self.manifests().items():
                for section in ("datasets", "models"):
                    for key, entry in manifest.get(section, {}).items():
                        self._index[key] = (stage, entry)
        return self._index

    def entry(self, key: str) -> tuple[str, dict[str, Any]]:
        """(producing stage, manifest entry) of a dataset or model; the running stage's own first."""
        key = safe_key(key)
        own = self.record.datasets.get(key) or self.record.models.get(key)
        if own is not None:
            return "(this stage)", own
        found = self.index().get(key) or self.index(refresh=True).get(key)
        if found is None:
            raise ManifestError(
                f"{self.storage.display(key)}: no completed stage lists it in its manifest "
                "(the stage that writes it has not finished; run it first)"
            )
        return found

    def changed_inputs(self, manifest: Mapping[str, Any]) -> list[str]:
        """Inputs of a completed stage that changed (or vanished) since it ran."""
        index = self.index()
        return sorted(
            key
            for key, expected in manifest.get("inputs", {}).items()
            if key not in index or digest(index[key][1]) != expected
        )

    def begin(self, stage: str) -> None:
        """Starts (or restarts) a stage: drops its old manifest, so it counts as not done until commit."""
        self.storage.delete([self.manifest_key(stage)])
        self.record = StageRecord()
        self._index = None

    def commit(
        self,
        stage: str,
        summary: Mapping[str, Any],
        *,
        config_hash: str | None = None,
        stage_key: str | None = None,
    ) -> dict[str, Any]:
        """Writes the stage's manifest (LAST), then removes files of its datasets that it does not list."""
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "stage": safe_name(stage, "stage name"),
            "run": self.storage.display(),
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config_hash": config_hash,
            "stage_key": stage_key,
            "code_version": code_version(),
            "datasets": self.record.datasets,
            "models": self.record.models,
            "inputs": self.record.inputs,
            "summary": dict(summary),
        }
        self.storage.write_json(self.manifest_key(stage), manifest)
        for key, entry in self.record.datasets.items():
            self._remove_orphans(key, {f["key"] for f in entry["files"]})
        self.record = StageRecord()
        self._index = None
        return json.loads(self.storage.redact(json.dumps(manifest, default=str)))

    def _remove_orphans(self, prefix: str, listed: set[str]) -> None:
        try:
            orphans = [key for key in self.storage.list_files(prefix) if key not in listed]
            self.storage.delete(orphans)
        except StorageError as error:  # the stage is done; leftovers are never read anyway
            logger.warning("could not remove unlisted files under %s: %s", prefix, error)
            return
        if orphans:
            logger.info("removed %d file(s) under %s that no manifest lists", len(orphans), prefix)

    # datasets

    def write_dataset(self, key: str, table: pa.Table, schema: pa.Schema) -> dict[str, Any]:
        """Writes `table` as `key/part-NNNNN.parquet` files (at most max_rows_per_file rows each)."""
        key = safe_key(key)
        table = conform(table, schema, where=self.storage.display(key))
        starts = range(0, max(table.num_rows, 1), self.max_rows_per_file)

        def write(index: int) -> dict[str, Any]:
            part = table.slice(starts[index], self.max_rows_per_file)
            return self.storage.write_table(f"{key}/part-{index:05d}.parquet", part, schema)

        with ThreadPoolExecutor(min(IO_THREADS, len(starts))) as pool:  # encode and upload in parallel
            files = list(pool.map(write, range(len(starts))))
        return self._record_dataset(key, schema, files)

    def register_dataset(
        self, key: str, schema: pa.Schema, files: Sequence[str | Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Lists Parquet files written by other processes (e.g. fan-out shards) as this stage's dataset.

        Each file is given as the entry its writer returned (`Storage.write_table`: key, rows,
        bytes, sha256), so nothing is read again, or as a bare key (a shard an earlier attempt
        wrote), which is then read once to describe it. Readers check every file's sha256.
        """
        key = safe_key(key)
        entries = []
        for file in files:
            entry = self._describe_file(file) if isinstance(file, str) else dict(file)
            entry["key"] = safe_key(entry["key"])
            if not entry["key"].startswith(f"{key}/"):
                raise StorageError(f"{entry['key']!r} is not inside the dataset folder {key!r}")
            entries.append({name: entry[name] for name in ("key", "rows", "bytes", "sha256")})
        return self._record_dataset(key, schema, entries)

    def _describe_file(self, file_key: str) -> dict[str, Any]:
        data = self.storage.read_bytes(file_key)
        rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
        return {"key": file_key, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def _record_dataset(self, key: str, schema: pa.Schema, files: list[dict[str, Any]]) -> dict[str, Any]:
        entry = {
            "schema": schema_name(schema),
            "schema_fingerprint": schema_fingerprint(schema),
            "rows": sum(f["rows"] for f in files),
            "files": files,
        }
        self.record.datasets[key] = entry
        return entry

    def read_dataset(self, key: str, schema: pa.Schema) -> pa.Table:
        """All rows of a dataset, from exactly the files its manifest lists (checked by sha256)."""
        stage, entry = self.entry(key)
        if entry.get("schema_fingerprint") != schema_fingerprint(schema):
            raise DataError(
                f"{self.storage.display(key)}: written with schema {entry.get('schema')} "
                f"({entry.get('schema_fingerprint')}), expected {schema_name(schema)} "
                f"({schema_fingerprint(schema)}); run stage {stage} again"
            )
        with ThreadPoolExecutor(max(1, min(IO_THREADS, len(entry["files"])))) as pool:
            tables = list(
                pool.map(
                    lambda f: self.storage.read_table(f["key"], schema, sha256=f.get("sha256")),
                    entry["files"],
                )
            )
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        if table.num_rows != entry["rows"]:
            raise DataError(
                f"{self.storage.display(key)}: {table.num_rows} rows, manifest says {entry['rows']}"
            )
        self._note_input(key, entry)
        return table

    def dataset_urls(self, key: str) -> list[str]:
        """Full URLs of a dataset's files, for pyarrow.dataset / datasets / pandas (see docs/storage.md)."""
        _, entry = self.entry(key)
        return [self.storage.url_of(f["key"]) for f in entry["files"]]

    def local_table_file(self, key: str, schema: pa.Schema) -> str:
        """A local Parquet file holding the dataset: its own file on local storage, else a cached copy."""
        _, entry = self.entry(key)
        if self.storage.is_local and len(entry["files"]) == 1:
            self._note_input(key, entry)
            return self.storage.path(entry["files"][0]["key"])
        table = self.read_dataset(key, schema)
        target = self.cache_dir / "data" / f"{safe_key(key)}.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, target)
        return str(target)

    def table_file_url(self, key: str, schema: pa.Schema) -> str:
        """The storage URL of one Parquet file holding the dataset, for a process on another machine.

        The dataset's own file when it has one part, else a single-file copy at `jobs/<key>.parquet`.
        """
        _, entry = self.entry(key)
        self._note_input(key, entry)
        if len(entry["files"]) == 1:
            return self.storage.url_of(entry["files"][0]["key"])
        copy_key = f"jobs/{safe_key(key)}.parquet"
        self.storage.write_table(copy_key, self.read_dataset(key, schema), schema)
        return self.storage.url_of(copy_key)

    def note_input(self, key: str) -> dict[str, Any]:
        """Records a completed stage's dataset or model as an input of the running stage; its entry.

        For stages that hand the files to other processes (Ray actors) instead of reading them.
        """
        key = safe_key(key)
        _, entry = self.entry(key)
        self._note_input(key, entry)
        return entry

    def _note_input(self, key: str, entry: dict[str, Any]) -> None:
        if key not in self.record.datasets and key not in self.record.models:
            self.record.inputs[key] = digest(entry)

    # models

    def model_dir(self, name: str) -> Path:
        """Local working folder for training model `name`: its storage folder when storage is local."""
        key = self.model_key(name)
        local = self.storage.local_path(key)
        return local if local is not None else self.cache_dir / key

    def save_model(self, name: str, *, exclude: tuple[str, ...] = ("checkpoint-*",)) -> dict[str, Any]:
        """Lists the trained model folder in this stage's record, uploading it when storage is remote.

        Top-level entries matching `exclude` (resumable checkpoints) stay local.
        """
        folder = self.model_dir(name)
        if not folder.is_dir():
            raise StorageError(f"model folder {folder} does not exist; train the model first")
        files = sorted(
            str(path.relative_to(folder))
            for path in folder.rglob("*")
            if path.is_file()
            and path.name not in (CACHED_SAVE_FILE, SUMS_FILE)
            and not any(fnmatch.fnmatch(path.relative_to(folder).parts[0], pattern) for pattern in exclude)
        )
        # Another machine handed the model's URL checks its copy against these (model_folders.py).
        (folder / SUMS_FILE).write_text(sums_text(folder, files))
        files = sorted([*files, SUMS_FILE])
        key = self.model_key(name)
        sizes = {f: (folder / f).stat().st_size for f in files}
        entry = {
            "files": [{"key": f"{key}/{f}", "bytes": sizes[f]} for f in files],
            "bytes": sum(sizes.values()),
            # Weights of a retrained model keep their sizes: a fresh id makes its readers stale.
            "saved_id": uuid.uuid4().hex,
        }
        if not self.storage.is_local:
            self.storage.upload(folder, key, files)
            if folder == self.cache_dir / key:  # the folder `model()` reads is this very save
                (folder / CACHED_SAVE_FILE).write_text(
                    json.dumps({"saved_id": entry["saved_id"], "model": self.storage.display(key)})
                )
        self.record.models[key] = entry
        return entry

    def model_url(self, name: str) -> str:
        """The storage URL of a finished model, for a process on another machine (it fetches and checks
        its own copy: `model_folders.fetch_model_folder`); recorded as an input of the running stage."""
        key = self.model_key(name)
        _, entry = self.entry(key)
        self._note_input(key, entry)
        return self.storage.url_of(key)

    def model(self, name: str) -> str:
        """Local folder of a finished model: its storage folder when local, else a cached download.

        The cached copy is the one the manifest lists only if it was downloaded for the same save
        (the entry's `saved_id`, recorded next to the files): a retrained model, whose files keep
        their names and sizes, is downloaded again whole, and files the new save lacks are removed.
        """
        key = self.model_key(name)
        _, entry = self.entry(key)
        wanted = []
        for listed in entry["files"]:
            file_key = safe_key(listed["key"])
            if not file_key.startswith(f"{key}/"):
                raise StorageError(
                    f"manifest of {self.storage.display(key)} lists {file_key!r} outside the model"
                )
            wanted.append(file_key[len(key) + 1 :])
        self._note_input(key, entry)
        local = self.storage.local_path(key)
        if local is not None:
            return str(local)
        target = self.cache_dir / key
        marker = target / CACHED_SAVE_FILE
        saved_id = entry.get("saved_id")
        cached = json.loads(marker.read_text()) if marker.is_file() else {}
        if (
            saved_id is None
            or cached.get("saved_id") != saved_id
            or any(not (target / f).is_file() for f in wanted)
        ):
            logger.info("downloading %d file(s) of %s to %s", len(wanted), self.storage.display(key), target)
            marker.unlink(missing_ok=True)  # a download cut short leaves no claim to be complete
            for stale in (
                p for p in target.rglob("*") if p.is_file() and str(p.relative_to(target)) not in wanted
            ):
                stale.unlink()
            self.storage.download(key, wanted, target)
            if saved_id is not None:
                marker.write_text(json.dumps({"saved_id": saved_id, "model": self.storage.display(key)}))
        return str(target)
