"""Shared-prompt packing: one sequence [prompt, y_ws, y_wt, y_l] per example, the prompt encoded once.

The response-major batch of `tokenization.ResponseCollator` holds three rows per example, each
with its own copy of the prompt. Packed, an example is one row: the prompt, then its responses
one after the other. A block attention mask lets each response see the prompt and itself
causally, never another response, and its position ids restart at len(prompt), so every
response token sees exactly what it sees in its own row of the unpacked batch and gets the same
log-prob (up to float rounding). A response's first token is scored from the prompt's last
position, which the responses share; each later token from the position before it.

The mask is a 4D tensor that transformers passes to the attention as it is (`masking_utils`
returns a 4D mask unchanged): boolean for sdpa (True = attend), additive (0 / dtype min) for
eager, the forms transformers itself builds for them. Other attention implementations
(flash-attention, flex) take no such mask, custom modelling code (trust_remote_code) may build its
own, and a sliding window shorter than a sequence would be bypassed by the mask: for those,
`packing_problem` says why, and the caller logs it and uses the unpacked batch instead.

The model is called once per batch, as unpacked, so ZeRO-3 ranks stay in step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from wrpo_core.tokenization import IGNORE_INDEX, ResponseCollator

logger = logging.getLogger(__name__)

PROMPT_SEGMENT = 0
"""`segment_ids` of prompt tokens; response j (0-based) is segment j + 1."""
PAD_SEGMENT = -1
"""`segment_ids` of padding."""
PACKED_KEY = "segment_ids"
"""The batch entry that marks a packed batch (`PackedResponseCollator`)."""

PACKABLE_ATTENTION = ("eager", "sdpa")
"""Attention implementations that take a custom 4D mask as transformers passes it on."""
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"})
"""Built-in transformers model types checked against the unpacked path (tests/test_packing.py)."""


def _fill(row: torch.Tensor, start: int, values: Sequence[int]) -> None:
    row[start : start + len(values)] = torch.tensor(list(values), dtype=torch.long)


@dataclass
class PackedResponseCollator:
    """Pads a batch of examples with K responses each into one packed row per example.

    Row i is [prompt_i, response_i0, ..., response_i(K-1)], then padding. Entries: `input_ids`,
    `attention_mask` (1 on tokens, 0 on padding; 2D, for counting: the model gets the 4D block
    mask), `position_ids` (the prompt from 0, each response from len(prompt)), `segment_ids`
    (PROMPT_SEGMENT, response j as j + 1, PAD_SEGMENT) and `labels` (response tokens, IGNORE_INDEX
    elsewhere); a `ref_logps` list (K floats) is stacked to (batch, K) when present, as
    `ResponseCollator` does.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        k = len(features[0]["response_ids"])
        for i, feature in enumerate(features):
            if len(feature["response_ids"]) != k:
                raise ValueError(
                    f"example {i} of the batch has {len(feature['response_ids'])} responses, example 0 has {k}; "
                    "every example in a batch must have the same number"
                )
            if not feature["prompt_ids"]:
                raise ValueError(
                    f"example {i} of the batch has an empty prompt_ids: a response's first token "
                    "is scored from the prompt's last position"
                )
        width = max(len(f["prompt_ids"]) + sum(len(r) for r in f["response_ids"]) for f in features)
        shape = (len(features), width)
        batch = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(shape, dtype=torch.long),
            "position_ids": torch.zeros(shape, dtype=torch.long),
            PACKED_KEY: torch.full(shape, PAD_SEGMENT, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        }
        for i, feature in enumerate(features):
            prompt = feature["prompt_ids"]
            _fill(batch["input_ids"][i], 0, prompt)
            _fill(batch["position_ids"][i], 0, range(len(prompt)))
            batch[PACKED_KEY][i, : len(prompt)] = PROMPT_SEGMENT
            at = len(prompt)
            for j, response in enumerate(feature["response_ids"]):
                _fill(batch["input_ids"][i], at, response)
                _fill(batch["labels"][i], at, response)
                _fill(batch["position_ids"][i], at, range(len(prompt), len(prompt) + len(response)))
                batch[PACKED_KEY][i, at : at + len(response)] = j + 1
                at += len(response)
            batch["attention_mask"][i, :at] = 1
        if "ref_logps" in features[0] and features[0]["ref_logps"] is not None:
            batch["ref_logps"] = torch.tensor([f["ref_logps"] for f in features], dtype=torch.float64)
        return batch


def packed_length(prompt_ids: Sequence[int], response_ids: Sequence[Sequence[int]]) -> int:
    """Tokens of one example packed: the prompt once plus every response."""
    return len(prompt_ids) + sum(len(r) for r in response_ids)


def block_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Which key each query attends to, (batch, 1, T, T) booleans.

    A token attends causally to the prompt and to earlier tokens of its own segment. Padding
    attends only to itself (its output is never used), so no row is empty: an all-masked row
    would make softmax NaN.
    """
    width = segment_ids.shape[1]
    index = torch.arange(width, device=segment_ids.device)
    causal = index[:, None] >= index[None, :]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    visible = ((key == PROMPT_SEGMENT) | (key == query)) & (key != PAD_SEGMENT) & (query != PAD_SEGMENT)
    allowed = (visible & causal) | (index[:, None] == index[None, :])
    return allowed.unsqueeze(1)


def attention_mask_for(segment_ids: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D block mask in the form `implementation` expects: boolean for sdpa, additive for eager.

    ValueError for any other implementation (it would ignore or misread a 4D mask).
    """
    allowed = block_mask(segment_ids)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(
        f"shared-prompt packing needs attention implementation eager or sdpa, the model uses "
        f"{implementation!r}; set pack_prompt: false or load the model with attn_implementation='sdpa'"
    )


def core_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DeepSpeed / DDP / torch.compile wrappers (itself if none)."""
    while not isinstance(model, PreTrainedModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


def packing_problem(model: torch.nn.Module, max_length: int | None) -> str | None:
    """Why `model` cannot score packed batches exactly, or None when it can.

    `max_length` is the longest prompt + response the model will see (None = unknown); it must
    fit in the model's sliding window, if any, since the block mask replaces the window's mask.
    """
    core = core_model(model)
    config = getattr(core, "config", None)
    if config is None or not isinstance(core, PreTrainedModel):
        return f"{type(core).__name__} is not a transformers model"
    if not type(core).__module__.startswith("transformers."):
        return (
            f"{type(core).__name__} is custom modelling code (trust_remote_code), "
            "whose handling of a 4D attention mask is not known"
        )
    if config.model_type not in PACKABLE_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one packing was checked on ({sorted(PACKABLE_MODEL_TYPES)})"
    implementation = config._attn_implementation
    if implementation not in PACKABLE_ATTENTION:
        return (
            f"attention implementation {implementation!r} takes no custom 4D mask "
            f"(packing needs one of {list(PACKABLE_ATTENTION)})"
        )
    window = getattr(config, "sliding_window", None)
    if window is not None and (max_length is None or max_length > window):
        return (
            f"the model's sliding window ({window} tokens) may be shorter than a sequence "
            f"(max_length {max_length}); the block mask would bypass it"
        )
    return None


def choose_collator(
    models: Sequence[torch.nn.Module | None],
    *,
    pad_token_id: int,
    pack: bool,
    max_length: int | None,
    where: str,
) -> PackedResponseCollator | ResponseCollator:
    """The packed collator when `pack` is set and every model given can score packed batches, else the unpacked one.

    A requested packing that a model cannot take is logged with the reason (never silent).
    """
    if pack:
        problems = [p for m in models if m is not None and (p := packing_problem(m, max_length)) is not None]
        if not problems:
            logger.info("%s: shared-prompt packing on (the prompt is encoded once for its responses)", where)
            return PackedResponseCollator(pad_token_id=pad_token_id)
        logger.warning("%s: shared-prompt packing off, one row per response instead: %s", where, problems[0])
    return ResponseCollator(pad_token_id=pad_token_id)


def score_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """For each position t, the position whose logits predict token t: t - 1, or the prompt's last
    position for the first token of a response (the prompt's own first position maps to 0, unused)."""
    prompt_last = (segment_ids == PROMPT_SEGMENT).sum(-1, keepdim=True) - 1
    previous = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids) - 1
    starts = torch.zeros_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = starts & (segment_ids > PROMPT_SEGMENT)
    return torch.where(first, prompt_last.expand_as(segment_ids), previous).clamp(min=0)


def segment_logps(
    logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each response's label tokens and their counts, both (batch, group).

    Computed in float32 via logsumexp, like `logprobs.sequence_logps`, with each token scored
    from `score_positions`.
    """
    if logits.shape[:-1] != labels.shape or labels.shape != segment_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and segment_ids "
            f"{tuple(segment_ids.shape)} do not match"
        )
    rows, width, vocab = logits.shape
    logits = logits.float()
    scored = labels != IGNORE_INDEX
    source = score_positions(segment_ids)
    flat = (torch.arange(rows, device=logits.device)[:, None] * width + source).reshape(-1)
    token_logits = logits.reshape(rows * width, vocab)[flat, labels.masked_fill(~scored, 0).reshape(-1)]
    token_logps = token_logits.view(rows, width) - torch.logsumexp(logits, dim=-1).gather(1, source)
    members = segment_ids[:, :, None] == torch.arange(1, group + 1, device=segment_ids.device)
    members = members & scored[:, :, None]
    return (token_logps.unsqueeze(-1) * members).sum(1), members.sum(1)


def packed_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], group: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and token counts of a packed batch (`PackedResponseCollator`), shape (examples, group).

    One forward pass with the block mask in the model's attention implementation's form.
    """
    core = core_model(model)
    config = core.config
    window = getattr(config, "sliding_window", None)
    if window is not None and int(batch["position_ids"].max()) + 1 > window:
        raise ValueError(
            f"a packed sequence is longer than the model's sliding window ({window} tokens), which the block "
            "mask would bypass; set pack_prompt: false"
        )
    mask = attention_mask_for(batch[PACKED_KEY], config._attn_implementation, core.dtype)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False
    ).logits
    return segment_logps(logits, batch["labels"], batch[PACKED_KEY], group)
