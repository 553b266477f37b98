"""The pipeline's data stages: ingest, split, sample, score (inline or on Ray actors) and selection.

Each is a plain function of (config, run layout) that reads finished stages' datasets through
the layout and writes its own; the stage runner (`runner.py`) records it in a manifest.

    ingest -> split -> sample each source -> score -> select y_ws
    -> (SFT) -> sample Target-SFT -> score -> select y_wt / y_l

Sample and score stages report progress through an optional `on_progress(done, total, unit)`:
shards on Ray (those written by an earlier attempt count as done from the start), samples inline
(per batch with the HF sampler and HF reward models; start and end otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from wrpo_core import fanout
from wrpo_core.config import FusionConfig, ModelSpec
from wrpo_core.pipeline.roles import TARGET_SFT
from wrpo_core.prompts import read_prompts, split_prompts, split_size
from wrpo_core.rewards import SequenceClassifierScorer, load_scorer, score_samples
from wrpo_core.sampling import HFSampler, load_sampler
from wrpo_core.schemas import BEST_SOURCE, PROMPTS, QUADRUPLES, SAMPLES, SCORES, DataError
from wrpo_core.selection import SelectionReport, select_best_source, select_target_pairs
from wrpo_core.storage import RunLayout, digest

ProgressCallback = Callable[[int, int, str], None]
"""A stage's progress: (done, total, unit), e.g. (3, 10, "shards"); called as work finishes."""


def _in_unit(on_progress: ProgressCallback | None, unit: str) -> Callable[[int, int], None] | None:
    """`on_progress` for counts of one unit, as fanout, the HF sampler and the HF scorer report them."""
    if on_progress is None:
        return None
    return lambda done, total: on_progress(done, total, unit)


def _prompt_text(layout: RunLayout) -> dict[str, str]:
    table = layout.read_dataset(layout.prompts, PROMPTS)
    return dict(zip(table["prompt_id"].to_pylist(), table["prompt"].to_pylist(), strict=True))


def rows_of_split(layout: RunLayout, table: pa.Table, split_name: str) -> pa.Table:
    """The rows of `table` whose prompt is in the split `split_name` ('sft' or 'preference')."""
    ids = layout.read_dataset(layout.split(split_name), PROMPTS)["prompt_id"]
    return table.filter(pc.is_in(table["prompt_id"], value_set=ids))


def ingest(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Reads the prompt source, collapses duplicates, stores PROMPTS.

    Refuses (before anything is stored) a source whose prompts cannot fill both parts of the split:
    SFT and preference optimization each need at least one prompt.
    """
    table, report = read_prompts(cfg.prompts)
    n_sft = split_size(table.num_rows, cfg.split.sft_fraction)
    if n_sft == 0 or n_sft == table.num_rows:
        empty = "SFT" if n_sft == 0 else "preference"
        raise DataError(
            f"{cfg.prompts.path}: {table.num_rows} prompt(s) after removing {report.duplicates} duplicate(s)"
            + (f" and cutting to prompts.limit {cfg.prompts.limit}" if cfg.prompts.limit is not None else "")
            + f": split.sft_fraction {cfg.split.sft_fraction} leaves the {empty} part empty; "
            "add prompts or change split.sft_fraction"
        )
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
    on_progress: ProgressCallback | None = None,
) -> dict:
    """Samples `spec.sampling.n` responses per prompt from one model (its HF or vLLM backend) into SAMPLES.

    Reads the prompts dataset `prompts_key`; writes `out_key` (default `samples/<spec.name>`).
    `on_progress` counts samples: per batch with the HF backend, at start and end with vLLM.
    """
    prompts = layout.read_dataset(prompts_key, PROMPTS)
    sampler = load_sampler(spec, device=device, batch_size=batch_size)
    progress = _in_unit(on_progress, "samples")
    if progress is not None and isinstance(sampler, HFSampler):
        sampler.on_progress = progress
    elif progress is not None:  # vLLM samples every prompt in one call
        progress(0, prompts.num_rows * spec.sampling.n)
    table, report = sampler.sample(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist())
    if progress is not None:
        progress(table.num_rows, table.num_rows)
    layout.write_dataset(out_key or layout.samples(spec.name), table, SAMPLES)
    return {
        "model": spec.name,
        "samples": report.samples,
        "completion_tokens": report.completion_tokens,
        "samples_per_second": round(report.samples_per_second, 2),
        "finished_by_length": report.finished_by_length,
        "prompts_truncated": report.prompts_truncated,
        "prompts_skipped_empty": report.prompts_skipped_empty,
        "max_prompt_tokens": report.max_prompt_tokens,
    }


def _shard_tag(layout: RunLayout, settings: Any, input_keys: list[str]) -> str:
    """A digest of what a Ray stage's shards depend on, so shards of changed settings are never reused."""
    return digest([settings, *(digest(layout.entry(key)[1]) for key in input_keys)])[:10]


def _shard_files(shards: list[fanout.Shard], results: dict[int, dict]) -> list[str | dict]:
    """Each shard's manifest entry as its actor returned it; the key alone for a shard written earlier."""
    return [results[s.index]["file"] if s.index in results else s.out_key for s in shards]


def sample_on_ray(
    cfg: FusionConfig,
    spec: ModelSpec,
    layout: RunLayout,
    prompts_key: str,
    *,
    device: str,
    on_progress: ProgressCallback | None = None,
) -> dict:
    """The sample stage fanned out over Ray actors: shards written by actors, listed in the manifest.

    `on_progress` counts shards, those already written by an earlier attempt done from the start.
    """
    out_key = layout.samples(spec.name)
    prompts = layout.read_dataset(prompts_key, PROMPTS)
    run_model = layout.model_key(spec.name)
    own_model = run_model in layout.index()  # a model this run trained: its files identify it, not its path
    settings = spec.model_dump(mode="json", exclude={"path"} if own_model else set())
    tag = _shard_tag(layout, settings, [prompts_key, *([run_model] if own_model else [])])
    shards, results = fanout.sample_model(
        spec, prompts, layout.storage.access(), out_key, cfg.compute,
        shard_size=cfg.compute.shard_size, num_actors=cfg.compute.num_actors, device=device, tag=tag,
        on_progress=_in_unit(on_progress, "shards"),
    )  # fmt: skip
    entry = layout.register_dataset(out_key, SAMPLES, _shard_files(shards, results))
    return {
        "model": spec.name,
        "samples": entry["rows"],
        "shards": len(shards),
        "shards_run_now": len(results),
        "completion_tokens_run_now": sum(r["completion_tokens"] for r in results.values()),
        # Counted by the shards run now (a shard written by an earlier, interrupted attempt is not).
        "prompts_truncated": sum(r.get("prompts_truncated", 0) for r in results.values()),
        "prompts_skipped_empty": sum(r.get("prompts_skipped_empty", 0) for r in results.values()),
    }


def score_on_ray(
    cfg: FusionConfig, layout: RunLayout, model: str, *, on_progress: ProgressCallback | None = None
) -> dict:
    """The score stage on the run's reward-model pool, one score shard per sample shard (`on_progress`: shards).

    The mean reward comes from the actors' sums; only shards an earlier attempt wrote are read back.
    """
    entry = layout.note_input(layout.samples(model))  # actors read the files; the stage depends on them
    sample_shards = [fanout.Shard(i, 0, 0, f["key"]) for i, f in enumerate(entry["files"])]
    out_key = layout.scores(model)
    tag = _shard_tag(layout, cfg.reward_model.model_dump(mode="json"), [layout.samples(model)])
    shards, results = fanout.score_model(
        cfg.reward_model, layout.read_dataset(layout.prompts, PROMPTS), layout.storage.access(),
        sample_shards, out_key, cfg.compute, tag=tag, on_progress=_in_unit(on_progress, "shards"),
    )  # fmt: skip
    scored = layout.register_dataset(out_key, SCORES, _shard_files(shards, results))["rows"]
    total = sum(r["score_sum"] for r in results.values())
    for shard in shards:
        if shard.index not in results:  # written by an earlier attempt of this stage: its sum is read back
            total += pc.sum(layout.storage.read_table(shard.out_key, SCORES)["score"]).as_py() or 0.0
    return {"model": model, "scored": scored, "mean_reward": total / scored if scored else None,
            "actors": sorted({r["actor"] for r in results.values() if r.get("actor")})}  # fmt: skip


def score(
    cfg: FusionConfig, layout: RunLayout, model: str, *, on_progress: ProgressCallback | None = None
) -> dict:
    """Scores one model's samples with the reward model into SCORES.

    `on_progress` counts samples: per batch with an HF reward model, at start and end otherwise.
    """
    samples = layout.read_dataset(layout.samples(model), SAMPLES)
    scorer = load_scorer(cfg.reward_model)
    progress = _in_unit(on_progress, "samples")
    if progress is not None and isinstance(scorer, SequenceClassifierScorer):
        scorer.on_progress = progress
    elif progress is not None:
        progress(0, samples.num_rows)
    scores = score_samples(samples, _prompt_text(layout), scorer)
    if progress is not None:
        progress(scores.num_rows, scores.num_rows)
    layout.write_dataset(layout.scores(model), scores, SCORES)
    return {"model": model, "scored": scores.num_rows, "mean_reward": pc.mean(scores["score"]).as_py()}


def _concat(layout: RunLayout, keys: list[str], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([layout.read_dataset(key, schema) for key in keys])


def _check_selected(report: SelectionReport, stage: str, models: str) -> None:
    """A selection that kept no prompt because every candidate was length-stopped fails, saying so."""
    if report.rows_out == 0 and report.dropped_length_stopped:
        raise DataError(
            f"{stage}: no prompt left: {report.dropped_length_stopped} of {report.prompts_in} prompt(s) lost "
            f"every candidate because {report.samples_length_stopped_dropped} sample(s) of {models} were cut "
            "at sampling.max_new_tokens (finish_reason 'length'); raise sampling.max_new_tokens or set "
            "sampling.drop_length_stopped: false"
        )


def select_source(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Picks y_ws (best source response over all sources) for every prompt.

    Length-stopped samples of the sources with `sampling.drop_length_stopped` cannot be y_ws.
    """
    names = [s.name for s in cfg.sources]
    dropping = {s.name for s in cfg.sources if s.sampling.drop_length_stopped}
    samples = _concat(layout, [layout.samples(n) for n in names], SAMPLES)
    scores = _concat(layout, [layout.scores(n) for n in names], SCORES)
    best, report = select_best_source(
        samples, scores, layout.read_dataset(layout.prompts, PROMPTS), drop_length_stopped=dropping
    )
    _check_selected(report, "select-source", "the sources")
    layout.write_dataset(layout.best_source, best, BEST_SOURCE)
    per_model = per_model_statistics(
        samples,
        scores,
        report.ws_share,
        drop_length_stopped=dropping,
        sampling=_sampling_summaries(layout, names),
    )
    return {**report.as_dict(), "per_model": per_model}


def _sampling_summaries(layout: RunLayout, models: list[str]) -> dict[str, dict]:
    """Each model's sample-stage summary (what its sampler counted, e.g. prompts_truncated), by model."""
    found = {}
    for model in models:
        manifest = layout.read_manifest(f"sample-{model}")
        if manifest is None:
            raise DataError(f"select-source: stage sample-{model} has no manifest; it must complete first")
        found[model] = manifest.get("summary", {})
    return found


def per_model_statistics(
    samples: pa.Table,
    scores: pa.Table,
    ws_share: dict[str, float],
    *,
    drop_length_stopped: Collection[str] = (),
    sampling: dict[str, dict] | None = None,
) -> list[dict]:
    """One row per source model: samples, completion tokens, mean reward, share of y_ws supplied, and
    `length_stopped` (samples cut by max_new_tokens) with `length_stopped_dropped` (of those, the ones
    left out of selection: all of them for a model in `drop_length_stopped`, else none).

    With `sampling` (each model's sample-stage summary), rows also carry `prompts_truncated` (prompts
    cut to fit the configured prompt length or the model's positions) and `prompts_skipped_empty`."""
    counts = samples.group_by("model").aggregate(
        [("completion_tokens", "sum"), ("completion_tokens", "count")]
    )
    cut = samples.filter(pc.equal(samples["finish_reason"], "length"))
    stopped = dict(
        zip(*cut.group_by("model").aggregate([([], "count_all")]).to_pydict().values(), strict=True)
    )
    rewards = dict(
        zip(*scores.group_by("model").aggregate([("score", "mean")]).to_pydict().values(), strict=True)
    )
    rows = []
    for model, tokens, n in zip(
        counts["model"].to_pylist(), counts["completion_tokens_sum"].to_pylist(),
        counts["completion_tokens_count"].to_pylist(), strict=True,
    ):  # fmt: skip
        length_stopped = stopped.get(model, 0)
        rows.append({"model": model, "samples": n, "completion_tokens": tokens,
                     "mean_reward": rewards.get(model), "ws_share": ws_share.get(model, 0.0),
                     "length_stopped": length_stopped,
                     "length_stopped_dropped": length_stopped if model in drop_length_stopped else 0})  # fmt: skip
        if sampling is not None:
            counted = sampling.get(model, {})
            rows[-1] |= {"prompts_truncated": counted.get("prompts_truncated"),
                         "prompts_skipped_empty": counted.get("prompts_skipped_empty")}  # fmt: skip
    return sorted(rows, key=lambda row: row["model"])


def target_sft_spec(cfg: FusionConfig, layout: RunLayout) -> ModelSpec:
    """Target-SFT as a model to sample from, with the target's sampling settings.

    Ray actors on remote storage get the model's storage URL (each machine fetches and checks its
    own copy: they share no disk with this one); otherwise the local folder.
    """
    elsewhere = cfg.compute.executor == "ray" and not layout.storage.is_local
    path = layout.model_url(TARGET_SFT) if elsewhere else layout.model(TARGET_SFT)
    return cfg.target.model_copy(update={"path": path, "name": TARGET_SFT})


def select_target(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Picks y_wt / y_l from Target-SFT's samples of the preference prompts into QUADRUPLES.

    Length-stopped samples are neither y_wt nor y_l when the target's `sampling.drop_length_stopped`.
    """
    best = rows_of_split(layout, layout.read_dataset(layout.best_source, BEST_SOURCE), "preference")
    quadruples, report = select_target_pairs(
        best,
        layout.read_dataset(layout.samples(TARGET_SFT), SAMPLES),
        layout.read_dataset(layout.scores(TARGET_SFT), SCORES),
        drop_length_stopped=cfg.target.sampling.drop_length_stopped,
    )
    _check_selected(report, "select-target", TARGET_SFT)
    layout.write_dataset(layout.quadruples, quadruples, QUADRUPLES)
    return report.as_dict()
