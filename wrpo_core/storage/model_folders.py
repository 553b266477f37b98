"""Model folders in object storage: a SHA256SUMS saved with each model, and node-local copies checked by it.

A run saves every model it trains with a `SHA256SUMS` file (sha256sum's format: `<hex>  <name>`).
A machine that is handed the folder's URL (`s3://bucket/runs/x/models/target-sft`) instead of a
path on the driver's disk (a Ray actor, a Ray Train worker, another cluster's job) downloads it
once into its own cache, `$WRPO_CACHE/models/<name>-<url digest>/`, and uses it only after every
file's sha256 matches: a copy cut short, a corrupted byte or a model retrained under the same URL
is downloaded again, never loaded. Concurrent fetches on one machine (several actors) take turns
through a lock file; the sums are written into the copy last, as its claim to be complete.

Opened with the environment's credentials and endpoint (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...:
wrpo_core/ray_env.py forwards them to Ray workers), never with options from a config.
"""

from __future__ import annotations

import fcntl
import logging
import re
from pathlib import Path

from wrpo_core.storage.errors import StorageError
from wrpo_core.storage.filesystem import Storage, cache_root
from wrpo_core.storage.provenance import digest, file_sha256

logger = logging.getLogger(__name__)

SUMS_FILE = "SHA256SUMS"
"""The file in a saved model folder listing every other file's sha256 (`sha256sum -c` can check it)."""

_LINE = re.compile(r"^([0-9a-f]{64})  (\S.*)$")
_LOCAL_PROTOCOLS = ("file", "local")


def is_storage_url(path: str) -> bool:
    """True for an fsspec URL of remote storage (`s3://...`, `gs://...`, `memory://...`), not a local path."""
    protocol, separator, _ = path.partition("://")
    return bool(
        separator and protocol.lower() not in _LOCAL_PROTOCOLS and re.fullmatch(r"[a-z0-9+]+", protocol)
    )


def sums_text(folder: Path, files: list[str]) -> str:
    """The SHA256SUMS text of `files` (relative paths in the local `folder`), sorted by name."""
    return "".join(f"{file_sha256(folder / name)}  {name}\n" for name in sorted(files))


def parse_sums(text: str, where: str) -> dict[str, str]:
    """`name -> sha256` of a SHA256SUMS text; StorageError naming `where` and the line when malformed."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _LINE.match(line)
        if match is None or match.group(2).startswith(("/", "~")) or ".." in match.group(2).split("/"):
            raise StorageError(f"{where}: line {number} is not `<sha256>  <relative name>`: {line!r}")
        sums[match.group(2)] = match.group(1)
    if not sums:
        raise StorageError(f"{where}: lists no files")
    return sums


def model_folder_identity(url: str) -> dict[str, str]:
    """What identifies the model at a storage URL without downloading it: its SHA256SUMS' digest."""
    return {"url": url, "sha256sums": digest(_read_sums(Storage.open(url), url))}


def fetch_model_folder(url: str, cache: Path | None = None) -> Path:
    """This machine's verified copy of the model folder at `url` (downloaded when missing or stale)."""
    storage = Storage.open(url)
    text = _read_sums(storage, url)
    sums = parse_sums(text, f"{url}/{SUMS_FILE}")
    root = cache or cache_root()
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40]
    target = root / "models" / f"{tail}-{digest(url)[:12]}"
    target.mkdir(parents=True, exist_ok=True)
    with (target.parent / f"{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per machine; the others wait and reuse it
        marker = target / SUMS_FILE
        if marker.is_file() and marker.read_text() == text and all((target / n).is_file() for n in sums):
            return target
        logger.info("downloading model %s (%d files) to %s", storage.display(), len(sums), target)
        marker.unlink(missing_ok=True)
        for stale in [p for p in target.rglob("*") if p.is_file() and str(p.relative_to(target)) not in sums]:
            stale.unlink()
        storage.download("", sorted(sums), target)
        wrong = [name for name, sha in sorted(sums.items()) if file_sha256(target / name) != sha]
        if wrong:
            raise StorageError(
                f"model {storage.display()}: {len(wrong)} downloaded file(s) do not match its {SUMS_FILE} "
                f"({', '.join(wrong[:3])}): the folder changed during the download or is corrupt; "
                "download again, or save the model again"
            )
        marker.write_text(text)
        return target


def _read_sums(storage: Storage, url: str) -> str:
    data = storage.read_bytes_if_exists(SUMS_FILE)
    if data is None:
        raise FileNotFoundError(
            f"model {url}: no {SUMS_FILE} in the folder, so a copy cannot be checked; models a run saves "
            f"have one; for another folder write it with `sha256sum * > {SUMS_FILE}` in the model folder"
        )
    return data.decode("utf-8")
