"""Storage errors that say what happened and where, classified permanent or transient: a storage URL
that is a file, a read-only folder (as a user who cannot write it), a full disk (a real tiny tmpfs
when this machine lets us mount one, and a simulated ENOSPC always), an unreachable endpoint."""

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from s3server import free_ports

from wrpo_core.storage import Storage, StorageError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_a_storage_url_that_is_a_file(tmp_path):
    file = tmp_path / "afile"
    file.write_text("x")
    for url in (file, file / "run"):
        with pytest.raises(StorageError, match=f"{file}.* is a file, not a folder") as error:
            Storage.open(str(url)).check()
        assert error.value.permanent is True
    with pytest.raises(StorageError, match="is a file, not a folder"):
        Storage.open(str(tmp_path)).write_json("afile/x.json", {})


WRITE_AS_NOBODY = textwrap.dedent(
    """
    import os, pwd, sys, uuid
    from wrpo_core.storage import Storage, StorageError
    os.setgid(65534); os.setuid(65534)  # after the imports: the interpreter lives under /root
    storage = Storage.open(sys.argv[1])
    for attempt in (storage.check, lambda: storage.write_json("run/a.json", {})):
        try:
            attempt()
        except StorageError as error:
            print(error.permanent, error)
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user (os.setuid)")
def test_a_read_only_folder_names_the_folder_and_the_user():
    # Root writes through mode bits, so the check runs as the user nobody (uid 65534) in a subprocess.
    parent = Path(tempfile.mkdtemp(prefix="wrpo-ro-", dir="/tmp"))
    try:
        os.chmod(parent, 0o755)
        folder = parent / "storage"
        folder.mkdir(mode=0o555)
        result = subprocess.run([sys.executable, "-c", WRITE_AS_NOBODY, str(folder)], capture_output=True,
                                text=True, env=ENV, cwd="/", timeout=120)  # fmt: skip
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 2, result.stderr
        for line in lines:
            assert line.startswith("True ") and "is not writable by user nobody (uid 65534)" in line
            assert str(folder) in line and "access key" not in line
    finally:
        shutil.rmtree(parent)


def test_a_full_disk_simulated_names_the_path_and_free_space(tmp_path, monkeypatch):
    storage = Storage.open(str(tmp_path))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("wrpo_core.storage.filesystem.atomic_write", full)
    with pytest.raises(StorageError) as error:
        storage.write_bytes("run/big.bin", b"x")
    free = shutil.disk_usage(tmp_path)
    assert f"no space left on the device holding {tmp_path}/run/big.bin" in str(error.value)
    assert f"free of {free.total}" in str(error.value) and error.value.permanent is True


FILL_TMPFS = textwrap.dedent(
    """
    import sys
    from wrpo_core.storage import Storage, StorageError
    try:
        Storage.open(sys.argv[1]).write_bytes("run/big.bin", b"x" * 400_000)
    except StorageError as error:
        print(error.permanent, error)
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_a_full_disk_on_a_real_tiny_tmpfs(tmp_path):
    # A 64 KiB tmpfs mounted in a private mount namespace (gone with the process).
    mount = tmp_path / "small"
    mount.mkdir()
    script = f'mount -t tmpfs -o size=64k tmpfs {mount} && exec "$0" -c "$1" {mount}'
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, sys.executable, FILL_TMPFS],
                            capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
    if "mount:" in result.stderr or "unshare:" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.stdout.startswith("True "), result.stderr
    assert f"no space left on the device holding {mount}/run/big.bin" in result.stdout
    assert "bytes free of 65536" in result.stdout


def test_an_unreachable_endpoint_is_transient():
    (port,) = free_ports(1)
    storage = Storage.open("s3://bucket/run", {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k",
                                                "secret": "s", "max_attempts": 1})  # fmt: skip
    with pytest.raises(StorageError, match="cannot reach the endpoint") as error:
        storage.check()
    assert error.value.permanent is False
