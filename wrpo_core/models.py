"""Loading tokenizers and models from a hub id, a local folder or a `toy-world:` path.

The one place that calls `from_pretrained` for causal LMs, their tokenizers and generation
configs: samplers, evaluation, the reference pass and the trainers all load through here. Pass
the model spec's `revision` to every loader: a hub model's files then all come from that commit.

    tokenizer = load_tokenizer("meta-llama/Meta-Llama-3-8B-Instruct")
    model = load_causal_lm("toy-world:demo/target", dtype="float32")
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from wrpo_core.locations import resolve_model_location
from wrpo_core.storage.layout import CACHED_SAVE_FILE
from wrpo_core.storage.model_folders import SUMS_FILE, is_storage_url, model_folder_identity
from wrpo_core.storage.provenance import file_sha256
from wrpo_core.tokenization import PositionLimit, model_max_positions
from wrpo_core.train.checkpoints import FINGERPRINT_FILE

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
"""Weight files of a model folder: identified by name, size and modification time (not read)."""
MODEL_TEXT_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken", ".py")
"""Config, tokenizer, chat template and modelling-code files: identified by their content's sha256."""
NOT_MODEL_FILES = frozenset(
    {"training_args.bin", "trainer_state.json", "train_results.json", "all_results.json", FINGERPRINT_FILE,
     CACHED_SAVE_FILE, SUMS_FILE}
)  # fmt: skip
"""Files a training job or a download leaves next to a model, which are not the model."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
"""A Hugging Face hub model id (`org/name` or `name`)."""


def load_tokenizer(
    path: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Loads a tokenizer and makes sure it can pad (pad = eos when the model has no pad token)."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_location(path), trust_remote_code=trust_remote_code, revision=revision
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = "auto",
    revision: str | None = None,
) -> PreTrainedModel:
    """Loads a causal LM (its weights in `dtype`; "auto" = as stored)."""
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_location(path), dtype=dtype, trust_remote_code=trust_remote_code, revision=revision
    )


def load_generation_config(
    path: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> GenerationConfig:
    """The model's generation config (its end tokens), as `load_causal_lm` would give the model.

    A model without a generation_config.json gets one derived from its config.json, which is
    what transformers does when it loads the model.
    """
    location = resolve_model_location(path)
    try:
        return GenerationConfig.from_pretrained(location, revision=revision)
    except OSError:  # no generation_config.json: transformers derives it from config.json
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, revision=revision)
        return GenerationConfig.from_model_config(config)


def hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit of a hub model that `from_pretrained` loads now at `revision` (its config's snapshot).

    Online this asks the hub (and downloads config.json); offline it is the cached one. The hub's
    error (not found, no network and nothing cached) propagates.
    """
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent.name


def model_identity(path: str, *, revision: str | None = None) -> dict[str, Any]:
    """What identifies the model a path loads now, cheaply enough for a 16 GB model (JSON data).

    A local folder: its weight files by name, size and modification time in ns (stat calls, no
    reading: a model retrained at the same path rewrites its files, so their times change even
    when the sizes do not), its config, tokenizer, template and code files by content. A folder
    the pipeline downloaded from run storage carries the save it holds (`CACHED_SAVE_FILE`): that
    identifies its weights on every machine, where download times differ. A hub id: the commit
    its revision resolves to. A storage URL of a saved model: the digest of its SHA256SUMS (the
    same on the driver and on the machine that fetches it). FileNotFoundError for a path that is
    none of these, or a folder without weights.
    """
    if is_storage_url(path):  # identified by its SHA256SUMS, without downloading 16 GB to hash them
        return model_folder_identity(path)
    local = Path(resolve_model_location(path))
    if not local.is_dir():
        if local.exists() or not HUB_ID.match(path):
            raise FileNotFoundError(f"model {path}: neither a model folder nor a hub id")
        try:
            commit = hub_commit(path, revision)
        except Exception as exc:  # the hub's errors have many types and often do not name the model
            raise FileNotFoundError(
                f"model {path}: not a local folder, and its revision {revision or 'main'} cannot be resolved "
                f"on the hub or in the local cache: {exc}"
            ) from exc
        return {"hub": path, "revision": commit}
    marker = local / CACHED_SAVE_FILE
    saved_id = json.loads(marker.read_text(encoding="utf-8"))["saved_id"] if marker.is_file() else None
    files: dict[str, Any] = {}
    for item in sorted(local.iterdir()):
        if not item.is_file() or item.name in NOT_MODEL_FILES:
            continue
        if item.name.endswith(WEIGHT_SUFFIXES):
            stat = item.stat()
            files[item.name] = [stat.st_size] if saved_id else [stat.st_size, stat.st_mtime_ns]
        elif item.name.endswith(MODEL_TEXT_SUFFIXES):
            files[item.name] = file_sha256(item)
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise FileNotFoundError(f"model {path}: no weight files (*.safetensors, *.bin) in {local}")
    return {"files": files} if saved_id is None else {"save": saved_id, "files": files}


def load_position_limit(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PositionLimit | None:
    """How many positions the model at `path` holds (see `tokenization.model_max_positions`); only its config is read."""
    config = AutoConfig.from_pretrained(
        resolve_model_location(path), trust_remote_code=trust_remote_code, revision=revision
    )
    return model_max_positions(config, tokenizer)


def loaded_dtype(
    path: str, requested: torch.dtype | str, *, trust_remote_code: bool = False, revision: str | None = None
) -> torch.dtype | str:
    """The dtype `load_causal_lm(path, dtype=requested)` gives the weights: "auto" is the stored one.

    So that what a result depends on is named the same whichever way it was asked for (an fp32
    checkpoint loaded "auto" is float32). Only the config is read; "auto" stays when it names none.
    """
    if requested != "auto":
        return requested
    config = AutoConfig.from_pretrained(
        resolve_model_location(path), trust_remote_code=trust_remote_code, revision=revision
    )
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
    return stored if isinstance(stored, torch.dtype) else "auto"
