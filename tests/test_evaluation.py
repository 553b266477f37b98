"""Evaluation helpers: reward-judged win rates, model comparison, AlpacaEval outputs, skipped prompts."""

import io
import json
import math

import pytest

from wrpo_core.evaluation import (
    alpaca_eval_records,
    compare_models,
    evaluate_model,
    greedy_answers,
    win_rate,
    write_alpaca_eval,
)
from wrpo_core.rewards import ToyVerifierScorer

# --- win_rate ---------------------------------------------------------------------------------


def test_win_rate_counts_wins_ties_losses_by_hand():
    result = win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 4.0, 0.0])
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (2, 1, 1, 4)
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    # outcomes (1, 0.5, 0, 1): sum of squared deviations from 0.625 is 0.6875
    assert result["standard_error"] == pytest.approx(math.sqrt(0.6875 / 3 / 4))
    assert result["ci_low"] <= result["win_rate"] <= result["ci_high"]
    assert 0.0 <= result["ci_low"] < result["ci_high"] <= 1.0


def test_all_ties_is_one_half_with_a_degenerate_interval():
    result = win_rate([0.3, 0.7, 1.0], [0.3, 0.7, 1.0])
    assert (result["wins"], result["ties"], result["losses"]) == (0, 3, 0)
    assert result["win_rate"] == 0.5
    assert result["ci_low"] == result["ci_high"] == 0.5
    assert result["standard_error"] == 0.0


def test_tie_tolerance_turns_small_differences_into_ties():
    assert win_rate([1.05, 2.0], [1.0, 1.0])["wins"] == 2
    result = win_rate([1.05, 2.0, 0.0], [1.0, 1.0, 0.09], tie_tolerance=0.1)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 0)
    assert result["win_rate"] == pytest.approx(2 / 3)


def test_bootstrap_interval_is_seeded_and_narrows_with_more_prompts():
    candidate, baseline = [1.0, 0.0, 1.0, 1.0, 0.5] * 4, [0.0, 1.0, 0.5, 0.5, 0.5] * 4
    a, b = win_rate(candidate, baseline, seed=3), win_rate(candidate, baseline, seed=3)
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    big = win_rate(candidate * 25, baseline * 25, seed=3)
    assert big["win_rate"] == a["win_rate"] == pytest.approx((12 + 2) / 20)
    assert big["ci_high"] - big["ci_low"] < a["ci_high"] - a["ci_low"]
    assert json.loads(json.dumps(a)) == a


def test_win_rate_errors_name_the_index():
    with pytest.raises(ValueError, match=r"baseline reward at index 2 is not finite \(nan\)"):
        win_rate([1.0, 2.0, 3.0], [1.0, 2.0, float("nan")])
    with pytest.raises(ValueError, match="candidate reward at index 0 is not finite"):
        win_rate([float("inf"), 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="3 candidate rewards but 2 baseline rewards; index 2 has no pair"):
        win_rate([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no rewards"):
        win_rate([], [])


# --- compare_models -----------------------------------------------------------------------------


class LengthScorer:
    """A stub reward: the response length, counting the calls."""

    name = "length"

    def __init__(self):
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += 1
        assert len(prompts) == len(responses)
        return [float(len(r)) for r in responses]


def test_compare_models_with_a_stub_scorer():
    prompts = ["p0", "p1", "p2", "p3"]
    answers = {
        "wrpo": ["aaa", "a", "aa", "aaaa"],
        "dpo": ["a", "a", "aaa", ""],
        "sft": ["aaaa", "aaaa", "aaaa", "aaaa"],
    }
    scorer = LengthScorer()
    result = compare_models(answers, prompts, scorer, candidate="wrpo", baselines=["dpo", "sft"])
    assert scorer.calls == 3  # each model scored once
    assert result["scorer"] == "length" and result["prompts"] == 4 and result["candidate"] == "wrpo"
    assert result["models"]["wrpo"]["mean_reward"] == pytest.approx(10 / 4)
    assert result["models"]["dpo"]["rewards"] == [1.0, 1.0, 3.0, 0.0]
    assert "accuracy" not in result["models"]["wrpo"]
    dpo = result["win_rates"]["dpo"]
    assert (dpo["wins"], dpo["ties"], dpo["losses"], dpo["win_rate"]) == (2, 1, 1, 0.625)
    sft = result["win_rates"]["sft"]
    assert (sft["wins"], sft["ties"], sft["losses"], sft["win_rate"]) == (0, 1, 3, 0.125)
    assert json.loads(json.dumps(result)) == result


def test_compare_models_with_the_toy_verifier_reports_exact_accuracy():
    prompts = ["reverse: abc", "add: 1+2", "upper: dog"]
    skills = ["reverse", "add", "upper"]
    answers = {"wrpo": ["cba", "3", "DOG"], "dpo": ["cba", "4", "DOG!"]}
    result = compare_models(
        answers, prompts, ToyVerifierScorer(), candidate="wrpo", baselines=["dpo"], skills=skills
    )
    wrpo, dpo = result["models"]["wrpo"], result["models"]["dpo"]
    assert wrpo["rewards"] == [1.0, 1.0, 1.0] and wrpo["accuracy"] == 1.0
    assert dpo["rewards"][0] == 1.0 and 0.0 <= dpo["rewards"][1] < 0.9 and 0.0 < dpo["rewards"][2] < 0.9
    assert dpo["accuracy"] == pytest.approx(1 / 3)
    assert dpo["by_skill"]["add"]["accuracy"] == 0.0 and dpo["by_skill"]["reverse"]["accuracy"] == 1.0
    assert set(dpo["by_skill"]) == {"reverse", "add", "upper", "all"}
    verdict = result["win_rates"]["dpo"]
    assert (verdict["wins"], verdict["ties"], verdict["losses"]) == (2, 1, 0)
    assert verdict["win_rate"] == pytest.approx(2.5 / 3)


def test_compare_models_errors():
    prompts = ["p0", "p1"]
    scorer = LengthScorer()
    with pytest.raises(ValueError, match=r"no answers for \['base'\]"):
        compare_models({"wrpo": ["a", "b"]}, prompts, scorer, candidate="wrpo", baselines=["base"])
    with pytest.raises(ValueError, match="'base' has 1 answers for 2 prompts"):
        compare_models(
            {"wrpo": ["a", "b"], "base": ["a"]}, prompts, scorer, candidate="wrpo", baselines=["base"]
        )
    with pytest.raises(ValueError, match="also listed as a baseline"):
        compare_models({"wrpo": ["a", "b"]}, prompts, scorer, candidate="wrpo", baselines=["wrpo"])

    class NaNScorer(LengthScorer):
        def score(self, prompts, responses):
            return [float("nan") if r == "bad" else 1.0 for r in responses]

    with pytest.raises(ValueError, match="model 'base' a non-finite reward nan at index 1"):
        compare_models(
            {"wrpo": ["a", "b"], "base": ["a", "bad"]},
            prompts,
            NaNScorer(),
            candidate="wrpo",
            baselines=["base"],
        )


# --- AlpacaEval ----------------------------------------------------------------------------------


def test_alpaca_eval_records_round_trip_with_exactly_the_documented_fields(tmp_path):
    prompts = ["What is 2+2?", "Écris un haïku."]
    outputs = ["4", "Neige sur le toit…"]
    records = alpaca_eval_records(prompts, outputs, "wrpo-8b")
    assert [set(r) for r in records] == [{"instruction", "output", "generator", "dataset"}] * 2
    assert [r["instruction"] for r in records] == prompts
    assert [r["output"] for r in records] == outputs
    assert {r["generator"] for r in records} == {"wrpo-8b"}

    path = tmp_path / "outputs.json"
    write_alpaca_eval(path, records)
    assert json.loads(path.read_text(encoding="utf-8")) == records
    assert "Écris" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    buffer = io.StringIO()
    write_alpaca_eval(buffer, records)
    assert json.loads(buffer.getvalue()) == records


def test_alpaca_eval_records_per_prompt_datasets_and_errors():
    records = alpaca_eval_records(["a", "b"], ["x", "y"], "m", dataset=["helpful_base", "koala"])
    assert [r["dataset"] for r in records] == ["helpful_base", "koala"]
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        alpaca_eval_records(["a", "b"], ["x"], "m")
    with pytest.raises(ValueError, match="1 dataset names for 2 prompts"):
        alpaca_eval_records(["a", "b"], ["x", "y"], "m", dataset=["koala"])
    with pytest.raises(ValueError, match="generator"):
        alpaca_eval_records(["a"], ["x"], "")


# --- greedy answers: skipped prompts ------------------------------------------------------------


def test_greedy_answers_report_skipped_empty_prompts(tiny_model_dir):
    prompts = ["reverse: abc", "   ", "add: 1+2"]
    answers, skipped = greedy_answers(tiny_model_dir, prompts, max_new_tokens=4)
    assert skipped == [1]
    assert len(answers) == 3 and answers[1] == ""
    # the same answers for the non-empty prompts as when asked without the empty one
    alone = greedy_answers(tiny_model_dir, [prompts[0], prompts[2]], max_new_tokens=4)
    assert alone.skipped == [] and alone.answers == [answers[0], answers[2]]


def test_evaluate_model_keeps_its_return_type(tiny_model_dir):
    prompts, skills = ["reverse: abc", "add: 1+2"], ["reverse", "add"]
    summary, rewards = evaluate_model(tiny_model_dir, prompts, skills, LengthScorer(), max_new_tokens=4)
    assert len(rewards) == 2 and set(summary) == {"reverse", "add", "all"}
    assert summary["all"]["mean_reward"] == pytest.approx(sum(rewards) / 2)
