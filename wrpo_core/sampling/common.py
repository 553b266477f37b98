"""What every sampler backend shares: per-sample seeds, prompt encoding, SAMPLES rows, the report."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from wrpo_core.schemas import SAMPLES, conform
from wrpo_core.tokenization import prompt_text


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
    finished_by_length: int = 0
    seconds: float = 0.0
    skipped_ids: list[str] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[str],
    prompts: list[str],
    *,
    max_prompt_tokens: int,
    report: SamplingReport,
) -> list[tuple[str, list[int]]]:
    """Chat-templated prompt ids, longest first; empty prompts skipped, long ones cut from the left.

    The template is applied once as text and tokenized without special tokens, so BOS comes
    only from the template (never doubled). Truncation keeps the end of the prompt: the
    question's last part and the assistant header.
    """
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
