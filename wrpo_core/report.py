"""The run report's pieces as plain data: summary markdown, per-source and evaluation tables, curves.

The Prefect flow publishes them as artifacts (tasks/report.py); anything else can print them.
`results` maps a stage name to {"outcome": ran|skipped|reused, "summary": {...}}.
"""

from __future__ import annotations

from typing import Any

from wrpo_core.config import FusionConfig
from wrpo_core.pipeline.roles import FUSED, TARGET_SFT
from wrpo_core.storage import RunLayout
from wrpo_core.train.metrics import METRICS_FILE, parse_metrics_line


def _short(summary: dict[str, Any], limit: int = 110) -> str:
    shown = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary_markdown(cfg: FusionConfig, layout: RunLayout, results: dict[str, dict[str, Any]]) -> str:
    """The run at a glance: where everything is stored, and what each stage did."""
    storage = layout.storage
    fused = results.get("register", {}).get("summary", {})
    lines = [
        f"# WRPO fusion `{cfg.run_name}`",
        "",
        f"- Run folder: `{storage.display()}`",
        f"- Fused model: `{fused.get('model', storage.display(layout.model_key(FUSED)))}`",
        f"- Target-SFT: `{storage.display(layout.model_key(TARGET_SFT))}`",
        f"- Quadruples: `{storage.display(layout.quadruples)}`",
        f"- Sources: {', '.join(f'`{s.name}` ({s.path})' for s in cfg.sources)}",
        f"- Target: `{cfg.target.path}`; reward model: `{cfg.reward_model.path}`",
        f"- WRPO: alpha {cfg.wrpo.alpha} ({cfg.wrpo.alpha_schedule}), beta {cfg.wrpo.beta}, "
        f"{cfg.wrpo.loss_type} loss",
    ]
    exports = results.get("evaluate", {}).get("summary", {}).get("alpaca_eval", {})
    if exports:
        lines.append("- AlpacaEval inputs: " + ", ".join(f"{m}: `{uri}`" for m, uri in exports.items()))
    lines += ["", "| stage | outcome | summary |", "|---|---|---|"]
    for name, result in results.items():
        lines.append(f"| {name} | {result['outcome']} | {_short(result['summary'])} |")
    return storage.redact("\n".join(lines) + "\n")


def source_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per source model: samples, completion tokens, mean reward, share of y_ws supplied."""
    rows = results.get("select-source", {}).get("summary", {}).get("per_model", [])
    return [
        {
            "source": row["model"],
            "samples": row["samples"],
            "completion_tokens": row["completion_tokens"],
            "mean_reward": round(row["mean_reward"], 4),
            "ws_share": round(row["ws_share"], 4),
        }
        for row in rows
    ]


def evaluation_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluated model: mean judge reward, exact accuracy if known, the fused model's win rate."""
    summary = results.get("evaluate", {}).get("summary")
    if not summary:
        return []
    rows = []
    for model, scores in summary["models"].items():
        rate = summary["win_rates"].get(model)
        rows.append(
            {
                "model": model,
                "mean_reward": round(scores["mean_reward"], 4),
                "exact_accuracy": round(scores["accuracy"], 4) if "accuracy" in scores else None,
                "fused_win_rate_vs_this": None if rate is None else round(rate["win_rate"], 4),
                "win_rate_95ci": None if rate is None else f"[{rate['ci_low']:.3f}, {rate['ci_high']:.3f}]",
            }
        )
    return rows


def training_rows(layout: RunLayout, name: str = FUSED) -> list[dict[str, Any]]:
    """The per-step metrics rows a trained model's job logged (its metrics.jsonl), [] if none.

    Reads that one file from storage (not the whole model).
    """
    data = layout.storage.read_bytes_if_exists(f"{layout.model_key(name)}/{METRICS_FILE}")
    if data is None:
        return []
    rows = (parse_metrics_line(line) for line in data.decode().splitlines())
    return [row for row in rows if row is not None]
