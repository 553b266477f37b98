"""Samplers that turn (prompts, model) into SAMPLES rows: Hugging Face transformers and vLLM."""

from wrpo_core.sampling.common import SamplingReport, sample_seed
from wrpo_core.sampling.hf import HFSampler

__all__ = ["HFSampler", "SamplingReport", "sample_seed"]
