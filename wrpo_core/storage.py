"""One storage layer for every artifact of a run: a local folder or any fsspec URL (S3 through s3fs).

    layout = RunLayout("s3://bucket/runs/my-run", {"endpoint_url": "http://127.0.0.1:8333"})
    layout.storage.check()                       # one cheap probe: credentials, bucket, endpoint
    layout.write_dataset("samples/src-a", table, SAMPLES)
    layout.commit("sample-src-a", {"samples": 48})   # the stage's manifest, written LAST
    layout.read_dataset("samples/src-a", SAMPLES)    # only the files that manifest lists

Credentials and endpoint come from `storage_options` (s3fs names: `endpoint_url`, `key`, `secret`,
`token`, plus the flat `region`, `connect_timeout`, `read_timeout`, `max_attempts`), else from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL[_S3],
AWS_REGION, profiles: botocore's usual chain), or from a Prefect block named by the option
`prefect_block` ("remote-file-system/NAME", "secret/NAME" holding a dict of options, or a
prefect-aws "aws-credentials/NAME"); Prefect is imported only then. Secrets never reach logs,
errors, manifests or model cards: every message passes through `redact`.

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
stage's manifest is written. Keys can never leave the run's root (`safe_key`).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import fsspec.asyn
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from wrpo_core.schemas import DataError, atomic_write, conform, schema_fingerprint, schema_name

logger = logging.getLogger(__name__)

REDACTED = "***"
MANIFEST_VERSION = 1
DEFAULT_ROWS_PER_FILE = 200_000
IO_THREADS = 4  # partitions written or read at once
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_WORDS = ("secret", "token", "password", "credential", "account_key", "sas")
_USERINFO = re.compile(r"(\b[A-Za-z][\w+.-]*://[^/\s:@]*:)[^/\s@]+@")
_SIGNED_QUERY = re.compile(
    r"\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|sig|token)=[^&\s\"']+", re.I
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_S3_PROTOCOLS = ("s3", "s3a")


class StorageError(RuntimeError):
    """Storage that cannot be used; the message names the URL (never a secret) and what to fix."""


class ManifestError(StorageError):
    """An artifact that no finished stage's manifest lists (its stage has not completed)."""


# --- secrets ------------------------------------------------------------------------------------


def is_secret_option(name: str) -> bool:
    """Whether a storage option (or config field) of this name holds a secret."""
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def secret_values(options: Mapping[str, Any]) -> list[str]:
    """The secret strings among `options` (nested mappings included) and the secret AWS_* variables."""
    found = [os.environ.get(name, "") for name in SECRET_ENV]
    for name, value in options.items():
        if isinstance(value, Mapping):
            found += secret_values(value)
        elif isinstance(value, str) and is_secret_option(name):
            found.append(value)
    return [value for value in found if len(value) >= 4]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with known secret values, URL passwords and request signatures replaced by '***'.

    Known secrets are `secrets` plus AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN from the environment.
    """
    values = {value for value in (*secrets, *(os.environ.get(n, "") for n in SECRET_ENV)) if len(value) >= 4}
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    return _SIGNED_QUERY.sub(rf"\1={REDACTED}", text)


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `options` with every secret-named value replaced by '***' (nested mappings too)."""
    clean: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, Mapping):
            clean[name] = redact_options(value)
        elif value is not None and is_secret_option(name):
            clean[name] = REDACTED
        else:
            clean[name] = redact(value) if isinstance(value, str) else value
    return clean


# --- keys ---------------------------------------------------------------------------------------


def safe_key(key: str) -> str:
    """`key` as a clean relative path ("a/b/c"); StorageError if it could leave its root.

    Rejected: empty keys, absolute paths, '..' parts, URLs or drive letters (':'), backslashes,
    '~' at the start and control characters.
    """
    if not isinstance(key, str):
        raise StorageError(f"storage key must be a string, got {type(key).__name__}")
    bad = (
        not key.strip()
        or key.startswith(("/", "~"))
        or ":" in key
        or "\\" in key
        or any(ord(ch) < 32 for ch in key)
    )
    parts = [part for part in key.split("/") if part not in ("", ".")]
    if bad or ".." in parts or not parts:
        raise StorageError(
            f"storage key {key!r} is not allowed: keys are relative paths inside the run's folder "
            "(no '..', no absolute paths, no URLs)"
        )
    return "/".join(parts)


def safe_name(name: str, what: str = "name") -> str:
    """A single key segment (run id, model or stage name): letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise StorageError(
            f"{what} {name!r} is not allowed in storage keys: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# --- options ------------------------------------------------------------------------------------


def protocol_of(url: str) -> str:
    """The fsspec protocol of `url` ('file' for plain paths)."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def _block_options(block: Any) -> dict[str, Any]:
    """Storage options held by a Prefect block (duck-typed, so Prefect itself is not needed here)."""
    if hasattr(block, "settings") and hasattr(block, "basepath"):  # prefect.filesystems.RemoteFileSystem
        return dict(block.settings or {})
    if hasattr(block, "aws_access_key_id"):  # prefect_aws.AwsCredentials
        secret = getattr(block, "aws_secret_access_key", None)
        token = getattr(block, "aws_session_token", None)
        params = getattr(block, "aws_client_parameters", None)
        options = {
            "key": block.aws_access_key_id,
            "secret": secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret,
            "token": token.get_secret_value() if hasattr(token, "get_secret_value") else token,
            "region": getattr(block, "region_name", None),
            "endpoint_url": getattr(params, "endpoint_url", None),
        }
        return {name: value for name, value in options.items() if value}
    if hasattr(block, "get"):  # prefect.blocks.system.Secret holding a mapping
        value = block.get()
        if isinstance(value, Mapping):
            return dict(value)
    raise StorageError(
        f"Prefect block of type {type(block).__name__} holds no storage options "
        "(use a RemoteFileSystem, an AwsCredentials or a Secret block holding a mapping)"
    )


def prefect_block_options(name: str) -> dict[str, Any]:
    """Storage options from the Prefect block `name` ('block-type-slug/block-name')."""
    try:
        from prefect.blocks.core import Block
    except ImportError:
        raise StorageError(
            f"storage option prefect_block={name!r} needs Prefect: pip install 'wrpo-fusion[orchestration]'"
        ) from None
    try:
        block = Block.load(name)
    except Exception as exc:
        raise StorageError(f"cannot load the Prefect block {name!r}: {redact(str(exc))}") from None
    return _block_options(block)


def resolve_storage_options(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options for `url`: config options, a Prefect block's, and S3 defaults.

    For s3:// the flat options `region`, `connect_timeout`, `read_timeout` and `max_attempts` become
    botocore settings; the endpoint falls back to AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; timeouts
    and retries are short (5 s to connect, 3 attempts) so a dead endpoint fails in seconds.
    """
    options = dict(storage_options or {})
    block = options.pop("prefect_block", None)
    if block:
        options = {**prefect_block_options(str(block)), **options}
    if protocol_of(url) not in _S3_PROTOCOLS:
        return options
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not options.get("endpoint_url"):
        options["endpoint_url"] = endpoint
    client = dict(options.pop("client_kwargs", None) or {})
    region = options.pop("region", None) or options.pop("region_name", None)
    if region:
        client["region_name"] = region
    if client:
        options["client_kwargs"] = client
    config = dict(options.pop("config_kwargs", None) or {})
    config.setdefault("connect_timeout", options.pop("connect_timeout", 5))
    config.setdefault("read_timeout", options.pop("read_timeout", 60))
    config.setdefault("retries", {"max_attempts": int(options.pop("max_attempts", 3)), "mode": "standard"})
    options["config_kwargs"] = config
    options.setdefault("use_listings_cache", False)  # other machines write the same bucket
    return options


# --- errors -------------------------------------------------------------------------------------

_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "FSTimeoutError",
    "ConnectionError",
    "TimeoutError",
}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "403"}


def _is_storage_failure(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(names & (_UNREACHABLE | {"BotoCoreError", "ClientError"}))


# --- storage ------------------------------------------------------------------------------------


@dataclass(repr=False)
class Storage:
    """A root folder on any fsspec filesystem, addressed by relative keys; errors are StorageError."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    options: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Storage({self.display()!r})"

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
        """Storage rooted at `url` (a local path or any fsspec URL); nothing is contacted yet."""
        url = url.rstrip("/") or url
        options = resolve_storage_options(url, storage_options)
        try:
            # A private instance: credentials may come from the environment, which fsspec's cache ignores.
            fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
        except (ImportError, ValueError, TypeError) as exc:
            raise StorageError(
                f"storage {redact(url, secret_values(options))}: cannot open it: {redact(str(exc))}"
            ) from None
        return cls(url=url, fs=fs, root=root.rstrip("/") or root, options=options)

    @property
    def protocol(self) -> str:
        protocol = self.fs.protocol
        return protocol if isinstance(protocol, str) else protocol[0]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def endpoint(self) -> str:
        """Where requests go, for messages: the S3 endpoint URL, or the protocol's default."""
        return str(self.options.get("endpoint_url") or f"the default {self.protocol} endpoint")

    def reader_options(self) -> dict[str, Any]:
        """A copy of the resolved fsspec options, for pandas / datasets / pyarrow readers (holds secrets)."""
        return copy.deepcopy(self.options)

    def redact(self, text: str) -> str:
        """`text` without this storage's secrets (or any other secret `redact` knows)."""
        return redact(text, secret_values(self.options))

    def path(self, key: str = "") -> str:
        """The filesystem path of `key` (the root itself for '')."""
        return f"{self.root}/{safe_key(key)}" if key else self.root

    def url_of(self, key: str = "") -> str:
        """The full URL of `key`, for readers outside this class (pyarrow, datasets, pandas)."""
        if self.is_local:
            return self.path(key)
        return f"{self.protocol}://{self.path(key)}"

    def display(self, key: str = "") -> str:
        """The URL of `key` as it may appear in logs and errors (redacted)."""
        return self.redact(self.url_of(key))

    def child(self, key: str) -> Storage:
        """Storage rooted at `key` below this root (same filesystem and options)."""
        key = safe_key(key)
        return Storage(url=f"{self.url}/{key}", fs=self.fs, root=self.path(key), options=self.options)

    def local_path(self, key: str = "") -> Path | None:
        """The local path of `key` when the storage is a local folder, else None."""
        return Path(self.path(key)) if self.is_local else None

    # errors

    def explain(self, exc: BaseException) -> str:
        """One line saying what went wrong with a request, without secrets."""
        names = {cls.__name__ for cls in type(exc).__mro__}
        detail = self.redact(f"{type(exc).__name__}: {exc}")[:300]
        code = (
            str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))
            if "ClientError" in names
            else ""
        )
        if names & {"NoCredentialsError", "PartialCredentialsError"}:
            return (
                "no credentials found: set key/secret in storage_options, AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or a Prefect block (storage option prefect_block)"
            )
        if isinstance(exc, PermissionError) or code in _DENIED_CODES:
            return (
                f"access denied by {self.endpoint}: the credentials are wrong or lack permission "
                f"(check the access key and secret) [{detail}]"
            )
        if "bucket does not exist" in str(exc).lower() or code == "NoSuchBucket":
            bucket = self.root.split("/", 1)[0]
            return f"bucket {bucket!r} does not exist at {self.endpoint} (create it or fix the URL)"
        if names & _UNREACHABLE or isinstance(exc, ConnectionError | TimeoutError):
            return (
                f"cannot reach the endpoint {self.endpoint} (connection refused or timed out): check "
                f"endpoint_url / AWS_ENDPOINT_URL and that the server is up [{detail}]"
            )
        return detail

    @contextmanager
    def guard(self, action: str, key: str = "") -> Iterator[None]:
        """Turns a failing storage request into one StorageError naming the URL, without secrets."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            if not _is_storage_failure(exc):
                raise
            raise StorageError(f"{action} {self.display(key)}: {self.explain(exc)}") from None

    def check(self) -> None:
        """Probes the storage once, cheaply (a few seconds at most), before a run writes anything.

        Raises one StorageError naming the URL for wrong credentials, a missing bucket, an
        unreachable endpoint or a local folder that cannot be written.
        """
        if self.is_local:
            with self.guard("storage"):
                self.fs.makedirs(self.root, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise StorageError(f"storage {self.display()}: the folder is not writable")
            return
        bucket = self.root.split("/", 1)[0]
        if self.protocol not in _S3_PROTOCOLS:
            with self.guard("storage"):
                if not self.fs.exists(bucket):
                    raise StorageError(f"storage {self.display()}: {bucket!r} does not exist")
            return
        # One HEAD on the bucket from a client with fewer retries (2 attempts, 3 s to connect), so a
        # dead endpoint fails in a second or two; everything capped at 10 s.
        config = {**self.options.get("config_kwargs", {}), "connect_timeout": 3, "read_timeout": 10}
        config["retries"] = {"max_attempts": 2, "mode": "standard"}
        probe = type(self.fs)(**{**self.options, "config_kwargs": config}, skip_instance_cache=True)
        try:
            fsspec.asyn.sync(probe.loop, probe._call_s3, "head_bucket", Bucket=bucket, timeout=10)
        except FileNotFoundError:
            raise StorageError(
                f"storage {self.display()}: bucket {bucket!r} does not exist at {self.endpoint} "
                "(create it or fix the URL)"
            ) from None
        except Exception as exc:
            if not _is_storage_failure(exc):
                raise
            raise StorageError(f"storage {self.display()}: {self.explain(exc)}") from None

    # files

    def exists(self, key: str) -> bool:
        with self.guard("cannot check", key):
            return self.fs.exists(self.path(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Writes `data` to `key` so that readers see the old object or the whole new one, never a part."""
        with self.guard("cannot write", key):
            if self.is_local:
                atomic_write(self.path(key), lambda handle: handle.write(data))
            else:  # one PUT (or a multipart upload completed at the end) is atomic on object stores
                self.fs.pipe_file(self.path(key), data)

    def read_bytes(self, key: str) -> bytes:
        with self.guard("cannot read", key):
            return self.fs.cat_file(self.path(key))

    def read_bytes_if_exists(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none (one request, no separate existence check)."""
        with self.guard("cannot read", key):
            try:
                return self.fs.cat_file(self.path(key))
            except FileNotFoundError as exc:
                if "bucket" in str(exc).lower():  # a missing bucket is an error, not a missing object
                    raise
                return None

    def write_json(self, key: str, obj: Any) -> None:
        """Writes `obj` as indented JSON, redacted of this storage's secrets."""
        text = self.redact(json.dumps(obj, indent=2, sort_keys=True, default=str))
        self.write_bytes(key, text.encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def list_files(self, prefix: str) -> list[str]:
        """Keys of every file below `prefix` (recursively), sorted; [] when there is none."""
        return list(self.list_versions(prefix))

    def list_versions(self, prefix: str) -> dict[str, str]:
        """Every file below `prefix`: key -> a tag that changes when the file does (size, ETag or mtime)."""
        with self.guard("cannot list", prefix):
            try:
                found = self.fs.find(self.path(prefix), detail=True)
            except FileNotFoundError:
                return {}
        cut = len(self.root) + 1
        files = {}
        for path, info in found.items():
            path = path.rstrip("/")
            if path.startswith(f"{self.root}/") and info.get("type") != "directory":
                tag = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
                files[path[cut:]] = f"{info.get('size')}:{tag}"
        return dict(sorted(files.items()))

    def delete(self, keys: Iterable[str]) -> None:
        """Removes these keys; keys that do not exist are ignored."""
        paths = [self.path(key) for key in keys]
        if paths:
            with self.guard("cannot delete under"):
                for path in paths:  # one DELETE each; no existence checks first
                    with suppress(FileNotFoundError):
                        self.fs.rm_file(path)

    def write_table(self, key: str, table: pa.Table, schema: pa.Schema) -> dict[str, Any]:
        """Writes `table` (conformed to `schema`) as one Parquet file; returns its manifest entry."""
        conformed = conform(table, schema, where=self.display(key))
        buffer = io.BytesIO()
        pq.write_table(conformed, buffer)
        data = buffer.getvalue()
        self.write_bytes(key, data)
        return {
            "key": safe_key(key),
            "rows": conformed.num_rows,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    def read_table(self, key: str, schema: pa.Schema, *, sha256: str | None = None) -> pa.Table:
        """Reads one Parquet file conformed to `schema`; with `sha256`, checks it is the file expected."""
        data = self.read_bytes(key)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise DataError(
                f"{self.display(key)}: the file differs from the one its manifest lists "
                "(overwritten later); run the stage that writes it again"
            )
        try:
            table = pq.read_table(pa.BufferReader(data))
        except pa.ArrowInvalid as exc:
            raise DataError(f"{self.display(key)}: not a readable Parquet file: {exc}") from exc
        return conform(table, schema, where=self.display(key))

    def upload(self, folder: Path, prefix: str, files: list[str]) -> None:
        """Uploads `files` (paths relative to the local `folder`) to `prefix/<file>`, each atomically."""
        if not files:
            return
        with self.guard("cannot upload to", prefix):
            self.fs.put([str(folder / f) for f in files], [self.path(f"{prefix}/{f}") for f in files])

    def download(self, prefix: str, files: list[str], folder: Path) -> None:
        """Downloads `prefix/<file>` for each of `files` into the local `folder`."""
        if not files:
            return
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with self.guard("cannot download", prefix):
            self.fs.get([self.path(f"{prefix}/{f}") for f in files], [str(folder / f) for f in files])


# --- code version -------------------------------------------------------------------------------


@functools.cache
def code_version() -> dict[str, Any]:
    """The package version and, in a git checkout, the commit (and whether tracked files changed)."""
    try:
        version = importlib.metadata.version("wrpo-fusion")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip()

    # Only when the package itself is tracked (an installed copy inside another repository is not).
    sha = git("rev-parse", "HEAD") if git("ls-files", "--error-unmatch", "__init__.py") else None
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if sha else None
    return {"package": "wrpo-fusion", "version": version, "git_sha": sha, "git_dirty": dirty}


def digest(obj: Any) -> str:
    """Short sha256 of `obj`'s canonical JSON: manifests compare inputs by it."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- run layout and manifests -------------------------------------------------------------------


@dataclass
class StageRecord:
    """What the running stage has written and read so far; becomes its manifest on commit."""

    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)


def default_cache_dir(storage: Storage) -> Path:
    """Local working folder of a run on remote storage: $WRPO_CACHE (or ~/.cache/wrpo-fusion)/runs/..."""
    base = Path(os.environ.get("WRPO_CACHE", Path.home() / ".cache" / "wrpo-fusion"))
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
    ):
        self.storage = storage or Storage.open(root, storage_options)
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

    def register_dataset(self, key: str, schema: pa.Schema, file_keys: list[str]) -> dict[str, Any]:
        """Lists Parquet files written by other processes (e.g. fan-out shards) as this stage's dataset."""
        key = safe_key(key)
        files = []
        for file_key in file_keys:
            file_key = safe_key(file_key)
            if not file_key.startswith(f"{key}/"):
                raise StorageError(f"{file_key!r} is not inside the dataset folder {key!r}")
            data = self.storage.read_bytes(file_key)
            rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            files.append(
                {
                    "key": file_key,
                    "rows": rows,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        return self._record_dataset(key, schema, files)

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
            and not any(fnmatch.fnmatch(path.relative_to(folder).parts[0], pattern) for pattern in exclude)
        )
        key = self.model_key(name)
        if not self.storage.is_local:
            self.storage.upload(folder, key, files)
        entry = {
            "files": [{"key": f"{key}/{f}", "bytes": (folder / f).stat().st_size} for f in files],
            "bytes": sum((folder / f).stat().st_size for f in files),
            # Weights of a retrained model keep their sizes: a fresh id makes its readers stale.
            "saved_id": uuid.uuid4().hex,
        }
        self.record.models[key] = entry
        return entry

    def model(self, name: str) -> str:
        """Local folder of a finished model: its storage folder when local, else a cached download.

        Only files the model's manifest lists are fetched, and only those missing or of another size.
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
            wanted.append((file_key[len(key) + 1 :], listed["bytes"]))
        self._note_input(key, entry)
        local = self.storage.local_path(key)
        if local is not None:
            return str(local)
        target = self.cache_dir / key
        missing = [
            rel
            for rel, size in wanted
            if not (target / rel).is_file() or (target / rel).stat().st_size != size
        ]
        if missing:
            logger.info("downloading %d file(s) of %s to %s", len(missing), self.storage.display(key), target)
            self.storage.download(key, missing, target)
        return str(target)
