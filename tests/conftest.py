"""Shared pytest fixtures: the toy character tokenizer and a saved tiny Llama, offline and single-threaded."""

from __future__ import annotations

import os

# Set before torch / tokenizers are imported anywhere in the test session.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import PreTrainedTokenizerFast

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
