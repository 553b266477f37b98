"""The storage layer's errors: storage that cannot be used, and artifacts no finished stage lists."""

from __future__ import annotations


class StorageError(RuntimeError):
    """Storage that cannot be used; the message names the URL (never a secret) and what to fix."""

    permanent: bool = False
    """True when retrying cannot help (a full disk, a missing bucket); set by whoever raises it."""


class ManifestError(StorageError):
    """An artifact that no finished stage's manifest lists (its stage has not completed)."""
