"""What the SFT and WRPO trainers share: TrainingArguments, DeepSpeed set-up, resume and saving.

Both trainers build their TrainingArguments with `training_arguments` (which readies a DeepSpeed
process when the job uses DeepSpeed) and train with `run_training`, which resumes from the newest
complete checkpoint, drops the metrics rows a rerun logs again, and saves the final model in
Hugging Face format. Models and tokenizers are loaded by `wrpo_core.models`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback, TrainingArguments

from wrpo_core.config import ConfigError, _TrainingHyperparameters
from wrpo_core.config.training import gradient_accumulation
from wrpo_core.train.checkpoints import SAVE_ON_EACH_NODE_ENV, checkpoint_step, last_complete_checkpoint
from wrpo_core.train.metrics import METRICS_FILE, append_metrics_row, append_train_begin_row, trim_metrics

logger = logging.getLogger(__name__)


def bf16_default() -> bool:
    """bf16 where a CUDA GPU supports it; fp32 elsewhere (CPU bf16 training is slow and lossy)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def policy_load_dtype(hp: _TrainingHyperparameters) -> torch.dtype | str:
    """The dtype to load a model that will be trained in: fp32 master weights unless DeepSpeed owns them.

    A checkpoint stored in bf16 (Llama-3 and most released models) loaded as stored would be
    updated in bf16, where an update of lr 3e-7 rounds away (0.015 - 3e-7 == 0.015). Without
    DeepSpeed the weights are therefore fp32 and `bf16` only autocasts the compute; DeepSpeed
    keeps its own fp32 master partitions, so there the model loads as stored ("auto").
    """
    return "auto" if hp.deepspeed else torch.float32


def free_port() -> int:
    """A TCP port free on this machine right now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_deepspeed_config(path: str) -> dict:
    """Reads a DeepSpeed JSON config and refuses ZeRO-3 without 16-bit weight gathering on save.

    Without `stage3_gather_16bit_weights_on_model_save` the Trainer saves only ZeRO shards, so the
    final model would not be loadable by `from_pretrained`.
    """
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ValueError(
            f"{path}: ZeRO-3 needs zero_optimization.stage3_gather_16bit_weights_on_model_save: true "
            "so the final model is saved as Hugging Face safetensors"
        )
    return config


def prepare_deepspeed_process(hp: _TrainingHyperparameters) -> bool:
    """Readies this process for a DeepSpeed job; True when it created accelerate's state itself.

    A process that no launcher started gets the environment of a one-process group. Without CUDA
    the state is created with the gloo backend explicitly: left alone, accelerate picks no backend,
    counts one process, and DeepSpeed's batch-size check fails for two or more processes.
    """
    if not hp.deepspeed:
        return False
    check_deepspeed_config(hp.deepspeed)
    if "WORLD_SIZE" not in os.environ:
        for name, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_WORLD_SIZE", "1"),
        ):
            os.environ[name] = value
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        return False
    state = PartialState._shared_state
    if (
        state
        and state.get("distributed_type") == DistributedType.DEEPSPEED
        and state.get("backend") == "gloo"
    ):
        return True
    AcceleratorState._reset_state(reset_partial_state=True)
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo", timeout=timedelta(seconds=1800))
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    return True


def effective_accumulation(hp: _TrainingHyperparameters) -> int:
    """Gradient accumulation of this process's job (WORLD_SIZE processes); logs the global batch.

    From `global_batch_size` when it is set (ValueError naming the numbers when it does not
    divide), else `gradient_accumulation_steps` as given. The first process logs the effective
    global batch either way.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = gradient_accumulation(hp, world_size)
    if os.environ.get("RANK", "0") == "0":
        source = "global_batch_size" if hp.global_batch_size is not None else "gradient_accumulation_steps"
        logger.info(
            "global batch %d = %d per device x %d accumulation x %d processes (accumulation from %s)",
            hp.per_device_train_batch_size * accumulation * world_size, hp.per_device_train_batch_size,
            accumulation, world_size, source,
        )  # fmt: skip
    return accumulation


REPORTING_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def reporting_integration(report_to: str) -> str:
    """The Trainer's `report_to`, after checking that its package is installed in this process.

    A missing package is a ConfigError naming it (the Trainer would fail later, or a silent fallback
    would lose the run's curves).
    """
    package = REPORTING_PACKAGES.get(report_to)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"report_to: {report_to!r} needs the {package!r} package, which is not installed where this job "
            f"runs (host {socket.gethostname()}): install it there (pip install {package}) or set "
            "report_to: none"
        )
    return report_to


def checkpointing_arguments(enabled: bool) -> dict[str, object]:
    """Activation checkpointing under the name the installed transformers takes.

    transformers 5.23 renamed `gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)`
    (the old names are deprecated aliases there, to be removed in v6); the GPU locks' 5.20 knows only
    the old names. Non-reentrant checkpointing: the reentrant kind breaks with ZeRO-3 and frozen inputs.
    """
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(hp: _TrainingHyperparameters, output_dir: str) -> TrainingArguments:
    """TrainingArguments from our hyper-parameters: batch, cosine/warmup, checkpoints, logging, DeepSpeed."""
    report_to = reporting_integration(hp.report_to)
    bf16 = bf16_default() if hp.bf16 is None else hp.bf16
    configured_state = prepare_deepspeed_process(hp)
    return TrainingArguments(
        output_dir=output_dir,
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.num_train_epochs,
        max_steps=hp.max_steps,
        per_device_train_batch_size=hp.per_device_train_batch_size,
        gradient_accumulation_steps=effective_accumulation(hp),
        lr_scheduler_type=hp.lr_scheduler_type,
        warmup_steps=hp.warmup_ratio,
        weight_decay=hp.weight_decay,
        optim=hp.optim,
        max_grad_norm=hp.max_grad_norm,
        bf16=bf16,
        **checkpointing_arguments(hp.gradient_checkpointing),
        seed=hp.seed,
        data_seed=hp.seed,
        logging_steps=hp.logging_steps,
        save_strategy="steps",
        save_steps=hp.save_steps,
        save_total_limit=hp.save_total_limit,
        save_on_each_node=os.environ.get(SAVE_ON_EACH_NODE_ENV) == "1",
        report_to=report_to,
        remove_unused_columns=False,
        deepspeed=hp.deepspeed,
        accelerator_config={"use_configured_state": True} if configured_state else None,
        disable_tqdm=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


class JsonlMetricsCallback(TrainerCallback):
    """Appends every logged dict (with its optimizer step and wall time) to `metrics.jsonl` on rank 0,
    and at the start of training a row with the step it starts at and the total steps (`MAX_STEPS`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            append_train_begin_row(self.path, state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_metrics_row(self.path, state.global_step, logs)


_EXTRA_CALLBACKS: list[TrainerCallback] = []


@contextmanager
def extra_callbacks(*callbacks: TrainerCallback) -> Iterator[None]:
    """Adds callbacks to every trainer that `run_training` runs inside this block (e.g. Ray reporting)."""
    _EXTRA_CALLBACKS.extend(callbacks)
    try:
        yield
    finally:
        for callback in callbacks:
            _EXTRA_CALLBACKS.remove(callback)


def run_training(trainer: Trainer, output_dir: str, *, resume: bool = True) -> dict[str, float]:
    """Trains (resuming from the newest complete checkpoint in output_dir) and saves the final model.

    Only checkpoints of the same job are there to resume from: `jobs.claim_output_dir` removed a
    changed job's before (in this process's `train_in_process`, or in the launcher); every rank
    waits here until all ranks got this far, so none looks for a checkpoint while the first
    process of its machine may still be removing stale ones.

    The final model lands in `output_dir` in Hugging Face format (safetensors, config, tokenizer
    with its chat template); under ZeRO-3 every rank must call this, and the shards are gathered
    (in the training precision: 16-bit with bf16) before rank 0 writes them. Without DeepSpeed the
    fp32 master weights (`policy_load_dtype`) are saved as they are: casting a short run's result
    to bf16 would round most of its updates away. Returns the train metrics.
    """
    for callback in _EXTRA_CALLBACKS:
        trainer.add_callback(callback)
    trainer.accelerator.wait_for_everyone()
    checkpoint = last_complete_checkpoint(output_dir) if resume else None
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    if trainer.is_world_process_zero():  # the steps about to run are logged again
        trim_metrics(Path(output_dir) / METRICS_FILE, checkpoint_step(checkpoint))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.model.config.use_cache = True
    trainer.save_model(output_dir)
    trainer.save_state()
    return dict(result.metrics)
