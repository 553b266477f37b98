"""Concurrency: one run per run folder (a lease on local disks and S3), registry changes that never
lose each other, and a local Ray that never outlives its driver."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wrpo_core.pipeline import run_pipeline
from wrpo_core.storage import (
    ConditionFailed,
    Lease,
    LeaseError,
    Storage,
    read_tagged,
    write_if,
)
from wrpo_core.storage.lease import conditional_writes

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}

HOLDER = textwrap.dedent(
    """
    import json, sys
    from wrpo_core.storage import Lease, Storage
    storage = Storage.open(sys.argv[1], json.loads(sys.argv[2]))
    with Lease(storage, purpose="run A", ttl_s=60, heartbeat_s=1):
        print("HELD", flush=True)
        sys.stdin.read()   # holds the lease until the test closes stdin
    print("RELEASED", flush=True)
    """
)


def start_holder(url: str, options: dict | None = None) -> subprocess.Popen:
    """A separate process that takes the lease of `url` and holds it until its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, json.dumps(options or {})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout.readline().strip() == "HELD"
    return process


def stop_holder(process: subprocess.Popen) -> None:
    process.stdin.close()
    assert process.stdout.readline().strip() == "RELEASED"
    assert process.wait(timeout=30) == 0


# --- the run lease --------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(fusion_config, tmp_path):
    run = tmp_path / "runs" / fusion_config.run_name
    holder = start_holder(str(run))
    try:
        with pytest.raises(LeaseError) as refused:
            run_pipeline(fusion_config, str(run))
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {holder.pid}" in message
        assert "since 20" in message and "--break-lease" in message and str(run / "lease.json") in message
        assert refused.value.permanent is True
        assert not (run / "manifests").exists()  # nothing of the run was written
    finally:
        stop_holder(holder)
    assert not (run / "lease.json").exists()  # released at its end
    with Lease(Storage.open(str(run)), purpose="run B") as lease:  # after the first ends, the next one runs
        assert json.loads((run / "lease.json").read_text())["token"] == lease.holder.token


def stale_lease(storage: Storage, **changes) -> None:
    holder = {"host": "elsewhere", "pid": 1, "user": "x", "started_at": time.time() - 900,
              "heartbeat_at": time.time() - 900, "ttl_s": 300, "token": "old", "purpose": "run A"}  # fmt: skip
    storage.write_json("lease.json", {**holder, **changes})


def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, caplog):
    storage = Storage.open(str(tmp_path / "run"))
    stale_lease(storage)
    with caplog.at_level(logging.WARNING), Lease(storage, purpose="run B") as lease:
        assert storage.read_json("lease.json")["token"] == lease.holder.token
    assert "taking over the stale lease" in caplog.text and "heartbeat is 900 s old" in caplog.text


def test_a_lease_of_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage = Storage.open(str(tmp_path / "run"))
    stale_lease(storage, host=socket.gethostname(), pid=dead.pid, heartbeat_at=time.time())
    with Lease(storage) as lease:
        assert lease.holder.pid == os.getpid()


def test_a_live_lease_is_refused_until_broken_and_its_holder_finds_out(tmp_path):
    storage = Storage.open(str(tmp_path / "run"))
    first = Lease(storage, purpose="run A", ttl_s=30, heartbeat_s=0.2).acquire()
    with pytest.raises(LeaseError, match="held by run A"):
        Lease(storage).acquire()
    with Lease(storage, break_lease=True):
        time.sleep(1)  # the first holder's next heartbeat fails
        with pytest.raises(LeaseError, match="took the lease over"):
            first.check()
    first.release()


def test_write_if_refuses_a_changed_object(tmp_path):
    storage = Storage.open(str(tmp_path))
    tag = write_if(storage, "doc.json", b"1", None)
    with pytest.raises(ConditionFailed):
        write_if(storage, "doc.json", b"x", None)  # it exists now
    write_if(storage, "doc.json", b"2", tag)
    with pytest.raises(ConditionFailed):
        write_if(storage, "doc.json", b"3", tag)  # the tag is the old one
    assert read_tagged(storage, "doc.json")[0] == b"2"


@pytest.mark.integration
def test_the_lease_on_s3(s3_server, s3_prefix, caplog):
    url, options = f"{s3_prefix}/run", s3_server.storage_options()
    storage = Storage.open(url, options)
    assert conditional_writes(storage)  # SeaweedFS honours If-None-Match / If-Match
    holder = start_holder(url, options)
    try:
        with pytest.raises(LeaseError, match=f"pid {holder.pid}"):
            Lease(storage).acquire()
    finally:
        stop_holder(holder)
    assert not storage.exists("lease.json")
    stale_lease(storage)
    with caplog.at_level(logging.WARNING), Lease(storage, ttl_s=30, heartbeat_s=0.2) as lease:
        time.sleep(0.6)  # heartbeats renew through If-Match
        assert lease.lost is None and storage.read_json("lease.json")["token"] == lease.holder.token
    assert "taking over the stale lease" in caplog.text and not storage.exists("lease.json")
    tag = write_if(storage, "doc", b"1", None)
    with pytest.raises(ConditionFailed):
        write_if(storage, "doc", b"2", '"0000"')
    write_if(storage, "doc", b"2", tag)


# --- the source registry --------------------------------------------------------------------------

ADD = textwrap.dedent(
    """
    import sys, time
    from wrpo_core.config import ModelSpec
    from wrpo_core.registry import add_source, open_registry
    storage = open_registry(sys.argv[1])
    spec = ModelSpec.model_validate({"name": sys.argv[2], "path": "toy-world:models/a"})
    sys.stdin.read()   # all start together
    print(add_source(storage, spec)["version"])
    """
)


def test_concurrent_adds_never_lose_a_registration(tmp_path):
    from wrpo_core.registry import read_sources

    names = [f"src-{i}" for i in range(10)]
    adds = [
        subprocess.Popen(
            [sys.executable, "-c", ADD, str(tmp_path), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        for name in names
    ]
    time.sleep(2)  # let them import
    for add in adds:
        add.stdin.close()
    versions = [int(add.stdout.read()) for add in adds]
    for add in adds:
        add.wait(timeout=120)
    assert all(add.returncode == 0 for add in adds)
    document = read_sources(open_registry_storage(tmp_path))
    assert sorted(s["name"] for s in document["sources"]) == sorted(names)
    assert sorted(versions) == list(range(1, 11)) and document["version"] == 10
    assert sorted(h["version"] for h in document["history"]) == list(range(1, 11))


def open_registry_storage(folder: Path) -> Storage:
    from wrpo_core.registry import open_registry

    return open_registry(str(folder))


# --- local Ray ------------------------------------------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import os, time, ray
    from wrpo_core.config import ComputeConfig
    from wrpo_core.fanout import init_ray

    class Sleeper:
        def pid(self):
            return os.getpid()
        def busy(self):
            time.sleep(1000)

    init_ray(ComputeConfig())
    actors = [ray.remote(Sleeper).options(num_cpus=0).remote() for _ in range(2)]
    pids = ray.get([a.pid.remote() for a in actors])
    calls = [a.busy.remote() for a in actors]
    print("PIDS", *pids, flush=True)
    time.sleep(1000)
    """
)


@pytest.mark.integration
@pytest.mark.parametrize("kill", ["group", "driver"])
def test_local_ray_dies_with_its_driver(kill):
    psutil = pytest.importorskip("psutil")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=ENV,
                              cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        line = driver.stdout.readline()
        assert line.startswith("PIDS"), line
        actors = [int(pid) for pid in line.split()[1:]]
        session = psutil.Process(driver.pid).children(recursive=True)  # raylet, GCS, agents, workers
        assert all(pid in {p.pid for p in session} for pid in actors)
        assert any(p.name().startswith("ray::") for p in session)
    finally:
        if kill == "group":
            os.killpg(driver.pid, signal.SIGKILL)
        else:  # only the driver: the harder case, nothing else is signalled
            os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30
    alive = session
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
