"""The plan of a fusion run: which stages, in what order, with what settings keys, and how to run them.

    layout = layout_for(cfg)                      # <storage.url>/<run_name>
    run_pipeline(cfg)                             # every unfinished stage, in order, in this process
    stage = pipeline_stage(cfg, layout, "sft")    # one stage (an orchestrator's task runs it)
    run_pipeline_stage(cfg, layout, stage)        # -> ("ran" | "skipped" | "reused", summary)

    ingest -> split -> sample/score each source -> select-source -> sft -> sample/score Target-SFT
    -> select-target -> wrpo (reference log-probs inside) -> [evaluate] -> register

A stage's key is what its result depends on besides its input datasets (recorded digested in
its manifest): change it and the stage runs again; its `after` stages must be complete first
(an orchestrator may run the others concurrently).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from wrpo_core import actor_pools
from wrpo_core.config import FusionConfig, ModelSpec, WRPOConfig
from wrpo_core.locations import location_fingerprint
from wrpo_core.pipeline import data, publishing, training
from wrpo_core.pipeline.data import ProgressCallback
from wrpo_core.pipeline.roles import DPO_BASELINE, FUSED, TARGET_SFT
from wrpo_core.pipeline.runner import Outcome, Stage, config_hash, run_stage_outcome, sibling_runs
from wrpo_core.pipeline.training import TrainingHooks
from wrpo_core.storage import DEFAULT_ROWS_PER_FILE, BlockLoader, Lease, RunLayout, safe_name
from wrpo_core.train.jobs import LogCallback, MetricsCallback

logger = logging.getLogger(__name__)


def layout_for(
    cfg: FusionConfig,
    root: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    max_rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    load_block: BlockLoader | None = None,
) -> RunLayout:
    """The run's layout: `root`, or `<storage.url>/<run_name>`, opened with the storage options.

    `load_block` reads a Prefect block named by the storage option `prefect_block` (the Prefect
    layer passes it in).
    """
    url = root or f"{cfg.storage.url.rstrip('/')}/{safe_name(cfg.run_name, 'run_name')}"
    return RunLayout(
        url, cfg.storage.storage_options, cache_dir=cache_dir, max_rows_per_file=max_rows_per_file,
        load_block=load_block,
    )  # fmt: skip


def _device(cfg: FusionConfig) -> str:
    if cfg.compute.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.compute.device


def _stage_builders(
    cfg: FusionConfig, layout: RunLayout, hooks: TrainingHooks
) -> dict[str, Callable[[], Stage]]:
    """Every stage of the run by name, in order, each built only when asked for (keys can cost a stat)."""
    on_ray = cfg.compute.executor == "ray"

    progress = hooks.on_progress

    def sample(spec: ModelSpec, prompts_key: str) -> dict:
        if on_ray:
            return data.sample_on_ray(
                cfg, spec, layout, prompts_key, device=_device(cfg), on_progress=progress
            )
        return data.sample(spec, layout, prompts_key, device=_device(cfg), on_progress=progress)

    def score(model: str) -> dict:
        if on_ray:
            return data.score_on_ray(cfg, layout, model, on_progress=progress)
        return data.score(cfg, layout, model, on_progress=progress)

    reward = cfg.reward_model.model_dump(mode="json")
    target = cfg.target.model_dump(mode="json", exclude={"sampling", "name"})
    tsft = TARGET_SFT
    builders: dict[str, Callable[[], Stage]] = {
        "ingest": lambda: Stage(
            "ingest", lambda: data.ingest(cfg, layout),
            {"prompts": cfg.prompts.model_dump(mode="json"), "source": location_fingerprint(cfg.prompts.path)},
            reusable=True,
        ),
        "split": lambda: Stage(
            "split", lambda: data.split(cfg, layout), cfg.split.model_dump(mode="json"), ("ingest",), reusable=True
        ),
    }  # fmt: skip
    for spec in cfg.sources:
        builders[f"sample-{spec.name}"] = lambda s=spec: Stage(
            f"sample-{s.name}", lambda: sample(s, layout.prompts), s.model_dump(mode="json"), ("ingest",),
            s.name, reusable=True,
        )  # fmt: skip
        builders[f"score-{spec.name}"] = lambda s=spec: Stage(
            f"score-{s.name}", lambda: score(s.name), reward, (f"sample-{s.name}",), s.name, reusable=True
        )
    sources = [s.name for s in cfg.sources]
    builders |= {
        "select-source": lambda: Stage(
            "select-source", lambda: data.select_source(cfg, layout), sorted(sources),
            (*(f"score-{name}" for name in sources), "split"),
        ),
        "sft": lambda: Stage(
            "sft", lambda: training.sft(cfg, layout, hooks=hooks), {"target": target, "sft": cfg.sft.model_dump(mode="json")},
            ("select-source",), cfg.target.name,
        ),
        f"sample-{tsft}": lambda: Stage(
            f"sample-{tsft}", lambda: sample(data.target_sft_spec(cfg, layout), layout.split("preference")),
            cfg.target.model_dump(mode="json", exclude={"path", "name"}), ("sft",), tsft,
        ),
        f"score-{tsft}": lambda: Stage(f"score-{tsft}", lambda: score(tsft), reward, (f"sample-{tsft}",), tsft),
        "select-target": lambda: Stage(
            "select-target", lambda: data.select_target(cfg, layout), {}, (f"score-{tsft}",)
        ),
        FUSED: lambda: Stage(
            FUSED, lambda: training.wrpo(cfg, layout, hooks=hooks), cfg.wrpo.model_dump(mode="json"),
            ("select-target",), tsft,
        ),
    }  # fmt: skip
    last = FUSED
    if cfg.evaluation.prompts is not None:
        key = {"evaluation": cfg.evaluation.model_dump(mode="json"), "judge": reward, "target": target}
        builders["evaluate"] = lambda: Stage(
            "evaluate", lambda: publishing.evaluate(cfg, layout), key, (FUSED,), FUSED
        )
        last = "evaluate"
    builders["register"] = lambda: Stage(
        "register", lambda: publishing.register(cfg, layout), {"config": config_hash(cfg)}, (last,)
    )
    return builders


def pipeline_stages(
    cfg: FusionConfig,
    layout: RunLayout,
    *,
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[Stage]:
    """The ordered stages of a whole fusion run, each with its settings key and prerequisites.

    `on_log` / `on_metrics` receive the training stages' log lines and per-step metrics rows;
    `on_progress(done, total, unit)` the progress of the sample, score and training stages.
    """
    hooks = TrainingHooks(on_log, on_metrics, on_progress)
    return [build() for build in _stage_builders(cfg, layout, hooks).values()]


def pipeline_stage(
    cfg: FusionConfig,
    layout: RunLayout,
    name: str,
    *,
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> Stage:
    """One stage of the run's plan by name, built without building the others (see `pipeline_stages`)."""
    builders = _stage_builders(cfg, layout, TrainingHooks(on_log, on_metrics, on_progress))
    if name not in builders:
        raise ValueError(f"run {cfg.run_name} has no stage {name!r}; its stages: {list(builders)}")
    return builders[name]()


def dpo_baseline_stage(
    cfg: FusionConfig,
    layout: RunLayout,
    *,
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> Stage:
    """The DPO baseline (WRPO at alpha 0 on the same data) as a stage after WRPO; not in the plan itself."""
    hooks = TrainingHooks(on_log, on_metrics, on_progress)
    return wrpo_variant_stage(cfg, layout, DPO_BASELINE, training.dpo_training(cfg), hooks=hooks)


def wrpo_variant_stage(
    cfg: FusionConfig,
    layout: RunLayout,
    name: str,
    settings: WRPOConfig,
    *,
    hooks: TrainingHooks | None = None,
) -> Stage:
    """WRPO with other settings (alpha, beta, schedule) on the fused model's data, as a stage after WRPO.

    Trains `models/<name>` from Target-SFT on the quadruples and reference log-probs WRPO stored;
    its manifest keys the settings, so a rerun skips it and a changed setting retrains it.
    """

    def run() -> dict:
        return training.wrpo_variant(cfg, layout, name, settings, hooks or TrainingHooks())

    return Stage(name, run, {"wrpo": settings.model_dump(mode="json")}, (FUSED,), TARGET_SFT)


def run_pipeline_stage(
    cfg: FusionConfig, layout: RunLayout, stage: Stage, *, reuse: bool = True
) -> tuple[Outcome, dict]:
    """Runs (or skips, or copies from another run when `reuse`) one stage of the plan."""
    others = sibling_runs(cfg, layout) if reuse and stage.reusable else []
    return run_stage_outcome(
        layout, stage.name, stage.run, cfg=cfg, key=stage.key, model=stage.model, reuse_from=others
    )


def run_pipeline(
    cfg: FusionConfig,
    root: str | None = None,
    *,
    layout: RunLayout | None = None,
    reuse: bool = True,
    load_block: BlockLoader | None = None,
    break_lease: bool = False,
) -> dict[str, dict]:
    """Probes the storage, takes the run's lease, then runs every unfinished stage in order.

    Returns each stage's summary. The run lives at `root` (a local path or URL) or
    `<storage.url>/<run_name>`; pass `layout` instead to choose the cache folder or file sizes.
    With `reuse`, samples and scores that another run under the same storage URL made with the
    same settings and inputs are copied. The lease (`<run>/lease.json`) is held until the end: a
    second run of the same folder is refused (LeaseError naming the holder) unless `break_lease`.
    """
    layout = layout or layout_for(cfg, root, load_block=load_block)
    layout.storage.check()
    summaries = {}
    with Lease(layout.storage, purpose=f"run {cfg.run_name}", break_lease=break_lease) as lease:
        try:
            for stage in pipeline_stages(cfg, layout):
                lease.check()  # taken over by another run (judged stale, or broken): stop before writing more
                summaries[stage.name] = run_pipeline_stage(cfg, layout, stage, reuse=reuse)[1]
        finally:
            actor_pools.release_pools()  # the reward model's replicas, on a cluster too
    for row in summaries["select-source"].get("per_model", []):
        logger.info(
            "source %s: %d samples, %d tokens, mean reward %.4f, y_ws share %.1f%%", row["model"],
            row["samples"], row["completion_tokens"], row["mean_reward"], 100 * row["ws_share"],
        )  # fmt: skip
    return summaries
