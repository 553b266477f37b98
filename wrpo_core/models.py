"""Loading tokenizers and models from a hub id, a local folder or a `toy-world:` path.

The one place that calls `from_pretrained` for causal LMs and their tokenizers: samplers,
evaluation, the reference pass and the trainers all load through here.

    tokenizer = load_tokenizer("meta-llama/Meta-Llama-3-8B-Instruct")
    model = load_causal_lm("toy-world:demo/target", dtype="float32")
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from wrpo_core.locations import resolve_location


def load_tokenizer(
    path: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Loads a tokenizer and makes sure it can pad (pad = eos when the model has no pad token)."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_location(path), trust_remote_code=trust_remote_code, revision=revision
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
        resolve_location(path), dtype=dtype, trust_remote_code=trust_remote_code, revision=revision
    )
