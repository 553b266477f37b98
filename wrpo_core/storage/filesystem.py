"""A root folder on any fsspec filesystem, addressed by relative keys: the one way artifacts are read and written.

    storage = Storage.open("s3://bucket/runs", {"endpoint_url": "http://127.0.0.1:8333"})
    storage.check()                     # one cheap probe: credentials, bucket, endpoint
    storage.write_json("x.json", {...}) # atomic: readers see the old object or the whole new one

Every failing request becomes one `StorageError` naming the URL and what to fix, never a secret.
Another process (a Ray actor) opens the same storage from `storage.access()`: the URL and the
options as configured, so no resolved credential travels with the work.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import fsspec.asyn
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from wrpo_core.schemas import DataError, atomic_write, conform
from wrpo_core.storage.errors import StorageError
from wrpo_core.storage.keys import safe_key
from wrpo_core.storage.options import S3_PROTOCOLS, BlockLoader, resolve_storage_options
from wrpo_core.storage.secrets import redact, secret_values

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
_BUSY_CODES = {
    "InternalError",
    "SlowDown",
    "ServiceUnavailable",
    "RequestTimeout",
    "500",
    "502",
    "503",
    "504",
}
"""S3 answers that a retry can fix (the server is busy or restarting)."""
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _is_storage_failure(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(names & (_UNREACHABLE | {"BotoCoreError", "ClientError"}))


def storage_error(message: str, *, permanent: bool) -> StorageError:
    """A StorageError with `permanent` set: True when no retry can help (the runner reads it)."""
    error = StorageError(message)
    error.permanent = permanent  # type: ignore[attr-defined]
    return error


def _s3_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError, or of the one s3fs translated into `exc`."""
    for candidate in (exc, exc.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, Mapping):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


def _user() -> str:
    """The user this process runs as, for messages: 'name (uid N)'."""
    uid = os.geteuid()
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _free_bytes(path: str) -> str:
    """Free and total bytes of the device holding `path` (its nearest existing folder), for messages."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{usage.free} bytes free of {usage.total}"


# --- storage ------------------------------------------------------------------------------------


def cache_root() -> Path:
    """This machine's working folder for wrpo-fusion: $WRPO_CACHE, default ~/.cache/wrpo-fusion."""
    return Path(os.environ.get("WRPO_CACHE", Path.home() / ".cache" / "wrpo-fusion"))


class StorageAccess(NamedTuple):
    """How another process opens the same storage: the URL and the options as configured.

    The options are the config's (a block name, an endpoint), not the resolved ones, so no
    credential travels with the work; the other process resolves them in its own environment.
    `load_block` must be a module-level function (it is pickled by reference for Ray actors).
    A plain `(url, options)` tuple works wherever a StorageAccess is taken.
    """

    url: str
    options: Mapping[str, Any] = {}
    load_block: BlockLoader | None = None

    def open(self) -> Storage:
        return Storage.open(self.url, self.options, load_block=self.load_block)


@dataclass(repr=False)
class Storage:
    """A root folder on any fsspec filesystem, addressed by relative keys; errors are StorageError."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    options: dict[str, Any] = field(default_factory=dict)
    """The resolved fsspec options (may hold secrets)."""
    configured_options: dict[str, Any] = field(default_factory=dict)
    """The options as given to `open` (what `access()` hands to other processes)."""
    load_block: BlockLoader | None = None

    def __repr__(self) -> str:
        return f"Storage({self.display()!r})"

    @classmethod
    def open(
        cls,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        load_block: BlockLoader | None = None,
    ) -> Storage:
        """Storage rooted at `url` (a local path or any fsspec URL); nothing is contacted yet.

        `load_block` reads the options of a Prefect block named by the option `prefect_block`
        (see `resolve_storage_options`).
        """
        url = url.rstrip("/") or url
        options = resolve_storage_options(url, storage_options, load_block=load_block)
        try:
            # A private instance: credentials may come from the environment, which fsspec's cache ignores.
            fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
        except (ImportError, ValueError, TypeError) as exc:
            raise storage_error(
                f"storage {redact(url, secret_values(options))}: cannot open it: {redact(str(exc))}",
                permanent=True,
            ) from None
        return cls(
            url=url, fs=fs, root=root.rstrip("/") or root, options=options,
            configured_options=dict(storage_options or {}), load_block=load_block,
        )  # fmt: skip

    def access(self) -> StorageAccess:
        """What another process needs to open this storage itself (see `StorageAccess`)."""
        return StorageAccess(self.url, dict(self.configured_options), self.load_block)

    def open_other(self, url: str) -> Storage:
        """Storage at another URL opened the same way as this one (same configured options and loader)."""
        return Storage.open(url, self.configured_options, load_block=self.load_block)

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
        return Storage(
            url=f"{self.url}/{key}", fs=self.fs, root=self.path(key), options=self.options,
            configured_options=self.configured_options, load_block=self.load_block,
        )  # fmt: skip

    def local_path(self, key: str = "") -> Path | None:
        """The local path of `key` when the storage is a local folder, else None."""
        return Path(self.path(key)) if self.is_local else None

    # errors

    def explain(self, exc: BaseException, key: str = "", action: str = "") -> str:
        """One line saying what went wrong with a request on `key` (during `action`), without secrets."""
        return self._diagnose(exc, key, action)[0]

    def _diagnose(self, exc: BaseException, key: str = "", action: str = "") -> tuple[str, bool]:
        names = {cls.__name__ for cls in type(exc).__mro__}
        detail = self.redact(f"{type(exc).__name__}: {exc}")[:300]
        code = _s3_code(exc)
        number = exc.errno if isinstance(exc, OSError) else None
        where = self.redact(str(getattr(exc, "filename", None) or self.path(key)))
        if names & {"NoCredentialsError", "PartialCredentialsError"}:
            return (
                "no credentials found: set key/secret in storage_options, AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or a Prefect block (storage option prefect_block)"
            ), True
        if self.is_local and number in _NO_SPACE:
            return f"no space left on the device holding {where} ({_free_bytes(where)}) [{detail}]", True
        if self.is_local and number == errno.EROFS:
            return f"{where} is on a read-only file system: choose a writable storage.url [{detail}]", True
        if self.is_local and number in (errno.EACCES, errno.EPERM):
            kind = "readable" if action.startswith(("cannot read", "cannot download")) else "writable"
            return (
                f"permission denied: {where} is not {kind} by user {_user()}; fix the folder's "
                f"permissions or choose another storage.url [{detail}]"
            ), True
        if self.is_local and number in (errno.ENOTDIR, errno.EEXIST):
            blocker = self._file_in_the_way(key)
            if blocker is not None:
                return (
                    f"{blocker} is a file, not a folder: storage.url and its run folders must be folders",
                    True,
                )
        if isinstance(exc, PermissionError) or code in _DENIED_CODES:
            return (
                f"access denied by {self.endpoint}: the credentials are wrong or lack permission "
                f"(check the access key and secret) [{detail}]"
            ), True
        if "bucket does not exist" in str(exc).lower() or code == "NoSuchBucket":
            bucket = self.root.split("/", 1)[0]
            return f"bucket {bucket!r} does not exist at {self.endpoint} (create it or fix the URL)", True
        if names & _UNREACHABLE or isinstance(exc, ConnectionError | TimeoutError):
            return (
                f"cannot reach the endpoint {self.endpoint} (connection refused or timed out): check "
                f"endpoint_url / AWS_ENDPOINT_URL and that the server is up [{detail}]"
            ), False
        if not self.is_local and (code in _BUSY_CODES or number == getattr(errno, "EREMOTEIO", -1)):
            return f"the server at {self.endpoint} failed the request (busy or restarting) [{detail}]", False
        return detail, not (names & {"BotoCoreError", "ClientError"}) and not isinstance(exc, OSError)

    def _file_in_the_way(self, key: str = "") -> str | None:
        """The local path of a file standing where a folder of `key` (or the root) must be, if any."""
        path = Path(self.path(key))
        for folder in (path, *path.parents):
            if folder.exists():
                return None if folder.is_dir() or folder == path else str(folder)
        return None

    @contextmanager
    def guard(self, action: str, key: str = "") -> Iterator[None]:
        """Turns a failing storage request into one StorageError naming the URL, without secrets.

        The error's `permanent` says whether a retry can help (only an unreachable endpoint or a
        busy server can recover by itself).
        """
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            if not _is_storage_failure(exc):
                raise
            message, permanent = self._diagnose(exc, key, action)
            raise storage_error(f"{action} {self.display(key)}: {message}", permanent=permanent) from None

    def check(self) -> None:
        """Probes the storage once, cheaply (a few seconds at most), before a run writes anything.

        Raises one StorageError naming the URL for wrong credentials, a missing bucket, an
        unreachable endpoint or a local folder that cannot be written.
        """
        if self.is_local:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise storage_error(
                    f"storage {self.display()}: it is a file, not a folder; storage.url must name a folder",
                    permanent=True,
                )
            with self.guard("storage"):
                self.fs.makedirs(self.root, exist_ok=True)
            probe = f".wrpo-write-probe-{uuid.uuid4().hex}"
            with self.guard("cannot write to the storage folder", probe):  # root ignores mode bits: try it
                with open(self.path(probe), "wb") as handle:
                    handle.write(b"ok")
                os.remove(self.path(probe))
            return
        bucket = self.root.split("/", 1)[0]
        if self.protocol not in S3_PROTOCOLS:
            with self.guard("storage"):
                if not self.fs.exists(bucket):
                    raise storage_error(
                        f"storage {self.display()}: {bucket!r} does not exist", permanent=True
                    )
            return
        # One HEAD on the bucket from a client with fewer retries (2 attempts, 3 s to connect), so a
        # dead endpoint fails in a second or two; everything capped at 10 s.
        config = {**self.options.get("config_kwargs", {}), "connect_timeout": 3, "read_timeout": 10}
        config["retries"] = {"max_attempts": 2, "mode": "standard"}
        probe = type(self.fs)(**{**self.options, "config_kwargs": config}, skip_instance_cache=True)
        try:
            fsspec.asyn.sync(probe.loop, probe._call_s3, "head_bucket", Bucket=bucket, timeout=10)
        except FileNotFoundError:
            raise storage_error(
                f"storage {self.display()}: bucket {bucket!r} does not exist at {self.endpoint} "
                "(create it or fix the URL)",
                permanent=True,
            ) from None
        except Exception as exc:
            if not _is_storage_failure(exc):
                raise
            message, permanent = self._diagnose(exc)
            raise storage_error(f"storage {self.display()}: {message}", permanent=permanent) from None

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
        """Downloads `prefix/<file>` (`<file>` for an empty prefix) for each of `files` into the local `folder`."""
        if not files:
            return
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
        keys = [f"{prefix}/{f}" if prefix else f for f in files]
        with self.guard("cannot download", prefix or self.display()):
            self.fs.get([self.path(key) for key in keys], [str(folder / f) for f in files])
