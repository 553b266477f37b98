"""Samplers that turn (prompts, model) into SAMPLES rows: Hugging Face transformers and vLLM."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wrpo_core.locations import resolve_model_location
from wrpo_core.models import load_causal_lm, load_generation_config, load_tokenizer
from wrpo_core.sampling.common import SamplingReport, sample_seed
from wrpo_core.sampling.hf import HFSampler

if TYPE_CHECKING:
    from wrpo_core.config import ModelSpec
    from wrpo_core.sampling.vllm import VLLMSampler

__all__ = ["HFSampler", "SamplingReport", "load_sampler", "sample_seed"]


def load_sampler(
    spec: ModelSpec, *, device: str = "cpu", batch_size: int = 32, progress: bool = True
) -> HFSampler | VLLMSampler:
    """The sampler a model spec names: its backend ('hf' or 'vllm') with the model loaded.

    Model, tokenizer and generation config are loaded at `spec.revision` (see `wrpo_core.models`;
    vLLM resolves the path itself and gets the revision for weights and tokenizer).
    """
    tokenizer = load_tokenizer(spec.path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    if spec.backend == "vllm":
        from wrpo_core.sampling.vllm import VLLMSampler, build_engine

        generation_config = load_generation_config(
            spec.path, trust_remote_code=spec.trust_remote_code, revision=spec.revision
        )
        spec = spec.model_copy(update={"path": resolve_model_location(spec.path)})
        return VLLMSampler(build_engine(spec), tokenizer, spec, generation_config, progress=progress)
    model = load_causal_lm(
        spec.path, trust_remote_code=spec.trust_remote_code, dtype=spec.dtype, revision=spec.revision
    )
    return HFSampler(
        model.to(device).eval(), tokenizer, spec.name, spec.sampling, batch_size=batch_size, progress=progress
    )
