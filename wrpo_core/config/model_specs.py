"""The models a run names: sources and target (with their sampling settings) and the reward model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from wrpo_core.config.base import ConfigModel, checked_model_name


class SamplingConfig(ConfigModel):
    """How responses are sampled from a model (the SimPO/WRPO pipeline's settings)."""

    n: Annotated[int, Field(ge=1, description="Responses sampled per prompt.")] = 5
    top_p: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description="Nucleus sampling: draw from the smallest set of tokens whose probabilities reach "
            "top_p (1 = off). Paper: 0.95.",
        ),
    ] = 0.95
    temperature: Annotated[
        float,
        Field(ge=0, description="Softmax temperature of sampling; 0 = greedy decoding. Paper: 0.8."),
    ] = 0.8
    max_new_tokens: Annotated[
        int,
        Field(
            ge=1,
            description="Most tokens generated per response; a response cut at this limit has "
            "finish_reason 'length'. The authors' pipeline (SimPO's) allows 4096.",
        ),
    ] = 4096
    drop_length_stopped: bool = Field(
        default=True,
        description="Leave this model's responses that were cut by max_new_tokens (finish_reason "
        "'length') out of the choice of y_ws, y_wt and y_l. Training appends an end-of-turn token to "
        "every chosen response, so a cut one would teach the target to stop mid-sentence. They are "
        "still scored and counted per source in the run's statistics (length_stopped and "
        "length_stopped_dropped); a prompt left without enough responses is dropped and counted "
        "(dropped_length_stopped). False keeps them as candidates.",
    )
    seed: int = Field(
        default=42,
        description="Base seed: every (model, prompt, sample index) draws with its own seed derived from it, "
        "so samples reproduce.",
    )


class ModelSpec(ConfigModel):
    """A model to sample from or train: a Hugging Face hub id or a local/fsspec path."""

    path: str = Field(description="Hub id (org/name) or local folder of a Hugging Face model.")
    name: str | None = Field(
        default=None,
        description="Short name used in storage keys and stage names; defaults to the last part of the path. "
        "Letters, digits, '.', '_' and '-', starting with a letter or digit; not one of the pipeline's own "
        "names (target-sft, wrpo, dpo, the stage names, nor sample-/score- followed by a model of the run).",
    )
    backend: Literal["hf", "vllm"] = Field(
        default="hf",
        description="Sampler: 'hf' = transformers generation (CPU or GPU); "
        "'vllm' = vLLM's offline engine (GPU).",
    )
    revision: str | None = Field(
        default=None, description="Hub commit, tag or branch to load; None = the default branch."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="The weights' dtype when loading; 'auto' = as stored."
    )
    tensor_parallel_size: Annotated[
        int, Field(ge=1, description="vllm: GPUs one copy of the model is split over (tensor parallelism).")
    ] = 1
    trust_remote_code: bool = Field(
        default=False,
        description="Run the custom modelling code of the model's repository; "
        "only for repositories you trust.",
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        title="Sampling",
        description="Responses per prompt, temperature, top-p, length.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("name") is None and isinstance(data.get("path"), str):
            return {**data, "name": data["path"].rstrip("/").split("/")[-1]}
        return data

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a hub id or a local path, got an empty string")
        return value

    @field_validator("name")
    @classmethod
    def _name_is_a_key(cls, value: str | None) -> str | None:
        return None if value is None else checked_model_name(value)


class RewardModelSpec(ConfigModel):
    """The reward model that scores responses: an HF sequence classifier or the toy verifier."""

    path: str = Field(
        description="Hub id or local folder of the reward model (paper: RLHFlow/ArmoRM-Llama3-8B-v0.1)."
    )
    kind: Literal["sequence_classifier", "toy_verifier"] = Field(
        default="sequence_classifier",
        description="'sequence_classifier' = an HF sequence-classification model scoring the chat-templated "
        "conversation; 'toy_verifier' = the toy world's exact-answer verifier.",
    )
    revision: str | None = Field(
        default=None,
        description="Hub commit, tag or branch of the reward model (tokenizer and weights); "
        "None = the default branch.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Needed by custom-code reward models such as ArmoRM; never on by default."
    )
    batch_size: Annotated[int, Field(ge=1, description="Conversations scored per forward pass.")] = 16
    max_length: Annotated[
        int,
        Field(
            ge=16,
            description="Most tokens of a scored conversation; longer ones lose the start of the prompt "
            "(left truncation), so the response is judged whole.",
        ),
    ] = 4096
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="The weights' dtype when loading; 'auto' = as stored."
    )
