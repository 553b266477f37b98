"""The WRPO objective, its variants (SimPO, IPO) and the fusion-coefficient (alpha) schedules.

WRPO (arXiv 2412.03187) weighs the implicit reward of the best SOURCE response y_ws and of
the best TARGET response y_wt against the worst target response y_l:

    r(y)   = log pi_theta(y|x) - log pi_ref(y|x)            (summed over response tokens)
    L_WRPO = -log sigmoid(beta * (alpha * r(y_ws) + (1 - alpha) * r(y_wt) - r(y_l)))

Chosen tensors are (batch, 2) ordered [y_ws, y_wt], as in the authors' data and code;
rejected tensors are (batch,) or (batch, 1). alpha = 0 is DPO on (y_wt, y_l); alpha = 1 is
DPO on (y_ws, y_l).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

AlphaSchedule = Callable[[int, int], float]
"""Maps (optimizer step, total optimizer steps) to the fusion coefficient for that step."""


class WRPOLossOutput(NamedTuple):
    """Per-example losses and the batch-mean metrics the authors log (rewards scaled by beta)."""

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _split_chosen(
    chosen: torch.Tensor, rejected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if chosen.dim() != 2 or chosen.shape[1] != 2:
        raise ValueError(
            f"chosen tensors must be (batch, 2) ordered [y_ws, y_wt]; got shape {tuple(chosen.shape)}"
        )
    if rejected.dim() == 2 and rejected.shape[1] == 1:
        rejected = rejected[:, 0]
    if rejected.dim() != 1 or rejected.shape[0] != chosen.shape[0]:
        raise ValueError(
            f"rejected tensors must be (batch,) or (batch, 1) with batch {chosen.shape[0]}; "
            f"got shape {tuple(rejected.shape)}"
        )
    return chosen[:, 0], chosen[:, 1], rejected


def _implicit_rewards(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """r(y) = log pi(y|x) - log pi_ref(y|x) of y_ws, y_wt and y_l, each (batch,)."""
    pol_ws, pol_wt, pol_l = _split_chosen(policy_chosen, policy_rejected)
    ref_ws, ref_wt, ref_l = _split_chosen(ref_chosen, ref_rejected)
    return pol_ws - ref_ws, pol_wt - ref_wt, pol_l - ref_l


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _reward_metrics(
    source: torch.Tensor, target: torch.Tensor, rejected: torch.Tensor, *, alpha: float, scale: float
) -> dict[str, torch.Tensor]:
    """The authors' logged metrics from per-example rewards, each multiplied by `scale`."""
    source, target, rejected = (scale * t.detach() for t in (source, target, rejected))
    weighted = alpha * source + (1 - alpha) * target
    return {
        "rewards/chosen": weighted.mean(),
        "rewards/source_chosen": source.mean(),
        "rewards/target_chosen": target.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (weighted - rejected).mean(),
        "rewards/accuracies": (weighted > rejected).float().mean(),
        "rewards/source_accuracies": (source > rejected).float().mean(),
        "rewards/target_accuracies": (target > rejected).float().mean(),
    }


def wrpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    label_smoothing: float = 0.0,
) -> WRPOLossOutput:
    """WRPO's sigmoid loss (the paper's objective), with cDPO-style label smoothing as in TRL."""
    _check_alpha(alpha)
    r_ws, r_wt, r_l = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = alpha * r_ws + (1 - alpha) * r_wt - r_l
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )
    return WRPOLossOutput(losses, _reward_metrics(r_ws, r_wt, r_l, alpha=alpha, scale=beta))


def wrpo_ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    alpha: float,
    beta: float,
) -> WRPOLossOutput:
    """IPO's squared loss on the weighted reward: (h - 1/(2 beta))^2, h the weighted log-ratio margin.

    Pass length-averaged log-probs to match TRL's IPO (the trainer does so for loss_type 'ipo').
    """
    _check_alpha(alpha)
    r_ws, r_wt, r_l = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    h = alpha * r_ws + (1 - alpha) * r_wt - r_l
    losses = (h - 1 / (2 * beta)) ** 2
    return WRPOLossOutput(losses, _reward_metrics(r_ws, r_wt, r_l, alpha=alpha, scale=beta))


def wrpo_simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> WRPOLossOutput:
    """SimPO's reference-free, length-normalized reward in the weighted form, with target margin gamma.

    r(y) = beta * log pi_theta(y|x) / |y|;  L = -log sigmoid(alpha r(y_ws) + (1-alpha) r(y_wt) - r(y_l) - gamma).
    """
    _check_alpha(alpha)
    pol_ws, pol_wt, pol_l = _split_chosen(policy_chosen_logps, policy_rejected_logps)
    len_ws, len_wt, len_l = _split_chosen(chosen_lengths.to(pol_ws.dtype), rejected_lengths.to(pol_ws.dtype))
    if bool((len_ws <= 0).any() or (len_wt <= 0).any() or (len_l <= 0).any()):
        raise ValueError("SimPO needs every response to have at least one token (a length of 0 was passed)")
    r_ws, r_wt, r_l = beta * pol_ws / len_ws, beta * pol_wt / len_wt, beta * pol_l / len_l
    logits = alpha * r_ws + (1 - alpha) * r_wt - r_l - gamma
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return WRPOLossOutput(losses, _reward_metrics(r_ws, r_wt, r_l, alpha=alpha, scale=1.0))


# --- alpha schedules -------------------------------------------------------------------------


def authors_total_steps(
    num_batches_per_epoch: int, gradient_accumulation_steps: int, num_epochs: float
) -> int:
    """Total optimizer steps as the authors' trainer counts them: ceil(epochs * (batches // accumulation)).

    transformers >= 4.46 counts a trailing partial accumulation as one more step; on that extra
    step the linear schedule is already clamped at its final value.
    """
    per_epoch = num_batches_per_epoch // gradient_accumulation_steps
    return max(1, math.ceil(num_epochs * per_epoch))


def linear_alpha(alpha: float) -> AlphaSchedule:
    """Progressive adaptation: alpha * step / total_steps, clamped to [0, alpha] (the authors' schedule).

    Step is the number of optimizer steps already taken (Trainer's global_step), so the first
    step uses 0 and the value reaches `alpha` at step == total_steps.
    """
    _check_alpha(alpha)

    def schedule(step: int, total_steps: int) -> float:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if step <= 0:
            return 0.0
        if step >= total_steps:
            return float(alpha)
        return alpha * step / total_steps

    return schedule


def constant_alpha(alpha: float) -> AlphaSchedule:
    """A static fusion coefficient (the paper's ablation)."""
    _check_alpha(alpha)
    return lambda step, total_steps: float(alpha)


def resolve_alpha_schedule(name: str, alpha: float) -> AlphaSchedule:
    """Returns the schedule named 'linear', 'constant' or 'package.module:function'.

    A user function is called as f(step, total_steps, alpha) and must return a value in [0, 1].
    """
    if name == "linear":
        return linear_alpha(alpha)
    if name == "constant":
        return constant_alpha(alpha)
    module_name, _, attr = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"alpha_schedule {name!r} could not be imported: {error}") from None

    def user_schedule(step: int, total_steps: int) -> float:
        value = float(function(step, total_steps, alpha))
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha_schedule {name!r} returned {value} at step {step}; it must be in [0, 1]")
        return value

    return user_schedule
