"""The names the pipeline gives its own models and stages, which a source or target may not take.

A fusion run stores each model's samples, scores and weights under the model's name, and names
its stages after them (`sample-<model>`, `score-<model>`). A source called `target-sft` would
share the Target-SFT stage's samples and manifest: every rerun would redo four stages and
overwrite that source's samples. So a model name must not be one of the pipeline's model roles
or stage names, nor the name of one of the run's per-model stages (compared without case: a
case-insensitive disk is one folder for both).

The role constants live here, not in wrpo_core.pipeline, so that the config can refuse them
without importing the pipeline (wrpo_core.pipeline.roles re-exports them).
"""

from __future__ import annotations

TARGET_SFT = "target-sft"
"""The target after SFT on (x, y_ws): WRPO's policy start and reference."""

FUSED = "wrpo"
"""The fused model: Target-SFT after WRPO."""

DPO_BASELINE = "dpo"
"""The DPO baseline (WRPO at alpha 0 on the same data), trained only when asked for (the demo)."""

MODEL_ROLES = (TARGET_SFT, FUSED, DPO_BASELINE)
"""The models a run trains; their names are storage keys (models/, samples/, scores/) and stage names."""

STAGE_NAMES = ("ingest", "split", "select-source", "sft", "select-target", FUSED, "evaluate", "register")
"""The pipeline's stages that are not per model (see wrpo_core.pipeline.plan)."""

PER_MODEL_STAGE_PREFIXES = ("sample-", "score-")
"""Stages run once per sampled model: `sample-<model>`, `score-<model>`."""


def reserved_name_problem(name: str) -> str | None:
    """Why `name` cannot name any source or target model (it is the pipeline's own), or None when it can."""
    lowered = name.lower()
    if lowered in MODEL_ROLES:
        return f"name {name!r} is reserved: the run trains a model of that name ({', '.join(MODEL_ROLES)})"
    if lowered in STAGE_NAMES:
        return f"name {name!r} is reserved: it is the name of a pipeline stage ({', '.join(STAGE_NAMES)})"
    return None


def per_model_stage_names(sampled: list[str]) -> set[str]:
    """The lower-cased names of the per-model stages of a run whose sources are `sampled` (Target-SFT added).

    A source may not be called like one of them (say `sample-src-a` next to a source `src-a`).
    """
    models = [*sampled, TARGET_SFT]
    return {f"{prefix}{model}".lower() for prefix in PER_MODEL_STAGE_PREFIXES for model in models}
