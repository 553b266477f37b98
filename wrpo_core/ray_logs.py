"""The last lines a dead Ray worker wrote (stderr and stdout, C-level crash output included), for errors.

Ray keeps each worker process's output in `worker-*-<pid>.err/.out` in its node's session logs. A
worker that died on this machine's node is read from there; one on another node through Ray's
state API (the cluster's dashboard). Used for sampling/scoring actors (`fanout.run_shards`) and
Ray Train workers (`train.ray_train`), so a failure shows the failing node's last lines.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_ACTOR_IN_TEXT = re.compile(r"Actor\(\w+, ([0-9a-f]{32})\)")


def actor_ids_in(text: str) -> list[str]:
    """Actor ids named in a Ray error's text (`Actor(RayTrainWorker, 8dce...)`), in order, once each."""
    return list(dict.fromkeys(_ACTOR_IN_TEXT.findall(text)))


def actor_output_tail(actor_id: str | None, lines: int = 20) -> str:
    """The last `lines` of a dead actor's stderr and stdout (C-level crash output included), for an error.

    Ray keeps a worker's output in `worker-*-<pid>.err/.out` in the logs folder of its node's session.
    An actor on this machine's node is read from there; on another node through Ray's state API
    (the cluster's dashboard). Says why when neither can be read.
    """
    import ray

    if actor_id is None:
        return "(no actor id: its output cannot be found)"
    try:
        info = ray._private.state.actors(actor_id)
        pid, node_id = info.get("Pid"), info["Address"]["NodeID"]
        if node_id == ray.get_runtime_context().get_node_id():
            folder = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
            found = [
                f"{path.name} (last {lines} lines):\n" + "\n".join(_tail(path, lines))
                for suffix in ("err", "out")
                for path in sorted(folder.glob(f"worker-*-{pid}.{suffix}"))
            ]
            return "\n".join(found) if found else f"(no output files of pid {pid} in {folder})"
        from ray.util.state import get_log

        webui = ray._private.worker.global_worker.node.address_info.get("webui_url")
        if not webui:
            return f"(the actor ran on node {node_id}, and this cluster has no dashboard to read its logs)"
        text = "".join(
            get_log(address=f"http://{webui}", actor_id=actor_id, suffix="err", tail=lines, timeout=10)
        )
        return f"stderr of pid {pid} on node {node_id} (last {lines} lines):\n{text.rstrip()}"
    except Exception as error:
        return f"(its output could not be read: {type(error).__name__}: {error})"


def _tail(path: Path, lines: int) -> list[str]:
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 64 * 1024))
        return handle.read().decode("utf-8", errors="replace").splitlines()[-lines:]


@contextmanager
def worker_output_to(on_line: Callable[[str], None]) -> Iterator[None]:
    """Sends every line Ray's workers print (stdout and stderr, prefixed as `ray job logs` shows them)
    to `on_line` while the block runs: the flow puts them in its Prefect run log.

    Ray delivers them to a driver connected with `log_to_driver` (fanout.init_ray's); a connection made
    inside the block counts too. A failing `on_line` never stops Ray's log thread.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # no Ray installed: there are no Ray workers whose output to forward
        yield
        return
    name = f"wrpo-worker-output-{id(on_line)}-{threading.get_ident()}"

    def forward(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')})"
        for line in data.get("lines", ()):
            try:
                on_line(f"{prefix} {line}")
            except Exception:  # a logging failure must not kill Ray's log thread
                return

    dispatcher.add_handler(name, forward)
    try:
        yield
    finally:
        dispatcher.remove_handler(name)
