"""Samplers that turn (prompts, model) into SAMPLES rows: Hugging Face transformers here, vLLM later."""

from wrpo_core.sampling.hf import HFSampler, SamplingReport, sample_seed

__all__ = ["HFSampler", "SamplingReport", "sample_seed"]
