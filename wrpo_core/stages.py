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

import hashlib
import json
import logging
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import torch
import yaml

from wrpo_core.config import FusionConfig, ModelSpec, PromptsConfig, SFTJobConfig, WRPOConfig, WRPOJobConfig
from wrpo_core.prompts import IngestReport, load_prompts, split_prompts
from wrpo_core.rewards import load_scorer, score_samples
from wrpo_core.sampling import load_sampler
from wrpo_core.schemas import BEST_SOURCE, PROMPTS, QUADRUPLES, SAMPLES, SCORES
from wrpo_core.selection import select_best_source, select_target_pairs
from wrpo_core.storage import (
    DEFAULT_ROWS_PER_FILE,
    ManifestError,
    RunLayout,
    Storage,
    code_version,
    digest,
    redact_options,
    safe_name,
)
from wrpo_core.toy.paths import is_toy_path, resolve_path
from wrpo_core.train.common import METRICS_FILE
from wrpo_core.train.launch import LogCallback, MetricsCallback, launch_job
from wrpo_core.train.sft import train_sft
from wrpo_core.train.wrpo import train_wrpo

__all__ = ["TARGET_SFT", "RunLayout", "Stage", "StageError", "layout_for", "run_pipeline", "run_stage"]

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


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: its name, how to run it, and what its result depends on."""

    name: str
    run: Callable[[], dict]
    key: Any = None
    """The settings its result depends on besides its input data (stored digested in its manifest)."""
    after: tuple[str, ...] = ()
    """Stages that must be complete first (the flow runs the others concurrently)."""
    model: str | None = None
    """The model it samples, scores or trains, for error messages."""
    reusable: bool = False
    """A data-only stage: another run's result with the same key and inputs can be copied instead."""


Outcome = Literal["ran", "skipped", "reused"]

PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, NotImplementedError, FileNotFoundError, ManifestError,
)  # fmt: skip
"""Errors that a retry cannot fix (bad config or data, a missing model, an unfinished input)."""


class StageError(RuntimeError):
    """A failed stage, naming it and its model; the cause (with shard and file) is in the message."""

    def __init__(self, stage: str, model: str | None, error: BaseException):
        self.stage, self.model = stage, model
        self.permanent = isinstance(error, PERMANENT_ERRORS)
        where = f"stage {stage}" + (f" (model {model})" if model else "")
        kind = "permanent" if self.permanent else "possibly transient"
        super().__init__(f"{where} failed ({kind}): {type(error).__name__}: {error}")


def _stale_reason(
    layout: RunLayout, manifest: dict, key_digest: str | None, cfg: FusionConfig | None
) -> str | None:
    """Why a completed stage must run again (its settings or its inputs changed), or None.

    A manifest written before stages had settings keys counts as current when the whole
    config's hash still matches.
    """
    if key_digest is not None:
        if "stage_key" in manifest and manifest["stage_key"] is not None:
            if manifest["stage_key"] != key_digest:
                return "its settings changed"
        elif cfg is None or manifest.get("config_hash") != config_hash(cfg):
            return "it ran before settings were recorded, with another configuration"
    changed = layout.changed_inputs(manifest)
    return f"inputs changed since it ran ({', '.join(changed)})" if changed else None


def run_stage_outcome(
    layout: RunLayout,
    name: str,
    run: Callable[[], dict],
    *,
    cfg: FusionConfig | None = None,
    key: Any = None,
    model: str | None = None,
    reuse_from: Sequence[RunLayout] = (),
) -> tuple[Outcome, dict]:
    """Runs one stage unless it is done with the same settings and inputs: (outcome, summary).

    A stage that ran before but whose inputs or settings (`key`) changed since runs again. A stage
    not done here whose result another run in `reuse_from` holds (same key, same inputs) is copied
    from it ("reused"). Any failure raises StageError naming the stage and model.
    """
    key_digest = None if key is None else digest(key)
    try:
        manifest = layout.read_manifest(name)
        if manifest is not None:
            reason = _stale_reason(layout, manifest, key_digest, cfg)
            if reason is None:
                logger.info("stage %s: done before, skipped", name)
                return "skipped", manifest["summary"]
            logger.info("stage %s: %s; running it again", name, reason)
        for other in reuse_from:
            summary = reuse_stage(layout, other, name, key_digest)
            if summary is not None:
                return "reused", summary
        logger.info("stage %s: running", name)
        layout.begin(name)
        summary = run()
        manifest = layout.commit(
            name, summary, config_hash=config_hash(cfg) if cfg is not None else None, stage_key=key_digest
        )
    except StageError:
        raise
    except Exception as error:
        raise StageError(name, model, error) from error
    return "ran", manifest["summary"]


def run_stage(layout: RunLayout, name: str, run: Callable[[], dict], **options: Any) -> dict:
    """Runs one stage unless it is done with unchanged settings and inputs; returns its summary.

    See `run_stage_outcome` for the options; the manifest is written last.
    """
    return run_stage_outcome(layout, name, run, **options)[1]


def reuse_stage(layout: RunLayout, other: RunLayout, name: str, key_digest: str | None) -> dict | None:
    """Copies stage `name` from another run when it is complete there with the same key and inputs.

    The inputs are compared by their manifest entries (file keys, rows and sha256), so the copy is
    exactly what running the stage here would read. Files are copied, checked against the
    manifest's sha256 (the other run may be rewriting them), and the manifest is written last.
    Returns the stage's summary, or None when the other run has no such result.
    """
    if other.storage.root == layout.storage.root and other.storage.protocol == layout.storage.protocol:
        return None
    manifest = other.read_manifest(name)
    if (
        manifest is None
        or manifest.get("models")
        or key_digest is None
        or manifest.get("stage_key") != key_digest
    ):
        return None
    if layout.changed_inputs(manifest):
        return None
    files = [f for entry in manifest["datasets"].values() for f in entry["files"]]
    copy_files(other.storage, layout.storage, [f["key"] for f in files])
    for f in files:
        if hashlib.sha256(layout.storage.read_bytes(f["key"])).hexdigest() != f["sha256"]:
            logger.warning("stage %s: %s changed while it was copied from %s; running the stage instead",
                           name, f["key"], other.storage.display())  # fmt: skip
            return None
    manifest = {**manifest, "run": layout.storage.display(), "reused_from": other.storage.display()}
    layout.storage.write_json(layout.manifest_key(name), manifest)
    layout.index(refresh=True)
    logger.info("stage %s: reused from %s", name, other.storage.display())
    return manifest["summary"]


def copy_files(source: Storage, target: Storage, keys: list[str]) -> None:
    """Copies files between storages (server-side within one filesystem, else through this process)."""
    same_fs = source.protocol == target.protocol and source.options == target.options
    for key in keys:
        if same_fs:
            with target.guard("cannot copy to", key):
                target.fs.makedirs(posixpath.dirname(target.path(key)), exist_ok=True)
                target.fs.copy(source.path(key), target.path(key))
        else:
            target.write_bytes(key, source.read_bytes(key))


def sibling_runs(cfg: FusionConfig, layout: RunLayout) -> list[RunLayout]:
    """The other runs under the config's storage URL with stage manifests: where results may be reused."""
    base = Storage.open(cfg.storage.url, cfg.storage.storage_options)
    with base.guard("cannot list runs under"):
        found = base.fs.glob(base.path("*/manifests/*.json"))
    runs = sorted({path.rstrip("/")[len(base.root) + 1 :].split("/")[0] for path in found})
    return [
        RunLayout(base.url_of(run), cfg.storage.storage_options, cache_dir=layout.cache_dir)
        for run in runs
        if f"{base.root}/{run}" != layout.storage.root
    ]


def source_fingerprint(path: str) -> str | None:
    """Size and modification tag of a prompt file or folder (so an edited file is read again); None
    for what fsspec cannot stat (a hub dataset id: pin a revision-specific path instead)."""
    if is_toy_path(path):
        return path
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path)
        found = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    except (OSError, ValueError, ImportError):
        return None
    tags = sorted(
        (name, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""))
        for name, info in found.items()
    )
    return digest(tags)


def _device(cfg: FusionConfig) -> str:
    if cfg.compute.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.compute.device


def _prompt_text(layout: RunLayout) -> dict[str, str]:
    table = layout.read_dataset(layout.prompts, PROMPTS)
    return dict(zip(table["prompt_id"].to_pylist(), table["prompt"].to_pylist(), strict=True))


# --- stages --------------------------------------------------------------------------------------


def read_prompts(prompts: PromptsConfig) -> tuple[pa.Table, IngestReport]:
    """The prompts a config section names (a `toy-world:` path resolved), cut to its `limit`."""
    table, report = load_prompts(
        resolve_path(prompts.path), prompt_field=prompts.prompt_field, split=prompts.split
    )
    return (table if prompts.limit is None else table.slice(0, prompts.limit)), report


def ingest(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Reads the prompt source, collapses duplicates, stores PROMPTS."""
    table, report = read_prompts(cfg.prompts)
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


def _shard_tag(layout: RunLayout, settings: Any, input_keys: list[str]) -> str:
    """A digest of what a Ray stage's shards depend on, so shards of changed settings are never reused."""
    return digest([settings, *(digest(layout.entry(key)[1]) for key in input_keys)])[:10]


def sample_on_ray(
    cfg: FusionConfig, spec: ModelSpec, layout: RunLayout, prompts_key: str, *, device: str
) -> dict:
    """The sample stage fanned out over Ray actors: shards written by actors, listed in the manifest."""
    from wrpo_core import fanout

    out_key = layout.samples(spec.name)
    prompts = layout.read_dataset(prompts_key, PROMPTS)
    run_model = layout.model_key(spec.name)
    own_model = run_model in layout.index()  # a model this run trained: its files identify it, not its path
    settings = spec.model_dump(mode="json", exclude={"path"} if own_model else set())
    tag = _shard_tag(layout, settings, [prompts_key, *([run_model] if own_model else [])])
    shards, results = fanout.sample_model(
        spec, prompts, _storage_for_workers(cfg, layout), out_key, cfg.compute,
        shard_size=cfg.compute.shard_size, num_actors=cfg.compute.num_actors, device=device, tag=tag,
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

    entry = layout.note_input(layout.samples(model))  # actors read the files; the stage depends on them
    sample_shards = [fanout.Shard(i, 0, 0, f["key"]) for i, f in enumerate(entry["files"])]
    out_key = layout.scores(model)
    tag = _shard_tag(layout, cfg.reward_model.model_dump(mode="json"), [layout.samples(model)])
    shards, _ = fanout.score_model(
        cfg.reward_model, layout.read_dataset(layout.prompts, PROMPTS), _storage_for_workers(cfg, layout),
        sample_shards, out_key, cfg.compute, num_actors=cfg.compute.num_actors, tag=tag,
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


def _fetch_model(uri: str, folder: Path) -> None:
    """Copies a model a Ray job stored elsewhere (its storage path) into the stage's local folder."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    fs.get(path.rstrip("/") + "/", str(folder), recursive=True)


def _train_job(
    stage: Literal["sft", "wrpo"],
    job: SFTJobConfig | WRPOJobConfig,
    *,
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
) -> dict[str, float]:
    """Trains in this process, or as a torchrun / Ray Train job when the config has a `launch` section."""
    if job.launch is None:
        return train_sft(job) if stage == "sft" else train_wrpo(job)
    result = launch_job(stage, job, on_log=on_log, on_metrics=on_metrics)
    folder = Path(job.output_dir)
    if result.model_uri and result.model_uri != job.output_dir:  # a Ray job stored it elsewhere: this one
        _fetch_model(result.model_uri, folder)
    if result.metrics and not (folder / METRICS_FILE).exists():
        (folder / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in result.metrics))
    return {k: v for k, v in result.summary.items() if isinstance(v, int | float)}


def sft(
    cfg: FusionConfig,
    layout: RunLayout,
    *,
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
) -> dict:
    """Target-SFT on (x, y_ws) of the SFT prompts; the model goes to `models/target-sft`.

    With `cfg.launch` the training runs as a job (torchrun or Ray Train) whose log lines and
    per-step metrics reach `on_log` / `on_metrics`.
    """
    pairs = _rows_of(layout, layout.read_dataset(layout.best_source, BEST_SOURCE), "sft")
    layout.write_dataset(layout.sft_pairs, pairs, BEST_SOURCE)
    job = SFTJobConfig(
        model=resolve_path(cfg.target.path), data=layout.local_table_file(layout.sft_pairs, BEST_SOURCE),
        output_dir=str(layout.model_dir(TARGET_SFT)), trust_remote_code=cfg.target.trust_remote_code,
        training=cfg.sft, launch=cfg.launch,
    )  # fmt: skip
    metrics = _train_job("sft", job, on_log=on_log, on_metrics=on_metrics)
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
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
) -> dict:
    """WRPO training from Target-SFT (reference log-probs computed once, inside the job).

    `data` defaults to the run's quadruples; pass quadruples that already carry reference
    log-probs (e.g. another job's stored file) to skip the reference pass. The model goes to
    `models/<name>` with its lineage card. `cfg.launch`, `on_log`, `on_metrics`: see `sft`.
    """
    job = WRPOJobConfig(
        model=layout.model(TARGET_SFT), data=data or layout.local_table_file(layout.quadruples, QUADRUPLES),
        output_dir=str(layout.model_dir(name)), trust_remote_code=cfg.target.trust_remote_code,
        training=training or cfg.wrpo, launch=cfg.launch,
    )  # fmt: skip
    metrics = _train_job("wrpo", job, on_log=on_log, on_metrics=on_metrics)
    return _finish_model(cfg, layout, name, metrics, {"wrpo": job.training.model_dump(mode="json")})


# --- runner --------------------------------------------------------------------------------------


def evaluate(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Held-out evaluation: greedy answers of the target, Target-SFT and the fused model, judged.

    The judge (the run's reward model unless `evaluation.judge`) scores each answer; the fused
    model's win rate against the target and Target-SFT counts ties as half. With the toy
    verifier as judge, exact accuracy is reported too. Each model's answers are exported in
    AlpacaEval's model-outputs format under `evaluation/alpaca_eval/<model>.json`.
    """
    from wrpo_core.evaluation import alpaca_eval_records, compare_models, greedy_answers

    settings = cfg.evaluation
    if settings.prompts is None:
        raise ValueError("evaluation.prompts is not set: there are no held-out prompts to evaluate on")
    table, _ = read_prompts(settings.prompts)
    prompts = table["prompt"].to_pylist()
    models = {
        "target": resolve_path(cfg.target.path),
        TARGET_SFT: layout.model(TARGET_SFT),
        "wrpo": layout.model("wrpo"),
    }
    generated = {
        name: greedy_answers(
            path, prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size
        )
        for name, path in models.items()
    }
    answers = {name: g.answers for name, g in generated.items()}
    skipped = len(next(iter(generated.values())).skipped)
    judge = settings.judge or cfg.reward_model
    exact = ["all"] * len(prompts) if judge.kind == "toy_verifier" else None
    result = compare_models(
        answers, prompts, load_scorer(judge, progress=False), candidate="wrpo", baselines=["target", TARGET_SFT],
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
    from wrpo_core.registry import fused_record_key, open_registry, record_fused_model

    model = layout.note_input(layout.model_key("wrpo"))  # a retrained fused model is registered again
    evaluation = layout.read_manifest("evaluate")
    record = {
        "run": layout.storage.display(),
        "run_name": cfg.run_name,
        "model": layout.storage.display(layout.model_key("wrpo")),
        "model_files": len(model.get("files", [])),
        "config_hash": config_hash(cfg),
        "sources": [{"name": s.name, "path": s.path, "revision": s.revision} for s in cfg.sources],
        "target": cfg.target.path,
        "evaluation": None if evaluation is None else {
            k: v for k, v in evaluation["summary"].items() if k in ("win_rates", "models", "prompts", "judge")
        },
    }  # fmt: skip
    storage = open_registry(cfg.storage.url, cfg.storage.storage_options)
    entry = record_fused_model(storage, record)
    return {**entry, "registry": storage.display(fused_record_key(record["run"]))}


def pipeline_stages(
    cfg: FusionConfig,
    layout: RunLayout,
    *,
    on_log: LogCallback | None = None,
    on_metrics: MetricsCallback | None = None,
) -> list[Stage]:
    """The ordered stages of a whole fusion run, each with its settings key and prerequisites.

    `on_log` / `on_metrics` receive a launched training job's log lines and per-step metrics.
    """
    device = _device(cfg)
    on_ray = cfg.compute.executor == "ray"
    train_hooks = {"on_log": on_log, "on_metrics": on_metrics}

    def sample_stage(spec: ModelSpec, prompts_key: str) -> dict:
        if on_ray:
            return sample_on_ray(cfg, spec, layout, prompts_key, device=device)
        return sample(spec, layout, prompts_key, device=device)

    def score_stage(model: str) -> dict:
        return score_on_ray(cfg, layout, model) if on_ray else score(cfg, layout, model)

    reward = cfg.reward_model.model_dump(mode="json")
    target = cfg.target.model_dump(mode="json", exclude={"sampling", "name"})
    result: list[Stage] = [
        Stage(
            "ingest",
            lambda: ingest(cfg, layout),
            {"prompts": cfg.prompts.model_dump(mode="json"), "source": source_fingerprint(cfg.prompts.path)},
            reusable=True,
        ),
        Stage(
            "split", lambda: split(cfg, layout), cfg.split.model_dump(mode="json"), ("ingest",), reusable=True
        ),
    ]
    for spec in cfg.sources:
        result += [
            Stage(f"sample-{spec.name}", lambda s=spec: sample_stage(s, layout.prompts), spec.model_dump(mode="json"),
                  ("ingest",), spec.name, reusable=True),
            Stage(f"score-{spec.name}", lambda s=spec: score_stage(s.name), reward, (f"sample-{spec.name}",),
                  spec.name, reusable=True),
        ]  # fmt: skip
    tsft = TARGET_SFT
    result += [
        Stage("select-source", lambda: select_source(cfg, layout), sorted(s.name for s in cfg.sources),
              (*tuple(f"score-{s.name}" for s in cfg.sources), "split")),
        Stage("sft", lambda: sft(cfg, layout, **train_hooks), {"target": target, "sft": cfg.sft.model_dump(mode="json")},
              ("select-source",), cfg.target.name),
        Stage(f"sample-{tsft}", lambda: sample_stage(target_sft_spec(cfg, layout), layout.split("preference")),
              cfg.target.model_dump(mode="json", exclude={"path", "name"}), ("sft",), tsft),
        Stage(f"score-{tsft}", lambda: score_stage(tsft), reward, (f"sample-{tsft}",), tsft),
        Stage("select-target", lambda: select_target(cfg, layout), {}, (f"score-{tsft}",)),
        Stage("wrpo", lambda: wrpo(cfg, layout, **train_hooks), cfg.wrpo.model_dump(mode="json"),
              ("select-target",), tsft),
    ]  # fmt: skip
    last = "wrpo"
    if cfg.evaluation.prompts is not None:
        key = {"evaluation": cfg.evaluation.model_dump(mode="json"), "judge": reward, "target": target}
        result.append(Stage("evaluate", lambda: evaluate(cfg, layout), key, ("wrpo",), "wrpo"))
        last = "evaluate"
    result.append(Stage("register", lambda: register(cfg, layout), {"config": config_hash(cfg)}, (last,)))
    return result


def run_pipeline_stage(
    cfg: FusionConfig, layout: RunLayout, stage: Stage, *, reuse: bool = True
) -> tuple[Outcome, dict]:
    """Runs (or skips, or copies from another run when `reuse`) one stage of `pipeline_stages`."""
    others = sibling_runs(cfg, layout) if reuse and stage.reusable else []
    return run_stage_outcome(
        layout, stage.name, stage.run, cfg=cfg, key=stage.key, model=stage.model, reuse_from=others
    )


def run_pipeline(
    cfg: FusionConfig, root: str | None = None, *, layout: RunLayout | None = None, reuse: bool = True
) -> dict[str, dict]:
    """Probes the storage, then runs every unfinished stage in order; returns each stage's summary.

    The run lives at `root` (a local path or URL) or `<storage.url>/<run_name>`; pass `layout`
    instead to choose the cache folder or file sizes. With `reuse`, samples and scores that
    another run under the same storage URL made with the same settings and inputs are copied.
    """
    layout = layout or layout_for(cfg, root)
    layout.storage.check()
    summaries = {
        stage.name: run_pipeline_stage(cfg, layout, stage, reuse=reuse)[1]
        for stage in pipeline_stages(cfg, layout)
    }
    for row in summaries["select-source"].get("per_model", []):
        logger.info(
            "source %s: %d samples, %d tokens, mean reward %.4f, y_ws share %.1f%%", row["model"],
            row["samples"], row["completion_tokens"], row["mean_reward"], 100 * row["ws_share"],
        )  # fmt: skip
    return summaries
