"""Storage keys that cannot leave their root, and names that can be one segment of a key."""

from __future__ import annotations

import re

from wrpo_core.storage.errors import StorageError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def safe_key(key: str) -> str:
    """`key` as a clean relative path ("a/b/c"); StorageError if it could leave its root.

    Rejected: empty keys, absolute paths, '..' parts, URLs or drive letters (':'), backslashes,
    '~' at the start and control characters.
    """
    if not isinstance(key, str):
        raise StorageError(f"storage key must be a string, got {type(key).__name__}")
    bad = (
        not key.strip()
        or key.startswith(("/", "~"))
        or ":" in key
        or "\\" in key
        or any(ord(ch) < 32 for ch in key)
    )
    parts = [part for part in key.split("/") if part not in ("", ".")]
    if bad or ".." in parts or not parts:
        raise StorageError(
            f"storage key {key!r} is not allowed: keys are relative paths inside the run's folder "
            "(no '..', no absolute paths, no URLs)"
        )
    return "/".join(parts)


def safe_name(name: str, what: str = "name") -> str:
    """A single key segment (run id, model or stage name): letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise StorageError(
            f"{what} {name!r} is not allowed in storage keys: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name
