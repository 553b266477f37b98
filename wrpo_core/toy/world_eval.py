"""Exact-answer evaluation of toy models: greedy responses, per-skill accuracy, a Markdown table.

`greedy_responses` answers prompts exactly as the pipeline's samplers send them (chat template,
left padding, stop at `<|end|>`); `evaluate_exact` loads a saved model folder and scores it per
skill with the toy verifier; `format_accuracy_table` renders `{model: {skill: accuracy}}`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from wrpo_core.tokenization import end_of_turn_id, prompt_text
from wrpo_core.toy.skills import accuracy_by_skill


@torch.no_grad()
def greedy_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 128,
) -> list[str]:
    """Greedy responses of a loaded model: batched, left-padded, chat-templated, stopped at eos.

    Each prompt is wrapped as one user turn plus the assistant header (`prompt_text`), so the
    model sees exactly what the pipeline's samplers send. Generation stops at the tokenizer's eos
    (`<|end|>` for the toy tokenizer) or after `max_new_tokens`; only the new tokens are decoded,
    with special tokens skipped. The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    eot = end_of_turn_id(tokenizer)
    was_training = model.training
    model.eval()
    responses: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
            batch = tokenizer(
                texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
            )
            batch = {key: value.to(model.device) for key, value in batch.items()}
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eot,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return responses


def evaluate_exact(
    model_path: str | os.PathLike[str],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 128,
) -> dict[str, float]:
    """Exact-match accuracy per skill of the model saved at `model_path` on toy `prompts`.

    Loads the model and tokenizer with `AutoModelForCausalLM` / `AutoTokenizer`, answers every
    prompt greedily (see `greedy_responses`: batched, left-padded, chat template's generation
    prompt, stops at `<|end|>`, new tokens decoded with special tokens skipped) and scores them
    with `skills.accuracy_by_skill`: a response is correct when it equals the exact answer after
    stripping surrounding whitespace. Returns `{skill: accuracy in [0, 1]}` for every skill present
    in `prompts`, in first-seen order. ValueError on a prompt that is not a toy skill prompt.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    responses = greedy_responses(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return accuracy_by_skill(prompts, responses)


def format_accuracy_table(accuracy: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: one row per model, one column per skill, exact accuracy in percent."""
    skills: list[str] = []
    for per_skill in accuracy.values():
        skills.extend(s for s in per_skill if s not in skills)
    lines = ["| model | " + " | ".join(skills) + " |", "|---|" + "---:|" * len(skills)]
    for model, per_skill in accuracy.items():
        cells = [f"{100 * per_skill[s]:.0f}" if s in per_skill else "-" for s in skills]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
