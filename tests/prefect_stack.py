"""A real local Prefect stack for integration tests: server on loopback, process worker, deployments.

`PrefectStack.start(folder, prefect_file, env_overrides)` starts `prefect server start` (own process group, free
port, its own PREFECT_HOME), waits until it is healthy, deploys with deployments/deploy.sh (which
creates the `wrpo-process` pool), and starts a process worker. `stop()` ends the worker with
SIGINT (it ignores SIGTERM) and the server with SIGTERM, each group SIGKILLed after a timeout.
Tests talk to it through `env` (PREFECT_API_URL etc.) and `prefect(...)` (the CLI).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from s3server import free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _stop_group(process: subprocess.Popen, sig: int, timeout: float) -> None:
    if process.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class PrefectStack:
    folder: Path
    port: int
    env: dict[str, str]
    server: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls, folder: Path, prefect_file: Path, env_overrides: Mapping[str, str | None] | None = None
    ) -> PrefectStack:
        """Server, deployments from `prefect_file`, and a worker; raises with the logs if any fails.

        `env_overrides` set (or, with None, remove) variables of every process the stack starts,
        flow runs included (e.g. HF_ENDPOINT for a local hub).
        """
        (port,) = free_ports(1)
        env = {
            **os.environ,
            "PREFECT_HOME": str(folder / "home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "WRPO_PROJECT_DIR": str(REPO),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        }
        for name, value in (env_overrides or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        stack = cls(folder=folder, port=port, env=env)
        try:
            stack.server = stack._spawn("server", [str(BIN / "prefect"), "server", "start"])
            stack.prefect("server", "status", "--wait", "--timeout", "180", timeout=200)
            deploy = subprocess.run(
                [str(REPO / "deployments" / "deploy.sh")], capture_output=True, text=True, timeout=300,
                env={**env, "PREFECT": str(BIN / "prefect"), "WRPO_PREFECT_FILE": str(prefect_file)},
            )  # fmt: skip
            if deploy.returncode != 0:
                raise RuntimeError(f"deploy failed:\n{deploy.stdout}\n{deploy.stderr}")
            stack.worker = stack._spawn(
                "worker", [str(BIN / "prefect"), "worker", "start", "--pool", "wrpo-process"]
            )
        except BaseException:
            stack.stop()
            raise
        return stack

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self.folder / f"{name}.log"
        self.logs.append(log)
        with log.open("w") as handle:
            return subprocess.Popen(command, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.folder)  # fmt: skip

    def prefect(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        """Runs the `prefect` CLI against this server; with `check`, a non-zero exit raises with its output."""
        done = subprocess.run([str(BIN / "prefect"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.folder)  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(
                f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in self.logs
            if log.exists()
        )

    def wait_for(self, predicate, timeout: float, what: str, every: float = 2.0):
        """Polls `predicate()` until it returns something truthy; fails with the stack's logs on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.log_tail()}")

    def stop(self) -> None:
        if self.worker is not None:
            _stop_group(self.worker, signal.SIGINT, 30)
        if self.server is not None:
            _stop_group(self.server, signal.SIGTERM, 30)
