"""WRPO loss variants and alpha schedules against values worked out by hand."""

import math
import sys
import textwrap

import pytest
import torch

from wrpo_core.objectives import (
    authors_total_steps,
    constant_alpha,
    linear_alpha,
    resolve_alpha_schedule,
    wrpo_ipo_loss,
    wrpo_loss,
    wrpo_simpo_loss,
)

# One example: implicit rewards r_ws = 0.5, r_wt = -1.0, r_l = -1.0.
POLICY_CHOSEN = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
POLICY_REJECTED = torch.tensor([-3.0], dtype=torch.float64)
REF_CHOSEN = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
REF_REJECTED = torch.tensor([-2.0], dtype=torch.float64)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_wrpo_sigmoid_loss_by_hand():
    # weighted = 0.25 * 0.5 + 0.75 * -1.0 = -0.625; margin = -0.625 - -1.0 = 0.375; beta * margin = 0.1875
    out = wrpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, alpha=0.25, beta=0.5)
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx(softplus(-0.1875), abs=1e-12)
    m = out.metrics
    assert m["rewards/source_chosen"].item() == pytest.approx(0.25)  # beta * 0.5
    assert m["rewards/target_chosen"].item() == pytest.approx(-0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/chosen"].item() == pytest.approx(-0.3125)
    assert m["rewards/margins"].item() == pytest.approx(0.1875)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["rewards/source_accuracies"].item() == 1.0
    assert m["rewards/target_accuracies"].item() == 0.0  # r_wt == r_l is not a win


def test_wrpo_label_smoothing_by_hand():
    out = wrpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, alpha=0.25, beta=0.5, label_smoothing=0.1
    )
    expected = 0.9 * softplus(-0.1875) + 0.1 * softplus(0.1875)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("alpha", "chosen_index"), [(0.0, 1), (1.0, 0)])
def test_alpha_extremes_are_dpo_on_one_pair(alpha, chosen_index):
    torch.manual_seed(0)
    pc, rc = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    pr, rr = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    out = wrpo_loss(pc, pr, rc, rr, alpha=alpha, beta=0.1)
    for i in range(4):
        margin = (pc[i, chosen_index] - rc[i, chosen_index]) - (pr[i] - rr[i])
        assert out.losses[i].item() == pytest.approx(softplus(-0.1 * margin.item()), abs=1e-12)


def test_rejected_may_be_batch_by_one():
    a = wrpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, alpha=0.3, beta=0.2)
    b = wrpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED[:, None], REF_CHOSEN, REF_REJECTED[:, None], alpha=0.3, beta=0.2
    )
    assert torch.equal(a.losses, b.losses)


def test_ipo_loss_by_hand():
    # h = 0.375 (as above, alpha 0.25); target 1 / (2 * 0.5) = 1; (0.375 - 1)^2 = 0.390625
    out = wrpo_ipo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, alpha=0.25, beta=0.5)
    assert out.losses.item() == pytest.approx(0.390625, abs=1e-12)


def test_simpo_loss_by_hand():
    # r = beta * logp / len: r_ws = 2 * -4/2 = -4, r_wt = 2 * -6/3 = -4, r_l = 2 * -9/3 = -6
    # logits = 0.5 * -4 + 0.5 * -4 - -6 - gamma 0.5 = 1.5
    out = wrpo_simpo_loss(
        torch.tensor([[-4.0, -6.0]], dtype=torch.float64),
        torch.tensor([-9.0], dtype=torch.float64),
        torch.tensor([[2, 3]]),
        torch.tensor([3]),
        alpha=0.5,
        beta=2.0,
        gamma=0.5,
    )
    assert out.losses.item() == pytest.approx(softplus(-1.5), abs=1e-12)
    assert out.metrics["rewards/margins"].item() == pytest.approx(2.0)


def test_simpo_rejects_empty_response():
    with pytest.raises(ValueError, match="at least one token"):
        wrpo_simpo_loss(
            torch.zeros(1, 2),
            torch.zeros(1),
            torch.tensor([[0, 3]]),
            torch.tensor([3]),
            alpha=0.5,
            beta=1,
            gamma=0,
        )


@pytest.mark.parametrize(
    ("chosen", "rejected", "message"),
    [
        (torch.zeros(3), torch.zeros(3), r"\(batch, 2\)"),
        (torch.zeros(3, 3), torch.zeros(3), r"\(batch, 2\)"),
        (torch.zeros(3, 2), torch.zeros(2), r"\(batch,\) or \(batch, 1\)"),
    ],
)
def test_bad_shapes_are_named(chosen, rejected, message):
    with pytest.raises(ValueError, match=message):
        wrpo_loss(chosen, rejected, chosen, rejected, alpha=0.1, beta=0.1)


def test_alpha_out_of_range():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        wrpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, alpha=1.5, beta=0.1)


def test_linear_schedule_matches_authors():
    schedule = linear_alpha(0.1)
    assert schedule(0, 10) == 0.0
    assert schedule(5, 10) == pytest.approx(0.05)
    assert schedule(9, 10) == pytest.approx(0.09)
    assert schedule(10, 10) == pytest.approx(0.1)
    assert schedule(12, 10) == pytest.approx(0.1)  # clamped after the counted steps


def test_constant_schedule():
    assert constant_alpha(0.3)(0, 10) == 0.3
    assert constant_alpha(0.3)(7, 10) == 0.3


@pytest.mark.parametrize(
    ("batches", "accumulation", "epochs", "expected"),
    [(10, 3, 1, 3), (10, 3, 2, 6), (16, 8, 1, 2), (17, 8, 1.5, 3), (1, 8, 1, 1)],
)
def test_authors_total_steps(batches, accumulation, epochs, expected):
    # ceil(epochs * (batches // accumulation)), never below 1
    assert authors_total_steps(batches, accumulation, epochs) == expected


def test_user_schedule_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_alpha.py").write_text(
        textwrap.dedent(
            """
            def cosine_up(step, total_steps, alpha):
                import math
                return alpha * (1 - math.cos(math.pi * step / total_steps)) / 2

            def broken(step, total_steps, alpha):
                return 2.0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    schedule = resolve_alpha_schedule("my_alpha:cosine_up", 0.2)
    assert schedule(0, 10) == pytest.approx(0.0)
    assert schedule(5, 10) == pytest.approx(0.1)
    assert schedule(10, 10) == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"returned 2.0 at step 3"):
        resolve_alpha_schedule("my_alpha:broken", 0.2)(3, 10)
    with pytest.raises(ValueError, match="could not be imported"):
        resolve_alpha_schedule("my_alpha:missing", 0.2)
    sys.modules.pop("my_alpha", None)
