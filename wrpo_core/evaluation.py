"""Held-out evaluation of trained models: greedy answers scored by the reward, per skill on the toy world.

Also the evaluation stage's pure reporting helpers: reward-judged head-to-head win rates
(`win_rate`, `compare_models`) and generations written in AlpacaEval's model-outputs format
(`alpaca_eval_records`, `write_alpaca_eval`) for judging with `alpaca_eval --model_outputs`.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from os import PathLike
from typing import IO, Any, NamedTuple

import numpy as np
import torch

from wrpo_core.config import SamplingConfig
from wrpo_core.models import load_causal_lm, load_tokenizer
from wrpo_core.rewards import RewardScorer
from wrpo_core.sampling import HFSampler

logger = logging.getLogger(__name__)


class GreedyAnswers(NamedTuple):
    """Greedy answers aligned with the prompts, and the indices of prompts the sampler skipped.

    A skipped prompt (empty or whitespace-only) has the answer "" so the list stays aligned;
    callers should report `len(skipped)` rather than judge those empty answers as real ones.
    """

    answers: list[str]
    skipped: list[int]


def greedy_answers(
    model_path: str,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    revision: str | None = None,
) -> GreedyAnswers:
    """One greedy response per prompt from the model at `model_path` (at `revision`), through the production sampler.

    Returns the answers (aligned with `prompts`) and the indices of prompts the sampler skipped
    (empty prompts), whose answers are "".
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(model_path, revision=revision).to(device).eval()
    sampler = HFSampler(
        model, load_tokenizer(model_path, revision=revision), "eval",
        SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens), batch_size=batch_size, progress=False,
    )  # fmt: skip
    ids = [str(i) for i in range(len(prompts))]
    table, _ = sampler.sample(ids, prompts)
    by_id = dict(zip(table["prompt_id"].to_pylist(), table["text"].to_pylist(), strict=True))
    skipped = [i for i, pid in enumerate(ids) if pid not in by_id]
    return GreedyAnswers([by_id.get(pid, "") for pid in ids], skipped)


def summarize(rewards: list[float], skills: list[str]) -> dict[str, dict[str, float]]:
    """Per-skill (and 'all') exact accuracy and mean reward; a reward of exactly 1.0 counts as correct."""
    groups: dict[str, list[float]] = defaultdict(list)
    for skill, reward in zip(skills, rewards, strict=True):
        groups[skill].append(reward)
        groups["all"].append(reward)
    return {
        skill: {
            "accuracy": sum(r == 1.0 for r in values) / len(values),
            "mean_reward": sum(values) / len(values),
        }
        for skill, values in groups.items()
    }


def evaluate_model(
    model_path: str, prompts: list[str], skills: list[str], scorer: RewardScorer, *, max_new_tokens: int
) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Greedy answers to held-out prompts scored by the reward: the per-skill summary and each reward.

    Skipped (empty) prompts are scored with an empty answer, as before; a warning says how many.
    """
    answers, skipped = greedy_answers(model_path, prompts, max_new_tokens=max_new_tokens)
    if skipped:
        logger.warning("%s: %d empty prompt(s) skipped, scored with empty answers", model_path, len(skipped))
    rewards = scorer.score(prompts, answers)
    return summarize(rewards, skills), rewards


# --- reward-judged win rates ------------------------------------------------------------------


def _check_rewards(candidate: Sequence[float], baseline: Sequence[float]) -> None:
    if len(candidate) != len(baseline):
        first = min(len(candidate), len(baseline))
        raise ValueError(
            f"win_rate: {len(candidate)} candidate rewards but {len(baseline)} baseline rewards; "
            f"index {first} has no pair"
        )
    if not candidate:
        raise ValueError("win_rate: no rewards to compare")
    for side, values in (("candidate", candidate), ("baseline", baseline)):
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise ValueError(f"win_rate: {side} reward at index {i} is not finite ({value})")


def win_rate(
    candidate: Sequence[float],
    baseline: Sequence[float],
    *,
    tie_tolerance: float = 0.0,
    confidence: float = 0.95,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Head-to-head of two models judged by a reward model on the same prompts (index i vs index i).

    A prompt is a win when the candidate's reward is higher by more than `tie_tolerance`, a tie
    when they differ by at most that, a loss otherwise. win_rate = (wins + 0.5 ties) / n, a
    fraction in [0, 1] (AlpacaEval also counts a tie as half a win). `standard_error` is that of
    the per-prompt outcomes (1, 0.5, 0), normalized by n - 1 as AlpacaEval does (None for n = 1).
    `ci_low`/`ci_high`: a seeded percentile bootstrap over prompts at `confidence`; resampling
    prompts only redistributes the win/tie/loss counts, so it is drawn as a multinomial (exact
    and cheap). ValueError naming the index for a non-finite reward or unpaired lengths.
    """
    _check_rewards(candidate, baseline)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"win_rate: confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 1:
        raise ValueError(f"win_rate: n_bootstrap must be >= 1, got {n_bootstrap}")
    diffs = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    n = len(diffs)
    wins = int((diffs > tie_tolerance).sum())
    losses = int((diffs < -tie_tolerance).sum())
    ties = n - wins - losses
    outcomes = np.where(diffs > tie_tolerance, 1.0, np.where(diffs < -tie_tolerance, 0.0, 0.5))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [wins / n, ties / n, losses / n], size=n_bootstrap)
    rates = (counts[:, 0] + 0.5 * counts[:, 1]) / n
    low, high = np.quantile(rates, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": (wins + 0.5 * ties) / n,
        "standard_error": float(outcomes.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "ci_low": float(low),
        "ci_high": float(high),
        "confidence": confidence,
    }


def compare_models(
    answers: dict[str, list[str]],
    prompts: list[str],
    scorer: RewardScorer,
    *,
    candidate: str,
    baselines: list[str],
    skills: list[str] | None = None,
) -> dict[str, Any]:
    """Scores every model's answers to the same prompts once and reports the candidate against baselines.

    `answers[model][i]` answers `prompts[i]`. Returns (JSON-serializable)::

        {"scorer": name, "prompts": n, "candidate": candidate,
         "models": {model: {"mean_reward": float, "rewards": [...],
                            # only when `skills` is given (exact-verifier rewards, 1.0 = correct):
                            "accuracy": float, "by_skill": summarize(rewards, skills)}},
         "win_rates": {baseline: win_rate(candidate rewards, baseline rewards)}}

    ValueError for an unknown candidate/baseline, answers or skills not aligned with the prompts,
    or a non-finite reward (naming the model and index).
    """
    if not prompts:
        raise ValueError("compare_models: no prompts")
    missing = [name for name in [candidate, *baselines] if name not in answers]
    if missing:
        raise ValueError(f"compare_models: no answers for {missing}; have {sorted(answers)}")
    if candidate in baselines:
        raise ValueError(f"compare_models: candidate {candidate!r} is also listed as a baseline")
    if skills is not None and len(skills) != len(prompts):
        raise ValueError(f"compare_models: {len(skills)} skills for {len(prompts)} prompts")
    rewards: dict[str, list[float]] = {}
    for name, texts in answers.items():
        if len(texts) != len(prompts):
            raise ValueError(
                f"compare_models: model {name!r} has {len(texts)} answers for {len(prompts)} prompts"
            )
        values = [float(v) for v in scorer.score(prompts, texts)]
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(
                f"compare_models: {scorer.name} gave model {name!r} a non-finite reward {values[bad]} at index {bad}"
            )
        rewards[name] = values
    models: dict[str, dict[str, Any]] = {}
    for name, values in rewards.items():
        entry: dict[str, Any] = {"mean_reward": sum(values) / len(values), "rewards": values}
        if skills is not None:
            by_skill = summarize(values, skills)
            entry["accuracy"] = by_skill["all"]["accuracy"]
            entry["by_skill"] = by_skill
        models[name] = entry
    return {
        "scorer": scorer.name,
        "prompts": len(prompts),
        "candidate": candidate,
        "models": models,
        "win_rates": {base: win_rate(rewards[candidate], rewards[base]) for base in baselines},
    }


# --- AlpacaEval model outputs -------------------------------------------------------------------

ALPACA_EVAL_FIELDS = ("instruction", "output", "generator", "dataset")


def alpaca_eval_records(
    prompts: list[str], outputs: list[str], generator: str, dataset: str | Sequence[str] = "wrpo_eval"
) -> list[dict[str, str]]:
    """Generations as AlpacaEval model outputs, for `alpaca_eval --model_outputs file.json`.

    Format checked in tatsu-lab/alpaca_eval: `example/outputs.json` is a JSON list of records
    `{"instruction", "output", "generator", "dataset", "datasplit"}`; `src/alpaca_eval/main.py`
    (`evaluate`) says "Each dictionary (or row of dataframe) should contain the keys that are
    formatted in the prompts. E.g. by default `instruction` and `output` with optional `input`",
    and `name` defaults to the records' `generator` ("If None we check if `generator is in
    model_outputs`"). Outputs are paired with the reference's on `instruction` (the annotator's
    `annotate_head2head` merges on its input keys, by default ("instruction",)), so prompts must
    be AlpacaEval's instructions verbatim to be judged against its reference outputs.

    Each record has exactly the fields `instruction`, `output`, `generator`, `dataset`; `dataset`
    is one name for all records or one per prompt (AlpacaEval's own set uses e.g. "helpful_base").
    """
    if len(prompts) != len(outputs):
        raise ValueError(f"alpaca_eval_records: {len(prompts)} prompts but {len(outputs)} outputs")
    datasets = [dataset] * len(prompts) if isinstance(dataset, str) else list(dataset)
    if len(datasets) != len(prompts):
        raise ValueError(f"alpaca_eval_records: {len(datasets)} dataset names for {len(prompts)} prompts")
    if not generator:
        raise ValueError("alpaca_eval_records: generator (the model's leaderboard name) must not be empty")
    return [
        {"instruction": prompt, "output": output, "generator": generator, "dataset": name}
        for prompt, output, name in zip(prompts, outputs, datasets, strict=True)
    ]


def write_alpaca_eval(path_or_file: str | PathLike[str] | IO[str], records: list[dict[str, str]]) -> None:
    """Writes AlpacaEval model-output records as the JSON list `alpaca_eval --model_outputs` reads (UTF-8)."""
    if hasattr(path_or_file, "write"):
        json.dump(records, path_or_file, ensure_ascii=False, indent=2)  # type: ignore[arg-type]
        return
    with open(path_or_file, "w", encoding="utf-8") as handle:
        json.dump(records, handle, ensure_ascii=False, indent=2)
