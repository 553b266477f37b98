"""Thin Prefect tasks of the discovery flow: list, check and register hub models; publish the report.

The work is `wrpo_core.discovery.discover_sources`; these tasks add retries (only for a hub or
storage that did not answer, never for a bad config) and the run's artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.blocks import load_block_options
from wrpo_core.config import ConfigError, DiscoveryConfig, FusionConfig
from wrpo_core.discovery import discover_sources, report_markdown
from wrpo_core.registry import RegistryError, open_registry

REPORT_KEY = "wrpo-discover-report"


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: not for a bad config or a corrupt registry; yes for an unreachable hub or storage."""
    try:
        state.result()
    except (ConfigError, RegistryError):
        return False
    except Exception:
        return True
    return True


@task(
    name="discover-sources",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_unless_permanent,
)
def discover_sources_task(config: FusionConfig, discovery: DiscoveryConfig, dry_run: bool) -> dict[str, Any]:
    """Runs one discovery against the config's registry; returns the report (`DiscoveryReport.to_dict()`).

    Every hub check happens before the first registration, so a retry after a hub failure starts
    from a registry that this attempt did not change.
    """
    registry = open_registry(
        config.storage.url, config.storage.storage_options, load_block=load_block_options
    )
    return discover_sources(config, discovery, registry, dry_run=dry_run).to_dict()


@task(name="publish-discovery-report", cache_policy=NO_CACHE)
def publish_discovery_report(report: dict[str, Any]) -> str:
    """The run's markdown artifact: what was registered, what was rejected and why, what was unchanged."""
    about = f"discovery into {report['registry']}: {len(report['registered'])} registered, " \
            f"{len(report['rejected'])} rejected"  # fmt: skip
    return str(create_markdown_artifact(report_markdown(report), key=REPORT_KEY, description=about))
