"""Held-out evaluation of trained models: greedy answers scored by the reward, per skill on the toy world."""

from __future__ import annotations

from collections import defaultdict

import torch

from wrpo_core.config import SamplingConfig
from wrpo_core.rewards import RewardScorer
from wrpo_core.sampling import HFSampler
from wrpo_core.train.common import load_causal_lm, load_tokenizer


def greedy_answers(
    model_path: str, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """One greedy response per prompt from the model at `model_path`, through the production sampler."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(model_path).to(device).eval()
    sampler = HFSampler(
        model, load_tokenizer(model_path), "eval",
        SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens), batch_size=batch_size, progress=False,
    )  # fmt: skip
    ids = [str(i) for i in range(len(prompts))]
    table, _ = sampler.sample(ids, prompts)
    by_id = dict(zip(table["prompt_id"].to_pylist(), table["text"].to_pylist(), strict=True))
    return [by_id.get(i, "") for i in ids]


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
    """Greedy answers to held-out prompts scored by the reward: the per-skill summary and each reward."""
    rewards = scorer.score(prompts, greedy_answers(model_path, prompts, max_new_tokens=max_new_tokens))
    return summarize(rewards, skills), rewards
