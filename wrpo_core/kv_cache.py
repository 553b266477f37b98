"""KV-cache helpers shared by the sampler's one prefill per prompt and the scorer's shared prefixes.

Both run a decoder once over the tokens many rows share and hand the cache to later calls; both
need the keyword the installed transformers takes a cache under, and a cache they may copy and
re-index (plain full-attention `DynamicLayer`s only).
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import DynamicCache


@functools.cache
def _keyword_of(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword a model's forward (and `generate`) takes its KV cache under.

    `past_key_values` in transformers 5.20 (the GPU lock), `cache` in later 5.x releases (which still
    accept the old name with a FutureWarning). Looked up once per model class.
    """
    return _keyword_of(type(model))


def plain_dynamic_cache(model: torch.nn.Module) -> DynamicCache | None:
    """An empty cache for `model` when every layer of it is a plain full-attention `DynamicLayer`
    (which can be copied, repeated and re-indexed by row); None for sliding-window, linear-attention
    or no layers."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    return cache


def prefill(
    model: torch.nn.Module,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> DynamicCache:
    """`cache` filled by `model`'s decoder (`base_model`, without its head: only the cache is wanted)."""
    base = model.base_model
    base(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
        **{cache_keyword(base): cache},
    )  # fmt: skip
    return cache
