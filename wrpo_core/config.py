"""Configuration models for a fusion run and its training jobs, loaded from YAML.

Every model forbids unknown keys, so a typo in a YAML file is an error that names the
field instead of a silently ignored setting. Defaults follow the WRPO paper
(arXiv 2412.03187) and the authors' released training configs.

    cfg = load_config("configs/paper.yaml", FusionConfig)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(_Model):
    """How responses are sampled from a model (the SimPO/WRPO pipeline's settings)."""

    n: Annotated[int, Field(ge=1, description="Responses sampled per prompt.")] = 5
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    temperature: Annotated[float, Field(ge=0)] = 0.8
    max_new_tokens: Annotated[int, Field(ge=1)] = 2048
    seed: int = 42


class ModelSpec(_Model):
    """A model to sample from or train: a Hugging Face hub id or a local/fsspec path."""

    path: str = Field(description="Hub id (org/name) or local folder of a Hugging Face model.")
    name: str | None = Field(
        default=None, description="Short name used in storage keys; defaults to the last part of the path."
    )
    backend: Literal["hf", "vllm"] = "hf"
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    trust_remote_code: bool = False
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        title="Sampling",
        description="Responses per prompt, temperature, top-p, length.",
    )

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a hub id or a local path, got an empty string")
        return value

    @model_validator(mode="after")
    def _default_name(self) -> ModelSpec:
        if self.name is None:
            object.__setattr__(self, "name", self.path.rstrip("/").split("/")[-1])
        if not _NAME_RE.match(self.name or ""):
            raise ValueError(
                f"name {self.name!r} must start with a letter or digit and use only letters, digits, '.', '_' "
                "or '-' (it becomes a storage key); set `name` explicitly"
            )
        return self


class RewardModelSpec(_Model):
    """The reward model that scores responses: an HF sequence classifier or the toy verifier."""

    path: str
    kind: Literal["sequence_classifier", "toy_verifier"] = "sequence_classifier"
    trust_remote_code: bool = Field(
        default=False, description="Needed by custom-code reward models such as ArmoRM; never on by default."
    )
    batch_size: Annotated[int, Field(ge=1)] = 16
    max_length: Annotated[int, Field(ge=16)] = 4096
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class PromptsConfig(_Model):
    """Where the prompts come from (JSONL, JSON, Parquet or a `datasets.save_to_disk` folder)."""

    path: str
    prompt_field: str | None = None
    split: str | None = None
    limit: Annotated[int | None, Field(ge=1)] = None


class SplitConfig(_Model):
    """Random split of prompts: a fraction for SFT, the rest for preference optimization."""

    sft_fraction: Annotated[float, Field(gt=0, lt=1)] = 1 / 3
    seed: int = 42


class _TrainingHyperparameters(_Model):
    learning_rate: Annotated[float, Field(gt=0)]
    num_train_epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: int = Field(default=-1, description="Overrides epochs when > 0.")
    per_device_train_batch_size: Annotated[int, Field(ge=1)]
    gradient_accumulation_steps: Annotated[int, Field(ge=1)]
    lr_scheduler_type: str = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    optim: str = "adamw_torch"
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    bf16: bool | None = Field(default=None, description="None = bf16 on GPUs that support it, fp32 on CPU.")
    gradient_checkpointing: bool = True
    seed: int = 42
    logging_steps: Annotated[int, Field(ge=1)] = 1
    save_steps: Annotated[int, Field(ge=1)] = 500
    save_total_limit: Annotated[int | None, Field(ge=1)] = 2
    deepspeed: str | None = Field(default=None, description="Path of a DeepSpeed JSON config (ZeRO-3).")


class SFTConfig(_TrainingHyperparameters):
    """Target-SFT on (x, y_ws). Paper: lr 7e-6, 1 epoch, batch 8x2x8, cosine, warmup 0.1, 2048."""

    learning_rate: Annotated[float, Field(gt=0)] = 7e-6
    per_device_train_batch_size: Annotated[int, Field(ge=1)] = 8
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 2
    max_seq_length: Annotated[int, Field(ge=8)] = 2048
    max_prompt_length: Annotated[int, Field(ge=4)] = 1800


class WRPOConfig(_TrainingHyperparameters):
    """WRPO on (x, y_ws, y_wt, y_l). Paper: beta 0.01, alpha 0.1 rising linearly, lr 3e-7, batch 2x8x8."""

    learning_rate: Annotated[float, Field(gt=0)] = 3e-7
    per_device_train_batch_size: Annotated[int, Field(ge=1)] = 2
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 8
    beta: Annotated[float, Field(gt=0)] = 0.01
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.1
    alpha_schedule: str = Field(
        default="linear",
        description="'linear' (0 -> alpha over the optimizer steps), 'constant', or 'package.module:function' "
        "taking (step, total_steps, alpha) and returning the alpha for that step.",
    )
    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    simpo_gamma: Annotated[float, Field(ge=0)] = Field(
        default=0.5, description="SimPO target reward margin (only for loss_type 'simpo')."
    )
    max_length: Annotated[int, Field(ge=8)] = 2048
    max_prompt_length: Annotated[int, Field(ge=4)] = 1800
    precompute_reference: bool = Field(
        default=True,
        description="Compute reference log-probs once and store them with the quadruples, so training "
        "holds only the policy; False re-runs the reference model every step as the authors' trainer does.",
    )

    @field_validator("alpha_schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        if value not in ("linear", "constant") and not re.match(r"^[\w.]+:\w+$", value):
            raise ValueError("must be 'linear', 'constant' or an import path 'package.module:function'")
        return value

    @model_validator(mode="after")
    def _prompt_fits(self) -> WRPOConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})"
            )
        return self


class StorageConfig(_Model):
    """Where a run's artifacts live: any fsspec URL (a local path by default, s3://bucket/prefix)."""

    url: str = "./runs"
    storage_options: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="Passed to fsspec (e.g. endpoint_url for S3); keep secrets in env."
    )


class ComputeConfig(_Model):
    """Where the work runs: the device for local work and the Ray cluster for fan-out."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    executor: Literal["inline", "ray"] = Field(
        default="inline",
        description="'inline' samples and scores in this process; 'ray' fans shards out over Ray actors.",
    )
    ray_address: str | None = Field(default=None, description="None starts a local Ray; 'auto' or ray://...")
    num_actors: Annotated[int, Field(ge=1, description="ray: replicas per model (each holds the model).")] = 1
    shard_size: Annotated[int, Field(ge=1, description="ray: prompts per work unit (one Parquet shard).")] = (
        256
    )
    num_cpus_per_actor: Annotated[float, Field(gt=0)] = 1.0
    num_gpus_per_actor: Annotated[float, Field(ge=0)] = 0.0


class LaunchConfig(_Model):
    """How a training job is launched: `local` = torchrun on this machine, `ray` = Ray Train workers.

    Absent from a job config, `wrpo train` trains in its own process (as before).
    """

    launcher: Literal["local", "ray"] = "local"
    nproc_per_node: Annotated[int, Field(ge=1, description="local: processes per machine (one per GPU).")] = 1
    nnodes: Annotated[int, Field(ge=1, description="local: machines; run the same command on each.")] = 1
    master_addr: str = Field(
        default="127.0.0.1", description="local: rendezvous host (node 0 when nnodes > 1)."
    )
    master_port: Annotated[int | None, Field(ge=1, le=65535)] = Field(
        default=None, description="local: rendezvous port; None = a free port (29500 when nnodes > 1)."
    )
    ray_address: str | None = Field(
        default=None, description="ray: 'auto', 'ray://host:10001' or an address; None starts a local Ray."
    )
    num_workers: Annotated[int, Field(ge=1, description="ray: training workers (one per GPU).")] = 1
    use_gpu: bool | None = Field(
        default=None, description="ray: one GPU per worker; None = if the cluster has GPUs."
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="ray: e.g. {CPU: 8, GPU: 1}; empty = Ray Train's default."
    )
    storage_path: str | None = Field(
        default=None,
        description="ray: where checkpoints persist (s3://bucket/prefix, NFS path); a retried or rerun job "
        "with the same run_name resumes from its newest checkpoint there. None = ~/ray_results.",
    )
    run_name: str | None = Field(
        default=None, description="ray: run name in storage; None = derived from output_dir."
    )
    max_failures: Annotated[
        int, Field(ge=-1, description="ray: worker-failure retries (-1 = unlimited).")
    ] = 0
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for the training processes."
    )
    shared_output_dir: bool = Field(
        default=False,
        description="True when every machine sees the same output_dir (NFS): checkpoints are written once. "
        "False: each machine keeps its own copy of every checkpoint (needed to resume on local disks).",
    )


class EvaluationConfig(_Model):
    """Held-out evaluation of the fused model: reward-judged win rates against the target and Target-SFT."""

    prompts: PromptsConfig | None = Field(
        default=None, description="Held-out prompts (never trained on); None skips the evaluation stage."
    )
    max_new_tokens: Annotated[int, Field(ge=1)] = 512
    batch_size: Annotated[int, Field(ge=1)] = 16
    judge: RewardModelSpec | None = Field(
        default=None, description="Reward model that judges; None = the run's."
    )


class FusionConfig(_Model):
    """A whole fusion run: prompts, sources, target, reward model, split, SFT, WRPO, storage, compute."""

    run_name: str = Field(default="fusion", description="Name of the run's folder under storage.url.")
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
    split: SplitConfig = Field(default_factory=SplitConfig, title="Prompt split")
    sft: SFTConfig = Field(default_factory=SFTConfig, title="SFT", description="Target-SFT on (x, y_ws).")
    wrpo: WRPOConfig = Field(
        default_factory=WRPOConfig,
        title="WRPO",
        description="Preference optimization: alpha, beta, schedule, loss.",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, title="Storage")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, title="Compute")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, title="Evaluation")
    launch: LaunchConfig | None = Field(
        default=None,
        description="How SFT and WRPO train: torchrun or Ray Train jobs; None = in the stage's process.",
    )

    @model_validator(mode="after")
    def _unique_source_names(self) -> FusionConfig:
        names = [s.name for s in self.sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"source model names must be unique; repeated: {duplicated} (set `name`)")
        if self.target.name in names:
            raise ValueError(f"target name {self.target.name!r} is also a source name; set `target.name`")
        return self


class SFTJobConfig(_Model):
    """A Target-SFT training job: `wrpo train sft --config FILE`."""

    model: str = Field(description="Hub id or local folder of the target model.")
    data: str = Field(description="Parquet file (BEST_SOURCE schema) with the (x, y_ws) pairs.")
    output_dir: str
    trust_remote_code: bool = False
    training: SFTConfig = Field(default_factory=SFTConfig)
    launch: LaunchConfig | None = Field(default=None, description="None = train in this process.")


class WRPOJobConfig(_Model):
    """A WRPO training job: `wrpo train wrpo --config FILE`."""

    model: str = Field(description="Hub id or local folder of Target-SFT (the policy's start).")
    reference_model: str | None = Field(
        default=None, description="Frozen reference; defaults to `model` (Target-SFT), as in the paper."
    )
    data: str = Field(description="Quadruples: Parquet (QUADRUPLES schema) or the authors' JSONL format.")
    output_dir: str
    trust_remote_code: bool = False
    training: WRPOConfig = Field(default_factory=WRPOConfig)
    launch: LaunchConfig | None = Field(default=None, description="None = train in this process.")


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def format_validation_error(error: ValidationError, where: str) -> str:
    """Turns a pydantic error into lines 'where: field.path: message' a user can act on."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see the documented fields)"
        lines.append(f"{where}: {field}: {message}")
    return "\n".join(lines)


def parse_config(data: object, model: type[ConfigT], *, where: str) -> ConfigT:
    """Validates a mapping against a config model, raising ConfigError naming each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping of fields at the top level, got {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, where)) from None


def load_config(path: str | Path, model: type[ConfigT]) -> ConfigT:
    """Loads a YAML file (any fsspec URL) into a config model; errors name the file and the field."""
    where = str(path)
    try:
        with fsspec.open(where, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {error}") from None
    return parse_config(data, model, where=where)
