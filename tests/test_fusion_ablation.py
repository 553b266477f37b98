"""bench/fusion_quality.py --ablation: beta and the tuned alpha are chosen on dev only, test is reported.

Synthetic per-prompt correctness where dev and test disagree on purpose, so a choice that peeked at
test would pick other settings; differences vs DPO are paired by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "fusion_quality.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("fusion_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fusion_quality"] = module
    spec.loader.exec_module(module)
    return module


def correct(rate: float, n: int = 100) -> np.ndarray:
    """n prompts, the first round(rate * n) right."""
    return (np.arange(n) < round(rate * n)).astype(float)


def test_beta_and_alpha_are_chosen_on_dev_and_test_is_what_is_reported():
    bench = load_bench()
    betas = [0.3, 1.0]
    dev, test = {"Target": 0.2, "Target-SFT": 0.3}, {"Target": 0.2, "Target-SFT": 0.3}
    for arm in bench.ablation_arms():
        alpha, schedule = arm
        for beta in betas:
            name = bench.variant_name(arm, beta)
            # dev prefers beta 1 everywhere and alpha 0.5 among the linear arms; test prefers the opposite
            dev[name] = (
                0.40
                + (0.02 if beta == 1.0 else 0.0)
                + (0.05 if (alpha, schedule) == (0.5, "linear") else 0.0)
            )
            test[name] = (
                0.40
                + (0.10 if beta == 0.3 else 0.0)
                + (0.08 if (alpha, schedule) == (0.7, "linear") else 0.0)
            )
    per_seed = {s: {"dev": {k: correct(v) for k, v in dev.items()}, "test": {k: correct(v) for k, v in test.items()}}
                for s in (0, 1)}  # fmt: skip
    lines, summary = bench.ablation_report(per_seed, betas, 100)
    arms = summary["arms"]
    assert all(row["beta"] == 1.0 for name, row in arms.items() if "alpha" in row)  # dev's choice, not test's
    tuned = [name for name, row in arms.items() if row.get("tuned")]
    assert tuned == ["WRPO alpha 0.5"]  # dev's best linear arm, although alpha 0.7 is best on test
    assert arms["WRPO alpha 0.5"]["test"] == 0.40  # test reported at the dev-chosen beta
    assert (
        abs(arms["WRPO alpha 0.7"]["minus_dpo"] - 0.08) < 1e-12
    )  # paired with DPO (same beta, same prompts)
    assert arms["WRPO alpha 0.7"]["seeds_positive"] == 2
    assert "minus_dpo" not in arms["DPO (alpha 0)"]
    assert any(line.startswith("| WRPO alpha 0.5 (tuned on dev) | 1 |") for line in lines)
    assert all(line.count("|") == 9 for line in lines if line.startswith("| "))  # every row has its 8 cells
    assert bench.ablation_figure(summary).startswith(b"\x89PNG")


def test_dev_only_report_never_reads_test():
    """The selection view (`--dev-only`) works from dev scores alone: no test split is there to read."""
    bench = load_bench()
    betas = [1.0]
    dev = {"Target": correct(0.2), "Target-SFT": correct(0.3)}
    for arm in bench.ablation_arms():
        dev[bench.variant_name(arm, 1.0)] = correct(0.5 if arm == (1.0, "linear") else 0.4)
    lines, summary = bench.ablation_report({0: {"dev": dev}}, betas, 100, report="dev")
    assert summary["report"] == "dev" and "test" not in summary["arms"]["WRPO alpha 1"]
    assert abs(summary["arms"]["WRPO alpha 1"]["minus_dpo"] - 0.10) < 1e-12  # 0.5 - 0.4 on the same prompts
    assert "test not read" in lines[0]


def test_quadruple_stats_by_hand():
    """Shares computed on four hand-made rows: the statistic that says where WRPO can add to DPO."""
    import pyarrow as pa

    bench = load_bench()
    rows = pa.table(
        {
            "prompt": ["reverse: abc", "reverse: abc", "upper: ab", "sort_digits: 3120", "upper: xy"],
            "y_ws": ["cba", "cba", "AB", "0123", "XZ"],
            # same, right; wrong; right (whitespace ignored); wrong; the same WRONG text as y_ws
            "y_wt": ["cba", "cab", "AB ", "0132", "XZ"],
        }
    )
    stats = bench.quadruple_stats(rows)
    assert stats == {
        "rows": 5,
        "y_ws_correct": 0.8,
        "y_wt_correct": 0.4,
        "y_wt_is_y_ws": 0.6,  # rows 1, 3 and 5: the same text whether right or not
        "only_y_ws_correct": 0.4,  # rows 2 and 4
    }


def test_run_settings_reach_the_fusion_config(tmp_path):
    """A named run setting changes the run (prompt count, SFT share and epochs), not the world's models."""
    from wrpo_core.config import FusionConfig
    from wrpo_core.toy.paths import toy_config_data

    bench = load_bench()
    from wrpo_core.toy.paths import demo_settings

    light = bench.run_settings("sft-light")
    demo = bench.run_settings("sft-heavy")  # the demo's settings before 2026-11-29's change
    assert light["train_prompts"] == 3600 and demo["train_prompts"] == 1800
    assert light["wrpo"]["num_train_epochs"] == 2 and demo["wrpo"]["num_train_epochs"] == 3
    data = toy_config_data(
        sources={"src": "model"}, target="target", prompts=str(tmp_path / "p.jsonl"), held_out=None,
        storage_url=str(tmp_path), settings=light, run_name="toy",
    )  # fmt: skip
    cfg = FusionConfig.model_validate(data)
    assert abs(cfg.split.sft_fraction - 1 / 6) < 1e-12
    assert cfg.sft.num_train_epochs == 1 and cfg.wrpo.num_train_epochs == 2
    demo_data = toy_config_data(
        sources={"src": "model"}, target="target", prompts=str(tmp_path / "p.jsonl"), held_out=None,
        storage_url=str(tmp_path), settings=demo_settings(quick=True), run_name="toy",
    )  # fmt: skip
    default = FusionConfig.model_validate(demo_data)
    assert abs(default.split.sft_fraction - 1 / 3) < 1e-12  # the paper's share when a setting names none


def fake_ablation_run(bench, monkeypatch, tmp_path, held: dict):
    """ablation_seed with the world, pipeline, training and evaluation replaced by stand-ins; returns the
    (model, split size) pairs evaluated."""
    import argparse
    import types

    import pyarrow as pa

    evaluated = []
    layout = types.SimpleNamespace(
        quadruples="q",
        model=lambda name: f"models/{name}",
        read_dataset=lambda key, schema: pa.table({"prompt": ["upper: ab"], "y_ws": ["AB"], "y_wt": ["Ab"]}),
    )
    monkeypatch.setattr(bench, "seed_world", lambda seed, args: ({"max_new_tokens": 4}, None, [], held))
    from wrpo_core.config import FusionConfig
    from wrpo_core.toy.paths import toy_config_data

    real = FusionConfig.model_validate(toy_config_data(
        sources={"src": "model"}, target="target", prompts=str(tmp_path / "p.jsonl"), held_out=None,
        storage_url=str(tmp_path), settings=bench.run_settings("sft-light"), run_name="toy"))  # fmt: skip
    monkeypatch.setattr(bench, "fusion_config", lambda *a, **k: types.SimpleNamespace(wrpo=real.wrpo))
    monkeypatch.setattr(bench, "layout_for", lambda cfg: layout)
    monkeypatch.setattr(bench, "run_toy_fusion", lambda *a, **k: (
        {"Target": "t", "Target-SFT": "sft", "Target-SFT-WRPO": "w", "Target-SFT-DPO": "d"}, {}))  # fmt: skip
    monkeypatch.setattr(bench, "wrpo_variant_stage", lambda *a: None)
    monkeypatch.setattr(bench, "run_pipeline_stage", lambda *a, **k: ("ran", {}))

    def evaluate(path, prompts, skills, scorer, max_new_tokens):
        evaluated.append((path, len(prompts)))
        return {}, [1.0] * len(prompts)

    monkeypatch.setattr(bench, "evaluate_model", evaluate)
    (tmp_path / "seed-0").mkdir(exist_ok=True)

    def run(dev_only: bool, setting: str = "sft-light"):
        args = argparse.Namespace(
            out=str(tmp_path), eval_prompts=3, dev_only=dev_only, quick=False, setting=setting
        )
        return bench.ablation_seed(0, args, [1.0])

    return evaluated, run


def test_dev_only_ablation_never_scores_test(tmp_path, monkeypatch):
    """`--dev-only` trains and scores every arm on dev; the test split is never evaluated (here it is not
    even there: held-out rows for dev only), and the saved scores record the run setting."""
    bench = load_bench()
    dev_rows = [{"prompt": "upper: ab", "skill": "upper"}] * 3
    evaluated, run = fake_ablation_run(bench, monkeypatch, tmp_path, {"dev": dev_rows})
    scores = run(dev_only=True)
    assert (
        set(scores) == {"dev", "quadruples"} and len(scores["dev"]) == 2 + 7
    )  # Target, SFT, 7 arms at beta 1
    assert evaluated and all(n == 3 for _, n in evaluated) and len(evaluated) == 9
    saved = json.loads((tmp_path / "seed-0" / "ablation-3-correct.json").read_text())
    assert saved["test"] == {} and saved["setting"] == bench.setting_identity(
        argparse_namespace(setting="sft-light")
    )
    with pytest.raises(SystemExit, match="holds scores of run setting"):  # another setting, same folder
        run(dev_only=True, setting="sft-heavy")


def argparse_namespace(**fields) -> argparse.Namespace:
    return argparse.Namespace(quick=False, **fields)
