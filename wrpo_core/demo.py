"""The embedded default: the whole fusion pipeline, offline, on the toy world.

Run: `wrpo demo --out runs/demo` (or `make demo`). Builds (or loads from cache) the toy
world's specialist sources and generalist target, then runs the production stages: sample
every source, score with the exact verifier, select y_ws, SFT, sample Target-SFT, select
y_wt / y_l, WRPO; plus the DPO baseline (alpha = 0 on the same data). Writes `report.md`
and `report.json` comparing Target, Target-SFT, Target-SFT-DPO and Target-SFT-WRPO on
held-out prompts (per-skill exact accuracy and mean reward).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from wrpo_core.config import FusionConfig
from wrpo_core.evaluation import evaluate_model
from wrpo_core.pipeline import (
    DPO_BASELINE,
    FUSED,
    TARGET_SFT,
    dpo_baseline_stage,
    layout_for,
    run_pipeline,
    run_pipeline_stage,
)
from wrpo_core.rewards import ToyVerifierScorer
from wrpo_core.toy.paths import default_cache_dir, demo_settings, toy_config_data, toy_prompts
from wrpo_core.toy.world import build_world

logger = logging.getLogger(__name__)

DEFAULT_CACHE = default_cache_dir()  # $WRPO_CACHE/toy-world, shared with the toy-world: paths


def fusion_config(
    world,
    prompts_path: Path,
    out: Path,
    settings: dict,
    *,
    held_out_path: Path | None = None,
    executor: str = "inline",
) -> FusionConfig:
    """The FusionConfig of a toy run on a built `world` (see `toy.paths.toy_config_data`)."""
    data = toy_config_data(
        sources=dict(world.sources), target=world.target, prompts=str(prompts_path),
        held_out=None if held_out_path is None else str(held_out_path), storage_url=str(out),
        settings=settings, run_name="toy", executor=executor,
    )  # fmt: skip
    return FusionConfig.model_validate(data)


def _write_prompts(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))


Runner = Callable[[FusionConfig], dict[str, dict]]
"""Runs a fusion config's pipeline and returns each stage's summary (default: pipeline.run_pipeline)."""


def run_toy_fusion(
    out: Path,
    world,
    train: list[dict],
    settings: dict,
    *,
    held_out: list[dict] | None = None,
    executor: str = "inline",
    runner: Runner = run_pipeline,
) -> tuple[dict[str, str], dict]:
    """Runs the production stages on the toy world plus the DPO baseline; returns model paths and summaries."""
    prompts_path = out / "prompts.jsonl"
    _write_prompts(prompts_path, train)
    held_out_path = None
    if held_out is not None:
        held_out_path = out / "held-out.jsonl"
        _write_prompts(held_out_path, held_out)
    cfg = fusion_config(world, prompts_path, out, settings, held_out_path=held_out_path, executor=executor)
    layout = layout_for(cfg)
    summaries = runner(cfg)
    # DPO = WRPO at alpha 0, on the same quadruples and stored reference log-probs: one more stage.
    summaries[DPO_BASELINE] = run_pipeline_stage(cfg, layout, dpo_baseline_stage(cfg, layout))[1]
    models = {
        "Target": world.target,
        "Target-SFT": layout.model(TARGET_SFT),
        "Target-SFT-DPO": layout.model(DPO_BASELINE),
        "Target-SFT-WRPO": layout.model(FUSED),
    }
    return models, summaries


def run_demo(
    out: str = "runs/demo",
    *,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    executor: str = "inline",
    runner: Runner = run_pipeline,
) -> dict:
    """Runs the toy fusion end to end and writes the report; returns where it is and the overall numbers.

    `runner` runs the pipeline (the Prefect flow passes itself, see flows/demo.py); `executor`
    'ray' samples and scores on local Ray actors.
    """
    started = time.perf_counter()
    out_path = Path(out)
    settings = demo_settings(quick)
    world_config = settings["world"]
    world = build_world(world_config, Path(cache_dir) if cache_dir else DEFAULT_CACHE)
    train, held_out = toy_prompts(
        world_config, settings["train_prompts"], settings["eval_prompts"], seed=world_config.seed + 1000
    )
    models, summaries = run_toy_fusion(
        out_path, world, train, settings, held_out=held_out, executor=executor, runner=runner
    )
    prompts, skills = [r["prompt"] for r in held_out], [r["skill"] for r in held_out]
    scorer = ToyVerifierScorer()
    results = {
        name: evaluate_model(path, prompts, skills, scorer, max_new_tokens=settings["max_new_tokens"])[0]
        for name, path in models.items()
    }
    report = {
        "held_out_prompts": len(held_out),
        "skills": sorted({r["skill"] for r in held_out}),
        "sources": dict(world.sources),
        "results": results,
        "stages": summaries,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_path / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_path / "report.md").write_text(render_report(report))
    print(render_report(report))
    overall = {name: r["all"] for name, r in results.items()}
    return {"report": str(out_path / "report.md"), "seconds": report["seconds"], "all": overall}


def render_report(report: dict) -> str:
    """The markdown table: one row per model, accuracy (mean reward) per skill and overall."""
    columns = [*report["skills"], "all"]
    lines = [
        "# Toy fusion report",
        "",
        f"Held-out prompts: {report['held_out_prompts']}. Cell: exact accuracy (mean verifier reward).",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, by_skill in report["results"].items():
        cells = [f"{by_skill[c]['accuracy']:.1%} ({by_skill[c]['mean_reward']:.3f})" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| source | samples | completion tokens | mean reward | share of y_ws |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["stages"].get("select-source", {}).get("per_model", []):
        lines.append(f"| {row['model']} | {row['samples']} | {row['completion_tokens']} | "
                     f"{row['mean_reward']:.3f} | {row['ws_share']:.1%} |")  # fmt: skip
    lines += ["", f"Run time: {report['seconds']} s.", ""]
    return "\n".join(lines)
