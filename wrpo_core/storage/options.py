"""The fsspec options a storage URL is opened with: config options, a Prefect block's, S3 defaults.

Credentials and endpoint come from `storage_options` (s3fs names: `endpoint_url`, `key`, `secret`,
`token`, plus the flat `region`, `connect_timeout`, `read_timeout`, `max_attempts`), else from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL[_S3],
AWS_REGION, profiles: botocore's usual chain), or from a Prefect block named by the option
`prefect_block`, which the Prefect layer loads (it passes a `BlockLoader` in; this package never
imports Prefect).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from wrpo_core.storage.errors import StorageError

BlockLoader = Callable[[str], Mapping[str, Any]]
"""Returns the storage options a Prefect block holds, given its name ('block-type-slug/block-name')."""

S3_PROTOCOLS = ("s3", "s3a")


def protocol_of(url: str) -> str:
    """The fsspec protocol of `url` ('file' for plain paths)."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def resolve_storage_options(
    url: str, storage_options: Mapping[str, Any] | None = None, *, load_block: BlockLoader | None = None
) -> dict[str, Any]:
    """The fsspec options for `url`: config options, a Prefect block's (through `load_block`), S3 defaults.

    The option `prefect_block` names a block; `load_block(name)` returns the options it holds, and
    options set in the config win over the block's. Only the Prefect layer can load a block, so it
    passes `load_block` in (flows.blocks.load_block_options); without one such a config is refused.

    For s3:// the flat options `region`, `connect_timeout`, `read_timeout` and `max_attempts` become
    botocore settings; the endpoint falls back to AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; timeouts
    and retries are short (5 s to connect, 3 attempts) so a dead endpoint fails in seconds.
    """
    options = dict(storage_options or {})
    block = options.pop("prefect_block", None)
    if block:
        if load_block is None:
            raise StorageError(
                f"storage option prefect_block={block!r} needs Prefect: run through the flow, a deployment "
                "or the `wrpo` command with pip install 'wrpo-fusion[orchestration]'; or give the "
                "credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            )
        options = {**load_block(str(block)), **options}
    if protocol_of(url) not in S3_PROTOCOLS:
        return options
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not options.get("endpoint_url"):
        options["endpoint_url"] = endpoint
    client = dict(options.pop("client_kwargs", None) or {})
    region = options.pop("region", None) or options.pop("region_name", None)
    if region:
        client["region_name"] = region
    if client:
        options["client_kwargs"] = client
    config = dict(options.pop("config_kwargs", None) or {})
    config.setdefault("connect_timeout", options.pop("connect_timeout", 5))
    config.setdefault("read_timeout", options.pop("read_timeout", 60))
    config.setdefault("retries", {"max_attempts": int(options.pop("max_attempts", 3)), "mode": "standard"})
    options["config_kwargs"] = config
    options.setdefault("use_listings_cache", False)  # other machines write the same bucket
    return options
