"""Tokenization of (prompt, responses) with the tokenizer's own chat template, and the padding collator.

Rules (used identically by SFT, reference log-probs and WRPO):

- The prompt is the chat template applied to one user turn WITH the generation prompt (so
  the assistant header belongs to the prompt and is masked). The response is what the
  template adds for the assistant turn after that prefix.
- The end-of-turn token is the model's, read from its chat template (`end_of_turn_id`): the
  first added token the template writes after an assistant message (Llama-3-Instruct
  <|eot_id|>, Gemma-2 <end_of_turn>, Qwen2 / InternLM2.5 / Yi <|im_end|>, Phi-3 <|end|>,
  Mistral </s>), not `tokenizer.eos_token`, which differs for several families (Gemma-2's
  <eos>, Phi-3's <|endoftext|>, InternLM's </s>, the first Llama-3-Instruct release's
  <|end_of_text|>). Only a template that writes no added token after the message falls back
  to the eos token. Samplers stop on that token and on every end token the model's
  generation config names (`stop_token_ids`).
- Exactly one end-of-turn token ends every response: tokens the template puts after the
  end-of-turn token (e.g. Qwen's trailing "\\n", Phi-3-mini's eos after <|end|>) are dropped,
  and one is appended only when the template emits none. The authors' pipeline appends
  `eos_token_id` to a response whose template already ended it with <|eot_id|>, training on a
  second end token; we do not. Their labels also include the assistant header tokens; ours
  start after the header.
- When prompt + longest response exceeds `max_length`, the prompt is truncated from the
  LEFT to `max_prompt_length` tokens (a leading BOS is kept), then any response still too
  long is cut at the right to fit (a cut response loses its end-of-turn token).
- Labels are -100 on prompt and padding, so summed log-probs cover response tokens only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                 "n_ctx")  # fmt: skip
"""Model-config attributes that hold the number of positions a model takes (Llama/Mistral/Qwen/Gemma
name it max_position_embeddings, GPT-2 n_positions, ChatGLM seq_length, ...): the ones vLLM reads."""

_UNSET_LENGTH = int(1e29)
"""A tokenizer without a stated limit carries transformers' placeholder (int(1e30)): at or above this, none."""


@dataclass(frozen=True)
class PositionLimit:
    """How many positions (prompt + response tokens) a model holds, and where that number was read."""

    positions: int
    source: str


def model_max_positions(
    model_config: Any, tokenizer: PreTrainedTokenizerBase | None = None
) -> PositionLimit | None:
    """The number of positions a model takes: its config's limit, else its tokenizer's `model_max_length`.

    The config wins (the smallest of its `POSITION_KEYS` that are set): it is the size the weights were
    built and trained for, and the number vLLM derives its `max_model_len` from, so both sampling
    backends agree. The tokenizer's `model_max_length` is metadata: most chat tokenizers (Llama-3,
    Mistral) carry transformers' 1e30 placeholder, and a set one is sometimes a training recipe's
    length below what the model holds; it is used only when the config states no limit. RoPE scaling
    is not extrapolated (a scaled model that states its original length is limited to it). None when
    neither states a limit.
    """
    found = [
        (int(value), key)
        for key in POSITION_KEYS
        if isinstance(value := getattr(model_config, key, None), int)
        and not isinstance(value, bool)
        and value > 0
    ]
    if found:
        positions, key = min(found)
        return PositionLimit(positions, f"{key} {positions} of the model config")
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _UNSET_LENGTH:
        return PositionLimit(length, f"model_max_length {length} of the tokenizer (the config states none)")
    return None


@dataclass
class TokenizeReport:
    """What tokenization did to a dataset: rows, truncated prompts, truncated responses."""

    rows: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0

    def add(self, example: EncodedExample) -> None:
        self.rows += 1
        self.prompts_truncated += example.prompt_truncated
        self.responses_truncated += example.responses_truncated


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one prompt and its responses, with what truncation did to them."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    prompt_truncated: bool
    responses_truncated: int


_PROBE_USER = "Hello."
_PROBE_REPLY = "WRPO-end-of-turn-probe"
"""A user message and an assistant reply rendered through the template to find its end-of-turn token."""


def template_end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The first added (special) token the chat template writes right after an assistant message.

    None when the template writes no added token there (e.g. it ends a turn with plain text).
    """
    messages = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
    rendered = _template(tokenizer, messages, generation=False)
    at = rendered.rfind(_PROBE_REPLY)
    if at < 0:
        raise ValueError(
            f"chat template of {tokenizer.name_or_path!r} does not write the assistant message's content; "
            "cannot find the token that ends an assistant turn"
        )
    added = tokenizer.added_tokens_decoder
    tail = _ids(tokenizer, rendered[at + len(_PROBE_REPLY) :])
    return next((token_id for token_id in tail if token_id in added), None)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, end_of_turn_token: str | None = None) -> int:
    """The id that ends an assistant turn: `end_of_turn_token` if given, else the chat template's.

    The template's is the first added token it writes after an assistant message
    (`template_end_of_turn_id`); a template that writes none there ends turns with the eos token.
    """
    if end_of_turn_token is None:
        found = template_end_of_turn_id(tokenizer)
        if found is not None:
            return int(found)
    token = end_of_turn_token or tokenizer.eos_token
    if token is None:
        raise ValueError(
            f"chat template of {tokenizer.name_or_path!r} writes no special token after an assistant message "
            "and the tokenizer has no eos_token; pass end_of_turn_token"
        )
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"end-of-turn token {token!r} is not in the tokenizer's vocabulary")
    return int(token_id)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> list[int]:
    """Every token id that ends a sample: the end-of-turn id first, then the model's other end tokens.

    The others are the generation config's `eos_token_id` (an id or a list of ids; Llama-3-Instruct
    names both <|end_of_text|> and <|eot_id|>, Qwen2 both <|im_end|> and <|endoftext|>) and the
    tokenizer's eos token, each once.
    """
    found = [end_of_turn_id(tokenizer)]
    named = getattr(generation_config, "eos_token_id", None)
    named = [] if named is None else [named] if isinstance(named, int) else list(named)
    for token_id in [*named, tokenizer.eos_token_id]:
        if token_id is not None and int(token_id) not in found:
            found.append(int(token_id))
    return found


def _template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation: bool) -> str:
    if not tokenizer.chat_template:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; WRPO needs an instruct model's template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The chat-templated prompt (one user turn plus the assistant header), as sent to generation."""
    return _template(tokenizer, [{"role": "user", "content": prompt}], generation=True)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template already holds BOS and other specials: never let the tokenizer add them again.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, *, templated_prompt: str, eot_id: int
) -> list[int]:
    """Token ids of `response` as the assistant turn after `prompt`, ending in exactly one eot_id."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    full = _template(tokenizer, messages, generation=False)
    if not full.startswith(templated_prompt):
        raise ValueError(
            f"chat template of {tokenizer.name_or_path!r} does not render the assistant turn as a continuation "
            "of the generation prompt; cannot separate prompt from response tokens"
        )
    ids = _ids(tokenizer, full[len(templated_prompt) :])
    if eot_id in ids:
        last = len(ids) - 1 - ids[::-1].index(eot_id)
        ids = ids[: last + 1]
    else:
        ids.append(eot_id)
    return ids


def truncate(
    prompt_ids: list[int],
    response_ids: list[list[int]],
    *,
    max_length: int,
    max_prompt_length: int,
    bos_id: int | None,
) -> EncodedExample:
    """Applies the module's truncation rule to one prompt and its responses."""
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})"
        )
    longest = max(len(r) for r in response_ids)
    prompt_truncated = False
    if len(prompt_ids) + longest > max_length and len(prompt_ids) > max_prompt_length:
        keep_bos = bos_id is not None and prompt_ids[0] == bos_id
        tail = max_prompt_length - 1 if keep_bos else max_prompt_length
        prompt_ids = ([bos_id] if keep_bos else []) + prompt_ids[-tail:]
        prompt_truncated = True
    room = max_length - len(prompt_ids)
    cut = sum(len(r) > room for r in response_ids)
    return EncodedExample(prompt_ids, [r[:room] for r in response_ids], prompt_truncated, cut)


def fit_lengths(
    max_length: int, max_prompt_length: int, max_positions: int, *, where: str = "training"
) -> tuple[int, int]:
    """(max_length, max_prompt_length) clipped to a model that holds `max_positions` positions.

    A configured `max_length` above the model's positions would index past its position table (or
    extrapolate RoPE beyond its training): it is clipped to `max_positions`, and `max_prompt_length` to
    keep it below (scaled in proportion, at least one response token left). Unchanged when they fit.
    """
    if max_positions < 2:
        raise ValueError(
            f"{where}: the model holds {max_positions} position(s); it cannot take a prompt and a response"
        )
    if max_length <= max_positions:
        return max_length, max_prompt_length
    prompt = min(
        max_prompt_length, max(1, max_prompt_length * max_positions // max_length), max_positions - 1
    )
    return max_positions, prompt


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    responses: Sequence[str],
    *,
    max_length: int,
    max_prompt_length: int,
    eot_id: int | None = None,
    max_positions: int | None = None,
) -> EncodedExample:
    """Tokenizes one prompt with its responses (e.g. [y_ws, y_wt, y_l]) and truncates them to fit.

    `max_positions` (the model's, see `model_max_positions`) caps the lengths: `fit_lengths` clips
    `max_length` (and `max_prompt_length` below it) to what the model holds; the truncation then counts.
    """
    if max_positions is not None:
        max_length, max_prompt_length = fit_lengths(max_length, max_prompt_length, max_positions)
    eot = end_of_turn_id(tokenizer) if eot_id is None else eot_id
    templated = prompt_text(tokenizer, prompt)
    prompt_ids = _ids(tokenizer, templated)
    response_ids = [
        encode_response(tokenizer, prompt, response, templated_prompt=templated, eot_id=eot)
        for response in responses
    ]
    return truncate(
        prompt_ids,
        response_ids,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        bos_id=tokenizer.bos_token_id,
    )


@dataclass
class ResponseCollator:
    """Pads a batch of examples with K responses each into one (K * batch, T) tensor set.

    Rows are response-major: all first responses, then all second ones, ... (for WRPO:
    y_ws of every example, then y_wt, then y_l), so a single forward pass scores them all.
    Features need `prompt_ids` and `response_ids`; a `ref_logps` list (K floats) is stacked
    to (batch, K) when present.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        k = len(features[0]["response_ids"])
        if any(len(f["response_ids"]) != k for f in features):
            raise ValueError("every example in a batch must have the same number of responses")
        rows = [(f["prompt_ids"], f["response_ids"][j]) for j in range(k) for f in features]
        width = max(len(p) + len(r) for p, r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (prompt, response) in enumerate(rows):
            n_prompt, n_total = len(prompt), len(prompt) + len(response)
            input_ids[i, :n_total] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
            labels[i, n_prompt:n_total] = torch.tensor(list(response), dtype=torch.long)
            attention_mask[i, :n_total] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "ref_logps" in features[0] and features[0]["ref_logps"] is not None:
            batch["ref_logps"] = torch.tensor([f["ref_logps"] for f in features], dtype=torch.float64)
        return batch
