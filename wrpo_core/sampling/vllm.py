"""Sampling with vLLM's offline engine (GPU): same prompts, seeds and SAMPLES rows as the HF sampler.

Each (prompt, sample index) is one request with n=1 and its own seed, so samples reproduce
per sample like the HF backend; vLLM's prefix caching shares the n copies of a prompt. The
engine uses tensor parallelism over `tensor_parallel_size` GPUs. vLLM is imported lazily:
this module imports without it. Requests stop on the same end tokens as the HF backend
(`tokenization.stop_token_ids`), and the text is decoded here from the returned token ids up to
the first end token, so both backends write the same text for the same tokens (vLLM itself
keeps a stop token that is not a special token in its text).

Not run in this project's CI (vLLM needs a CUDA GPU); everything up to the engine call is
unit-tested with a stand-in engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from wrpo_core.config import ModelSpec
from wrpo_core.sampling.common import SampleRows, SamplingReport, encode_prompts, response_budget, sample_seed
from wrpo_core.tokenization import PositionLimit, stop_token_ids


def engine_max_positions(engine: Any) -> PositionLimit | None:
    """The positions a vLLM engine holds (its `max_model_len`), or None when the engine does not say."""
    config = getattr(getattr(engine, "llm_engine", None), "model_config", None)
    length = getattr(config, "max_model_len", None)
    return None if length is None else PositionLimit(int(length), "max_model_len of the vLLM engine")


def build_engine(
    spec: ModelSpec, *, max_model_len: int | None = None, gpu_memory_utilization: float = 0.9
) -> Any:
    """vLLM's `LLM` for a model spec (hub id or local path), with tensor parallelism."""
    try:
        from vllm import LLM
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"model {spec.name}: backend 'vllm' needs vLLM on a CUDA machine (pip install -r requirements/gpu-sampling.txt)"
        ) from error
    return LLM(
        model=spec.path,
        tokenizer=spec.path,
        revision=spec.revision,
        tokenizer_revision=spec.revision,
        dtype=spec.dtype,
        tensor_parallel_size=spec.tensor_parallel_size,
        trust_remote_code=spec.trust_remote_code,
        seed=spec.sampling.seed,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
    )


@dataclass
class VLLMSampler:
    """Samples n responses per prompt through a vLLM engine (`engine.generate` on token ids)."""

    engine: Any
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    generation_config: Any = None
    """The model's `GenerationConfig` (its eos ids become stop tokens); None = the tokenizer's alone."""
    max_prompt_tokens: int = 1800
    progress: bool = True

    def sample(self, prompt_ids: list[str], prompts: list[str]) -> tuple[pa.Table, SamplingReport]:
        """SAMPLES rows for every (prompt, sample index); empty prompts are skipped and counted."""
        from vllm import SamplingParams

        report = SamplingReport()
        start = time.perf_counter()
        limit = engine_max_positions(self.engine)
        encoded = encode_prompts(
            self.tokenizer, prompt_ids, prompts, max_prompt_tokens=self.max_prompt_tokens, report=report,
            limit=limit, max_new_tokens=self.spec.sampling.max_new_tokens, model_name=self.spec.name,
        )  # fmt: skip
        s = self.spec.sampling
        stops = stop_token_ids(self.tokenizer, self.generation_config)
        requests = [(pid, ids, k) for pid, ids in encoded for k in range(s.n)]
        seeds = [sample_seed(s.seed, self.spec.name, pid, k) for pid, _, k in requests]
        params = [
            SamplingParams(
                n=1,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=response_budget(limit, len(ids), s.max_new_tokens),
                seed=seed,
                stop_token_ids=stops,
                skip_special_tokens=True,
            )
            for seed, (_, ids, _) in zip(seeds, requests, strict=True)
        ]
        outputs = self.engine.generate(
            [{"prompt_token_ids": ids} for _, ids, _ in requests], params, use_tqdm=self.progress
        )
        rows = SampleRows(self.spec.name, report)
        stop_set = set(stops)
        for (pid, ids, k), seed, output in zip(requests, seeds, outputs, strict=True):
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            end = next((i for i, token in enumerate(tokens) if token in stop_set), len(tokens))
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            rows.add(pid, k, text, finished=completion.finish_reason == "stop", prompt_tokens=len(ids),
                     completion_tokens=len(tokens), seed=seed)  # fmt: skip
        report.seconds = time.perf_counter() - start
        return rows.table(), report
