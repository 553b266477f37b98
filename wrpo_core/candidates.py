"""Whether a hub model may become a source: the watch rules' tests and the loading and size checks.

Two stages, cheapest first (see `wrpo_core.discovery` for the whole run):

    listing_problem(rule, model, now)        # deny-list, name, license, downloads, age, parameter range
    check_revision(rule, repo_id, sha, cluster, dtype=...)   # at that exact commit: weights present,
                                             # config (remote code only if allowed), causal LM, tokenizer,
                                             # chat template, size -> CheckedModel, or raises Rejected(reason)

The size check derives the tensor-parallel degree: the smallest power of two, at most
`cluster.max_tensor_parallel_size`, that divides the attention heads and puts at most
`gpu_memory_gib * weights_memory_fraction` of weights on each GPU (`tensor_parallel_size`).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

from wrpo_core import hub
from wrpo_core.config import SamplingClusterConfig, WatchRule

BYTES_PER_DTYPE = {
    "float64": 8, "F64": 8, "float32": 4, "F32": 4, "float16": 2, "F16": 2, "bfloat16": 2, "BF16": 2,
    "float8_e4m3fn": 1, "F8_E4M3": 1, "F8_E5M2": 1, "int64": 8, "I64": 8, "int32": 4, "I32": 4,
    "int16": 2, "I16": 2, "int8": 1, "I8": 1, "U8": 1, "uint8": 1, "BOOL": 1,
}  # fmt: skip
"""Bytes per parameter of a torch dtype name or a safetensors dtype code."""

TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*\.json|tokenizer\.model|.*\.tiktoken|vocab\..*|merges\.txt|special_tokens_map\.json|"
    r"added_tokens\.json|chat_template\.(jinja|json)|additional_chat_templates/.*\.jinja|generation_config\.json)$"
)
"""The files a tokenizer and its chat template may need (downloaded with config.json, never the weights)."""
WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin)$")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class Rejected(Exception):
    """A hub model that may not become a source; the message is the reason shown to operators."""


@dataclass(frozen=True)
class CheckedModel:
    """A model that passed every check at one revision, with what registering it needs."""

    repo_id: str
    revision: str
    parameters: int
    weights_gib: float
    tensor_parallel_size: int
    needs_remote_code: bool


def listing_problem(rule: WatchRule, model: hub.HubModel, now: dt.datetime) -> str | None:
    """Why the listing alone rules the model out under `rule` (None = worth checking its files)."""
    denied = next((p for p in rule.deny if fnmatch.fnmatchcase(model.repo_id, p)), None)
    if denied is not None:
        return f"on the deny-list ({denied})"
    if rule.name_pattern is not None and not re.fullmatch(rule.name_pattern, model.repo_id):
        return f"name does not match {rule.name_pattern!r}"
    if rule.licenses and not set(model.licenses) & set(rule.licenses):
        return f"license {', '.join(model.licenses) or 'unknown'} is not one of {', '.join(rule.licenses)}"
    if rule.min_downloads is not None and (model.downloads or 0) < rule.min_downloads:
        return f"{model.downloads or 0} downloads, fewer than {rule.min_downloads}"
    if rule.min_age_days is not None:
        if model.last_modified is None:
            return "the hub gives no lastModified date, so its age is unknown"
        age = (now - model.last_modified).total_seconds() / 86400
        if age < rule.min_age_days:
            return f"revision is {age:.1f} days old, younger than {rule.min_age_days:g}"
    if model.parameters is not None:
        return parameter_problem(rule, model.parameters)
    return None


def parameter_problem(rule: WatchRule, parameters: int) -> str | None:
    if rule.min_parameters is not None and parameters < rule.min_parameters:
        return f"{parameters:,} parameters, fewer than {rule.min_parameters:,}"
    if rule.max_parameters is not None and parameters > rule.max_parameters:
        return f"{parameters:,} parameters, more than {rule.max_parameters:,}"
    return None


def tensor_parallel_size(
    weights_bytes: float, attention_heads: int | None, cluster: SamplingClusterConfig
) -> int:
    """The smallest power-of-two GPU count that holds the weights and divides the heads; Rejected if none."""
    per_gpu = cluster.gpu_memory_gib * 2**30 * cluster.weights_memory_fraction
    size = 1
    while size <= cluster.max_tensor_parallel_size:
        if weights_bytes / size <= per_gpu and (attention_heads is None or attention_heads % size == 0):
            return size
        size *= 2
    needed = weights_bytes / 2**30
    if weights_bytes / cluster.max_tensor_parallel_size > per_gpu:
        raise Rejected(
            f"too large for the sampling cluster: {needed:.1f} GiB of weights, but at most "
            f"{cluster.max_tensor_parallel_size} GPUs x {cluster.gpu_memory_gib:g} GiB x "
            f"{cluster.weights_memory_fraction:g} = {cluster.max_tensor_parallel_size * per_gpu / 2**30:.1f} GiB"
        )
    raise Rejected(
        f"no tensor-parallel size up to {cluster.max_tensor_parallel_size} both fits {needed:.1f} GiB of "
        f"weights and divides its {attention_heads} attention heads"
    )


def weights_bytes(parameters_by_dtype: dict[str, int], dtype: str) -> float:
    """Bytes of the weights: as stored (dtype 'auto', from the per-dtype counts) or all cast to `dtype`."""
    if dtype != "auto":
        return sum(parameters_by_dtype.values()) * BYTES_PER_DTYPE[dtype]
    unknown = sorted(set(parameters_by_dtype) - set(BYTES_PER_DTYPE))
    if unknown:
        raise Rejected(
            f"weights stored as {unknown}, whose size per parameter is unknown; set the rule's dtype"
        )
    return sum(count * BYTES_PER_DTYPE[name] for name, count in parameters_by_dtype.items())


def _weights_problem(
    folder_files: dict[str, int | None], index: dict | None, index_name: str | None
) -> str | None:
    if not any(WEIGHT_FILES.match(name) for name in folder_files):
        return "no weights (model*.safetensors or pytorch_model*.bin) in this revision"
    if index is not None:
        missing = sorted(set(index.get("weight_map", {}).values()) - set(folder_files))
        if missing:
            return f"incomplete upload: {index_name} names shards this revision lacks: {missing[:3]}"
    return None


def _load_config(folder: Path, remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=remote_code)
    except Exception as error:
        raise Rejected(f"config does not load: {type(error).__name__}: {error}") from error


def _is_causal_lm(config, raw: dict) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING or "AutoModelForCausalLM" in raw.get("auto_map", {})


def _check_tokenizer(folder: Path, remote_code: bool) -> None:
    from wrpo_core.models import load_tokenizer
    from wrpo_core.tokenization import end_of_turn_id, prompt_text

    try:
        tokenizer = load_tokenizer(str(folder), trust_remote_code=remote_code)
    except Exception as error:
        raise Rejected(f"tokenizer does not load: {type(error).__name__}: {error}") from error
    if not tokenizer.chat_template:
        raise Rejected("no chat template (sources answer prompts as chat turns)")
    try:
        prompt_text(tokenizer, "Hello")  # what sampling sends
    except Exception as error:
        raise Rejected(
            f"chat template does not render a user turn: {type(error).__name__}: {error}"
        ) from error
    try:
        end_of_turn_id(tokenizer)  # what sampling stops on and training appends to every response
    except ValueError as error:
        raise Rejected(f"chat template: {error}") from error


def _meta_parameter_counts(config, remote_code: bool) -> dict[str, int]:
    """Parameters per dtype of a model built on the meta device from its config (no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote_code)
    except Exception as error:
        raise Rejected(
            f"parameter count unknown (not on the hub, and the config does not build): {error}"
        ) from error
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return {dtype.removeprefix("torch."): sum(p.numel() for p in model.parameters())}


def check_revision(
    rule: WatchRule, repo_id: str, revision: str, cluster: SamplingClusterConfig, *, dtype: str
) -> CheckedModel:
    """Every check at one exact commit; raises Rejected with the reason, HubError when the hub fails.

    Downloads config.json and the tokenizer files (never the weights) into the hub cache.
    """
    try:
        model, files = hub.model_at(repo_id, revision)
    except hub.ModelUnavailable as error:
        raise Rejected(str(error)) from error
    index_name = next((name for name in WEIGHT_INDEXES if name in files), None)
    if "config.json" not in files:
        raise Rejected("no config.json in this revision")
    wanted = [
        "config.json",
        *(n for n in files if TOKENIZER_FILES.match(n)),
        *([index_name] if index_name else []),
    ]
    try:
        folder = hub.download(repo_id, revision, wanted)
    except hub.ModelUnavailable as error:
        raise Rejected(str(error)) from error
    index = _read_json(folder, index_name) if index_name else None
    problem = _weights_problem(files, index, index_name)
    if problem:
        raise Rejected(problem)
    raw = _read_json(folder, "config.json")
    needs_remote_code = "auto_map" in raw
    if needs_remote_code and not rule.trust_remote_code:
        raise Rejected(
            f"needs its repository's code (auto_map: {sorted(raw['auto_map'])}); the rule does not allow "
            "trust_remote_code"
        )
    if needs_remote_code:
        code = [n for n in files if n.endswith(".py")]
        folder = hub.download(repo_id, revision, code) if code else folder
    config = _load_config(folder, needs_remote_code)
    if not _is_causal_lm(config, raw):
        raise Rejected(f"not a causal language model (model_type {getattr(config, 'model_type', None)!r})")
    _check_tokenizer(folder, needs_remote_code)
    counts = model.parameters_by_dtype or _meta_parameter_counts(config, needs_remote_code)
    parameters = sum(counts.values())
    problem = parameter_problem(rule, parameters)
    if problem:
        raise Rejected(problem)
    size = weights_bytes(counts, dtype)
    heads = getattr(config.get_text_config(), "num_attention_heads", None)
    tp = tensor_parallel_size(size, heads, cluster)
    return CheckedModel(repo_id, revision, parameters, round(size / 2**30, 3), tp, needs_remote_code)


def _read_json(folder: Path, name: str) -> dict:
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise Rejected(f"{name} is not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise Rejected(f"{name} is not a JSON object")
    return data
