"""What a run publishes: each trained model's lineage card, the held-out evaluation, the registry record.

finish_model(cfg, layout, "target-sft", metrics, training)   # card, then the model is stored
evaluate(cfg, layout)    # greedy answers of target, Target-SFT and the fused model, judged
register(cfg, layout)    # the fused model's record in <storage>/registry/fused/
"""

from __future__ import annotations

from typing import Any

import yaml

from wrpo_core.config import FusionConfig
from wrpo_core.evaluation import alpaca_eval_records, compare_models, greedy_answers
from wrpo_core.pipeline.roles import DPO_BASELINE, FUSED, TARGET_SFT
from wrpo_core.pipeline.runner import config_hash, redacted_config
from wrpo_core.prompts import read_prompts
from wrpo_core.registry import fused_record_key, open_registry, record_fused_model
from wrpo_core.rewards import load_scorer
from wrpo_core.storage import ManifestError, RunLayout, code_version
from wrpo_core.train.metrics import final_metrics


def _dataset_rows(layout: RunLayout, key: str) -> int | None:
    try:
        return layout.entry(key)[1]["rows"]
    except ManifestError:
        return None


def model_card(
    cfg: FusionConfig, layout: RunLayout, name: str, metrics: dict[str, Any], *, training: dict[str, Any]
) -> str:
    """The lineage card (README.md) of a model a run trained: sources, reward model, data, config, metrics.

    No credential appears, access key ids included: the config's are masked (storage options,
    launch env, URL passwords; see wrpo_core.config.credentials), then the whole text is redacted.
    """
    titles = {TARGET_SFT: "Target-SFT", FUSED: "Target-SFT-WRPO", DPO_BASELINE: "Target-SFT-DPO"}
    version = code_version()
    git = (
        f", git {version['git_sha'][:12]}{' (modified)' if version['git_dirty'] else ''}"
        if version["git_sha"]
        else ""
    )
    models = [("source", s) for s in cfg.sources] + [("target", cfg.target)]
    data = [("prompts", layout.prompts), ("prompts for SFT", layout.split("sft")),
            ("prompts for preference optimization", layout.split("preference"))]  # fmt: skip
    data += [(f"samples of {s.name}", layout.samples(s.name)) for s in cfg.sources]
    data += [(f"scores of {s.name}", layout.scores(s.name)) for s in cfg.sources]
    data += [("y_ws selections", layout.best_source), ("SFT pairs (x, y_ws)", layout.sft_pairs),
             (f"samples of {TARGET_SFT}", layout.samples(TARGET_SFT)), ("quadruples (x, y_ws, y_wt, y_l)", layout.quadruples)]  # fmt: skip
    config = redacted_config(cfg)
    config.update(training)
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {cfg.target.path}",
        "tags: [wrpo, implicit-model-fusion]",
        "---",
        "",
        f"# {titles.get(name, name)} of run `{cfg.run_name}`",
        "",
        f"Trained by wrpo-fusion {version['version']}{git}: implicit model fusion with WRPO "
        "(Weighted-Reward Preference Optimization, arXiv 2412.03187).",
        f"Run folder: `{layout.storage.display()}`. Config hash: `{config_hash(cfg)}`.",
        "",
        "## Models",
        "",
        "| role | name | path | revision |",
        "|---|---|---|---|",
        *[f"| {role} | {m.name} | `{m.path}` | {m.revision or '-'} |" for role, m in models],
        f"| reward model | {cfg.reward_model.kind} | `{cfg.reward_model.path}` | - |",
        "",
        "## Data",
        "",
        "| dataset | rows |",
        "|---|---|",
        *[f"| {label} | {rows} |" for label, key in data if (rows := _dataset_rows(layout, key)) is not None],
        "",
        "## Training metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[
            f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in sorted(metrics.items())
        ],
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return layout.storage.redact("\n".join(lines))


def finish_model(
    cfg: FusionConfig, layout: RunLayout, name: str, metrics: dict, training: dict[str, Any]
) -> dict:
    """Writes the model's card, records (and, for remote storage, uploads) its folder; the summary.

    The card's metrics are the last logged value of each metric in the job's metrics file,
    overridden by the job's final train metrics.
    """
    folder = layout.model_dir(name)
    card = model_card(cfg, layout, name, {**final_metrics(folder), **metrics}, training=training)
    (folder / "README.md").write_text(card, encoding="utf-8")
    layout.save_model(name)
    return {"model": layout.storage.display(layout.model_key(name)), **metrics}


def evaluate(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Held-out evaluation: greedy answers of the target, Target-SFT and the fused model, judged.

    The judge (the run's reward model unless `evaluation.judge`) scores each answer; the fused
    model's win rate against the target and Target-SFT counts ties as half. With the toy
    verifier as judge, exact accuracy is reported too. Each model's answers are exported in
    AlpacaEval's model-outputs format under `evaluation/alpaca_eval/<model>.json`.
    """
    settings = cfg.evaluation
    if settings.prompts is None:
        raise ValueError("evaluation.prompts is not set: there are no held-out prompts to evaluate on")
    table, _ = read_prompts(settings.prompts)
    prompts = table["prompt"].to_pylist()
    models = {
        "target": cfg.target.path,
        TARGET_SFT: layout.model(TARGET_SFT),
        FUSED: layout.model(FUSED),
    }
    generated = {
        name: greedy_answers(
            path,
            prompts,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            revision=cfg.target.revision if name == "target" else None,
        )
        for name, path in models.items()
    }
    answers = {name: g.answers for name, g in generated.items()}
    skipped = len(next(iter(generated.values())).skipped)
    judge = settings.judge or cfg.reward_model
    exact = ["all"] * len(prompts) if judge.kind == "toy_verifier" else None
    result = compare_models(
        answers, prompts, load_scorer(judge, progress=False), candidate=FUSED, baselines=["target", TARGET_SFT],
        skills=exact,
    )  # fmt: skip
    exports = {}
    for name, outputs in answers.items():
        key = f"evaluation/alpaca_eval/{name}.json"
        generator = f"{cfg.run_name}/{name}"
        layout.storage.write_json(key, alpaca_eval_records(prompts, outputs, generator))
        exports[name] = layout.storage.display(key)
    for row in result["models"].values():
        row.pop("rewards", None)  # per-prompt rewards: in the exports' order; keep the manifest small
    return {**result, "prompts": len(prompts), "prompts_skipped_empty": skipped, "judge": judge.path,
            "alpaca_eval": exports}  # fmt: skip


def register(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Records the fused model (where it is, its sources, its evaluation) in the storage's model log."""
    model = layout.note_input(layout.model_key(FUSED))  # a retrained fused model is registered again
    evaluation = layout.read_manifest("evaluate")
    record = {
        "run": layout.storage.display(),
        "run_name": cfg.run_name,
        "model": layout.storage.display(layout.model_key(FUSED)),
        "model_files": len(model.get("files", [])),
        "config_hash": config_hash(cfg),
        "sources": [{"name": s.name, "path": s.path, "revision": s.revision} for s in cfg.sources],
        "target": cfg.target.path,
        "evaluation": None if evaluation is None else {
            k: v for k, v in evaluation["summary"].items() if k in ("win_rates", "models", "prompts", "judge")
        },
    }  # fmt: skip
    storage = open_registry(
        cfg.storage.url, cfg.storage.storage_options, load_block=layout.storage.load_block
    )
    entry = record_fused_model(storage, record)
    return {**entry, "registry": storage.display(fused_record_key(record["run"]))}
