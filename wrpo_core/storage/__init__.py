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
- `lease`: `Lease`, one holder of a run folder at a time (refusing others, naming the holder);
  `read_tagged` / `write_if` / `delete_if`, compare-and-swap writes on local disks and S3.
- `options`: the fsspec options a URL is opened with (config, Prefect block, S3 defaults).
- `secrets`: which options are secrets, and redaction of every message and artifact.
- `keys`: keys that cannot leave their root; names that can be one key segment.
- `provenance`: the code version and content digests recorded in manifests.

The layout, manifests and how to read the data with pyarrow, `datasets` and pandas are in
docs/storage.md.
"""

from wrpo_core.storage.errors import ManifestError, StorageError
from wrpo_core.storage.filesystem import Storage, StorageAccess, storage_error
from wrpo_core.storage.keys import safe_key, safe_name
from wrpo_core.storage.layout import DEFAULT_ROWS_PER_FILE, RunLayout, StageRecord, default_cache_dir
from wrpo_core.storage.lease import (
    LEASE_KEY,
    ConditionFailed,
    Lease,
    LeaseError,
    LeaseHolder,
    delete_if,
    read_tagged,
    write_if,
)
from wrpo_core.storage.options import BlockLoader, protocol_of, resolve_storage_options
from wrpo_core.storage.provenance import code_version, digest
from wrpo_core.storage.secrets import REDACTED, is_secret_option, redact, redact_options, secret_values

__all__ = [
    "DEFAULT_ROWS_PER_FILE",
    "LEASE_KEY",
    "REDACTED",
    "BlockLoader",
    "ConditionFailed",
    "Lease",
    "LeaseError",
    "LeaseHolder",
    "ManifestError",
    "RunLayout",
    "StageRecord",
    "Storage",
    "StorageAccess",
    "StorageError",
    "code_version",
    "default_cache_dir",
    "delete_if",
    "digest",
    "is_secret_option",
    "protocol_of",
    "read_tagged",
    "redact",
    "redact_options",
    "resolve_storage_options",
    "safe_key",
    "safe_name",
    "secret_values",
    "storage_error",
    "write_if",
]
