"""The fusion pipeline's stages as plain functions over a run folder, and a sequential runner.

Each stage reads its inputs from the run layout, writes its outputs there, and records a
small JSON summary under `stages/<name>.json` LAST, so a stage counts as done only once all
of its outputs are complete. `run_pipeline` skips stages that are done, so a rerun resumes
at the first unfinished one. Orchestrators (the Prefect flow) call the same functions.

    ingest -> split -> sample sources -> score -> select y_ws -> SFT -> sample Target-SFT
    -> score -> select y_wt / y_l -> (reference log-probs inside) WRPO -> done
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from wrpo_core.config import FusionConfig, ModelSpec, SFTJobConfig, WRPOConfig, WRPOJobConfig
from wrpo_core.prompts import load_prompts, split_prompts
from wrpo_core.rewards import load_scorer, score_samples
from wrpo_core.sampling import HFSampler
from wrpo_core.schemas import BEST_SOURCE, PROMPTS, QUADRUPLES, SAMPLES, SCORES, read_parquet, write_parquet
from wrpo_core.selection import select_best_source, select_target_pairs
from wrpo_core.train.common import load_causal_lm, load_tokenizer
from wrpo_core.train.sft import train_sft
from wrpo_core.train.wrpo import train_wrpo

logger = logging.getLogger(__name__)

TARGET_SFT = "target-sft"


@dataclass(frozen=True)
class RunLayout:
    """Where each artifact of a run lives under its root folder."""

    root: str

    def path(self, *parts: str) -> str:
        return str(Path(self.root, *parts))

    @property
    def prompts(self) -> str:
        return self.path("prompts", "all.parquet")

    def split(self, name: str) -> str:
        return self.path("prompts", f"{name}.parquet")

    def samples(self, model: str) -> str:
        return self.path("samples", f"{model}.parquet")

    def scores(self, model: str) -> str:
        return self.path("scores", f"{model}.parquet")

    @property
    def best_source(self) -> str:
        return self.path("selection", "best_source.parquet")

    @property
    def quadruples(self) -> str:
        return self.path("selection", "quadruples.parquet")

    def model(self, name: str) -> str:
        return self.path("models", name)

    def stage_record(self, stage: str) -> Path:
        return Path(self.path("stages", f"{stage}.json"))


def is_done(layout: RunLayout, stage: str) -> bool:
    return layout.stage_record(stage).exists()


def mark_done(layout: RunLayout, stage: str, summary: dict) -> dict:
    """Records the stage's summary; written last, so it exists only for a complete stage."""
    record = layout.stage_record(stage)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(record)
    return summary


def load_summary(layout: RunLayout, stage: str) -> dict:
    return json.loads(layout.stage_record(stage).read_text())


def _device(cfg: FusionConfig) -> str:
    if cfg.compute.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.compute.device


def _prompt_text(layout: RunLayout) -> dict[str, str]:
    table = read_parquet(layout.prompts, PROMPTS)
    return dict(zip(table["prompt_id"].to_pylist(), table["prompt"].to_pylist(), strict=True))


# --- stages --------------------------------------------------------------------------------------


def ingest(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Reads the prompt source, collapses duplicates, stores PROMPTS."""
    table, report = load_prompts(
        cfg.prompts.path, prompt_field=cfg.prompts.prompt_field, split=cfg.prompts.split
    )
    if cfg.prompts.limit is not None:
        table = table.slice(0, cfg.prompts.limit)
    write_parquet(table, layout.prompts, PROMPTS)
    return {"prompts": table.num_rows, "rows_read": report.rows_read, "duplicates": report.duplicates}


def split(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Splits prompts by seed: a fraction for SFT, the rest for preference optimization."""
    sft, pref = split_prompts(
        read_parquet(layout.prompts, PROMPTS), sft_fraction=cfg.split.sft_fraction, seed=cfg.split.seed
    )
    write_parquet(sft, layout.split("sft"), PROMPTS)
    write_parquet(pref, layout.split("preference"), PROMPTS)
    return {"sft": sft.num_rows, "preference": pref.num_rows}


def sample(
    spec: ModelSpec, prompts_url: str, out_url: str, *, device: str = "cpu", batch_size: int = 32
) -> dict:
    """Samples `spec.sampling.n` responses per prompt from one model (HF backend) into SAMPLES."""
    if spec.backend != "hf":
        raise NotImplementedError(
            f"model {spec.name}: backend {spec.backend!r} is not available in this stage yet"
        )
    prompts = read_parquet(prompts_url, PROMPTS)
    tokenizer = load_tokenizer(spec.path, trust_remote_code=spec.trust_remote_code)
    model = (
        load_causal_lm(spec.path, trust_remote_code=spec.trust_remote_code, dtype=spec.dtype)
        .to(device)
        .eval()
    )
    sampler = HFSampler(model, tokenizer, spec.name, spec.sampling, batch_size=batch_size)
    table, report = sampler.sample(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist())
    write_parquet(table, out_url, SAMPLES)
    return {
        "model": spec.name,
        "samples": report.samples,
        "completion_tokens": report.completion_tokens,
        "samples_per_second": round(report.samples_per_second, 2),
        "finished_by_length": report.finished_by_length,
        "prompts_truncated": report.prompts_truncated,
        "prompts_skipped_empty": report.prompts_skipped_empty,
    }


def score(cfg: FusionConfig, layout: RunLayout, model: str) -> dict:
    """Scores one model's samples with the reward model into SCORES."""
    samples = read_parquet(layout.samples(model), SAMPLES)
    scores = score_samples(samples, _prompt_text(layout), load_scorer(cfg.reward_model))
    write_parquet(scores, layout.scores(model), SCORES)
    return {"model": model, "scored": scores.num_rows, "mean_reward": pc.mean(scores["score"]).as_py()}


def _concat(urls: list[str], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([read_parquet(url, schema) for url in urls])


def select_source(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Picks y_ws (best source response over all sources) for every prompt."""
    names = [s.name for s in cfg.sources]
    samples = _concat([layout.samples(n) for n in names], SAMPLES)
    scores = _concat([layout.scores(n) for n in names], SCORES)
    best, report = select_best_source(samples, scores, read_parquet(layout.prompts, PROMPTS))
    write_parquet(best, layout.best_source, BEST_SOURCE)
    return report.as_dict()


def _rows_of(table: pa.Table, prompts_url: str) -> pa.Table:
    ids = read_parquet(prompts_url, PROMPTS)["prompt_id"]
    return table.filter(pc.is_in(table["prompt_id"], value_set=ids))


def sft(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Target-SFT on (x, y_ws) of the SFT prompts."""
    data = layout.path("selection", "sft_pairs.parquet")
    write_parquet(
        _rows_of(read_parquet(layout.best_source, BEST_SOURCE), layout.split("sft")), data, BEST_SOURCE
    )
    job = SFTJobConfig(
        model=cfg.target.path, data=data, output_dir=layout.model(TARGET_SFT),
        trust_remote_code=cfg.target.trust_remote_code, training=cfg.sft,
    )  # fmt: skip
    metrics = train_sft(job)
    return {"model": job.output_dir, **metrics}


def target_sft_spec(cfg: FusionConfig, layout: RunLayout) -> ModelSpec:
    """Target-SFT as a model to sample from, with the target's sampling settings."""
    return cfg.target.model_copy(update={"path": layout.model(TARGET_SFT), "name": TARGET_SFT})


def select_target(cfg: FusionConfig, layout: RunLayout) -> dict:
    """Picks y_wt / y_l from Target-SFT's samples of the preference prompts into QUADRUPLES."""
    best = _rows_of(read_parquet(layout.best_source, BEST_SOURCE), layout.split("preference"))
    quadruples, report = select_target_pairs(
        best,
        read_parquet(layout.samples(TARGET_SFT), SAMPLES),
        read_parquet(layout.scores(TARGET_SFT), SCORES),
    )
    write_parquet(quadruples, layout.quadruples, QUADRUPLES)
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
    log-probs (e.g. another job's stored file) to skip the reference pass.
    """
    job = WRPOJobConfig(
        model=layout.model(TARGET_SFT), data=data or layout.quadruples, output_dir=layout.model(name),
        trust_remote_code=cfg.target.trust_remote_code, training=training or cfg.wrpo,
    )  # fmt: skip
    metrics = train_wrpo(job)
    return {"model": job.output_dir, **metrics}


# --- runner --------------------------------------------------------------------------------------


def pipeline_stages(cfg: FusionConfig, layout: RunLayout) -> list[tuple[str, Callable[[], dict]]]:
    """The ordered (stage name, thunk) list of a whole fusion run."""
    device = _device(cfg)
    stages: list[tuple[str, Callable[[], dict]]] = [
        ("ingest", lambda: ingest(cfg, layout)),
        ("split", lambda: split(cfg, layout)),
    ]
    for spec in cfg.sources:
        stages.append(
            (
                f"sample-{spec.name}",
                lambda s=spec: sample(s, layout.prompts, layout.samples(s.name), device=device),
            )
        )
        stages.append((f"score-{spec.name}", lambda s=spec: score(cfg, layout, s.name)))
    target_sft = target_sft_spec(cfg, layout)
    stages += [
        ("select-source", lambda: select_source(cfg, layout)),
        ("sft", lambda: sft(cfg, layout)),
        (
            f"sample-{TARGET_SFT}",
            lambda: sample(target_sft, layout.split("preference"), layout.samples(TARGET_SFT), device=device),
        ),
        (f"score-{TARGET_SFT}", lambda: score(cfg, layout, TARGET_SFT)),
        ("select-target", lambda: select_target(cfg, layout)),
        ("wrpo", lambda: wrpo(cfg, layout)),
    ]
    return stages


def run_pipeline(cfg: FusionConfig, root: str | None = None) -> dict[str, dict]:
    """Runs every unfinished stage in order; returns each stage's summary."""
    layout = RunLayout(root or str(Path(cfg.storage.url, cfg.run_name)))
    summaries = {}
    for name, run in pipeline_stages(cfg, layout):
        if is_done(layout, name):
            logger.info("stage %s: done before, skipped", name)
            summaries[name] = load_summary(layout, name)
            continue
        logger.info("stage %s: running", name)
        summaries[name] = mark_done(layout, name, run())
    return summaries
