"""The WRPO fusion flow: every pipeline stage as a Prefect task run, then the run's artifacts.

Run it from the Prefect UI or `prefect deployment run 'wrpo-fusion/default'` (deployments in
deployments/prefect.yaml), or directly: `python -m flows.fusion --config fusion.yaml`.

    ingest -> split -> sample sources -> score -> select y_ws -> SFT -> sample Target-SFT -> score
    -> select y_wt / y_l -> WRPO (reference log-probs inside) -> evaluate -> register

Stages pass storage URIs and small summaries, never data. A rerun of the same configuration
resumes at the first unfinished stage (stage manifests in storage; see tasks/fusion.py). With
`compute.executor: ray` the per-source sample and score stages run concurrently, each fanning
out over Ray actors; inline, stages run one after another in the flow's process.
"""

import argparse
import json
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait

from tasks.blocks import load_block_options
from tasks.fusion import run_fusion_stage
from tasks.report import publish_report
from wrpo_core.config import FusionConfig, load_config
from wrpo_core.config.credentials import credential_fields
from wrpo_core.fanout import shutdown_local_ray
from wrpo_core.pipeline import layout_for, pipeline_stages
from wrpo_core.ray_logs import worker_output_to
from wrpo_core.registry import open_registry, registered_sources, with_registered_sources
from wrpo_core.storage import Lease


def check_no_secrets(config: FusionConfig) -> None:
    """Refuses credentials anywhere in the config: flow parameters are stored by the Prefect server and shown.

    Storage options, `launch.env` and URLs with a password are looked at (`credential_fields`).
    """
    found = credential_fields(config)
    if found:
        raise ValueError(
            f"the config holds credentials ({', '.join(found)}); flow parameters are stored and shown by "
            "Prefect: give the worker AWS_* environment variables or use "
            "storage_options: {prefect_block: <block name>} instead"
        )


def effective_config(config: FusionConfig, use_source_registry: bool) -> FusionConfig:
    """The config to run: with the registry's sources added (as a run of its own) when asked."""
    if not use_source_registry:
        return config
    registry = open_registry(
        config.storage.url, config.storage.storage_options, load_block=load_block_options
    )
    return with_registered_sources(config, registered_sources(registry))


@flow(name="wrpo-fusion", log_prints=True)
def fusion(
    config: FusionConfig,
    use_source_registry: bool = False,
    reuse_other_runs: bool = True,
    triggered_by_registry: str | None = None,
) -> dict[str, Any]:
    """Implicit model fusion with WRPO: fuses the source LLMs into the target model.

    Args:
        config: The fusion run: prompts, source models (with their sampling settings), target,
            reward model, SFT and WRPO hyper-parameters (alpha, beta, ...), evaluation prompts,
            storage URL (a local path or s3://...) and compute (inline or Ray).
        use_source_registry: Also fuse the source models registered with `wrpo sources add` in
            the storage's registry; the run is then named after the resulting source set.
        reuse_other_runs: Copy samples and scores that another run under the same storage URL
            made with the same settings and inputs instead of sampling again.
        triggered_by_registry: Set by the re-fusion trigger: the registry whose change started
            the run. An event from another registry than this config's does nothing.
    """
    logger = get_run_logger()
    check_no_secrets(config)
    if triggered_by_registry is not None:
        own = open_registry(
            config.storage.url, config.storage.storage_options, load_block=load_block_options
        ).display()
        if triggered_by_registry != own:
            logger.warning("event from registry %s, but this deployment fuses with %s: nothing to do",
                           triggered_by_registry, own)  # fmt: skip
            return {"run": None, "skipped": f"registry {triggered_by_registry} is not {own}"}
    cfg = effective_config(config, use_source_registry)
    layout = layout_for(cfg, load_block=load_block_options)
    layout.storage.check()
    logger.info("run %s at %s with sources %s", cfg.run_name, layout.storage.display(),
                [s.name for s in cfg.sources])  # fmt: skip
    plan = pipeline_stages(cfg, layout)
    concurrent = cfg.compute.executor == "ray"
    futures: dict[str, Any] = {}
    previous: list[Any] = []
    # One lease for the whole flow run (its tasks do not take it): another run of this folder is refused.
    # What Ray's actors and training workers print (stderr and crash output too) goes to this run's log.
    with Lease(layout.storage, purpose=f"flow run of {cfg.run_name}"), worker_output_to(logger.info):
        for stage in plan:
            after = [futures[name] for name in stage.after] if concurrent else previous
            futures[stage.name] = run_fusion_stage.submit(cfg, stage.name, reuse_other_runs, wait_for=after)
            previous = [futures[stage.name]]
        try:
            wait(list(futures.values()))  # every stage settles (a failure does not cut the others short)
            results = {name: future.result() for name, future in futures.items()}  # the first failure raises
        finally:
            shutdown_local_ray()  # a local Ray started for this run's actors; never a cluster
        artifacts = publish_report(cfg, results)
    register = results["register"]["summary"]
    return {
        "run": layout.storage.display(),
        "model": register["model"],
        "stages": {name: result["outcome"] for name, result in results.items()},
        "evaluation": results.get("evaluate", {}).get("summary", {}).get("win_rates"),
        "artifacts": artifacts,
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.fusion --config fusion.yaml [--registry]`: the flow without a deployment."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="FusionConfig YAML")
    parser.add_argument("--registry", action="store_true", help="also fuse the registered sources")
    args = parser.parse_args(argv)
    result = fusion(load_config(args.config, FusionConfig), use_source_registry=args.registry)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
