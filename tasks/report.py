"""The Prefect artifacts of a fusion run: summary, per-source table, training curves, evaluation."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.blocks import load_block_options
from wrpo_core import report
from wrpo_core.config import FusionConfig
from wrpo_core.pipeline import layout_for
from wrpo_core.plots import png_data_uri, training_curves_png

SUMMARY_KEY = "wrpo-fusion-summary"
SOURCES_KEY = "wrpo-fusion-sources"
CURVES_KEY = "wrpo-fusion-training-curves"
EVALUATION_KEY = "wrpo-fusion-evaluation"


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(config: FusionConfig, results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Creates the run's artifacts (keys are stable, so the UI keeps their history across runs)."""
    layout = layout_for(config, load_block=load_block_options)
    about = f"WRPO fusion run {config.run_name}"
    created = {
        "summary": str(create_markdown_artifact(report.summary_markdown(config, layout, results), key=SUMMARY_KEY,
                                                description=about)),
        "sources": str(create_table_artifact(report.source_rows(results), key=SOURCES_KEY,
                                             description=f"{about}: samples, mean reward, share of y_ws per source")),
    }  # fmt: skip
    try:
        image = png_data_uri(training_curves_png(report.training_rows(layout)))
    except ValueError as error:  # e.g. fewer steps than logging_steps: nothing was logged to plot
        get_run_logger().warning("no training-curves artifact for %s: %s", config.run_name, error)
    else:
        markdown = f"# WRPO training of `{config.run_name}`\n\n![alpha, reward margins and loss]({image})\n"
        created["curves"] = str(create_markdown_artifact(markdown, key=CURVES_KEY, description=about))
    evaluation = report.evaluation_rows(results)
    if evaluation:
        created["evaluation"] = str(create_table_artifact(evaluation, key=EVALUATION_KEY,
                                                          description=f"{about}: held-out evaluation"))  # fmt: skip
    return created
