"""Prefect events the project emits: a change of the source-model registry.

`wrpo sources add|remove` calls `emit_registry_event`; the `wrpo-fusion/refusion` deployment's
trigger (deployments/prefect.yaml) matches `wrpo.source.added` on any `wrpo.registry.*` resource
and starts a re-fusion with the registered sources.
"""

from __future__ import annotations

from typing import Any

from wrpo_core.storage import digest


def registry_resource_id(registry: str) -> str:
    """The event resource of a registry: `wrpo.registry.<digest of its storage URL>`."""
    return f"wrpo.registry.{digest(registry)[:12]}"


def emit_registry_event(action: str, name: str, path: str, registry: str, version: int) -> Any:
    """Sends `wrpo.source.<action>` to the Prefect API and waits until it is sent; returns the Event.

    Raises RuntimeError when the API does not answer or the event could not be sent. The payload
    holds the registry's display URL (secrets redacted), never storage options.
    """
    from prefect import get_client
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise RuntimeError(f"the Prefect API does not answer: {problem}")
    event = emit_event(
        f"wrpo.source.{action}",
        resource={"prefect.resource.id": registry_resource_id(registry), "prefect.resource.name": registry},
        payload={"name": name, "path": path, "registry": registry, "version": version},
    )
    if event is None:
        raise RuntimeError("Prefect did not send the event (no API configured, or events are disabled)")
    EventsWorker.drain_all()  # send it before a short-lived process exits
    return event
