"""Watch rules: which new Hugging Face Hub models `wrpo sources discover` registers as sources.

A `DiscoveryConfig` file (`wrpo sources discover --config fusion.yaml --rules discovery.yaml`, or
the `discovery` parameter of the `wrpo-discover` deployment). It is kept out of `FusionConfig` on
purpose: what a fusion run computes never depends on how its sources were found.

    # discovery.yaml
    cluster: {gpu_memory_gib: 80, max_tensor_parallel_size: 8}
    watch:
    - name: qwen-instruct
      authors: [Qwen]
      tags: [text-generation, conversational]
      name_pattern: "Qwen/Qwen2\\\\.5-.*-Instruct"
      licenses: [apache-2.0]
      min_parameters: 1B
      max_parameters: 80B
      min_age_days: 7
      min_downloads: 1000
      deny: ["Qwen/*-GPTQ-*"]
      sampling: {n: 5}
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from wrpo_core.config.base import ConfigModel, FieldProblem
from wrpo_core.config.model_specs import SamplingConfig

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_COUNT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([KMBT]?)\s*$", re.IGNORECASE)


def parse_parameter_count(value: object) -> object:
    """A parameter count from a number or a string such as '7B', '500M', '1.5e9' (K, M, B, T suffixes)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("a parameter count is a number such as 7000000000 or a string such as '7B'")
    if isinstance(value, str):
        found = _COUNT_RE.match(value)
        if not found:
            raise ValueError(f"{value!r} is not a parameter count such as 7000000000, '7B' or '500M'")
        value = round(float(found.group(1)) * _SUFFIXES[found.group(2).upper()])
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and value < 1:
        raise ValueError(f"a parameter count is at least 1, got {value}")
    return value


class WatchRule(ConfigModel):
    """Hub models to watch: who publishes them, what they must be, and how to sample them once registered."""

    name: str = Field(description="The rule's name in reports and rejection reasons.")
    authors: list[str] = Field(
        default_factory=list,
        description="Hub users or organisations whose models are listed (one hub query each); empty = "
        "any author, then set tags or search so the listing stays small.",
    )
    tags: list[str] = Field(
        default_factory=list,
        description="Hub tags a model must all carry, e.g. text-generation, conversational (the hub filters).",
    )
    search: str | None = Field(
        default=None, description="Text the model id must contain (the hub filters); None = no search."
    )
    name_pattern: str | None = Field(
        default=None,
        description="Regular expression the whole model id (author/name) must match, e.g. "
        "'Qwen/.*-Instruct'; None = any name.",
    )
    licenses: list[str] = Field(
        default_factory=list,
        description="Allowed licenses, as the hub's license tag writes them (apache-2.0, mit, llama3, ...); "
        "empty = any; when set, a model without a license is rejected.",
    )
    min_parameters: Annotated[
        int | None,
        BeforeValidator(parse_parameter_count),
        Field(description="Fewest parameters, e.g. 1000000000 (in YAML also '1B'); None = no lower bound."),
    ] = None
    max_parameters: Annotated[
        int | None,
        BeforeValidator(parse_parameter_count),
        Field(
            description="Most parameters, e.g. 80000000000 (in YAML also '80B'); None = no upper bound (the "
            "cluster must still hold it).",
        ),
    ] = None
    min_age_days: Annotated[
        float | None,
        Field(
            ge=0,
            description="Take a revision only once it is this many days old (the hub's lastModified), so a "
            "model still being uploaded or fixed is registered once it has settled; None = any age.",
        ),
    ] = None
    min_downloads: Annotated[
        int | None, Field(ge=0, description="Fewest hub downloads (last 30 days); None = any.")
    ] = None
    deny: list[str] = Field(
        default_factory=list,
        description="Model ids never registered: exact ids or shell patterns such as 'org/*-base'.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Accept models whose config needs their repository's own code (auto_map); they are then "
        "registered with trust_remote_code on. Only for authors you trust.",
    )
    limit: Annotated[
        int, Field(ge=1, description="Most models listed per author (newest revision first).")
    ] = 50
    backend: Literal["hf", "vllm"] = Field(
        default="hf", description="Sampler of the registered sources: 'hf' (transformers) or 'vllm'."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Weights' dtype of the registered sources ('auto' = as stored); sizes the cluster check.",
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        title="Sampling",
        description="Sampling settings of the sources this rule registers.",
    )

    @field_validator("name_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a regular expression: {error}") from None
        return value

    @model_validator(mode="after")
    def _bounds(self) -> WatchRule:
        if self.min_parameters and self.max_parameters and self.min_parameters > self.max_parameters:
            raise FieldProblem(
                "min_parameters",
                f"min_parameters {self.min_parameters} exceeds max_parameters {self.max_parameters}",
            )
        return self


class SamplingClusterConfig(ConfigModel):
    """The GPUs that sample the sources: a model must fit on at most `max_tensor_parallel_size` of them."""

    gpu_memory_gib: Annotated[float, Field(gt=0, description="Memory of one GPU in GiB (H100: 80).")] = 80.0
    max_tensor_parallel_size: Annotated[
        int, Field(ge=1, description="Most GPUs one copy of a model may span (usually the GPUs of a node).")
    ] = 8
    weights_memory_fraction: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description="Share of each GPU's memory the weights may take; the rest holds the KV cache and "
            "activations while sampling.",
        ),
    ] = 0.75


class DiscoveryConfig(ConfigModel):
    """Discovery of new source models on the Hugging Face Hub (`wrpo sources discover`, `wrpo-discover`)."""

    watch: list[WatchRule] = Field(
        min_length=1,
        title="Watch rules",
        description="The rules; a model is taken by the first rule it passes.",
    )
    cluster: SamplingClusterConfig = Field(
        default_factory=SamplingClusterConfig,
        title="Sampling cluster",
        description="GPU memory and GPUs per model copy: a model that does not fit is rejected, the others "
        "get the smallest tensor-parallel size that fits.",
    )

    @model_validator(mode="after")
    def _unique_rule_names(self) -> DiscoveryConfig:
        names = [rule.name for rule in self.watch]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"watch rule names must be unique; repeated: {repeated}")
        return self
