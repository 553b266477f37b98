"""Fusion quality on the toy world: Target < SFT < SFT-DPO < SFT-WRPO, over seeds, with confidence intervals.

For each seed: build (or load) the seed's toy world, run the production pipeline and the DPO
baseline (`wrpo_core.demo.run_toy_fusion`), then score greedy answers of all four models on
held-out prompts with the exact verifier. Reports per-model accuracy and the paired
differences SFT - Target, DPO - SFT, WRPO - DPO (same prompts, same seed), with 95% intervals
from a two-level bootstrap (seeds, then prompts within each seed), so both training-seed and
evaluation noise count. Tune on `--split dev` only; report `--split test`.

`--ablation` adds the paper's ablations on the same runs: WRPO at alpha 0 (DPO: no y_ws),
0.1, 0.3, 0.5, 0.7, 1 (alpha rising linearly from 0, the paper's schedule), and alpha 1 held
constant (no y_wt at all), each at every beta of `--betas`, all trained from the same
Target-SFT on the same quadruples and stored reference log-probs. Every arm is scored on dev
and test prompts; each arm's beta is the one with the best mean dev accuracy over seeds, the
"tuned" WRPO is the linear-schedule alpha > 0 with the best dev accuracy, and only then is the
test split read.
Prints the table (test accuracy and paired difference vs DPO, with intervals) and the
quadruples' statistics (how often y_wt is right, and is y_ws's own text), and writes
`ablation.png` (accuracy vs alpha) and `ablation-test.json` next to the runs.

`--setting` picks one of `RUN_SETTINGS` (the same worlds, other run sizes and epochs);
`--dev-only` scores dev alone and shows the selection view, so settings are compared without
reading test.

Run: `.venv/bin/python bench/fusion_quality.py --seeds 5 --eval-prompts 2000`
     `.venv/bin/python bench/fusion_quality.py --ablation --setting sft-heavy --dev-only`  (select:
     each setting, dev only), then `... --ablation --setting sft-light` (the chosen one: test).
     `--seed-order 5,6,7,8,9 --out DIR` runs other worlds (built on first use, about 3 min each).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from pathlib import Path

import numpy as np

from wrpo_core.demo import DEFAULT_CACHE, demo_settings, fusion_config, run_toy_fusion, toy_prompts
from wrpo_core.evaluation import evaluate_model
from wrpo_core.pipeline import layout_for, run_pipeline_stage, wrpo_variant_stage
from wrpo_core.rewards import ToyVerifierScorer
from wrpo_core.schemas import QUADRUPLES
from wrpo_core.toy.skills import is_correct
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


RUN_SETTINGS: dict[str, dict] = {
    "sft-heavy": {
        "train_prompts": 1800,
        "split": {"sft_fraction": 1 / 3},
        "sft": {"num_train_epochs": 2},
        "wrpo": {"num_train_epochs": 3, "alpha": 0.5, "beta": 1.0},
    },
    "sft-light": {},  # the demo's own settings (wrpo_core/toy/paths.py demo_settings)
}
"""Run settings on the same worlds (the models are untouched), laid over the demo's settings.

`sft-heavy` (the demo until 2026-11-29): 1800 prompts, 1/3 for SFT (2 epochs), WRPO 3 epochs on
the rest. Target-SFT already knows most of what the sources know (SFT +11 points, preference
training +1.3), so y_ws has little to add. `sft-light` (the demo's settings since): 3600 prompts, 1/6 (600)
for one SFT epoch and 3000 for preference optimization (2 epochs), so that, as in the paper (SFT
+1.2 AlpacaEval LC, DPO +23), most of the sources' knowledge reaches the target through the
preference stage, where y_ws carries it and y_wt mostly does not. Chosen on dev (bench/RESULTS.md).
The WRPO alpha/beta here are the run's own WRPO stage; the ablation trains every other arm.
"""


def run_settings(name: str, *, quick: bool = False) -> dict:
    """The demo's settings with `RUN_SETTINGS[name]` laid over them (dicts merged one level deep); quick: the smoke sizes."""
    settings = demo_settings(quick=quick)
    if quick:  # the smoke check's own sizes
        return settings
    for key, value in RUN_SETTINGS[name].items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return settings


def seed_world(seed: int, args: argparse.Namespace) -> tuple[dict, object, list[dict], dict[str, list[dict]]]:
    """One seed's settings, world (built or loaded), training prompts and held-out prompts by split."""
    settings = run_settings(args.setting, quick=args.quick)
    world_config = settings["world"].model_copy(update={"seed": seed})
    settings = {**settings, "world": world_config}
    world = build_world(world_config, DEFAULT_CACHE)
    base = 10_000 * seed
    train, test = toy_prompts(world_config, settings["train_prompts"], args.eval_prompts, seed=base + 1000)
    _, dev = toy_prompts(world_config, settings["train_prompts"], args.eval_prompts, seed=base + 5000)
    return settings, world, train, {"dev": dev, "test": test}


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Per-prompt exact-correctness (0/1) of each model for one seed's world and run.

    Saved next to the run, so a rerun (or several processes on disjoint seeds) reuses it.
    """
    saved = Path(args.out) / f"seed-{seed}" / f"{args.split}-{args.eval_prompts}-correct.json"
    if saved.exists():
        return {name: np.array(values) for name, values in json.loads(saved.read_text()).items()}
    settings, world, train, held = seed_world(seed, args)
    held_out = held[args.split]
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


ALPHAS = (0.0, 0.1, 0.3, 0.5, 0.7, 1.0)
"""The alpha sweep of the issue: 0 is DPO on (y_wt, y_l) (no y_ws), 1 ends on (y_ws, y_l)."""
NO_YWT = (1.0, "constant")
"""alpha 1 from the first step: y_wt never weighs in (the paper's 'w/o y_wt' ablation)."""


def ablation_arms() -> list[tuple[float, str]]:
    """(alpha, schedule) of every ablation arm: the linear sweep, then alpha 1 held constant."""
    return [(alpha, "linear") for alpha in ALPHAS] + [NO_YWT]


def arm_label(arm: tuple[float, str]) -> str:
    alpha, schedule = arm
    if alpha == 0.0:
        return "DPO (alpha 0)"
    return f"alpha {alpha:g} constant (no y_wt)" if schedule == "constant" else f"WRPO alpha {alpha:g}"


def variant_name(arm: tuple[float, str], beta: float) -> str:
    alpha, schedule = arm
    return f"ablation-a{alpha:g}-{schedule}-b{beta:g}"


def ablation_seed(
    seed: int, args: argparse.Namespace, betas: list[float]
) -> dict[str, dict[str, np.ndarray]]:
    """Per-prompt correctness on dev and test of Target, Target-SFT and every arm x beta of one seed.

    Trains what is missing (each variant is a pipeline stage: a rerun skips it) and saves the
    scores after every model, so an interrupted sweep resumes where it stopped.
    """
    run_dir = Path(args.out) / f"seed-{seed}"
    saved = run_dir / f"ablation-{args.eval_prompts}-correct.json"
    scores: dict = json.loads(saved.read_text()) if saved.exists() else {"dev": {}, "test": {}}
    identity = setting_identity(args)
    if saved.exists() and "setting" not in scores:  # saved before settings were recorded: this run's
        saved.write_text(json.dumps({**scores, "setting": identity}))
    if scores.setdefault("setting", identity) != identity:
        raise SystemExit(
            f"{saved} holds scores of run setting {scores['setting']}, not {identity}: "
            "pass another --out (each setting needs its own folder)"
        )
    splits = ("dev",) if args.dev_only else ("dev", "test")
    names = {"Target", "Target-SFT", *(variant_name(arm, beta) for arm in ablation_arms() for beta in betas)}
    scored = all(names <= set(scores[split]) for split in splits)
    if scored and "quadruples" in scores:  # nothing to train, score or read
        return _seed_scores(scores, names, splits)
    settings, world, train, held = seed_world(seed, args)
    cfg = fusion_config(world, run_dir / "prompts.jsonl", run_dir, settings)
    layout = layout_for(cfg)
    if scored:  # scored before the quadruple statistics were kept
        scores["quadruples"] = quadruple_stats(layout.read_dataset(layout.quadruples, QUADRUPLES))
        saved.write_text(json.dumps(scores))
        return _seed_scores(scores, names, splits)
    models, _ = run_toy_fusion(run_dir, world, train, settings)
    scores["quadruples"] = quadruple_stats(layout.read_dataset(layout.quadruples, QUADRUPLES))
    trained = {variant_name((cfg.wrpo.alpha, cfg.wrpo.alpha_schedule), cfg.wrpo.beta): models["Target-SFT-WRPO"],
               variant_name((0.0, cfg.wrpo.alpha_schedule), cfg.wrpo.beta): models["Target-SFT-DPO"]}  # fmt: skip
    wanted = {"Target": models["Target"], "Target-SFT": models["Target-SFT"]}
    for arm in ablation_arms():
        for beta in betas:
            name = variant_name(arm, beta)
            if name not in trained:
                update = {"alpha": arm[0], "alpha_schedule": arm[1], "beta": beta}
                started = time.perf_counter()
                stage = wrpo_variant_stage(cfg, layout, name, cfg.wrpo.model_copy(update=update))
                outcome, _ = run_pipeline_stage(cfg, layout, stage, reuse=False)
                print(f"  seed {seed} {name}: {outcome} in {time.perf_counter() - started:.0f} s", flush=True)
                trained[name] = layout.model(name)
            wanted[name] = trained[name]
    for split in splits:
        prompts, skills = [r["prompt"] for r in held[split]], [r["skill"] for r in held[split]]
        for name, path in wanted.items():
            if name in scores[split]:
                continue
            _, rewards = evaluate_model(
                path, prompts, skills, ToyVerifierScorer(), max_new_tokens=settings["max_new_tokens"]
            )
            scores[split][name] = [float(r == 1.0) for r in rewards]
            saved.write_text(json.dumps(scores))
    saved.write_text(json.dumps(scores))
    return _seed_scores(scores, names, splits)


def setting_identity(args: argparse.Namespace) -> dict:
    """What in a run setting makes its scores (or the smoke sizes): prompt count, split and epochs of
    the settings the run uses, not the run's own WRPO alpha / beta, which no arm depends on (every arm
    is trained and named with its own)."""
    if args.quick:
        return {"quick": True}
    settings = run_settings(args.setting)
    wrpo = {key: value for key, value in settings["wrpo"].items() if key not in ("alpha", "beta")}
    return {"train_prompts": settings["train_prompts"], "split": settings.get("split", {}),
            "sft": settings["sft"], "wrpo": wrpo}  # fmt: skip


def _seed_scores(scores: dict, names: set[str], splits: tuple[str, ...]) -> dict:
    """A seed's saved scores as arrays, for `splits` only, with its quadruple statistics."""
    per_split = {split: {name: np.array(scores[split][name]) for name in names} for split in splits}
    return {**per_split, "quadruples": scores["quadruples"]}


def quadruple_stats(quadruples) -> dict[str, float]:
    """How much y_ws adds to y_wt on a run's preference quadruples: the reason WRPO can beat DPO or not.

    Shares of rows where y_ws is exactly right, where y_wt is, and where y_wt is the same text as
    y_ws (there WRPO's chosen term is DPO's). WRPO can only add where y_ws is right and y_wt is not.
    """
    rows = quadruples.select(["prompt", "y_ws", "y_wt"]).to_pylist()
    ws_right = [is_correct(r["prompt"], r["y_ws"]) for r in rows]
    wt_right = [is_correct(r["prompt"], r["y_wt"]) for r in rows]
    return {
        "rows": len(rows),
        "y_ws_correct": float(np.mean(ws_right)),
        "y_wt_correct": float(np.mean(wt_right)),
        "y_wt_is_y_ws": float(np.mean([r["y_wt"].strip() == r["y_ws"].strip() for r in rows])),
        "only_y_ws_correct": float(
            np.mean([ws and not wt for ws, wt in zip(ws_right, wt_right, strict=True)])
        ),
    }


def mean_over_seeds(per_seed: dict[int, dict[str, dict[str, np.ndarray]]], split: str, name: str) -> float:
    return float(np.mean([per_seed[s][split][name].mean() for s in per_seed]))


def ablation_report(
    per_seed: dict[int, dict], betas: list[float], eval_prompts: int, *, report: str = "test"
) -> tuple[list[str], dict]:
    """The ablation table (beta per arm and the tuned alpha chosen on dev; `report` split shown) and its data.

    `report="dev"` is the selection view of `--dev-only`: the test split is neither read nor shown.
    """
    chosen = {}
    for arm in ablation_arms():
        dev = {beta: mean_over_seeds(per_seed, "dev", variant_name(arm, beta)) for beta in betas}
        chosen[arm] = max(betas, key=lambda beta: dev[beta])  # first of equals: the order of --betas
    dpo = variant_name(ablation_arms()[0], chosen[ablation_arms()[0]])
    tuned = max((arm for arm in ablation_arms() if arm[0] > 0 and arm[1] == "linear"),  # WRPO as published
                key=lambda arm: mean_over_seeds(per_seed, "dev", variant_name(arm, chosen[arm])))  # fmt: skip
    seeds = sorted(per_seed)
    shown = "test" if report == "test" else "dev (selection view, test not read)"
    lines = [
        f"Ablations: exact accuracy, {eval_prompts} dev and {eval_prompts} {report} prompts x {len(seeds)} seeds "
        f"(seeds {','.join(map(str, seeds))}); beta per arm from {betas} by mean dev accuracy; shown: {shown}; "
        f"95% CI: two-level bootstrap (seeds, then prompts); difference vs DPO paired on the same {report} prompts.",
        "",
        f"| arm | beta (dev) | dev acc | {report} acc | 95% CI | {report} - DPO | 95% CI | seeds > 0 |",
        "|---|---:|---:|---:|---|---:|---|---:|",
    ]
    summary: dict = {"betas": betas, "seeds": seeds, "report": report, "arms": {}}
    for name in ("Target", "Target-SFT"):
        point, low, high = two_level_bootstrap([per_seed[s][report][name] for s in seeds])
        dev_acc = mean_over_seeds(per_seed, "dev", name)
        lines.append(f"| {name} | - | {dev_acc:.1%} | {point:.1%} | [{low:.1%}, {high:.1%}] | | | |")
        summary["arms"][name] = {"dev": dev_acc, report: point, f"{report}_ci": [low, high]}
    for arm in ablation_arms():
        name = variant_name(arm, chosen[arm])
        point, low, high = two_level_bootstrap([per_seed[s][report][name] for s in seeds])
        dev_acc = mean_over_seeds(per_seed, "dev", name)
        label = arm_label(arm) + (" (tuned on dev)" if arm == tuned else "")
        row = {"alpha": arm[0], "schedule": arm[1], "beta": chosen[arm], "dev": dev_acc, report: point,
               f"{report}_ci": [low, high], "tuned": arm == tuned}  # fmt: skip
        diff_cells = " |  | "
        if name != dpo:
            diffs = [per_seed[s][report][name] - per_seed[s][report][dpo] for s in seeds]
            d_point, d_low, d_high = two_level_bootstrap(diffs)
            wins = int(sum(d.mean() > 0 for d in diffs))
            row |= {"minus_dpo": d_point, "minus_dpo_ci": [d_low, d_high], "seeds_positive": wins}
            diff_cells = f"{d_point:+.2%} | [{d_low:+.2%}, {d_high:+.2%}] | {wins}/{len(seeds)}"
        lines.append(
            f"| {label} | {chosen[arm]:g} | {dev_acc:.1%} | {point:.1%} | [{low:.1%}, {high:.1%}] | {diff_cells} |"
        )
        summary["arms"][arm_label(arm)] = row
    stats = [per_seed[s]["quadruples"] for s in seeds if "quadruples" in per_seed[s]]
    if stats:
        summary["quadruples"] = {key: float(np.mean([q[key] for q in stats])) for key in stats[0]}
        q = summary["quadruples"]
        lines.append(
            f"\nPreference quadruples (mean of {len(stats)} seeds, {q['rows']:.0f} rows): y_ws right "
            f"{q['y_ws_correct']:.1%}, y_wt right {q['y_wt_correct']:.1%}, y_wt the same text as y_ws "
            f"{q['y_wt_is_y_ws']:.1%}; only y_ws right (where WRPO can add to DPO) {q['only_y_ws_correct']:.1%}."
        )
    return lines, summary


def ablation_figure(summary: dict) -> bytes:
    """PNG: accuracy vs alpha (test with 95% CI, dev) and the paired test difference vs DPO with its CI.

    The absolute intervals are wide because worlds differ by seed; the paired difference (same
    seed, same prompts) is what tells the arms apart. Alpha 1 held constant is the triangle.
    """
    from matplotlib.figure import Figure

    arms = [row for row in summary["arms"].values() if "alpha" in row]
    sweep = [row for row in arms if row["schedule"] == "linear" or row["alpha"] == 0.0]
    constant = [row for row in arms if row["schedule"] == "constant" and row["alpha"] > 0]
    figure = Figure(figsize=(11.0, 4.0), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2)

    def bars(rows: list[dict], key: str) -> np.ndarray:
        return np.array([[r[key] - r[f"{key}_ci"][0], r[f"{key}_ci"][1] - r[key]] for r in rows]).T * 100

    alphas = [row["alpha"] for row in sweep]
    left.errorbar(alphas, [r["test"] * 100 for r in sweep], yerr=bars(sweep, "test"), marker="o", capsize=3,
                  label="test (95% CI), beta chosen on dev")  # fmt: skip
    left.plot(alphas, [r["dev"] * 100 for r in sweep], "s--", alpha=0.6, label="dev")
    for row in constant:
        left.errorbar([row["alpha"] + 0.03], [row["test"] * 100], yerr=bars([row], "test"), marker="^", capsize=3,
                      color="C3", linestyle="none", label="alpha 1 constant (no y_wt), test")  # fmt: skip
    left.axhline(summary["arms"]["Target-SFT"]["test"] * 100, color="gray", linewidth=0.8, linestyle=":",
                 label="Target-SFT, test")  # fmt: skip
    left.set_title(f"accuracy vs alpha ({len(summary['seeds'])} seeds)", fontsize=10)
    left.set_ylabel("exact accuracy, %")
    paired = [row for row in sweep if "minus_dpo" in row]
    right.errorbar([r["alpha"] for r in paired], [r["minus_dpo"] * 100 for r in paired], yerr=bars(paired, "minus_dpo"),
                   marker="o", capsize=3, label="WRPO - DPO, test (95% CI)")  # fmt: skip
    for row in constant:
        right.errorbar([row["alpha"] + 0.03], [row["minus_dpo"] * 100], yerr=bars([row], "minus_dpo"), marker="^",
                       capsize=3, color="C3", linestyle="none", label="alpha 1 constant - DPO")  # fmt: skip
    right.axhline(0.0, color="gray", linewidth=0.8)
    right.set_title("paired difference vs DPO (same seeds, same prompts)", fontsize=10)
    right.set_ylabel("points")
    for axes in (left, right):
        axes.set_xlabel("alpha (final value of the linear schedule; 0 = DPO)")
        axes.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def run_ablation(args: argparse.Namespace, order: list[int]) -> None:
    betas = [float(b) for b in args.betas.split(",")]
    started = time.perf_counter()
    per_seed = {}
    for seed in order:
        per_seed[seed] = ablation_seed(seed, args, betas)
        print(f"seed {seed}: done ({time.perf_counter() - started:.0f} s so far)", flush=True)
    if len(per_seed) < args.seeds:
        print(f"ran seeds {order}; the table needs all {args.seeds} (rerun without --seed-order)")
        return
    report = "dev" if args.dev_only else "test"
    lines, summary = ablation_report(per_seed, betas, args.eval_prompts, report=report)
    summary["setting"] = {"name": args.setting, "overrides": RUN_SETTINGS[args.setting]}
    out = Path(args.out)
    (out / f"ablation-{report}.json").write_text(json.dumps(summary, indent=2))
    if report == "test":
        (out / "ablation.png").write_bytes(ablation_figure(summary))
        lines.append(f"\nFigure: {out / 'ablation.png'}.")
    lines.insert(0, f"Run setting {args.setting!r}: {RUN_SETTINGS[args.setting] or 'the demo settings'}")
    lines.append(f"Total time: {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed-order", default=None, help="comma-separated seeds to run, e.g. 1,2,3,4,0")
    parser.add_argument("--eval-prompts", type=int, default=2000)
    parser.add_argument("--split", choices=["test", "dev"], default="test", help="tune on dev, report test")
    parser.add_argument(
        "--setting", choices=sorted(RUN_SETTINGS), default="sft-light", help="run setting (RUN_SETTINGS)"
    )
    parser.add_argument("--out", default=None, help="default: runs/fusion-quality-<setting>")
    parser.add_argument(
        "--dev-only", action="store_true", help="ablation: score and show dev only (selection)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smallest settings (smoke check, meaningless numbers)"
    )
    parser.add_argument("--ablation", action="store_true", help="the alpha sweep and y_ws / y_wt ablations")
    parser.add_argument("--betas", default="0.3,1,3", help="betas tried per ablation arm, chosen on dev")
    args = parser.parse_args()
    if args.dev_only and not args.ablation:
        parser.error("--dev-only is the ablation's selection view: use it with --ablation")
    args.out = args.out or f"runs/fusion-quality-{'quick' if args.quick else args.setting}"
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    per_seed = {}
    order = [int(s) for s in args.seed_order.split(",")] if args.seed_order else list(range(args.seeds))
    if args.ablation:
        run_ablation(args, order)
        return
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
