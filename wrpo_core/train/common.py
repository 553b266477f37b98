"""What the SFT and WRPO jobs share: model loading, TrainingArguments, metrics JSONL, resume, saving."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from wrpo_core.config import _TrainingHyperparameters

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def bf16_default() -> bool:
    """bf16 where a CUDA GPU supports it; fp32 elsewhere (CPU bf16 training is slow and lossy)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Loads a tokenizer and makes sure it can pad (pad = eos when the model has no pad token)."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str, *, trust_remote_code: bool = False, dtype: torch.dtype | str = "auto"
) -> PreTrainedModel:
    """Loads a causal LM from a hub id or local folder."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)


def training_arguments(hp: _TrainingHyperparameters, output_dir: str) -> TrainingArguments:
    """TrainingArguments from our hyper-parameters: cosine/warmup, checkpoints, logging, DeepSpeed."""
    report_to = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    bf16 = bf16_default() if hp.bf16 is None else hp.bf16
    return TrainingArguments(
        output_dir=output_dir,
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.num_train_epochs,
        max_steps=hp.max_steps,
        per_device_train_batch_size=hp.per_device_train_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        lr_scheduler_type=hp.lr_scheduler_type,
        warmup_steps=hp.warmup_ratio,
        weight_decay=hp.weight_decay,
        optim=hp.optim,
        max_grad_norm=hp.max_grad_norm,
        bf16=bf16,
        activation_checkpointing=hp.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if hp.gradient_checkpointing else None,
        seed=hp.seed,
        data_seed=hp.seed,
        logging_steps=hp.logging_steps,
        save_strategy="steps",
        save_steps=hp.save_steps,
        save_total_limit=hp.save_total_limit,
        report_to=report_to,
        remove_unused_columns=False,
        deepspeed=hp.deepspeed,
        disable_tqdm=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


class JsonlMetricsCallback(TrainerCallback):
    """Appends every logged dict (with its optimizer step) to `output_dir/metrics.jsonl` on rank 0."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def run_training(trainer: Trainer, output_dir: str, *, resume: bool = True) -> dict[str, float]:
    """Trains (resuming from the newest checkpoint in output_dir if any) and saves the final model.

    The final model lands in `output_dir` in Hugging Face format (safetensors, config, tokenizer
    with its chat template). Returns the train metrics.
    """
    checkpoint = get_last_checkpoint(output_dir) if resume and Path(output_dir).is_dir() else None
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.model.config.use_cache = True
    trainer.save_model(output_dir)
    trainer.save_state()
    return dict(result.metrics)
