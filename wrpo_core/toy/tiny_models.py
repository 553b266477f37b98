"""Tiny random Llama models for tests and toy runs: built locally from a seed, saved in HF format."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
) -> LlamaConfig:
    """Config for a tiny Llama matching `tokenizer` (vocab size, pad/bos/eos ids), with tied embeddings.

    `intermediate_size` defaults to `4 * hidden_size`.
    """
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size if intermediate_size is not None else 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, **config_kwargs
) -> LlamaForCausalLM:
    """Randomly initialised float32 tiny Llama; the same seed gives identical weights.

    `config_kwargs` go to `tiny_llama_config`. The global torch RNG state is left untouched.
    """
    config = tiny_llama_config(tokenizer, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model


def save_tiny_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> str:
    """Save model (safetensors) and tokenizer (with chat template) to `out_dir`; return the path as str."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
