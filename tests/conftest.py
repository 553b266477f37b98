"""Shared pytest fixtures: the toy character tokenizer and a saved tiny Llama, offline and single-threaded."""

from __future__ import annotations

import json
import os

# Set before torch / tokenizers are imported anywhere in the test session.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from wrpo_core.config import FusionConfig
from wrpo_core.toy.skills import make_prompts
from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model
from wrpo_core.toy.tokenizer import build_char_tokenizer

torch.set_num_threads(1)

# The SeaweedFS S3 server fixtures (s3_server, s3_prefix) of the storage integration tests.
pytest_plugins = ["s3server"]


@pytest.fixture(scope="session")
def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Toy character tokenizer shared by the session; copy or rebuild it before changing its settings."""
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a saved tiny Llama (seed 0) with the toy tokenizer and chat template, loadable offline."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0)
    return save_tiny_model(model, tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture()
def fusion_config(tmp_path, tiny_model_dir):
    """A two-source fusion config on the tiny untrained model: every stage runs in seconds."""
    prompts = tmp_path / "prompts.jsonl"
    rows = make_prompts(["reverse", "add", "upper"], 12, seed=0)
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    # Untrained models rarely end a turn within 8 tokens: keep their cut samples as candidates.
    sampling = {"n": 4, "max_new_tokens": 8, "temperature": 1.0, "drop_length_stopped": False}
    small = {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
             "gradient_checkpointing": False, "learning_rate": 1e-3, "bf16": False}  # fmt: skip
    return FusionConfig.model_validate(
        {
            "run_name": "smoke",
            "prompts": {"path": str(prompts)},
            "sources": [
                {"path": tiny_model_dir, "name": "src-a", "sampling": sampling},
                {"path": tiny_model_dir, "name": "src-b", "sampling": {**sampling, "seed": 1}},
            ],
            "target": {"path": tiny_model_dir, "name": "target", "sampling": sampling},
            "reward_model": {"path": "toy-verifier", "kind": "toy_verifier"},
            "sft": {**small, "max_seq_length": 64, "max_prompt_length": 32},
            "wrpo": {**small, "beta": 1.0, "max_length": 64, "max_prompt_length": 32},
            "storage": {"url": str(tmp_path / "runs")},
            "compute": {"device": "cpu"},
        }
    )
