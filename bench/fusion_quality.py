"""Fusion quality on the toy world: Target < SFT < SFT-DPO < SFT-WRPO, over seeds, with confidence intervals.

For each seed: build (or load) the seed's toy world, run the production pipeline and the DPO
baseline (`wrpo_core.demo.run_toy_fusion`), then score greedy answers of all four models on
held-out prompts with the exact verifier. Reports per-model accuracy and the paired
differences SFT - Target, DPO - SFT, WRPO - DPO (same prompts, same seed), with 95% intervals
from a two-level bootstrap (seeds, then prompts within each seed), so both training-seed and
evaluation noise count. Tune on `--split dev` only; report `--split test`.

Run: `.venv/bin/python bench/fusion_quality.py --seeds 5 --eval-prompts 2000 --out runs/fusion-quality`
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from wrpo_core.demo import DEFAULT_CACHE, demo_settings, run_toy_fusion, toy_prompts
from wrpo_core.evaluation import evaluate_model
from wrpo_core.rewards import ToyVerifierScorer
from wrpo_core.toy.world import build_world

MODELS = ["Target", "Target-SFT", "Target-SFT-DPO", "Target-SFT-WRPO"]
PAIRS = [("Target-SFT", "Target"), ("Target-SFT-DPO", "Target-SFT"), ("Target-SFT-WRPO", "Target-SFT-DPO")]


def two_level_bootstrap(
    per_seed: list[np.ndarray], *, draws: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of per-prompt values over seeds, and a 95% interval resampling seeds, then prompts."""
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    for d in range(draws):
        picked = rng.integers(0, len(per_seed), len(per_seed))
        means[d] = np.mean([rng.choice(per_seed[i], len(per_seed[i])).mean() for i in picked])
    point = float(np.mean([values.mean() for values in per_seed]))
    low, high = np.percentile(means, [2.5, 97.5])
    return point, float(low), float(high)


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Per-prompt exact-correctness (0/1) of each model for one seed's world and run.

    Saved next to the run, so a rerun (or several processes on disjoint seeds) reuses it.
    """
    saved = Path(args.out) / f"seed-{seed}" / f"{args.split}-{args.eval_prompts}-correct.json"
    if saved.exists():
        return {name: np.array(values) for name, values in json.loads(saved.read_text()).items()}
    settings = demo_settings(quick=args.quick)
    world_config = settings["world"].model_copy(update={"seed": seed})
    settings = {**settings, "world": world_config}
    world = build_world(world_config, DEFAULT_CACHE)
    base = 10_000 * seed
    train, test = toy_prompts(world_config, settings["train_prompts"], args.eval_prompts, seed=base + 1000)
    _, dev = toy_prompts(world_config, settings["train_prompts"], args.eval_prompts, seed=base + 5000)
    held_out = {"test": test, "dev": dev}[args.split]
    models, _ = run_toy_fusion(Path(args.out) / f"seed-{seed}", world, train, settings)
    prompts = [r["prompt"] for r in held_out]
    skills = [r["skill"] for r in held_out]
    correct = {}
    for name in MODELS:
        _, rewards = evaluate_model(
            models[name], prompts, skills, ToyVerifierScorer(), max_new_tokens=settings["max_new_tokens"]
        )
        correct[name] = np.array([r == 1.0 for r in rewards], dtype=float)
    saved.write_text(json.dumps({name: values.tolist() for name, values in correct.items()}))
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed-order", default=None, help="comma-separated seeds to run, e.g. 1,2,3,4,0")
    parser.add_argument("--eval-prompts", type=int, default=2000)
    parser.add_argument("--split", choices=["test", "dev"], default="test", help="tune on dev, report test")
    parser.add_argument("--out", default="runs/fusion-quality")
    parser.add_argument(
        "--quick", action="store_true", help="smallest settings (smoke check, meaningless numbers)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    per_seed = {}
    order = [int(s) for s in args.seed_order.split(",")] if args.seed_order else list(range(args.seeds))
    for seed in order:
        per_seed[seed] = run_seed(seed, args)
        print(f"seed {seed}: " + ", ".join(f"{m} {per_seed[seed][m].mean():.1%}" for m in MODELS), flush=True)

    lines = [f"Exact accuracy on {args.eval_prompts} held-out ({args.split}) prompts x {args.seeds} seeds; "
             "95% CI: two-level bootstrap (seeds, then prompts).", "",
             "| model | accuracy | 95% CI |", "|---|---:|---|"]  # fmt: skip
    summary: dict[str, dict] = {}
    for name in MODELS:
        point, low, high = two_level_bootstrap([per_seed[s][name] for s in per_seed])
        summary[name] = {"accuracy": point, "ci": [low, high]}
        lines.append(f"| {name} | {point:.1%} | [{low:.1%}, {high:.1%}] |")
    lines += ["", "| paired difference | mean | 95% CI | seeds where > 0 |", "|---|---:|---|---:|"]
    for better, worse in PAIRS:
        diffs = [per_seed[s][better] - per_seed[s][worse] for s in per_seed]
        point, low, high = two_level_bootstrap(diffs)
        wins = int(sum(d.mean() > 0 for d in diffs))
        summary[f"{better} - {worse}"] = {"mean": point, "ci": [low, high], "seeds_positive": wins}
        lines.append(
            f"| {better} - {worse} | {point:+.2%} | [{low:+.2%}, {high:+.2%}] | {wins}/{len(diffs)} |"
        )
    lines.append(f"\nTotal time: {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fusion_quality.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
