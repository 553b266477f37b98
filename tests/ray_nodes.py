"""A Ray cluster on this machine whose worker nodes share no disk with the driver (issue 14).

The head node (0 CPUs, so no actor or training worker lands there) runs beside the driver. Each
worker node runs in its own mount namespace (`unshare -m`, root only) where every folder in
`hidden` is replaced by an empty tmpfs: the node sees the same paths as the driver, empty, like
a machine of a real cluster where the Prefect worker's cache folder does not exist. Everything
else (the repository and its venv, the toy world standing in for the model hub, the S3 server on
loopback) the nodes reach as a cluster node would reach its image and the network.

    cluster = RayNodes.start(hidden=[tmp_path], env=credentials, worker_env={"WRPO_CACHE": str(tmp_path / "node")},
                             logs=...)
    ... compute.ray_address = cluster.address ...
    cluster.stop()
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from s3server import free_ports

RAY = str(Path(sys.executable).parent / "ray")


def can_hide_folders() -> str | None:
    """None when this process can make mount namespaces with private tmpfs mounts; else why not."""
    if os.geteuid() != 0:
        return "needs root for `unshare -m` and tmpfs mounts"
    if shutil.which("unshare") is None:
        return "no `unshare` (util-linux)"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt && umount /mnt"],
        capture_output=True, text=True,
    )  # fmt: skip
    return None if probe.returncode == 0 else f"`unshare -m` + tmpfs failed: {probe.stderr.strip()}"


@dataclass
class RayNodes:
    """A head node and worker nodes started with `ray start --block`, each in its own process group.

    `env` reaches every node (credentials: a real node has its own), `worker_env` the workers only.
    """

    address: str
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        *,
        hidden: list[Path],
        env: dict[str, str],
        worker_env: dict[str, str],
        logs: Path,
        workers: int = 2,
        cpus_per_worker: int = 2,
        timeout: float = 90.0,
    ) -> RayNodes:
        port, dashboard_agent = free_ports(2)
        # A busy machine registers nodes slowly (Ray's default wait is 30 s): allow more, start one at a time.
        env = {**os.environ, **env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_raylet_start_wait_time_s": "120"}  # fmt: skip
        logs.mkdir(parents=True, exist_ok=True)
        nodes = cls(address=f"127.0.0.1:{port}", logs=logs)
        head = [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={dashboard_agent}"]  # fmt: skip
        nodes._spawn("head", head, env)
        nodes._wait_for_nodes(1, timeout)
        for index in range(workers):
            mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(folder))}" for folder in hidden)
            # Nodes on one machine need ports of their own (the agents' defaults are fixed numbers).
            agent, grpc, runtime_env, metrics, manager, objects = free_ports(6)
            start = shlex.join([RAY, "start", "--block", f"--address={nodes.address}", f"--num-cpus={cpus_per_worker}",
                                "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
                                f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={runtime_env}",
                                f"--metrics-export-port={metrics}", f"--node-manager-port={manager}",
                                f"--object-manager-port={objects}"])  # fmt: skip
            cache = worker_env.get("WRPO_CACHE")  # inside a hidden folder: the node's own, created empty
            steps = [mounts, *([f"mkdir -p {shlex.quote(cache)}"] if cache else []), f"exec {start}"]
            script = " && ".join(step for step in steps if step)
            worker = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
            nodes._spawn(f"worker-{index}", worker, {**env, **worker_env})
            nodes._wait_for_nodes(2 + index, timeout)
        return nodes

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        out = (self.logs / f"{name}.log").open("w")
        self.processes.append(
            subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def _wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                self.stop()
                raise RuntimeError(f"a Ray node exited while starting; see {self.logs}/*.log")
            status = subprocess.run(
                [RAY, "status", f"--address={self.address}"], capture_output=True, text=True
            )
            if status.returncode == 0 and status.stdout.count("node_") >= count:
                return
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"{count} Ray node(s) not up after {timeout:.0f} s; see {self.logs}/*.log")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to every node's group (`ray start --block` then stops its node), SIGKILL after `grace`."""
        for process in reversed(self.processes):
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
        # `ray start --head` names itself the machine's current cluster; a plain ray.init() later would
        # try to join it. Only our own entry is removed.
        current = Path("/tmp/ray/ray_current_cluster")
        with suppress(OSError):
            if current.read_text().strip().rsplit(":", 1)[-1] == self.address.rsplit(":", 1)[-1]:
                current.unlink()
