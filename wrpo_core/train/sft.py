"""Target-SFT: fine-tune the target on (x, y_ws), the best source response of each SFT prompt.

Run: `wrpo train sft --config job.yaml` (an SFTJobConfig). The loss is the token-mean
cross-entropy over response tokens only (prompt masked), through transformers' Trainer.
"""

from __future__ import annotations

import logging

import pyarrow as pa
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, Trainer

from wrpo_core.config import SFTConfig, SFTJobConfig
from wrpo_core.models import load_causal_lm, load_tokenizer
from wrpo_core.schemas import BEST_SOURCE, read_parquet
from wrpo_core.tokenization import ResponseCollator, TokenizeReport, encode_example, end_of_turn_id
from wrpo_core.train.common import JsonlMetricsCallback, run_training, training_arguments
from wrpo_core.train.metrics import METRICS_FILE

logger = logging.getLogger(__name__)


def tokenize_sft(
    table: pa.Table, tokenizer: PreTrainedTokenizerBase, hp: SFTConfig
) -> tuple[Dataset, TokenizeReport]:
    """Tokenizes BEST_SOURCE rows into (prompt_ids, [response_ids]) examples for the collator."""
    eot = end_of_turn_id(tokenizer)
    report = TokenizeReport()
    rows = []
    for prompt, response in zip(
        table.column("prompt").to_pylist(), table.column("y_ws").to_pylist(), strict=True
    ):
        encoded = encode_example(
            tokenizer, prompt, [response], max_length=hp.max_seq_length,
            max_prompt_length=min(hp.max_prompt_length, hp.max_seq_length - 1), eot_id=eot,
        )  # fmt: skip
        report.add(encoded)
        rows.append({"prompt_ids": encoded.prompt_ids, "response_ids": encoded.response_ids})
    return Dataset.from_list(rows), report


def train_sft(job: SFTJobConfig) -> dict[str, float]:
    """Runs a Target-SFT job end to end and saves the model in Hugging Face format to output_dir."""
    tokenizer = load_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    dataset, report = tokenize_sft(read_parquet(job.data, BEST_SOURCE), tokenizer, job.training)
    if report.rows == 0:
        raise ValueError(f"{job.data}: no SFT rows to train on")
    logger.info("SFT data: %s", report)
    model = load_causal_lm(job.model, trust_remote_code=job.trust_remote_code)
    trainer = Trainer(
        model=model,
        args=training_arguments(job.training, job.output_dir),
        train_dataset=dataset,
        data_collator=ResponseCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(f"{job.output_dir}/{METRICS_FILE}")],
    )
    metrics = run_training(trainer, job.output_dir)
    return {
        **metrics,
        "prompts_truncated": report.prompts_truncated,
        "responses_truncated": report.responses_truncated,
    }
