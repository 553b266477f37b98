"""The fusion pipeline: its stages as plain functions over a run's storage, the plan, and the runner.

    from wrpo_core.pipeline import run_pipeline
    summaries = run_pipeline(cfg)      # resumes at the first unfinished stage

- `plan`: which stages a config runs, their settings keys and order; `run_pipeline`.
- `runner`: runs a stage unless done, writes its manifest last, reuses other runs' results,
  turns failures into `StageError`.
- `data`: ingest, split, sample, score (inline or on Ray actors), select y_ws / y_wt / y_l.
- `training`: Target-SFT, WRPO, and WRPO variants (the DPO baseline, ablations) as training jobs.
- `publishing`: model cards, the held-out evaluation, the registry record.
- `roles`: the names of the models a run trains.

Orchestrators (the Prefect flow) call `pipeline_stage` and `run_pipeline_stage` per stage.
"""

from wrpo_core.pipeline.plan import (
    dpo_baseline_stage,
    layout_for,
    pipeline_stage,
    pipeline_stages,
    run_pipeline,
    run_pipeline_stage,
    wrpo_variant_stage,
)
from wrpo_core.pipeline.roles import DPO_BASELINE, FUSED, TARGET_SFT
from wrpo_core.pipeline.runner import (
    Outcome,
    Stage,
    StageError,
    config_hash,
    load_summary,
    run_stage_outcome,
)
from wrpo_core.pipeline.training import TrainingHooks

__all__ = [
    "DPO_BASELINE",
    "FUSED",
    "TARGET_SFT",
    "Outcome",
    "Stage",
    "StageError",
    "TrainingHooks",
    "config_hash",
    "dpo_baseline_stage",
    "layout_for",
    "load_summary",
    "pipeline_stage",
    "pipeline_stages",
    "run_pipeline",
    "run_pipeline_stage",
    "run_stage_outcome",
    "wrpo_variant_stage",
]
