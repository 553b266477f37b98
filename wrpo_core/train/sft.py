"""Target-SFT: fine-tune the target on (x, y_ws), the best source response of each SFT prompt.

Run: `wrpo train sft --config job.yaml` (an SFTJobConfig), through transformers' Trainer. The
loss is the token-mean cross-entropy over the labelled tokens. By default those are the
response's (prompt masked) and every sequence holds one example. The authors' recipe is there
too: `loss_on_prompt` labels the whole text, and `packing` packs whole examples into sequences
of up to max_seq_length tokens; a packed example keeps its own positions (0, 1, ...) and, since
the batch then has no attention mask (and the Trainer trains without a KV cache), transformers'
attention sees where each example starts and lets it attend only to itself. No example is split across sequences, no end-of-turn token
is added between examples (each still ends in exactly one), and no label is predicted across a
boundary: the first token of every example is unlabelled.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import pyarrow as pa
import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from wrpo_core.config import SFTConfig, SFTJobConfig
from wrpo_core.models import load_causal_lm, load_position_limit, load_tokenizer
from wrpo_core.schemas import BEST_SOURCE, read_parquet
from wrpo_core.tokenization import (
    IGNORE_INDEX,
    EncodedExample,
    TokenizeReport,
    encode_example,
    end_of_turn_id,
)
from wrpo_core.train.common import JsonlMetricsCallback, policy_load_dtype, run_training, training_arguments
from wrpo_core.train.metrics import METRICS_FILE

logger = logging.getLogger(__name__)

PACKING_ATTENTION = frozenset({"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"})
"""Attention implementations of transformers that keep packed examples apart by their position ids."""


def example_tokens(encoded: EncodedExample, *, loss_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Input ids and labels of one SFT example: prompt + response, the prompt labelled only on request.

    The first token is never labelled: nothing in the example comes before it.
    """
    prompt, response = encoded.prompt_ids, encoded.response_ids[0]
    ids = list(prompt) + list(response)
    labels = ids.copy() if loss_on_prompt else [IGNORE_INDEX] * len(prompt) + list(response)
    labels[0] = IGNORE_INDEX
    return ids, labels


def pack_examples(lengths: list[int], capacity: int) -> list[list[int]]:
    """Groups example indices into sequences of at most `capacity` tokens (best fit, longest first).

    Each group lists its examples in data order. ValueError for an example longer than `capacity`.
    """
    if any(length > capacity for length in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a sequence of {capacity}")
    groups: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, group), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(room, (lengths[index], -1))
        if at == len(room):
            groups.append([index])
            free, group = capacity - lengths[index], len(groups) - 1
        else:
            free, group = room.pop(at)
            groups[group].append(index)
            free -= lengths[index]
        if free > 0:
            bisect.insort(room, (free, group))
    return [sorted(group) for group in groups]


def pack_rows(examples: list[tuple[list[int], list[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """Packed rows (input_ids, labels, position_ids) from examples' (input ids, labels)."""
    rows = []
    for group in pack_examples([len(ids) for ids, _ in examples], capacity):
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for index in group:
            ids, labels = examples[index]
            row["input_ids"] += ids
            row["labels"] += labels
            row["position_ids"] += range(len(ids))
        rows.append(row)
    return rows


def tokenize_sft(
    table: pa.Table, tokenizer: PreTrainedTokenizerBase, hp: SFTConfig, max_positions: int | None = None
) -> tuple[Dataset, TokenizeReport]:
    """Tokenizes BEST_SOURCE rows into training rows: one per example, or packed (`hp.packing`).

    `max_positions` (the model's) caps the configured lengths (`tokenization.fit_lengths`).
    """
    eot = end_of_turn_id(tokenizer)
    report = TokenizeReport()
    examples = []
    for prompt, response in zip(
        table.column("prompt").to_pylist(), table.column("y_ws").to_pylist(), strict=True
    ):
        encoded = encode_example(
            tokenizer, prompt, [response], max_length=hp.max_seq_length,
            max_prompt_length=min(hp.max_prompt_length, hp.max_seq_length - 1), eot_id=eot,
            max_positions=max_positions,
        )  # fmt: skip
        report.add(encoded)
        examples.append(example_tokens(encoded, loss_on_prompt=hp.loss_on_prompt))
    if hp.packing:
        rows = pack_rows(examples, hp.max_seq_length)
        tokens = sum(len(ids) for ids, _ in examples)
        logger.info(
            "SFT packing: %d examples (%d tokens) in %d sequences of up to %d tokens",
            len(examples), tokens, len(rows), hp.max_seq_length,
        )  # fmt: skip
    else:
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in examples]
    return Dataset.from_list(rows), report


@dataclass
class SFTCollator:
    """Pads SFT rows into a batch: packed rows (with position_ids) get no attention mask.

    Without a mask, transformers' attention takes each run of consecutive positions for one
    sequence and lets it attend only to itself; padding starts a run of its own (positions
    0, 1, ...) and carries no labels.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(features), width), dtype=torch.long)  # positions, or the attention mask
        for i, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[i, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(feature["labels"], dtype=torch.long)
            if packed:
                extra[i, :n] = torch.tensor(feature["position_ids"], dtype=torch.long)
                extra[i, n:] = torch.arange(width - n)
            else:
                extra[i, :n] = 1
        key = "position_ids" if packed else "attention_mask"
        return {"input_ids": input_ids, "labels": labels, key: extra}


def check_packing_support(model: PreTrainedModel, where: str) -> None:
    """ValueError unless the model keeps packed examples apart (a built-in transformers model)."""
    attention = getattr(model.config, "_attn_implementation", None)
    if not type(model).__module__.startswith("transformers.models.") or attention not in PACKING_ATTENTION:
        raise ValueError(
            f"{where}: training.packing needs a built-in transformers model whose attention keeps packed "
            f"examples apart ({', '.join(sorted(PACKING_ATTENTION))}); {type(model).__name__} from "
            f"{type(model).__module__} with attention {attention!r} is not: set packing to false"
        )


def train_sft(job: SFTJobConfig) -> dict[str, float]:
    """Runs a Target-SFT job end to end and saves the model in Hugging Face format to output_dir.

    The weights train in fp32 unless DeepSpeed holds fp32 master weights (`policy_load_dtype`),
    so a checkpoint stored in bf16 still learns at lr 7e-6; `bf16` then autocasts the compute.
    """
    hp = job.training
    tokenizer = load_tokenizer(job.model, trust_remote_code=job.trust_remote_code, revision=job.revision)
    limit = load_position_limit(
        job.model, tokenizer, trust_remote_code=job.trust_remote_code, revision=job.revision
    )
    dataset, report = tokenize_sft(
        read_parquet(job.data, BEST_SOURCE), tokenizer, hp, None if limit is None else limit.positions
    )
    if report.rows == 0:
        raise ValueError(f"{job.data}: no SFT rows to train on")
    logger.info("SFT data: %s", report)
    model = load_causal_lm(
        job.model, trust_remote_code=job.trust_remote_code, dtype=policy_load_dtype(hp), revision=job.revision
    )
    if hp.packing:
        check_packing_support(model, job.model)
    trainer = Trainer(
        model=model,
        args=training_arguments(hp, job.output_dir),
        train_dataset=dataset,
        data_collator=SFTCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(f"{job.output_dir}/{METRICS_FILE}")],
    )
    metrics = run_training(trainer, job.output_dir)
    return {
        **metrics,
        "prompts_truncated": report.prompts_truncated,
        "responses_truncated": report.responses_truncated,
    }
