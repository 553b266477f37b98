"""The fusion pipeline's stages as plain functions over a run's storage, and a sequential runner.

Each stage reads its inputs through the run layout (only files that finished stages' manifests
list), writes its outputs under deterministic keys, and `run_stage` writes its manifest
`manifests/<name>.json` LAST, so a stage counts as done only once all of its outputs are complete.
`run_pipeline` probes the storage first, then skips stages that are done and whose inputs have not
changed, so a rerun resumes at the first unfinished one. Storage is a local folder or any fsspec
URL (s3://...), see wrpo_core.storage; models train in a local folder and are uploaded after their
stage, with a model card (README.md) recording their lineage. Orchestrators call the same functions.

    ingest -> split -> sample sources -> score -> select y_ws -> SFT -> sample Target-SFT
    -> score -> select y_wt / y_l -> (reference log-probs inside) WRPO -> done
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
import yaml

from wrpo_core.config import FusionConfig, ModelSpec, SFTJobConfig, WRPOConfig, WRPOJobConfig
from wrpo_core.prompts import load_prompts, split_prompts
from wrpo_core.rewards import load_scorer, score_samples
from wrpo_core.sampling import load_sampler
from wrpo_core.schemas import BEST_SOURCE, PROMPTS, QUADRUPLES, SAMPLES, SCORES
from wrpo_core.selection import select_best_source, select_target_pairs
from wrpo_core.storage import (
    DEFAULT_ROWS_PER_FILE,
    ManifestError,
    RunLayout,
    code_version,
    digest,
    redact_options,
    safe_name,
)
from wrpo_core.train.common import METRICS_FILE
from wrpo_core.train.sft import train_sft
from wrpo_core.train.wrpo import train_wrpo

__all__ = ["TARGET_SFT", "RunLayout", "layout_for", "run_pipeline", "run_stage"]

logger = logging.getLogger(__name__)

TARGET_SFT = "target-sft"


def layout_for(
    cfg: FusionConfig,
    root: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    max_rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> RunLayout:
    """The run's layout: `root`, or `<storage.url>/<run_name>`, opened with the storage options."""
    url = root or f"{cfg.storage.url.rstrip('/')}/{safe_name(cfg.run_name, 'run_name')}"
    return RunLayout(
        url, cfg.storage.storage_options, cache_dir=cache_dir, max_rows_per_file=max_rows_per_file
    )


def config_hash(cfg: FusionConfig) -> str:
    """Short hash of what a run's results depend on: the config without run name, storage, compute."""
    return digest(cfg.model_dump(mode="json", exclude={"run_name", "storage", "compute"}))


def redacted_config(cfg: FusionConfig) -> dict[str, Any]:
    """The config as a plain dict with every secret storage option replaced by '***'."""
    data = cfg.model_dump(mode="json")
    data["storage"]["storage_options"] = redact_options(data["storage"]["storage_options"])
    return data


def is_done(layout: RunLayout, stage: str) -> bool:
    """Whether the stage's manifest exists (it is written last, so only for a complete stage)."""
    return layout.is_done(stage)


def mark_done(layout: RunLayout, stage: str, summary: dict, *, cfg: FusionConfig | None = None) -> dict:
    """Writes the stage's manifest (what it wrote and read, and `summary`); returns the summary as stored."""
    manifest = layout.commit(stage, summary, config_hash=config_hash(cfg) if cfg is not None else None)
    return manifest["summary"]


def load_summary(layout: RunLayout, stage: str) -> dict:
    """The summary a completed stage recorded in its manifest."""
    manifest = layout.read_manifest(stage)
    if manifest is None:
        raise ManifestError(f"stage {stage} of {layout.storage.display()} has not completed")
    return manifest["summary"]


def run_stage(
    layout: RunLayout, name: str, run: Callable[[], dict], *, cfg: FusionConfig | None = None
) -> dict:
    """Runs one stage unless it is done with unchanged inputs; its manifest is written last.

    A stage that ran before but whose inputs changed since (an upstream stage was redone with
    other results) runs again. Returns the stage's summary.
    """
    manifest = layout.read_manifest(name)
    if manifest is not None:
        changed = layout.changed_inputs(manifest)
        if not changed:
            if cfg is not None and manifest.get("config_hash") not in (None, config_hash(cfg)):
                logger.warning(
                    "stage %s: done with another configuration (hash %s, now %s); remove %s to redo it",
                    name, manifest.get("config_hash"), config_hash(cfg), layout.manifest_key(name),
                )  # fmt: skip
            logger.info("stage %s: done before, skipped", name)
            return manifest["summary"]
        logger.info("stage %s: inputs changed since it ran (%s); running it again", name, ", ".join(changed))
    logger.info("stage %s: running", name)
    layout.begin(name)
    return mark_done(layout, name, run(), cfg=cfg)


def _device(cfg: FusionConfig) -> str:
    if cfg.compute.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.compute.device


def _prompt_text(layout: RunLayout) -> dict[str, str]:
    table = layout.read_dataset(layout.prompts, PROMPTS)
    return dict(zip(table["prompt_id"].to_pylist(), table["prompt"].to_pylist(), strict=True))


# --- stages --------------------------------------------------------------------------------------


def ingest(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Reads the prompt source, collapses duplicates, stores PROMPTS."""
    table, report = load_prompts(
        cfg.prompts.path, prompt_field=cfg.prompts.prompt_field, split=cfg.prompts.split
    )
    if cfg.prompts.limit is not None:
        table = table.slice(0, cfg.prompts.limit)
    layout.write_dataset(layout.prompts, table, PROMPTS)
    return {"prompts": table.num_rows, "rows_read": report.rows_read, "duplicates": report.duplicates}


def split(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Splits prompts by seed: a fraction for SFT, the rest for preference optimization."""
    sft_prompts, pref = split_prompts(
        layout.read_dataset(layout.prompts, PROMPTS), sft_fraction=cfg.split.sft_fraction, seed=cfg.split.seed
    )
    layout.write_dataset(layout.split("sft"), sft_prompts, PROMPTS)
    layout.write_dataset(layout.split("preference"), pref, PROMPTS)
    return {"sft": sft_prompts.num_rows, "preference": pref.num_rows}


def sample(
    spec: ModelSpec,
    layout: RunLayout,
    prompts_key: str,
    out_key: str | None = None,
    *,
    device: str = "cpu",
    batch_size: int = 32,
) -> dict:
    """Samples `spec.sampling.n` responses per prompt from one model (its HF or vLLM backend) into SAMPLES.

    Reads the prompts dataset `prompts_key`; writes `out_key` (default `samples/<spec.name>`).
    """
    prompts = layout.read_dataset(prompts_key, PROMPTS)
    sampler = load_sampler(spec, device=device, batch_size=batch_size)
    table, report = sampler.sample(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist())
    layout.write_dataset(out_key or layout.samples(spec.name), table, SAMPLES)
    return {
        "model": spec.name,
        "samples": report.samples,
        "completion_tokens": report.completion_tokens,
        "samples_per_second": round(report.samples_per_second, 2),
        "finished_by_length": report.finished_by_length,
        "prompts_truncated": report.prompts_truncated,
        "prompts_skipped_empty": report.prompts_skipped_empty,
    }


def _storage_for_workers(cfg: FusionConfig, layout: RunLayout) -> tuple[str, dict]:
    # Workers open the run's storage themselves, with the config's options (credentials they
    # lack come from their own environment), so no resolved secret travels in task arguments.
    return layout.storage.url, dict(cfg.storage.storage_options)


def sample_on_ray(
    cfg: FusionConfig, spec: ModelSpec, layout: RunLayout, prompts_key: str, *, device: str
) -> dict:
    """The sample stage fanned out over Ray actors: shards written by actors, listed in the manifest."""
    from wrpo_core import fanout

    out_key = layout.samples(spec.name)
    prompts = layout.read_dataset(prompts_key, PROMPTS)
    shards, results = fanout.sample_model(
        spec, prompts, _storage_for_workers(cfg, layout), out_key, cfg.compute,
        shard_size=cfg.compute.shard_size, num_actors=cfg.compute.num_actors, device=device,
    )  # fmt: skip
    entry = layout.register_dataset(out_key, SAMPLES, [s.out_key for s in shards])
    return {
        "model": spec.name,
        "samples": sum(f["rows"] for f in entry["files"]),
        "shards": len(shards),
        "shards_run_now": len(results),
        "completion_tokens_run_now": sum(r["completion_tokens"] for r in results.values()),
    }


def score_on_ray(cfg: FusionConfig, layout: RunLayout, model: str) -> dict:
    """The score stage fanned out over Ray actors, one score shard per sample shard."""
    from wrpo_core import fanout

    _, entry = layout.entry(layout.samples(model))
    sample_shards = [fanout.Shard(i, 0, 0, f["key"]) for i, f in enumerate(entry["files"])]
    out_key = layout.scores(model)
    shards, _ = fanout.score_model(
        cfg.reward_model, layout.read_dataset(layout.prompts, PROMPTS), _storage_for_workers(cfg, layout),
        sample_shards, out_key, cfg.compute, num_actors=cfg.compute.num_actors,
    )  # fmt: skip
    layout.register_dataset(out_key, SCORES, [s.out_key for s in shards])
    scores = layout.read_dataset(out_key, SCORES)
    return {"model": model, "scored": scores.num_rows, "mean_reward": pc.mean(scores["score"]).as_py()}


def score(cfg: FusionConfig, layout: RunLayout, model: str) -> dict:
    """Scores one model's samples with the reward model into SCORES."""
    samples = layout.read_dataset(layout.samples(model), SAMPLES)
    scores = score_samples(samples, _prompt_text(layout), load_scorer(cfg.reward_model))
    layout.write_dataset(layout.scores(model), scores, SCORES)
    return {"model": model, "scored": scores.num_rows, "mean_reward": pc.mean(scores["score"]).as_py()}


def _concat(layout: RunLayout, keys: list[str], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([layout.read_dataset(key, schema) for key in keys])


def select_source(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Picks y_ws (best source response over all sources) for every prompt."""
    names = [s.name for s in cfg.sources]
    samples = _concat(layout, [layout.samples(n) for n in names], SAMPLES)
    scores = _concat(layout, [layout.scores(n) for n in names], SCORES)
    best, report = select_best_source(samples, scores, layout.read_dataset(layout.prompts, PROMPTS))
    layout.write_dataset(layout.best_source, best, BEST_SOURCE)
    return {**report.as_dict(), "per_model": per_model_statistics(samples, scores, report.ws_share)}


def per_model_statistics(samples: pa.Table, scores: pa.Table, ws_share: dict[str, float]) -> list[dict]:
    """One row per source model: samples, completion tokens, mean reward, share of y_ws supplied."""
    counts = samples.group_by("model").aggregate(
        [("completion_tokens", "sum"), ("completion_tokens", "count")]
    )
    rewards = dict(
        zip(*scores.group_by("model").aggregate([("score", "mean")]).to_pydict().values(), strict=True)
    )
    rows = []
    for model, tokens, n in zip(
        counts["model"].to_pylist(), counts["completion_tokens_sum"].to_pylist(),
        counts["completion_tokens_count"].to_pylist(), strict=True,
    ):  # fmt: skip
        rows.append({"model": model, "samples": n, "completion_tokens": tokens,
                     "mean_reward": rewards.get(model), "ws_share": ws_share.get(model, 0.0)})  # fmt: skip
    return sorted(rows, key=lambda row: row["model"])


def _rows_of(layout: RunLayout, table: pa.Table, split_name: str) -> pa.Table:
    ids = layout.read_dataset(layout.split(split_name), PROMPTS)["prompt_id"]
    return table.filter(pc.is_in(table["prompt_id"], value_set=ids))


def _final_metrics(folder: Path, metrics: dict) -> dict[str, Any]:
    """The train metrics plus the last logged value of every metric in the job's metrics.jsonl."""
    logged: dict[str, Any] = {}
    path = folder / METRICS_FILE
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                logged.update(json.loads(line))
    logged.pop("time", None)  # when the line was logged, not a metric
    return {**logged, **metrics}


def _dataset_rows(layout: RunLayout, key: str) -> int | None:
    try:
        return layout.entry(key)[1]["rows"]
    except ManifestError:
        return None


def model_card(
    cfg: FusionConfig, layout: RunLayout, name: str, metrics: dict[str, Any], *, training: dict[str, Any]
) -> str:
    """The lineage card (README.md) of a model a run trained: sources, reward model, data, config, metrics.

    Secrets never appear: storage options are redacted, then the whole text is.
    """
    titles = {TARGET_SFT: "Target-SFT", "wrpo": "Target-SFT-WRPO"}
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


def _finish_model(
    cfg: FusionConfig, layout: RunLayout, name: str, metrics: dict, training: dict[str, Any]
) -> dict:
    """Writes the model's card, records (and, for remote storage, uploads) its folder; the summary."""
    folder = layout.model_dir(name)
    card = model_card(cfg, layout, name, _final_metrics(folder, metrics), training=training)
    (folder / "README.md").write_text(card, encoding="utf-8")
    layout.save_model(name)
    return {"model": layout.storage.display(layout.model_key(name)), **metrics}


def sft(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Target-SFT on (x, y_ws) of the SFT prompts; the model goes to `models/target-sft`."""
    pairs = _rows_of(layout, layout.read_dataset(layout.best_source, BEST_SOURCE), "sft")
    layout.write_dataset(layout.sft_pairs, pairs, BEST_SOURCE)
    job = SFTJobConfig(
        model=cfg.target.path, data=layout.local_table_file(layout.sft_pairs, BEST_SOURCE),
        output_dir=str(layout.model_dir(TARGET_SFT)), trust_remote_code=cfg.target.trust_remote_code,
        training=cfg.sft,
    )  # fmt: skip
    metrics = train_sft(job)
    return _finish_model(cfg, layout, TARGET_SFT, metrics, {"sft": job.training.model_dump(mode="json")})


def target_sft_spec(cfg: FusionConfig, layout: RunLayout) -> ModelSpec:
    """Target-SFT as a model to sample from (a local folder), with the target's sampling settings."""
    return cfg.target.model_copy(update={"path": layout.model(TARGET_SFT), "name": TARGET_SFT})


def select_target(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Picks y_wt / y_l from Target-SFT's samples of the preference prompts into QUADRUPLES."""
    best = _rows_of(layout, layout.read_dataset(layout.best_source, BEST_SOURCE), "preference")
    quadruples, report = select_target_pairs(
        best,
        layout.read_dataset(layout.samples(TARGET_SFT), SAMPLES),
        layout.read_dataset(layout.scores(TARGET_SFT), SCORES),
    )
    layout.write_dataset(layout.quadruples, quadruples, QUADRUPLES)
    return report.as_dict()


def wrpo(
    cfg: FusionConfig,
    layout: RunLayout,
    *,
    name: str = "wrpo",
    training: WRPOConfig | None = None,
    data: str | None = None,
) -> dict:
    """WRPO training from Target-SFT (reference log-probs computed once, inside the job).

    `data` defaults to the run's quadruples; pass quadruples that already carry reference
    log-probs (e.g. another job's stored file) to skip the reference pass. The model goes to
    `models/<name>` with its lineage card.
    """
    job = WRPOJobConfig(
        model=layout.model(TARGET_SFT), data=data or layout.local_table_file(layout.quadruples, QUADRUPLES),
        output_dir=str(layout.model_dir(name)), trust_remote_code=cfg.target.trust_remote_code,
        training=training or cfg.wrpo,
    )  # fmt: skip
    metrics = train_wrpo(job)
    return _finish_model(cfg, layout, name, metrics, {"wrpo": job.training.model_dump(mode="json")})


# --- runner --------------------------------------------------------------------------------------


def pipeline_stages(cfg: FusionConfig, layout: RunLayout) -> list[tuple[str, Callable[[], dict]]]:
    """The ordered (stage name, thunk) list of a whole fusion run."""
    device = _device(cfg)
    stages: list[tuple[str, Callable[[], dict]]] = [
        ("ingest", lambda: ingest(cfg, layout)),
        ("split", lambda: split(cfg, layout)),
    ]
    on_ray = cfg.compute.executor == "ray"

    def sample_stage(spec: ModelSpec, prompts_key: str) -> dict:
        if on_ray:
            return sample_on_ray(cfg, spec, layout, prompts_key, device=device)
        return sample(spec, layout, prompts_key, device=device)

    def score_stage(model: str) -> dict:
        return score_on_ray(cfg, layout, model) if on_ray else score(cfg, layout, model)

    for spec in cfg.sources:
        stages.append((f"sample-{spec.name}", lambda s=spec: sample_stage(s, layout.prompts)))
        stages.append((f"score-{spec.name}", lambda s=spec: score_stage(s.name)))
    stages += [
        ("select-source", lambda: select_source(cfg, layout)),
        ("sft", lambda: sft(cfg, layout)),
        (
            f"sample-{TARGET_SFT}",
            lambda: sample_stage(target_sft_spec(cfg, layout), layout.split("preference")),
        ),
        (f"score-{TARGET_SFT}", lambda: score_stage(TARGET_SFT)),
        ("select-target", lambda: select_target(cfg, layout)),
        ("wrpo", lambda: wrpo(cfg, layout)),
    ]
    return stages


def run_pipeline(
    cfg: FusionConfig, root: str | None = None, *, layout: RunLayout | None = None
) -> dict[str, dict]:
    """Probes the storage, then runs every unfinished stage in order; returns each stage's summary.

    The run lives at `root` (a local path or URL) or `<storage.url>/<run_name>`; pass `layout`
    instead to choose the cache folder or file sizes.
    """
    layout = layout or layout_for(cfg, root)
    layout.storage.check()
    summaries = {name: run_stage(layout, name, run, cfg=cfg) for name, run in pipeline_stages(cfg, layout)}
    for row in summaries["select-source"].get("per_model", []):
        logger.info(
            "source %s: %d samples, %d tokens, mean reward %.4f, y_ws share %.1f%%", row["model"],
            row["samples"], row["completion_tokens"], row["mean_reward"], 100 * row["ws_share"],
        )  # fmt: skip
    return summaries
