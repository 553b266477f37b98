"""Provenance recorded in manifests: the code version that wrote an artifact, and content digests."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path
from typing import Any


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


@functools.lru_cache(maxsize=256)
def _sha256_of_file(path: str, size: int, mtime_ns: int) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a local file's content (computed once per process for an unchanged file)."""
    stat = os.stat(path)
    return _sha256_of_file(str(path), stat.st_size, stat.st_mtime_ns)
