"""Batched sampling with Hugging Face transformers (CPU or GPU), reproducible per sample.

Every (model, prompt_id, sample_index) has its own seed and its own torch.Generator: a
logits processor draws each row's next token (temperature, top-p) from that generator and
forces it, while `generate` runs greedily over the batch with the KV cache. A rerun thus
reproduces each sample on the same hardware whatever else was in its batch (up to the
floating-point effects of padding). Prompts are chat-templated once (BOS comes only from
the template), sorted by length, left-padded, and each prompt's n samples share a batch.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from wrpo_core.config import SamplingConfig
from wrpo_core.schemas import SAMPLES, conform
from wrpo_core.tokenization import end_of_turn_id, prompt_text


def sample_seed(base_seed: int, model: str, prompt_id: str, sample_index: int) -> int:
    """A 63-bit seed derived from (base seed, model name, prompt_id, sample index)."""
    digest = hashlib.sha256(f"{base_seed}|{model}|{prompt_id}|{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class PerRowSampling(LogitsProcessor):
    """Samples each row's next token from its own generator (temperature, nucleus) and forces it."""

    def __init__(self, generators: list[torch.Generator], *, temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.temperature == 0:
            return scores  # greedy
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Keep the smallest set of tokens whose probabilities reach top_p (always the top one).
            drop = cumulative - sorted_logits.softmax(-1) >= self.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        forced = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            token = torch.multinomial(probs[row], 1, generator=generator)
            forced[row, token] = 0.0
        return forced


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


@dataclass
class HFSampler:
    """Samples n responses per prompt from one causal LM with transformers' `generate`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    sampling: SamplingConfig
    batch_size: int = 16
    max_prompt_tokens: int = 1800
    progress: bool = True

    def _encode(self, prompt: str) -> tuple[list[int], bool]:
        ids = list(self.tokenizer(prompt_text(self.tokenizer, prompt), add_special_tokens=False)["input_ids"])
        if len(ids) <= self.max_prompt_tokens:
            return ids, False
        return ids[-self.max_prompt_tokens :], True  # keep the end: the question and the assistant header

    @torch.inference_mode()
    def sample(self, prompt_ids: list[str], prompts: list[str]) -> tuple[pa.Table, SamplingReport]:
        """SAMPLES rows for every (prompt, sample index); empty prompts are skipped and counted."""
        report = SamplingReport()
        start = time.perf_counter()
        encoded = []
        for pid, prompt in zip(prompt_ids, prompts, strict=True):
            if not prompt.strip():
                report.prompts_skipped_empty += 1
                report.skipped_ids.append(pid)
                continue
            ids, truncated = self._encode(prompt)
            report.prompts_truncated += truncated
            encoded.append((pid, ids))
        encoded.sort(key=lambda item: len(item[1]), reverse=True)
        report.prompts = len(encoded)
        columns: dict[str, list] = {name: [] for name in SAMPLES.names}
        n = self.sampling.n
        bar = tqdm(
            total=len(encoded) * n,
            desc=f"sampling {self.model_name}",
            unit="sample",
            disable=not self.progress,
        )
        for first in range(0, len(encoded), self.batch_size):
            chunk = encoded[first : first + self.batch_size]
            rows = [(pid, ids, k) for pid, ids in chunk for k in range(n)]
            self._generate(rows, columns, report)
            bar.update(len(rows))
            bar.set_postfix(samples_per_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.1f}")
        bar.close()
        report.seconds = time.perf_counter() - start
        return conform(pa.table(columns), SAMPLES, where=f"samples of {self.model_name}"), report

    def _generate(
        self, rows: list[tuple[str, list[int], int]], columns: dict[str, list], report: SamplingReport
    ) -> None:
        device = self.model.device
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        eot = end_of_turn_id(self.tokenizer)
        width = max(len(ids) for _, ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (_, ids, _) in enumerate(rows):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        seeds = [sample_seed(self.sampling.seed, self.model_name, pid, k) for pid, _, k in rows]
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=self.sampling.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eot,
            num_beams=1,
        )
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList(
                [PerRowSampling(generators, temperature=self.sampling.temperature, top_p=self.sampling.top_p)]
            ),
        )
        new_tokens = out[:, width:].cpu().tolist()
        for (pid, ids, k), seed, tokens in zip(rows, seeds, new_tokens, strict=True):
            finished = eot in tokens
            completion = tokens[: tokens.index(eot)] if finished else tokens
            columns["prompt_id"].append(pid)
            columns["model"].append(self.model_name)
            columns["sample_index"].append(k)
            columns["text"].append(self.tokenizer.decode(completion, skip_special_tokens=True))
            columns["finish_reason"].append("stop" if finished else "length")
            columns["prompt_tokens"].append(len(ids))
            columns["completion_tokens"].append(len(completion) + int(finished))
            columns["seed"].append(seed)
            report.samples += 1
            report.completion_tokens += len(completion) + int(finished)
            report.finished_by_length += not finished
