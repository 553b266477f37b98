"""The whole fusion run: prompts, split, storage, compute, evaluation, and `FusionConfig` over all of them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from wrpo_core.config.base import ConfigModel, FieldProblem, checked_name, checked_root_url
from wrpo_core.config.model_specs import ModelSpec, RewardModelSpec
from wrpo_core.config.names import per_model_stage_names
from wrpo_core.config.training import LaunchConfig, SFTConfig, WRPOConfig, planned_global_batch


class PromptsConfig(ConfigModel):
    """Where the prompts come from (JSONL, JSON, Parquet or a `datasets.save_to_disk` folder)."""

    path: str = Field(
        description="File or folder of prompts (local path, fsspec URL or `toy-world:` path): JSONL, JSON, "
        "Parquet or a `datasets.save_to_disk` folder."
    )
    prompt_field: str | None = Field(
        default=None,
        description="Column holding the prompt (a string, a {role, content} message or a message list); "
        "None = the first of prompt, instruction, messages.",
    )
    split: str | None = Field(
        default=None,
        description="For a saved DatasetDict folder: the split to read; None = every split.",
    )
    limit: Annotated[
        int | None, Field(ge=1, description="Keep only the first this many prompts; None = all.")
    ] = None


class SplitConfig(ConfigModel):
    """Random split of prompts: a fraction for SFT, the rest for preference optimization."""

    sft_fraction: Annotated[
        float,
        Field(
            gt=0,
            lt=1,
            description="Fraction of the prompts used for SFT; the rest go to preference optimization. "
            "Paper: 1/3.",
        ),
    ] = 1 / 3
    seed: int = Field(
        default=42,
        description="Seed of the split: prompts are ranked by sha256(seed:prompt_id), so a seed always gives "
        "the same split.",
    )


class StorageConfig(ConfigModel):
    """Where a run's artifacts live: any fsspec URL (a local path by default, s3://bucket/prefix)."""

    url: str = Field(
        default="./runs",
        description="Root of all runs: a local path or fsspec URL (s3://bucket/prefix); each run lives in "
        "the folder run_name below it.",
    )
    storage_options: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="Passed to fsspec (e.g. endpoint_url for S3); keep secrets in env."
    )

    @field_validator("url")
    @classmethod
    def _root_url(cls, value: str) -> str:
        return checked_root_url(value, "storage.url")


class ComputeConfig(ConfigModel):
    """Where the work runs: the device for local work and the Ray cluster for fan-out."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Device the samplers run on (here or in Ray actors); "
        "'auto' = CUDA when available, else CPU.",
    )
    executor: Literal["inline", "ray"] = Field(
        default="inline",
        description="'inline' samples and scores in this process; 'ray' fans shards out over Ray actors.",
    )
    ray_address: str | None = Field(default=None, description="None starts a local Ray; 'auto' or ray://...")
    num_actors: Annotated[int, Field(ge=1, description="ray: replicas per model (each holds the model).")] = 1
    shard_size: Annotated[int, Field(ge=1, description="ray: prompts per work unit (one Parquet shard).")] = (
        256
    )
    num_cpus_per_actor: Annotated[float, Field(gt=0, description="ray: CPUs reserved per replica.")] = 1.0
    num_gpus_per_actor: Annotated[
        float,
        Field(
            ge=0,
            description="ray: GPUs reserved per replica; 0 = tensor_parallel_size for a vllm model, none "
            "for an hf one.",
        ),
    ] = 0.0
    reward_pool_idle_s: Annotated[
        float,
        Field(
            ge=0,
            description="ray: seconds the reward model's replicas stay loaded with no shard to score (about "
            "what reloading it costs); the score stages of every source share them, so the reward model "
            "loads once. They are also released before training and at the end of the run.",
        ),
    ] = 300.0


class EvaluationConfig(ConfigModel):
    """Held-out evaluation of the fused model: reward-judged win rates against the target and Target-SFT."""

    prompts: PromptsConfig | None = Field(
        default=None, description="Held-out prompts (never trained on); None skips the evaluation stage."
    )
    max_new_tokens: Annotated[int, Field(ge=1, description="Most tokens of each greedy answer.")] = 512
    batch_size: Annotated[int, Field(ge=1, description="Prompts answered per generation batch.")] = 16
    judge: RewardModelSpec | None = Field(
        default=None, description="Reward model that judges; None = the run's."
    )


class FusionConfig(ConfigModel):
    """A whole fusion run: prompts, sources, target, reward model, split, SFT, WRPO, storage, compute."""

    run_name: str = Field(
        default="fusion",
        description="Name of the run's folder under storage.url: letters, digits, '.', '_' and '-', starting "
        "with a letter or digit.",
    )
    prompts: PromptsConfig = Field(
        title="Prompts", description="The prompt set (split into SFT and preference)."
    )
    sources: list[ModelSpec] = Field(
        min_length=1,
        title="Source models",
        description="The LLMs whose strengths are fused (10 in the paper).",
    )
    target: ModelSpec = Field(
        title="Target model", description="The (smaller) model the sources are fused into."
    )
    reward_model: RewardModelSpec = Field(
        title="Reward model",
        description="Scores every sampled response (e.g. ArmoRM); picks y_ws, y_wt, y_l.",
    )
    split: SplitConfig = Field(
        default_factory=SplitConfig,
        title="Prompt split",
        description="Which prompts go to SFT and which to preference optimization.",
    )
    sft: SFTConfig = Field(default_factory=SFTConfig, title="SFT", description="Target-SFT on (x, y_ws).")
    wrpo: WRPOConfig = Field(
        default_factory=WRPOConfig,
        title="WRPO",
        description="Preference optimization: alpha, beta, schedule, loss.",
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig, title="Storage", description="Where the run's artifacts are stored."
    )
    compute: ComputeConfig = Field(
        default_factory=ComputeConfig,
        title="Compute",
        description="Device, and Ray fan-out of sampling and scoring.",
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig,
        title="Evaluation",
        description="Held-out evaluation of the fused model; skipped without prompts.",
    )
    launch: LaunchConfig | None = Field(
        default=None,
        description="How SFT and WRPO train: torchrun or Ray Train jobs; None = in the stage's process.",
    )

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_folder(cls, value: str) -> str:
        return checked_name(value, "run_name")

    @field_validator("sources")
    @classmethod
    def _unique_source_names(cls, sources: list[ModelSpec]) -> list[ModelSpec]:
        names = [str(s.name).lower() for s in sources]  # a case-insensitive disk has one folder for both
        repeated = sorted({str(s.name) for s in sources if names.count(str(s.name).lower()) > 1})
        if repeated:
            raise ValueError(
                f"source model names must be unique (ignoring case); repeated: {repeated} (set `name`)"
            )
        return sources

    @field_validator("target")
    @classmethod
    def _target_not_a_source(cls, target: ModelSpec, info: ValidationInfo) -> ModelSpec:
        sources = {str(s.name).lower() for s in info.data.get("sources") or []}
        if str(target.name).lower() in sources:
            raise ValueError(f"target name {target.name!r} is also a source name; set `target.name`")
        return target

    @model_validator(mode="after")
    def _no_model_named_like_a_stage(self) -> FusionConfig:
        stages = per_model_stage_names([str(s.name) for s in self.sources])
        named = [(f"sources.{i}.name", s.name) for i, s in enumerate(self.sources)]
        for field, name in [*named, ("target.name", self.target.name)]:
            if str(name).lower() in stages:
                raise FieldProblem(
                    field,
                    f"name {name!r} is the name of one of this run's stages (sample-MODEL, score-MODEL); "
                    "set `name` to another name",
                )
        return self

    @model_validator(mode="after")
    def _global_batches_divide(self) -> FusionConfig:
        for field, section in (("sft", self.sft), ("wrpo", self.wrpo)):  # refused here, not in a stage
            try:
                planned_global_batch(section, self.launch)
            except ValueError as error:
                raise FieldProblem(f"{field}.global_batch_size", str(error)) from None
        return self
