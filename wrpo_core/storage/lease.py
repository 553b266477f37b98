"""Exclusive leases and compare-and-swap writes on storage: one writer of a run folder at a time.

    with Lease(storage, "lease.json", purpose="wrpo run") as lease:   # refused while another holds it
        ...                                                             # a thread renews the heartbeat
        lease.check()                                                   # raises if it was taken over

    data, tag = read_tagged(storage, "registry/sources.json")
    write_if(storage, "registry/sources.json", new_bytes, tag)        # ConditionFailed if it changed

How the write is made conditional:

- Local folders: under an exclusive `flock` on a hidden sidecar file (`.<name>.lock`, kept), the
  current content is compared with the tag read earlier (its sha256), then replaced atomically.
  Exact for every process of one machine (and NFS with working POSIX locks).
- S3 servers with conditional writes (AWS S3, SeaweedFS 4.x, MinIO): `PutObject` with
  `If-None-Match: *` (create) or `If-Match: <ETag>` (replace), `DeleteObject` with `If-Match`. Exact.
- Other object stores, and S3 servers that ignore those headers (found by a probe, once per
  endpoint): compare the tag, write, wait `SETTLE_S`, read back. Two writers can then both win
  only if one stalls between its read and its write for longer than the other's write + settle +
  read-back (seconds); the lease file then names the last writer and the other finds out at its
  next heartbeat (`Lease.check` raises).

A lease names its holder (host, pid, user, start time, a unique token) and a heartbeat, renewed
every `heartbeat_s`; it is stale when its heartbeat is older than `ttl_s`, or at once when its
holder is a process of this machine that no longer exists. A stale lease is taken over with a
warning; `break_lease=True` takes over any lease (the holder's next heartbeat fails).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from wrpo_core.storage.errors import StorageError
from wrpo_core.storage.filesystem import Storage
from wrpo_core.storage.options import S3_PROTOCOLS

logger = logging.getLogger(__name__)

LEASE_KEY = "lease.json"
SETTLE_S = 2.0
"""Wait between a write and its read-back on storage without conditional writes."""
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class ConditionFailed(StorageError):
    """A conditional write or delete refused: the object changed since it was read."""

    permanent = False


class LeaseError(StorageError):
    """A lease that cannot be taken (another run holds it) or that was lost; the message says how to go on."""

    permanent = True


# --- compare-and-swap -----------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _local_lock(storage: Storage, key: str) -> Iterator[None]:
    """An exclusive flock on the sidecar `.<name>.lock` next to `key` (released when the process dies)."""
    path = storage.path(key)
    folder, name = os.path.split(path)
    with storage.guard("cannot lock", key):
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, f".{name}.lock"), "a+b")  # noqa: SIM115 (closed below)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # closing drops the lock


def _s3_call(storage: Storage, method: str, key: str, **kwargs: Any) -> dict[str, Any]:
    bucket, _, path = storage.path(key).partition("/")
    return storage.fs.call_s3(method, Bucket=bucket, Key=path, **kwargs)


def _is_precondition(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):
        return True
    for candidate in (exc, exc.__cause__):
        response = getattr(candidate, "response", None)
        if (
            isinstance(response, Mapping)
            and str(response.get("Error", {}).get("Code", "")) in _PRECONDITION_CODES
        ):
            return True
    return False


_CONDITIONAL_SUPPORT: dict[tuple[str, str, str], bool] = {}
_SUPPORT_LOCK = threading.Lock()


def conditional_writes(storage: Storage) -> bool:
    """Whether the storage refuses a conditional write whose condition fails (probed once per endpoint).

    True for local folders (a lock file) and S3 servers that honour `If-None-Match`; False for other
    object stores and S3 servers that ignore the header (then the read-back scheme is used).
    """
    if storage.is_local:
        return True
    if storage.protocol not in S3_PROTOCOLS:
        return False
    ident = (storage.protocol, storage.endpoint, storage.root.split("/", 1)[0])
    with _SUPPORT_LOCK:
        if ident not in _CONDITIONAL_SUPPORT:
            probe = f".wrpo-conditional-probe-{uuid.uuid4().hex}"
            with storage.guard("cannot probe conditional writes at", probe):
                _s3_call(storage, "put_object", probe, Body=b"1", IfNoneMatch="*")
                try:
                    _s3_call(storage, "put_object", probe, Body=b"2", IfNoneMatch="*")
                    supported = False
                except Exception as exc:
                    if not _is_precondition(exc):
                        raise
                    supported = True
            storage.delete([probe])
            if not supported:
                logger.warning("%s ignores conditional writes (If-None-Match); leases use write + read-back",
                               storage.endpoint)  # fmt: skip
            _CONDITIONAL_SUPPORT[ident] = supported
        return _CONDITIONAL_SUPPORT[ident]


def read_tagged(storage: Storage, key: str) -> tuple[bytes | None, str | None]:
    """The object's bytes and a tag that changes whenever it does (None, None when it does not exist)."""
    if storage.is_local or not conditional_writes(storage):
        data = storage.read_bytes_if_exists(key)
        return data, None if data is None else _sha(data)
    with storage.guard("cannot read", key):  # the ETag first: content newer than it only fails the swap
        try:
            etag = storage.fs.info(storage.path(key))["ETag"]
        except FileNotFoundError:
            return None, None
    data = storage.read_bytes_if_exists(key)
    return data, None if data is None else etag


def write_if(storage: Storage, key: str, data: bytes, expected: str | None) -> str:
    """Writes `data` to `key` only if it still has tag `expected` (None: only if it does not exist).

    Returns the new tag; raises ConditionFailed when the object changed since it was read.
    """
    changed = ConditionFailed(f"{storage.display(key)} changed since it was read (another process wrote it)")
    if storage.is_local:
        with _local_lock(storage, key):
            current = storage.read_bytes_if_exists(key)
            if (None if current is None else _sha(current)) != expected:
                raise changed
            storage.write_bytes(key, data)
        return _sha(data)
    if conditional_writes(storage):
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        with storage.guard("cannot write", key):
            try:
                return _s3_call(storage, "put_object", key, Body=data, **condition)["ETag"]
            except Exception as exc:
                if _is_precondition(exc):
                    raise changed from None
                raise
    _, tag = read_tagged(storage, key)
    if tag != expected:
        raise changed
    storage.write_bytes(key, data)
    time.sleep(SETTLE_S)
    if storage.read_bytes_if_exists(key) != data:
        raise changed
    return _sha(data)


def delete_if(storage: Storage, key: str, expected: str) -> None:
    """Deletes `key` only if it still has tag `expected`; ConditionFailed otherwise."""
    changed = ConditionFailed(f"{storage.display(key)} changed since it was read (another process wrote it)")
    if storage.is_local:
        with _local_lock(storage, key):
            current = storage.read_bytes_if_exists(key)
            if current is None or _sha(current) != expected:
                raise changed
            storage.delete([key])
        return
    if conditional_writes(storage):
        with storage.guard("cannot delete", key):
            try:
                _s3_call(storage, "delete_object", key, IfMatch=expected)
            except Exception as exc:
                if _is_precondition(exc):
                    raise changed from None
                raise
        return
    if read_tagged(storage, key)[1] != expected:
        raise changed
    storage.delete([key])


# --- leases ---------------------------------------------------------------------------------------


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease: written as the lease file's JSON."""

    host: str
    pid: int
    user: str
    started_at: float
    heartbeat_at: float
    ttl_s: float
    token: str
    purpose: str = ""
    pid_start: str | None = None

    def describe(self) -> str:
        age = max(0.0, time.time() - self.heartbeat_at)
        return (
            f"{self.purpose or 'a run'} on host {self.host}, pid {self.pid}, user {self.user}, "
            f"since {_iso(self.started_at)} (last heartbeat {age:.0f} s ago)"
        )

    def stale_reason(self, now: float) -> str | None:
        """Why this lease no longer protects anything (None while its holder is alive)."""
        if self.host == socket.gethostname() and self.pid == os.getpid() and self.token not in _HELD_TOKENS:
            return "this process holds it no more (a release failed, e.g. while its storage was down)"
        if now - self.heartbeat_at > self.ttl_s:
            return f"its last heartbeat is {now - self.heartbeat_at:.0f} s old (expiry {self.ttl_s:.0f} s)"
        if self.host == socket.gethostname():
            alive = _process_start(self.pid) if os.path.exists("/proc") else None
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return f"its process {self.pid} no longer exists on this host"
            except PermissionError:
                pass  # another user's live process
            if self.pid_start is not None and alive is not None and alive != self.pid_start:
                return f"its process {self.pid} no longer exists on this host (the pid was reused)"
        return None


_HELD_TOKENS: set[str] = set()
"""Tokens of the leases this process holds now (a lease file of this process with another token is left over)."""


class Lease:
    """An exclusive lease on a storage folder, kept alive by a heartbeat thread while held.

    `acquire` refuses (LeaseError naming the holder) while another live holder has it, takes over
    a stale one with a warning, and any one with `break_lease`. Use as a context manager.
    """

    def __init__(
        self,
        storage: Storage,
        key: str = LEASE_KEY,
        *,
        purpose: str = "",
        ttl_s: float = 300.0,
        heartbeat_s: float = 30.0,
        break_lease: bool = False,
    ):
        if not 0 < heartbeat_s < ttl_s:
            raise ValueError(f"heartbeat_s must be > 0 and below ttl_s, got {heartbeat_s} and {ttl_s}")
        self.storage, self.key, self.purpose = storage, key, purpose
        self.ttl_s, self.heartbeat_s, self.break_lease = ttl_s, heartbeat_s, break_lease
        self.holder: LeaseHolder | None = None
        self.lost: str | None = None
        self._tag: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _how_to_break(self) -> str:
        return (
            f"if that run is gone, rerun with --break-lease (`wrpo run --break-lease`) or delete "
            f"{self.storage.display(self.key)}; a lease whose heartbeat is older than its expiry is "
            "taken over by the next run"
        )

    def _encode(self, holder: LeaseHolder) -> bytes:
        return json.dumps(asdict(holder), indent=2, sort_keys=True).encode()

    def acquire(self) -> Lease:
        """Takes the lease or raises LeaseError naming its live holder; starts the heartbeat."""
        now = time.time()
        holder = LeaseHolder(
            host=socket.gethostname(), pid=os.getpid(), user=getpass.getuser(), started_at=now,
            heartbeat_at=now, ttl_s=self.ttl_s, token=uuid.uuid4().hex, purpose=self.purpose,
            pid_start=_process_start(os.getpid()),
        )  # fmt: skip
        for _ in range(5):  # a lost race re-reads the winner, to name it
            data, tag = read_tagged(self.storage, self.key)
            if data is not None:
                try:
                    current = LeaseHolder(**json.loads(data))
                    reason = current.stale_reason(now)
                    who = current.describe()
                except (ValueError, TypeError) as error:
                    current, reason, who = None, f"it is not a readable lease ({error})", "unknown"
                if self.break_lease:
                    logger.warning("breaking the lease %s held by %s (--break-lease)",
                                   self.storage.display(self.key), who)  # fmt: skip
                elif reason is not None:
                    logger.warning("taking over the stale lease %s of %s: %s",
                                   self.storage.display(self.key), who, reason)  # fmt: skip
                else:
                    raise LeaseError(
                        f"{self.storage.display()} is in use: {self.storage.display(self.key)} is held by "
                        f"{who}; {self._how_to_break()}"
                    )
            try:
                self._tag = write_if(self.storage, self.key, self._encode(holder), tag)
            except ConditionFailed:
                now = time.time()
                continue
            self.holder, self.lost = holder, None
            _HELD_TOKENS.add(holder.token)
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name=f"lease-{self.key}", daemon=True)
            self._thread.start()
            return self
        raise LeaseError(
            f"{self.storage.display(self.key)}: other processes kept taking the lease; try again"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except ConditionFailed:
                return  # `lost` says why
            except StorageError as error:  # transient: the next beat tries again before the expiry
                logger.warning("lease %s: heartbeat failed: %s", self.storage.display(self.key), error)

    def renew(self) -> None:
        """Writes a fresh heartbeat; ConditionFailed (and `lost` set) when another process took the lease."""
        with self._lock:
            if self.holder is None or self.lost is not None:
                return
            holder = LeaseHolder(**{**asdict(self.holder), "heartbeat_at": time.time()})
            try:
                self._tag = write_if(self.storage, self.key, self._encode(holder), self._tag)
            except ConditionFailed:
                self.lost = "another process took the lease over (it judged this one stale, or broke it)"
                logger.error("lease %s lost: %s", self.storage.display(self.key), self.lost)
                raise
            self.holder = holder

    def check(self) -> None:
        """Raises LeaseError when the lease was lost (taken over by another process) since acquired."""
        if self.lost is not None:
            raise LeaseError(
                f"{self.storage.display(self.key)}: {self.lost}; stopping so as not to corrupt its run"
            )

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease file if it is still this holder's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.holder is None:
                return
            try:
                if self.lost is None and self._tag is not None:
                    try:
                        delete_if(self.storage, self.key, self._tag)
                    except ConditionFailed:
                        logger.warning("lease %s was taken over by another process before release",
                                       self.storage.display(self.key))  # fmt: skip
            finally:  # not held any more, even when the delete failed (the file is then left over)
                _HELD_TOKENS.discard(self.holder.token)
                self.holder = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        if exc_type is None:
            self.release()
            return
        # The block failed: its error is the one to report. A release that fails too (the storage
        # that broke the block is still down) leaves a lease that a rerun takes over as stale.
        try:
            self.release()
        except StorageError as error:
            logger.warning("could not release the lease %s: %s", self.storage.display(self.key), error)
