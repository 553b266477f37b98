"""WRPO numerics on real checkpoints: bf16-stored weights learn, exact reference log-probs, no dropout."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from toy_quadruples import quadruples_table
from transformers import GPT2Config, GPT2LMHeadModel

from wrpo_core.config import WRPOConfig, WRPOJobConfig
from wrpo_core.schemas import QUADRUPLES, write_parquet
from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model
from wrpo_core.toy.tokenizer import build_char_tokenizer
from wrpo_core.train.common import free_port
from wrpo_core.train.wrpo import WRPOTrainer, build_wrpo_trainer, disable_dropout, train_wrpo


@pytest.fixture(scope="module")
def quadruples(tmp_path_factory) -> str:
    """Eight toy quadruples without reference log-probs (the job computes them)."""
    table = quadruples_table()
    url = str(tmp_path_factory.mktemp("data") / "quadruples.parquet")
    write_parquet(table, url, QUADRUPLES)
    return url


def hyperparameters(**overrides) -> WRPOConfig:
    """The paper's learning rate and beta, a constant schedule, fp32 compute, 4 steps of 4 quadruples."""
    base = dict(
        max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-7,
        lr_scheduler_type="constant", warmup_ratio=0.0, beta=0.01, gradient_checkpointing=False,
        bf16=False, logging_steps=1, save_steps=100, max_length=64, max_prompt_length=32,
    )  # fmt: skip
    return WRPOConfig(**{**base, **overrides})


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    return {
        name: tensor.float() for name, tensor in load_file(str(Path(folder) / "model.safetensors")).items()
    }


def change_norm(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    assert before.keys() == after.keys()
    return float(torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before)))


def test_a_checkpoint_stored_in_bf16_learns_like_the_same_weights_stored_in_fp32(tmp_path, quadruples):
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0)
    model = model.to(torch.bfloat16).to(torch.float32)  # the same values in both files
    fp32_dir = save_tiny_model(model, tokenizer, tmp_path / "fp32")
    bf16_dir = save_tiny_model(model.to(torch.bfloat16), tokenizer, tmp_path / "bf16")
    assert json.loads(Path(bf16_dir, "config.json").read_text())["dtype"] == "bfloat16"
    start = weights(fp32_dir)

    norms = {}
    for name, folder in (("fp32", fp32_dir), ("bf16", bf16_dir)):
        out = tmp_path / f"wrpo-{name}"
        train_wrpo(
            WRPOJobConfig(model=folder, data=quadruples, output_dir=str(out), training=hyperparameters())
        )
        norms[name] = change_norm(start, weights(out))
    print(f"weight-change L2 norm: fp32-stored {norms['fp32']:.3e}, bf16-stored {norms['bf16']:.3e}, "
          f"ratio {norms['bf16'] / norms['fp32']:.3f}")  # fmt: skip
    assert norms["fp32"] > 0
    assert norms["bf16"] / norms["fp32"] == pytest.approx(1.0, abs=0.2)


# --- stored reference log-probs under a 16-bit engine -------------------------------------------


def batch_with_reference() -> dict[str, torch.Tensor]:
    """A collated-looking batch: token ids, stored reference log-probs (float64) and another float input."""
    return {
        "input_ids": torch.ones((3, 4), dtype=torch.long),
        "ref_logps": torch.tensor([[-347.12, -1234.567, -0.5]], dtype=torch.float64),
        "weights": torch.tensor([-347.12], dtype=torch.float32),
    }


def assert_unrounded(ref_logps: torch.Tensor) -> None:
    expected = torch.tensor([[-347.12, -1234.567, -0.5]], dtype=torch.float64)
    torch.testing.assert_close(ref_logps.double(), expected, atol=1e-4, rtol=0)


def plain_trainer(model_dir: str, tmp_path: Path, **overrides) -> WRPOTrainer:
    """The job's own trainer (build_wrpo_trainer) on the toy model, without data."""
    job = WRPOJobConfig(
        model=model_dir, data="unused.parquet", output_dir=str(tmp_path / "out"),
        training=hyperparameters(**overrides),
    )  # fmt: skip
    return build_wrpo_trainer(job, build_char_tokenizer(), None, None)


def test_stored_reference_logps_are_not_cast_to_the_engines_bf16(tmp_path, tiny_model_dir, monkeypatch):
    """Trainer._prepare_input's own DeepSpeed branch, made to see a bf16 engine; not a DeepSpeed engine."""
    trainer = plain_trainer(tiny_model_dir, tmp_path)
    engine = SimpleNamespace(dtype=lambda: torch.bfloat16)  # what HfTrainerDeepSpeedConfig.dtype() returns
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    plugin = SimpleNamespace(hf_ds_config=engine)
    monkeypatch.setattr(
        trainer, "accelerator", SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    )
    prepared = trainer._prepare_inputs(batch_with_reference())
    assert prepared["ref_logps"].dtype == torch.float64
    assert_unrounded(prepared["ref_logps"])
    # Every other floating input still takes the engine's dtype, as the Trainer does it.
    assert prepared["weights"].dtype == torch.bfloat16 and prepared["weights"].item() == -348.0
    assert prepared["input_ids"].dtype == torch.long


@pytest.fixture()
def deepspeed_process(monkeypatch):
    """A one-process gloo group for DeepSpeed, undone afterwards (accelerate state, group, HF config)."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):  # fmt: skip
        monkeypatch.setenv(name, value)
    if "TORCH_EXTENSIONS_DIR" not in os.environ:  # DeepSpeed's CPU op, built once (~90 s), as test_deepspeed
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/wrpo-fusion/torch_extensions"))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "")  # recorded, so that the one DeepSpeed sets is undone
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    yield
    unset_hf_deepspeed_config()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.integration
def test_a_real_deepspeed_bf16_trainer_keeps_reference_logps_unrounded(
    tmp_path, tiny_model_dir, deepspeed_process
):
    """A WRPOTrainer built by the job under a real DeepSpeed plugin whose engine dtype is bf16.

    Exercises accelerate's DeepSpeed state and transformers' HfTrainerDeepSpeedConfig as training
    would; the engine itself is not started (that happens in train(), and needs bf16 compute).
    """
    config = tmp_path / "zero3_bf16.json"
    config.write_text(json.dumps({
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }))  # fmt: skip
    trainer = plain_trainer(tiny_model_dir, tmp_path, deepspeed=str(config))
    assert trainer.is_deepspeed_enabled
    assert trainer.accelerator.state.deepspeed_plugin.hf_ds_config.dtype() == torch.bfloat16
    prepared = trainer._prepare_inputs(batch_with_reference())
    assert_unrounded(prepared["ref_logps"])
    assert prepared["weights"].dtype == torch.bfloat16 and prepared["weights"].item() == -348.0


# --- dropout ----------------------------------------------------------------------------------------


def dropout_models(tmp_path: Path) -> dict[str, str]:
    """A tiny Llama with attention dropout 0.3 (functional dropout) and a tiny GPT-2 with 0.3 on
    embeddings, attention and residual streams (`nn.Dropout` modules), saved with the toy tokenizer."""
    tokenizer = build_char_tokenizer()
    llama = build_tiny_llama(tokenizer, seed=0)
    llama.config.attention_dropout = 0.3
    llama_dir = save_tiny_model(llama, tokenizer, tmp_path / "llama")
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                   resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3, summary_first_dropout=0.3)
    )  # fmt: skip
    gpt2_dir = str(tmp_path / "gpt2")
    gpt2.save_pretrained(gpt2_dir)
    tokenizer.save_pretrained(gpt2_dir)
    return {"llama": llama_dir, "gpt2": gpt2_dir}


def test_the_wrpo_policy_trains_without_dropout(tmp_path):
    ids = torch.tensor([[1, 8, 9, 10, 11, 12, 13, 14]])
    for name, folder in dropout_models(tmp_path).items():
        policy = plain_trainer(folder, tmp_path / name).model
        policy.train()
        dropouts = [m for m in policy.modules() if isinstance(m, torch.nn.Dropout)]
        assert all(m.p == 0 for m in dropouts), name
        config = policy.config.to_dict()
        fields = {k: v for k, v in config.items() if "dropout" in k or k.endswith("pdrop")}
        assert fields and all(v == 0 for v in fields.values()), (name, fields)
        if name == "llama":  # its attention keeps its own copy of the config's rate
            assert all(
                m.attention_dropout == 0
                for m in policy.model.layers.modules()
                if hasattr(m, "attention_dropout")
            )
        else:
            assert len(dropouts) >= 5
        # In training mode the same input gives the same logits: nothing is dropped.
        torch.manual_seed(0)
        first = policy(input_ids=ids).logits
        second = policy(input_ids=ids).logits
        torch.testing.assert_close(first, second, atol=0, rtol=0, msg=name)


def test_disable_dropout_reaches_sub_configs():
    text = GPT2Config(n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.2)
    outer = GPT2Config(n_embd=16, n_layer=1, n_head=2, attn_pdrop=0.4)
    outer.text_config = text  # the shape of a multimodal model's config
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    model.config = outer
    disable_dropout(model)
    assert outer.attn_pdrop == 0 and text.resid_pdrop == 0
    assert outer.use_cache is True and outer.n_layer == 1  # other fields untouched
