"""Which errors a retry can fix: one rule for the stage runner and the Ray shard driver.

Bad config or data, a missing model or an unfinished input stay wrong however often they are retried
(permanent); a dropped connection or a dead node may not. An error can say so itself with a
`permanent` attribute (StorageError, ShardError).
"""

from __future__ import annotations

from wrpo_core.storage import ManifestError

PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, NotImplementedError, FileNotFoundError, ManifestError,
)  # fmt: skip
"""Errors that a retry cannot fix (bad config or data, a missing model, an unfinished input)."""


def is_permanent(error: BaseException) -> bool:
    """True when retrying cannot help: a permanent error type, or an error that says `permanent = True`."""
    return isinstance(error, PERMANENT_ERRORS) or getattr(error, "permanent", False) is True
