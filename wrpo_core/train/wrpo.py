"""The WRPO trainer: transformers' Trainer with the WRPO loss on [y_ws, y_wt, y_l] triples.

Everything else (accumulation, schedulers, mixed precision, DeepSpeed, checkpoint/resume,
logging) is the Trainer's. With reference log-probs stored in the data (the default) the
trainer holds only the policy; with `ref_model` it re-runs the reference every step, as the
authors' trainer does. The policy trains on fp32 master weights (`policy_load_dtype`), with
dropout off, and the stored reference log-probs reach the loss unrounded under any engine.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, Trainer

from wrpo_core.config import WRPOConfig, WRPOJobConfig
from wrpo_core.formats import from_authors_records, read_jsonl
from wrpo_core.logprobs import grouped_logps
from wrpo_core.models import load_causal_lm, load_position_limit, load_tokenizer, loaded_dtype
from wrpo_core.objectives import (
    AlphaSchedule,
    authors_total_steps,
    resolve_alpha_schedule,
    wrpo_ipo_loss,
    wrpo_loss,
    wrpo_simpo_loss,
)
from wrpo_core.packing import choose_collator
from wrpo_core.reference import (
    REFERENCE_FILE,
    attach_reference,
    cached_reference,
    compute_reference_logps,
    reference_settings,
    stored_reference,
)
from wrpo_core.schemas import QUADRUPLES, read_parquet, write_parquet
from wrpo_core.tokenization import TokenizeReport, encode_example, end_of_turn_id
from wrpo_core.train.common import (
    JsonlMetricsCallback,
    bf16_default,
    policy_load_dtype,
    run_training,
    training_arguments,
)
from wrpo_core.train.metrics import METRICS_FILE

logger = logging.getLogger(__name__)

FULL_PRECISION_INPUTS = ("ref_logps",)
"""Batch entries that reach `compute_loss` in their own dtype: the engine's 16-bit cast would round
a stored reference log-prob of -347.12 to -348.0 (bf16 keeps 8 significant bits)."""


def disable_dropout(model: torch.nn.Module) -> None:
    """Turns dropout off in a policy, as the authors' trainer does (TRL's `disable_dropout_in_model`).

    Every `torch.nn.Dropout` gets p = 0, and so does every float dropout rate that a module keeps
    for functional dropout (Llama's attention keeps `attention_dropout`) and every dropout field of
    the config and its sub-configs (saved with the trained model).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in [n for n, v in vars(module).items() if _is_dropout_rate(n, v)]:
            setattr(module, name, 0.0)
    pending = [getattr(model, "config", None)]
    while pending:
        config = pending.pop()
        if config is None:
            continue
        for name, value in list(vars(config).items()):
            if _is_dropout_rate(name, value):
                setattr(config, name, 0.0)
            elif isinstance(value, PretrainedConfig):  # e.g. the text_config of a multimodal model
                pending.append(value)


def _is_dropout_rate(name: str, value: object) -> bool:
    named = "dropout" in name or name.endswith("pdrop")
    return named and isinstance(value, (float, int)) and not isinstance(value, bool)


class WRPOTrainer(Trainer):
    """Trainer whose loss is WRPO (or its SimPO / IPO variants) with the alpha schedule.

    Batches come from `ResponseCollator` (one row per response) or, with shared-prompt packing,
    `packing.PackedResponseCollator` (one row per example) over examples with three responses;
    `grouped_logps` scores either. `ref_logps` (batch, 3) must be in the batch unless a
    `ref_model` is given or the loss is SimPO.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(
        self,
        *args,
        wrpo: WRPOConfig,
        ref_model: PreTrainedModel | None = None,
        alpha_schedule: AlphaSchedule | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.wrpo = wrpo
        self.ref_model = ref_model
        if ref_model is not None:
            if self.is_deepspeed_enabled:
                raise ValueError(
                    "an on-the-fly reference model is not supported under DeepSpeed; "
                    "precompute reference log-probs"
                )
            self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False)
        self.alpha_schedule = alpha_schedule or resolve_alpha_schedule(wrpo.alpha_schedule, wrpo.alpha)
        self._alpha_total_steps: int | None = None
        self._stored_metrics: dict[str, list[float]] = defaultdict(list)

    @property
    def alpha_total_steps(self) -> int:
        """Optimizer steps the alpha schedule spans: max_steps if set, else counted as the authors do."""
        if self._alpha_total_steps is None:
            if self.args.max_steps > 0:
                self._alpha_total_steps = self.args.max_steps
            else:
                self._alpha_total_steps = authors_total_steps(
                    len(self.get_train_dataloader()),
                    self.args.gradient_accumulation_steps,
                    self.args.num_train_epochs,
                )
        return self._alpha_total_steps

    def current_alpha(self) -> float:
        return self.alpha_schedule(self.state.global_step, self.alpha_total_steps)

    def _prepare_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Trainer's input preparation, except that `FULL_PRECISION_INPUTS` keep their dtype.

        Under DeepSpeed, `Trainer._prepare_input` casts every floating tensor of the batch to the
        engine's dtype (bf16); the stored reference log-probs (float64 from the collator) are only
        moved to the device, so the implicit rewards start at zero.
        """
        kept = {key: inputs[key] for key in FULL_PRECISION_INPUTS if key in inputs}
        prepared = super()._prepare_inputs({k: v for k, v in inputs.items() if k not in kept})
        for key, value in kept.items():
            prepared[key] = value.to(device=self.args.device)
        return prepared

    def _reference_logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.ref_model is not None:
            # The same mixed precision as the policy's forward (accelerate patches only the policy).
            with torch.no_grad(), self.accelerator.autocast():
                return grouped_logps(self.ref_model, inputs)[0]
        if "ref_logps" not in inputs:
            raise ValueError(
                "the batch has no reference log-probs: "
                "precompute them (wrpo_core.reference) or pass ref_model"
            )
        return inputs["ref_logps"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy, lengths = grouped_logps(model, inputs)
        alpha = (
            self.current_alpha()
            if model.training
            else self.alpha_schedule(self.alpha_total_steps, self.alpha_total_steps)
        )
        cfg = self.wrpo
        if cfg.loss_type == "simpo":
            out = wrpo_simpo_loss(
                policy[:, :2], policy[:, 2], lengths[:, :2], lengths[:, 2],
                alpha=alpha, beta=cfg.beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing,
            )  # fmt: skip
        else:
            reference = self._reference_logps(inputs).to(policy.device, policy.dtype)
            if cfg.loss_type == "ipo":
                scale = lengths.to(policy.dtype).clamp(min=1)
                out = wrpo_ipo_loss(
                    (policy / scale)[:, :2], (policy / scale)[:, 2], (reference / scale)[:, :2],
                    (reference / scale)[:, 2], alpha=alpha, beta=cfg.beta,
                )  # fmt: skip
            else:
                out = wrpo_loss(
                    policy[:, :2], policy[:, 2], reference[:, :2], reference[:, 2],
                    alpha=alpha, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                )  # fmt: skip
        loss = out.losses.mean()
        if model.training:
            self._store(out.metrics, policy.detach(), alpha)
        return (loss, {"policy_logps": policy.detach()}) if return_outputs else loss

    def _store(self, metrics: dict[str, torch.Tensor], policy: torch.Tensor, alpha: float) -> None:
        values = {name: float(value) for name, value in metrics.items()}
        values["alpha"] = alpha
        values["logps/source_chosen"] = float(policy[:, 0].mean())
        values["logps/target_chosen"] = float(policy[:, 1].mean())
        values["logps/chosen"] = float((alpha * policy[:, 0] + (1 - alpha) * policy[:, 1]).mean())
        values["logps/rejected"] = float(policy[:, 2].mean())
        for name, value in values.items():
            self._stored_metrics[name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of the WRPO metrics gathered since the last log to training logs."""
        if "loss" in logs and self._stored_metrics:
            for name, values in self._stored_metrics.items():
                logs[name] = sum(values) / len(values)
            self._stored_metrics.clear()
        super().log(logs, start_time)


# --- the WRPO job -----------------------------------------------------------------------------


def _positions(job: WRPOJobConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The positions the policy (and so its reference) holds, from its config."""
    limit = load_position_limit(job.model, tokenizer, trust_remote_code=job.trust_remote_code)
    return None if limit is None else limit.positions


def tokenize_quadruples(
    table: pa.Table,
    tokenizer: PreTrainedTokenizerBase,
    hp: WRPOConfig,
    reference: np.ndarray | None = None,
    max_positions: int | None = None,
) -> tuple[Dataset, TokenizeReport]:
    """Tokenizes QUADRUPLES rows into examples with responses [y_ws, y_wt, y_l] (and ref_logps).

    `max_positions` (the model's) caps the configured lengths (`tokenization.fit_lengths`).
    """
    eot = end_of_turn_id(tokenizer)
    report = TokenizeReport()
    rows = []
    columns = [table.column(name).to_pylist() for name in ("prompt", "y_ws", "y_wt", "y_l")]
    for i, (prompt, y_ws, y_wt, y_l) in enumerate(zip(*columns, strict=True)):
        encoded = encode_example(
            tokenizer, prompt, [y_ws, y_wt, y_l], max_length=hp.max_length,
            max_prompt_length=hp.max_prompt_length, eot_id=eot, max_positions=max_positions,
        )  # fmt: skip
        report.add(encoded)
        row = {"prompt_ids": encoded.prompt_ids, "response_ids": encoded.response_ids}
        if reference is not None:
            row["ref_logps"] = reference[i].tolist()
        rows.append(row)
    return Dataset.from_list(rows), report


def load_quadruples(url: str) -> pa.Table:
    """Reads quadruples from Parquet (QUADRUPLES schema) or the authors' JSONL release format."""
    if url.endswith((".jsonl", ".json")):
        return from_authors_records(read_jsonl(url), where=url)
    return read_parquet(url, QUADRUPLES)


def prepare_reference(
    job: WRPOJobConfig, table: pa.Table, tokenizer: PreTrainedTokenizerBase
) -> np.ndarray | None:
    """Stored reference log-probs for the job's data, computing and saving them once if missing.

    Saved as `output_dir/quadruples_with_reference.parquet` with `reference_settings` (the data's
    text, the reference model's weights, the tokenizer, the length limits, the precision); a
    rerun reuses them only when all of these are unchanged, else recomputes and overwrites them.
    Log-probs stored in the input data itself must match the settings (else an error names those
    that differ). Returns None when the job re-runs the reference every step instead.
    """
    hp = job.training
    if not hp.precompute_reference or hp.loss_type == "simpo":
        return None
    reference_path = job.reference_model or job.model
    dtype = policy_load_dtype(hp)  # as the policy runs: the implicit rewards start at zero
    bf16 = bf16_default() if hp.bf16 is None else hp.bf16
    autocast_dtype = torch.bfloat16 if bf16 else None
    settings = reference_settings(
        reference_model=reference_path, table=table, tokenizer=tokenizer, max_length=hp.max_length,
        max_prompt_length=hp.max_prompt_length, autocast_dtype=autocast_dtype,
        dtype=loaded_dtype(reference_path, dtype, trust_remote_code=job.trust_remote_code),
    )  # fmt: skip
    stored = stored_reference(table, settings, where=job.data)
    if stored is not None:
        return stored
    cache = f"{job.output_dir}/{REFERENCE_FILE}"
    cached = cached_reference(cache, settings, rows=table.num_rows)
    if cached is not None:
        return cached
    dataset, _ = tokenize_quadruples(table, tokenizer, hp, max_positions=_positions(job, tokenizer))
    model = load_causal_lm(reference_path, trust_remote_code=job.trust_remote_code, dtype=dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    logps = compute_reference_logps(
        model,
        dataset,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=2 * hp.per_device_train_batch_size,
        autocast_dtype=autocast_dtype,
        pack_prompt=hp.pack_prompt,
    )
    del model
    Path(job.output_dir).mkdir(parents=True, exist_ok=True)
    write_parquet(attach_reference(table, logps, settings), cache, QUADRUPLES)
    return logps


def build_wrpo_trainer(
    job: WRPOJobConfig,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    ref_model: PreTrainedModel | None,
    trainer_class: type[WRPOTrainer] = WRPOTrainer,
) -> WRPOTrainer:
    """The job's trainer: policy loaded from `job.model`, metrics to output_dir/metrics.jsonl.

    The policy loads in `policy_load_dtype` (fp32 master weights unless DeepSpeed keeps its own: a
    bf16 checkpoint updated in bf16 at lr 3e-7 would barely move) and trains with dropout off.
    Batches are packed (`wrpo_core.packing`) when `pack_prompt` is set and the policy (and the
    on-the-fly reference) support it; otherwise one row per response, with the reason logged.
    """
    policy = load_causal_lm(
        job.model, trust_remote_code=job.trust_remote_code, dtype=policy_load_dtype(job.training)
    )
    disable_dropout(policy)
    collator = choose_collator(
        [policy, ref_model], pad_token_id=tokenizer.pad_token_id, pack=job.training.pack_prompt,
        max_length=job.training.max_length, where="WRPO training",
    )  # fmt: skip
    return trainer_class(
        model=policy,
        args=training_arguments(job.training, job.output_dir),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(f"{job.output_dir}/{METRICS_FILE}")],
        wrpo=job.training,
        ref_model=ref_model,
    )


def train_wrpo(job: WRPOJobConfig) -> dict[str, float]:
    """Runs a WRPO job end to end: reference log-probs (once), training, final HF-format model."""
    hp = job.training
    tokenizer = load_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    table = load_quadruples(job.data)
    if table.num_rows == 0:
        raise ValueError(f"{job.data}: no quadruples to train on")
    reference = prepare_reference(job, table, tokenizer)
    dataset, report = tokenize_quadruples(table, tokenizer, hp, reference, _positions(job, tokenizer))
    logger.info("WRPO data: %s", report)
    ref_model = None
    if reference is None and hp.loss_type != "simpo":
        ref_model = load_causal_lm(
            job.reference_model or job.model,
            trust_remote_code=job.trust_remote_code,
            dtype=policy_load_dtype(hp),  # the policy's precision: the implicit rewards start at zero
        )
    trainer = build_wrpo_trainer(job, tokenizer, dataset, ref_model)
    metrics = run_training(trainer, job.output_dir)
    return {
        **metrics,
        "prompts_truncated": report.prompts_truncated,
        "responses_truncated": report.responses_truncated,
    }
