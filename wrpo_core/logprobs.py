"""Summed response log-probs of padded sequences, the quantity every preference loss here uses."""

from __future__ import annotations

import torch

from wrpo_core.packing import PACKED_KEY, packed_logps
from wrpo_core.tokenization import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the label tokens of each row, and how many tokens were summed.

    `logits` (rows, T, vocab) predict the next token, so position t scores labels[t + 1].
    Computed in float32 via logsumexp, without materializing the full log-softmax.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)
    token_logits = torch.gather(logits, 2, safe_labels.unsqueeze(-1)).squeeze(-1)
    token_logps = token_logits - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def grouped_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], group: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and token counts of a WRPO batch, shape (examples, group): columns [y_ws, y_wt, y_l].

    A response-major batch (`ResponseCollator`, one row per response) is scored row by row and
    reshaped; a packed batch (`packing.PackedResponseCollator`, one row per example, the prompt
    once) goes to `packing.packed_logps`. Both give the same values up to float rounding.
    """
    if PACKED_KEY in batch:
        return packed_logps(model, batch, group)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logps, lengths = sequence_logps(logits, batch["labels"])
    return logps.view(group, -1).T, lengths.view(group, -1).T
