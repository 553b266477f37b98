"""Storage credentials from Prefect blocks: what the storage option `prefect_block` names.

    storage_options: {prefect_block: "remote-file-system/wrpo-s3"}

The Prefect layer passes `load_block_options` to wrpo_core (as its `BlockLoader`), which never
imports Prefect itself. Supported blocks: a RemoteFileSystem (its `settings`), a prefect-aws
AwsCredentials, or a Secret holding a mapping of storage options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wrpo_core.storage import StorageError, redact


def block_options(block: Any) -> dict[str, Any]:
    """Storage options held by a Prefect block (duck-typed, so Prefect itself is not needed here)."""
    if hasattr(block, "settings") and hasattr(block, "basepath"):  # prefect.filesystems.RemoteFileSystem
        return dict(block.settings or {})
    if hasattr(block, "aws_access_key_id"):  # prefect_aws.AwsCredentials
        secret = getattr(block, "aws_secret_access_key", None)
        token = getattr(block, "aws_session_token", None)
        params = getattr(block, "aws_client_parameters", None)
        options = {
            "key": block.aws_access_key_id,
            "secret": secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret,
            "token": token.get_secret_value() if hasattr(token, "get_secret_value") else token,
            "region": getattr(block, "region_name", None),
            "endpoint_url": getattr(params, "endpoint_url", None),
        }
        return {name: value for name, value in options.items() if value}
    if hasattr(block, "get"):  # prefect.blocks.system.Secret holding a mapping
        value = block.get()
        if isinstance(value, Mapping):
            return dict(value)
    raise StorageError(
        f"Prefect block of type {type(block).__name__} holds no storage options "
        "(use a RemoteFileSystem, an AwsCredentials or a Secret block holding a mapping)"
    )


def load_block_options(name: str) -> dict[str, Any]:
    """Storage options from the Prefect block `name` ('block-type-slug/block-name')."""
    try:
        from prefect.blocks.core import Block
    except ImportError:
        raise StorageError(
            f"storage option prefect_block={name!r} needs Prefect: pip install 'wrpo-fusion[orchestration]'"
        ) from None
    try:
        block = Block.load(name)
    except Exception as exc:
        raise StorageError(f"cannot load the Prefect block {name!r}: {redact(str(exc))}") from None
    return block_options(block)
