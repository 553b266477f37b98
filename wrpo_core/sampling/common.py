"""What every sampler backend shares: per-sample seeds, prompt encoding, SAMPLES rows, the report."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from wrpo_core.config import ConfigError
from wrpo_core.schemas import SAMPLES, conform
from wrpo_core.tokenization import PositionLimit, prompt_text


def sample_seed(base_seed: int, model: str, prompt_id: str, sample_index: int) -> int:
    """A 63-bit seed derived from (base seed, model name, prompt_id, sample index)."""
    digest = hashlib.sha256(f"{base_seed}|{model}|{prompt_id}|{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class SamplingReport:
    """What a sampling run did: prompts, samples, tokens, skipped/truncated prompts, throughput."""

    prompts: int = 0
    samples: int = 0
    completion_tokens: int = 0
    prompts_truncated: int = 0
    prompts_skipped_empty: int = 0
    max_prompt_tokens: int | None = None
    """The prompt length prompts were cut to: the configured limit or, when smaller, the model's room."""
    finished_by_length: int = 0
    seconds: float = 0.0
    skipped_ids: list[str] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def response_reserve(limit: PositionLimit, max_new_tokens: int) -> int:
    """The response room every prompt keeps: `max_new_tokens`, or half the model's positions if that is less.

    With a length limit as large as the context (the authors' 4096 on a 4k model), reserving it
    whole would leave no room for any prompt; a response that reaches the context's end instead is
    stopped there ("length") and left out of selection like any cut response.
    """
    return min(max_new_tokens, limit.positions // 2)


def response_budget(limit: PositionLimit | None, prompt_tokens: int, max_new_tokens: int) -> int:
    """The most new tokens a sample may have after a prompt of `prompt_tokens`: what the model still holds."""
    return max_new_tokens if limit is None else max(1, min(max_new_tokens, limit.positions - prompt_tokens))


def prompt_token_budget(
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_tokens: int,
    limit: PositionLimit | None,
    max_new_tokens: int | None,
    model_name: str,
) -> int:
    """The longest prompt (in tokens) a sampler sends: `max_prompt_tokens`, or the model's room if smaller.

    The model's room is its positions (`tokenization.model_max_positions`) minus the response
    reserve (`response_reserve`). Raises ConfigError naming the model and the numbers when even an
    empty prompt (the chat template alone) does not fit in that room.
    """
    if limit is None or max_new_tokens is None:
        return max_prompt_tokens
    room = limit.positions - response_reserve(limit, max_new_tokens)
    template = len(tokenizer(prompt_text(tokenizer, ""), add_special_tokens=False)["input_ids"])
    if room < max(template, 1):
        raise ConfigError(
            f"model {model_name}: holds {limit.positions} positions ({limit.source}); keeping "
            f"{response_reserve(limit, max_new_tokens)} for the response (sampling.max_new_tokens "
            f"{max_new_tokens}) leaves {room} for the prompt, but the chat template alone takes {template} "
            f"token(s): lower sampling.max_new_tokens to at most {limit.positions - template}"
        )
    return min(max_prompt_tokens, room)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[str],
    prompts: list[str],
    *,
    max_prompt_tokens: int,
    report: SamplingReport,
    limit: PositionLimit | None = None,
    max_new_tokens: int | None = None,
    model_name: str = "model",
) -> list[tuple[str, list[int]]]:
    """Chat-templated prompt ids, longest first; empty prompts skipped, long ones cut from the left.

    The template is applied once as text and tokenized without special tokens, so BOS comes
    only from the template (never doubled). Truncation keeps the end of the prompt: the
    question's last part and the assistant header. Prompts are cut to `max_prompt_tokens` or, with
    the model's position `limit` and `max_new_tokens`, to the model's room when smaller
    (`prompt_token_budget`); every cut prompt is counted in `report.prompts_truncated`.
    """
    max_prompt_tokens = prompt_token_budget(
        tokenizer, max_prompt_tokens=max_prompt_tokens, limit=limit, max_new_tokens=max_new_tokens,
        model_name=model_name,
    )  # fmt: skip
    report.max_prompt_tokens = max_prompt_tokens
    encoded = []
    for pid, prompt in zip(prompt_ids, prompts, strict=True):
        if not prompt.strip():
            report.prompts_skipped_empty += 1
            report.skipped_ids.append(pid)
            continue
        ids = list(tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        if len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]
            report.prompts_truncated += 1
        encoded.append((pid, ids))
    encoded.sort(key=lambda item: len(item[1]), reverse=True)
    report.prompts = len(encoded)
    return encoded


class SampleRows:
    """Accumulates SAMPLES columns (and the report's counters) one sample at a time."""

    def __init__(self, model_name: str, report: SamplingReport):
        self.model_name = model_name
        self.report = report
        self.columns: dict[str, list] = {name: [] for name in SAMPLES.names}

    def add(self, prompt_id: str, sample_index: int, text: str, *, finished: bool, prompt_tokens: int,
            completion_tokens: int, seed: int) -> None:  # fmt: skip
        values = {
            "prompt_id": prompt_id, "model": self.model_name, "sample_index": sample_index, "text": text,
            "finish_reason": "stop" if finished else "length", "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "seed": seed,
        }  # fmt: skip
        for name, value in values.items():
            self.columns[name].append(value)
        self.report.samples += 1
        self.report.completion_tokens += completion_tokens
        self.report.finished_by_length += not finished

    def table(self) -> pa.Table:
        return conform(pa.table(self.columns), SAMPLES, where=f"samples of {self.model_name}")
