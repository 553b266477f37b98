"""The source-discovery flow: new Hugging Face Hub models and revisions become registered sources.

Run it from the `wrpo-discover/default` deployment (its nightly schedule is off by default), or
directly: `python -m flows.discover --config fusion.yaml --rules discovery.yaml [--dry-run]`.

    list the watched authors' models -> check each new model or revision -> register it pinned to
    its commit -> `wrpo.source.added` per registered source -> the 'wrpo-fusion/refusion' trigger

The registry is the one in the fusion config's storage, which is where the re-fusion deployment
reads it; a run that finds nothing new registers nothing and sends no event.
"""

import argparse
import json
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_API_URL

from flows.events import emit_registry_event
from flows.fusion import check_no_secrets
from tasks.discover import discover_sources_task, publish_discovery_report
from wrpo_core.config import DiscoveryConfig, FusionConfig, load_config


@flow(name="wrpo-discover", log_prints=True)
def discover(config: FusionConfig, discovery: DiscoveryConfig, dry_run: bool = False) -> dict[str, Any]:
    """Discovers new source models on the Hugging Face Hub and registers them, which starts a re-fusion.

    Args:
        config: The fusion config the re-fusion runs: its storage holds the source registry, and its
            sources count as known (a watched model that is one of them is pinned, not added again).
        discovery: The watch rules (authors, tags, name pattern, licenses, parameter range, age,
            downloads, deny-list, remote code) and the sampling cluster (GPU memory, GPUs per model).
        dry_run: List what would be registered; register nothing and send no event.
    """
    logger = get_run_logger()
    check_no_secrets(config)
    report = discover_sources_task(config, discovery, dry_run)
    logger.info("discovery: %d %s, %d unchanged, %d rejected", len(report["registered"]),
                "to register" if dry_run else "registered", len(report["unchanged"]), len(report["rejected"]))  # fmt: skip
    for rejected in report["rejected"]:
        logger.info(
            "rejected %s@%s: %s", rejected["path"], rejected["revision"], "; ".join(rejected["reasons"])
        )
    artifact = publish_discovery_report(report)
    events = []
    if report["registered"] and not dry_run:
        if not PREFECT_API_URL.value():
            logger.warning("PREFECT_API_URL is not set: no wrpo.source.added event (a scheduled re-fusion "
                           "picks the registrations up)")  # fmt: skip
        for source in report["registered"] if PREFECT_API_URL.value() else []:
            try:
                event = emit_registry_event("added", source["name"], source["path"], report["registry"],
                                            source["version"])  # fmt: skip
            except Exception as error:
                raise RuntimeError(
                    f"registered {[s['name'] for s in report['registered']]} (registry version "
                    f"{report['version']}), but the wrpo.source.added event for {source['name']} was not "
                    f"sent: {error}. Start 'wrpo-fusion/refusion' by hand or let its schedule run it"
                ) from error
            events.append(f"{event.event} {source['name']} ({event.id})")
    return {**report, "events": events, "artifact": artifact}


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.discover --config fusion.yaml --rules discovery.yaml [--dry-run]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="FusionConfig YAML (the registry's storage)")
    parser.add_argument("--rules", required=True, help="DiscoveryConfig YAML (watch rules, sampling cluster)")
    parser.add_argument("--dry-run", action="store_true", help="register nothing, send no event")
    args = parser.parse_args(argv)
    result = discover(load_config(args.config, FusionConfig), load_config(args.rules, DiscoveryConfig),
                      dry_run=args.dry_run)  # fmt: skip
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
