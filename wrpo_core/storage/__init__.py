"""One storage layer for every artifact of a run: a local folder or any fsspec URL (S3 through s3fs).

    layout = RunLayout("s3://bucket/runs/my-run", {"endpoint_url": "http://127.0.0.1:8333"})
    layout.storage.check()                       # one cheap probe: credentials, bucket, endpoint
    layout.write_dataset("samples/src-a", table, SAMPLES)
    layout.commit("sample-src-a", {"samples": 48})   # the stage's manifest, written LAST
    layout.read_dataset("samples/src-a", SAMPLES)    # only the files that manifest lists

The package's parts, one concern each:

- `filesystem`: `Storage`, a root on any fsspec filesystem addressed by relative keys, with
  errors that name the URL and what to fix; `StorageAccess`, how another process opens it.
- `layout`: `RunLayout`, a run's folder: datasets, models and per-stage manifests.
- `options`: the fsspec options a URL is opened with (config, Prefect block, S3 defaults).
- `secrets`: which options are secrets, and redaction of every message and artifact.
- `keys`: keys that cannot leave their root; names that can be one key segment.
- `provenance`: the code version and content digests recorded in manifests.

The layout, manifests and how to read the data with pyarrow, `datasets` and pandas are in
docs/storage.md.
"""

from wrpo_core.storage.errors import ManifestError, StorageError
from wrpo_core.storage.filesystem import Storage, StorageAccess
from wrpo_core.storage.keys import safe_key, safe_name
from wrpo_core.storage.layout import DEFAULT_ROWS_PER_FILE, RunLayout, StageRecord, default_cache_dir
from wrpo_core.storage.options import BlockLoader, protocol_of, resolve_storage_options
from wrpo_core.storage.provenance import code_version, digest
from wrpo_core.storage.secrets import REDACTED, is_secret_option, redact, redact_options, secret_values

__all__ = [
    "DEFAULT_ROWS_PER_FILE",
    "REDACTED",
    "BlockLoader",
    "ManifestError",
    "RunLayout",
    "StageRecord",
    "Storage",
    "StorageAccess",
    "StorageError",
    "code_version",
    "default_cache_dir",
    "digest",
    "is_secret_option",
    "protocol_of",
    "redact",
    "redact_options",
    "resolve_storage_options",
    "safe_key",
    "safe_name",
    "secret_values",
]
