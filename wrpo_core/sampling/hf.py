"""Batched sampling with Hugging Face transformers (CPU or GPU), reproducible per sample.

Every (model, prompt_id, sample_index) has its own seed and its own torch.Generator: a
logits processor draws each row's next token (temperature, top-p) from that generator and
forces it, while `generate` runs greedily over the batch with the KV cache. A rerun thus
reproduces each sample on the same hardware whatever else was in its batch (up to the
floating-point effects of padding). Prompts are chat-templated once (BOS comes only from
the template), sorted by length, left-padded, and each prompt's n samples share a batch.
A sample ends at the first of the model's end tokens (`tokenization.stop_token_ids`: the chat
template's end-of-turn token and every eos id of the model's generation config); the end token
is counted in `completion_tokens` but not written to the text. One exception to "whatever else
was in its batch": when max_new_tokens exceeds what the model holds after the batch's longest
(left-padded) prompt, the whole batch stops there, so a short prompt's cut point depends on its
neighbours (vLLM budgets each request by its own prompt).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

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
from wrpo_core.sampling.common import SampleRows, SamplingReport, encode_prompts, response_budget, sample_seed
from wrpo_core.tokenization import PositionLimit, model_max_positions, stop_token_ids


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
class HFSampler:
    """Samples n responses per prompt from one causal LM with transformers' `generate`.

    `on_progress(done, total)`, when set, is called with the samples done at the start and after each batch.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    sampling: SamplingConfig
    batch_size: int = 16
    max_prompt_tokens: int = 1800
    progress: bool = True
    on_progress: Callable[[int, int], None] | None = None

    @torch.inference_mode()
    def sample(self, prompt_ids: list[str], prompts: list[str]) -> tuple[pa.Table, SamplingReport]:
        """SAMPLES rows for every (prompt, sample index); empty prompts are skipped and counted."""
        report = SamplingReport()
        start = time.perf_counter()
        limit = model_max_positions(self.model.config, self.tokenizer)
        encoded = encode_prompts(
            self.tokenizer, prompt_ids, prompts, max_prompt_tokens=self.max_prompt_tokens, report=report,
            limit=limit, max_new_tokens=self.sampling.max_new_tokens, model_name=self.model_name,
        )  # fmt: skip
        rows = SampleRows(self.model_name, report)
        stops = stop_token_ids(self.tokenizer, self.model.generation_config)
        n = self.sampling.n
        bar = tqdm(
            total=len(encoded) * n,
            desc=f"sampling {self.model_name}",
            unit="sample",
            disable=not self.progress,
        )
        done = 0
        if self.on_progress is not None:
            self.on_progress(done, len(encoded) * n)
        for first in range(0, len(encoded), self.batch_size):
            chunk = [(pid, ids, k) for pid, ids in encoded[first : first + self.batch_size] for k in range(n)]
            self._generate(chunk, rows, stops, limit)
            done += len(chunk)
            if self.on_progress is not None:
                self.on_progress(done, len(encoded) * n)
            bar.update(len(chunk))
            bar.set_postfix(samples_per_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.1f}")
        bar.close()
        report.seconds = time.perf_counter() - start
        return rows.table(), report

    def _generate(
        self,
        rows: list[tuple[str, list[int], int]],
        sink: SampleRows,
        stops: list[int],
        limit: PositionLimit | None,
    ) -> None:
        device = self.model.device
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
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
            # Left-padded: the longest prompt of the batch decides what the model still holds.
            max_new_tokens=response_budget(limit, width, self.sampling.max_new_tokens),
            pad_token_id=pad,
            eos_token_id=stops,
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
        stop_set = set(stops)
        for (pid, ids, k), seed, tokens in zip(rows, seeds, new_tokens, strict=True):
            end = next((i for i, token in enumerate(tokens) if token in stop_set), None)
            finished = end is not None
            completion = tokens[:end] if finished else tokens
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            sink.add(pid, k, text, finished=finished, prompt_tokens=len(ids),
                    completion_tokens=len(completion) + int(finished), seed=seed)  # fmt: skip
