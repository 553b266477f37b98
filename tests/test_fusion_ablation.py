"""bench/fusion_quality.py --ablation: beta and the tuned alpha are chosen on dev only, test is reported.

Synthetic per-prompt correctness where dev and test disagree on purpose, so a choice that peeked at
test would pick other settings; differences vs DPO are paired by hand.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

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
            "prompt": ["reverse: abc", "reverse: abc", "upper: ab", "sort_digits: 3120"],
            "y_ws": ["cba", "cba", "AB", "0123"],
            "y_wt": ["cba", "cab", "AB ", "0132"],  # same; wrong; right (whitespace ignored); both differ
        }
    )
    stats = bench.quadruple_stats(rows)
    assert stats == {
        "rows": 4,
        "y_ws_correct": 1.0,
        "y_wt_correct": 0.5,
        "y_wt_is_y_ws": 0.5,
        "only_y_ws_correct": 0.5,
    }


def test_run_settings_reach_the_fusion_config(tmp_path):
    """A named run setting changes the run (prompt count, SFT share and epochs), not the world's models."""
    from wrpo_core.config import FusionConfig
    from wrpo_core.toy.paths import toy_config_data

    bench = load_bench()
    from wrpo_core.toy.paths import demo_settings

    light = bench.run_settings("sft-light")
    demo = bench.run_settings("sft-heavy")  # the demo's settings before 2026-11-29's change
    assert light == demo_settings(quick=False)  # the demo is the setting chosen on dev
    assert light["world"] == demo["world"]  # the same worlds: only the runs on them differ
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
