"""Batched sampling with Hugging Face transformers (CPU or GPU), reproducible per sample.

Every (model, prompt_id, sample_index) has its own seed (`sample_seed`). `generate` runs greedily
over the batch with the KV cache while a logits processor (`PerRowSampling`) draws each row's next
token (temperature, top-p) and forces it. The draw is counter-based, with no generator state:
row r's uniform number at generated-token index t is u = SplitMix64(SplitMix64(seed_r) XOR
SplitMix64((t + 1) * 0x9E3779B97F4A7C15)) >> 11, over 2**53 (`uniform_draws`, one vectorised
uint64 hash per step), and its token the first whose cumulative probability exceeds u times the
top-p nucleus mass (`sample_tokens`: inverse CDF via `searchsorted`; tokens in descending-probability
order, ties by id, when top_p < 1, else in id order). No Python loop runs over rows, and a sample's tokens depend on its seed, the model
and its prompt only, whatever else is in its batch (up to the floating-point effects of padding on
the logits).

Prompts are chat-templated once (BOS comes only from the template), sorted by length, left-padded,
and each prompt's n samples share a batch. With n > 1 the prompt is run through the model once and
its KV cache copied to its n rows (`HFSampler._shared_prefill`) before `generate` continues from it.

A sample ends at the first of the model's end tokens (`tokenization.stop_token_ids`: the chat
template's end-of-turn token and every eos id of the model's generation config); the end token
is counted in `completion_tokens` but not written to the text. One exception to "whatever else
was in its batch": when max_new_tokens exceeds what the model holds after the batch's longest
(left-padded) prompt, the whole batch stops there, so a short prompt's cut point depends on its
neighbours (vLLM budgets each request by its own prompt).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from wrpo_core.config import SamplingConfig
from wrpo_core.kv_cache import cache_keyword, plain_dynamic_cache, prefill
from wrpo_core.sampling.common import SampleRows, SamplingReport, encode_prompts, response_budget, sample_seed
from wrpo_core.tokenization import PositionLimit, model_max_positions, stop_token_ids

GOLDEN_GAMMA = 0x9E3779B97F4A7C15
"""SplitMix64's increment: counter t is spread to t * GOLDEN_GAMMA before it is hashed."""
MASK64 = (1 << 64) - 1


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, a bijective 64-bit hash, on a uint64 array.

    numpy's uint64 array arithmetic is modulo 2**64 (overflow wraps, by definition, silently) and
    its `>>` is logical, so this equals the hash on unsigned 64-bit integers.
    """
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
    """Each sample seed hashed to a 64-bit key (uint64), computed once per batch for `uniform_draws`."""
    return mix64(np.array([seed & MASK64 for seed in seeds], dtype=np.uint64))


def uniform_draws(keys: np.ndarray, step: int) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1), one per key, that depend on (that key, step) only.

    Counter-based, like Philox, with no generator state: u = top 53 bits of
    mix64(key XOR mix64((step + 1) * GOLDEN_GAMMA mod 2**64)) / 2**53, where key = mix64(sample seed)
    (`seed_keys`). Row r's number at step t is thus the same whatever the other rows are, and one
    vectorised hash per step serves the whole batch.
    """
    counter = mix64(np.array([((step + 1) * GOLDEN_GAMMA) & MASK64], dtype=np.uint64))
    bits = mix64(keys ^ counter) >> np.uint64(11)
    return torch.from_numpy(bits.astype(np.float64) * (1.0 / (1 << 53)))


def sample_tokens(scores: torch.Tensor, u: torch.Tensor, *, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row drawn by inverse CDF from softmax(scores / temperature), cut to the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probabilities reach `top_p` (a token
    is kept when the mass of the tokens before it, sorted by probability, is below `top_p`; the most
    likely one always is; ties are ordered by token id). Row r's token is the first whose cumulative
    probability exceeds u[r] * (the nucleus mass), which draws it with its probability renormalised
    to the nucleus; without a cut (top_p 1) the cumulative sum runs in token-id order, unsorted.
    Temperature 0 is greedy (argmax).
    """
    if temperature == 0:
        return scores.argmax(-1)
    probs = (scores.float() / temperature).softmax(-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
    probs64 = probs.double()
    cumulative = probs64.cumsum(-1)
    if order is not None:
        kept = ((cumulative - probs64) < top_p).sum(-1, keepdim=True)
    else:
        kept = torch.full((len(probs), 1), probs.shape[-1], dtype=torch.long, device=probs.device)
    target = u.to(cumulative.device).unsqueeze(-1) * cumulative.gather(-1, kept - 1)
    index = torch.searchsorted(cumulative, target, right=True).clamp(max=kept - 1)
    return (order.gather(-1, index) if order is not None else index).squeeze(-1)


class PerRowSampling(LogitsProcessor):
    """Draws each row's next token from its own seed (`sample_tokens`, `uniform_draws`) and forces it.

    `seeds[r]` is row r's sample seed; `prompt_width` the (left-padded) prompt length of the batch, so
    that a call on `input_ids` of width `prompt_width + t` draws the t-th generated token.
    """

    def __init__(self, seeds: Sequence[int], *, temperature: float, top_p: float, prompt_width: int):
        self.keys = seed_keys(seeds)
        self.temperature = temperature
        self.top_p = top_p
        self.prompt_width = prompt_width

    def draw(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """The tokens of generated position `step` (0 = the first generated token), one per row."""
        u = uniform_draws(self.keys, step)
        return sample_tokens(scores, u, temperature=self.temperature, top_p=self.top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.temperature == 0:
            return scores  # greedy
        tokens = self.draw(scores, input_ids.shape[-1] - self.prompt_width).to(scores.device)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(-1, tokens.unsqueeze(-1), 0.0)


def completion(tokens: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """A row's generated tokens up to (without) its first end token, and whether it had one."""
    end = next((i for i, token in enumerate(tokens) if token in stops), None)
    return (tokens, False) if end is None else (tokens[:end], True)


def position_ids_of(attention: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (0 on padding), as `generate` computes them."""
    return (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)


@dataclass
class HFSampler:
    """Samples n responses per prompt from one causal LM with transformers' `generate`.

    `batch_size` counts prompts: one `generate` call runs `batch_size * n` rows.
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
        total = len(encoded) * self.sampling.n
        bar = tqdm(total=total, desc=f"sampling {self.model_name}", unit="sample", disable=not self.progress)
        done = 0
        if self.on_progress is not None:
            self.on_progress(done, total)
        for first in range(0, len(encoded), self.batch_size):
            chunk = encoded[first : first + self.batch_size]
            self._generate(chunk, rows, stops, limit)
            done += len(chunk) * self.sampling.n
            if self.on_progress is not None:
                self.on_progress(done, total)
            bar.update(len(chunk) * self.sampling.n)
            bar.set_postfix(samples_per_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.1f}")
        bar.close()
        report.seconds = time.perf_counter() - start
        return rows.table(), report

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def _shared_prefill(self, input_ids: torch.Tensor, attention: torch.Tensor) -> DynamicCache | None:
        """The KV cache of every prompt but its last token, computed once per prompt and copied to its n rows.

        None (generate prefills every row itself) with n = 1, a one-token batch, a model whose
        cache is not plain full-attention `DynamicLayer`s (sliding windows, linear attention, ...), or
        whose generation config names a cache of its own (`generate` refuses that and a given cache).
        """
        n, defaults = self.sampling.n, self.model.generation_config
        if n == 1 or input_ids.shape[1] < 2 or not self.model._supports_default_dynamic_cache():
            return None
        if getattr(defaults, "cache_implementation", None) is not None or defaults.use_cache is False:
            return None
        cache = plain_dynamic_cache(self.model)
        if cache is None:
            return None
        prefill(self.model, cache, input_ids[:, :-1], attention[:, :-1], position_ids_of(attention[:, :-1]))
        cache.batch_repeat_interleave(n)
        return cache

    def _generate(
        self,
        prompts: list[tuple[str, list[int]]],
        sink: SampleRows,
        stops: list[int],
        limit: PositionLimit | None,
    ) -> None:
        """Samples n responses to each of `prompts` (prompt_id, token ids) in one `generate` call."""
        device, n, pad = self.model.device, self.sampling.n, self._pad_id()
        width = max(len(ids) for _, ids in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, (_, ids) in enumerate(prompts):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        cache = self._shared_prefill(input_ids, attention)
        rows = [(pid, ids, k) for pid, ids in prompts for k in range(n)]
        seeds = [sample_seed(self.sampling.seed, self.model_name, pid, k) for pid, _, k in rows]
        config = GenerationConfig(
            do_sample=False,
            # Left-padded: the longest prompt of the batch decides what the model still holds.
            max_new_tokens=response_budget(limit, width, self.sampling.max_new_tokens),
            pad_token_id=pad,
            eos_token_id=stops,
            num_beams=1,
        )
        sampling = PerRowSampling(
            seeds, temperature=self.sampling.temperature, top_p=self.sampling.top_p, prompt_width=width
        )
        out = self.model.generate(
            input_ids=input_ids.repeat_interleave(n, dim=0),
            attention_mask=attention.repeat_interleave(n, dim=0),
            generation_config=config,
            logits_processor=LogitsProcessorList([sampling]),
            **({cache_keyword(self.model): cache} if cache is not None else {}),
        )
        stop_set = set(stops)
        cut = [completion(tokens, stop_set) for tokens in out[:, width:].cpu().tolist()]
        texts = self.tokenizer.batch_decode([tokens for tokens, _ in cut], skip_special_tokens=True)
        for (pid, ids, k), seed, text, (tokens, finished) in zip(rows, seeds, texts, cut, strict=True):
            sink.add(pid, k, text, finished=finished, prompt_tokens=len(ids),
                    completion_tokens=len(tokens) + int(finished), seed=seed)  # fmt: skip
