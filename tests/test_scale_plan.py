"""bench/scale_plan.py: its arithmetic checked against numbers worked out by hand, and a run on the paper config.

The hand numbers below come from the formulas in the script's docstring applied to a tiny made-up
setup (one 1B source, a 2B target, a 1B reward model, 300 prompts); nothing is computed by calling the
script's own helpers to produce the expected value.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "scale_plan.py"


@pytest.fixture(scope="module")
def sp() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("scale_plan", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_plan"] = module
    spec.loader.exec_module(module)
    return module


def tiny(sp, source_tp: int = 1):
    """A made-up setup with rates chosen so every stage can be worked out by hand."""
    job = sp.Training(epochs=1, max_length=2048, max_prompt_length=1800, global_batch=8, per_device_batch=1)
    setup = sp.Setup(
        sources=(sp.Model("org/src-1b", 1.0, 1.0, tp=source_tp, n=2, max_new_tokens=1000),),
        target=sp.Model("org/tgt", 2.0, 2.0, tp=1, n=3, max_new_tokens=1000),
        reward=sp.Model("org/rm", 1.0, 1.0),
        reward_max_length=4096,
        sft_fraction=1 / 3,
        sft=job,
        wrpo=job,
        gpus_per_node=8,
    )
    lengths = sp.Lengths(prompts=300, prompt_tokens=10, response_tokens=20, target_response_tokens=30)
    rates = sp.Rates(
        decode_rate={"org/src-1b": 100.0, "org/tgt": 50.0},
        peak_tflops=1000.0,
        train_mfu=0.5,
        forward_mfu=0.25,
        internode_efficiency=0.5,
    )
    return setup, lengths, rates


def by_name(stages) -> dict:
    return {s.name: s for s in stages}


def test_gpu_seconds_per_stage_match_hand_computation(sp):
    setup, lengths, rates = tiny(sp)
    got = by_name(sp.plan_stages(setup, lengths, rates))
    # sampling: 300 prompts x n 2 x 20 tokens = 12,000 tokens at 100 tok/s/GPU = 120 GPU-s
    assert got["sample org/src-1b"].tokens == 12_000
    assert got["sample org/src-1b"].gpu_s == pytest.approx(120.0)
    # scoring: 600 samples x (10 + 20) = 18,000 tokens; 2 * 1e9 * 18,000 FLOPs / (0.25 * 1e15 FLOP/s) = 0.144 s
    assert got["score org/src-1b"].gpu_s == pytest.approx(0.144)
    # SFT: 100 rows x 30 tokens = 3,000 tokens; 6 * 2e9 * 3,000 / (0.5 * 1e15) = 0.072 s
    assert got["SFT (Target-SFT)"].tokens == 3_000
    assert got["SFT (Target-SFT)"].gpu_s == pytest.approx(0.072)
    # Target-SFT sampling: 200 rows x n 3 x 30 tokens = 18,000 at 50 tok/s = 360 s
    assert got["sample Target-SFT"].gpu_s == pytest.approx(360.0)
    # Target-SFT scoring: 600 x (10 + 30) = 24,000 tokens; 2 * 1e9 * 24,000 / 2.5e14 = 0.192 s
    assert got["score Target-SFT"].gpu_s == pytest.approx(0.192)
    # reference: 200 rows x (30 + 40 + 40) = 22,000 tokens; 2 * 2e9 * 22,000 / 2.5e14 = 0.352 s
    assert got["reference log-probs"].tokens == 22_000
    assert got["reference log-probs"].gpu_s == pytest.approx(0.352)
    # WRPO: 6 * 2e9 * 22,000 / 5e14 = 0.528 s; 200 rows / batch 8 = 25 steps
    assert got["WRPO"].gpu_s == pytest.approx(0.528)
    assert "25 steps" in got["WRPO"].rate
    # GPU-hours as reported = GPU-seconds / 3600
    result = sp.summarize(setup, lengths, rates, [1])
    total = 120 + 0.144 + 0.072 + 360 + 0.192 + 0.352 + 0.528
    assert result["total_gpu_h"] == pytest.approx(total / 3600)


def test_packed_wrpo_counts_each_prompt_once(sp):
    """wrpo.pack_prompt (the default): the reference pass and WRPO encode the prompt once per row."""
    setup, lengths, rates = tiny(sp)
    setup = dataclasses.replace(setup, wrpo=dataclasses.replace(setup.wrpo, packing=True))
    got = by_name(sp.plan_stages(setup, lengths, rates))
    # 200 rows x (10 + 20 + 30 + 30) = 18,000 tokens (unpacked: 22,000, the prompt three times)
    assert got["reference log-probs"].tokens == 18_000
    assert got["WRPO"].tokens == 18_000
    assert sp.setup_from_config(
        str(ROOT / "configs" / "paper.yaml"), rates
    ).wrpo.packing  # the config's default


def test_bytes_of_a_sample_stage_by_hand(sp):
    setup, lengths, rates = tiny(sp)
    got = by_name(sp.plan_stages(setup, lengths, rates))
    # 600 rows x (64-char id + 10-char model name + 24 fixed + 20 tokens x 4 chars), no compression
    assert got["sample org/src-1b"].bytes == pytest.approx(600 * (64 + 10 + 24 + 80))
    # SFT writes the bf16 model only (1 step < save_steps 500): 2 bytes x 2e9 parameters
    assert got["SFT (Target-SFT)"].bytes == pytest.approx(4e9)


def test_truncation_and_max_new_tokens(sp):
    # prompt 10 kept to max_prompt 8, response cut to max_length - 8 = 17
    assert sp.sequence_tokens(10, 20, 25, 8) == 25
    assert sp.sequence_tokens(10, 5, 25, 8) == 13
    setup, lengths, rates = tiny(sp)
    capped = dataclasses.replace(setup, sources=(dataclasses.replace(setup.sources[0], max_new_tokens=15),))
    assert by_name(sp.plan_stages(capped, lengths, rates))["sample org/src-1b"].tokens == 300 * 2 * 15


def test_doubling_prompts_doubles_sampling_scoring_and_data_bytes(sp):
    setup, lengths, rates = tiny(sp)
    one = by_name(sp.plan_stages(setup, lengths, rates))
    two = by_name(sp.plan_stages(setup, dataclasses.replace(lengths, prompts=600), rates))
    for name in ("sample org/src-1b", "score org/src-1b", "sample Target-SFT", "score Target-SFT"):
        assert two[name].gpu_s == pytest.approx(2 * one[name].gpu_s), name
        assert two[name].bytes == pytest.approx(2 * one[name].bytes), name
    for name in ("ingest prompts", "select y_ws", "select quadruples", "reference log-probs"):
        assert two[name].bytes == pytest.approx(2 * one[name].bytes), name


def test_doubling_sources_doubles_source_sampling_not_training(sp):
    setup, lengths, rates = tiny(sp)
    one = sp.plan_stages(setup, lengths, rates)
    two = sp.plan_stages(sp.with_sources(setup, 2), lengths, rates)

    def group(stages, name):
        return sum(s.gpu_s for s in stages if s.group == name)

    assert group(two, "sample sources") == pytest.approx(2 * group(one, "sample sources"))
    assert group(two, "score sources") == pytest.approx(2 * group(one, "score sources"))
    for unchanged in ("sft", "wrpo", "reference", "sample target"):
        assert group(two, unchanged) == pytest.approx(group(one, unchanged)), unchanged


def test_wall_time_never_grows_with_more_gpus(sp):
    setup, lengths, rates = tiny(sp, source_tp=2)
    stages = sp.plan_stages(setup, lengths, rates)
    assert sp.wall_time(stages, 1, setup, rates)["total_h"] is None  # a TP-2 replica needs 2 GPUs
    assert "needs >= 2 GPUs" in sp.wall_time(stages, 1, setup, rates)["note"]
    walls = [sp.wall_time(stages, n, setup, rates)["total_h"] for n in (2, 3, 4, 8, 16, 32, 64, 128)]
    assert all(b <= a for a, b in itertools.pairwise(walls)), walls
    assert walls[0] > walls[-1]


def test_wall_time_by_hand(sp):
    setup, lengths, rates = tiny(sp)
    big = dataclasses.replace(setup.sources[0], name="org/big", tp=4)
    two = dataclasses.replace(setup, sources=(setup.sources[0], big))
    rates = dataclasses.replace(rates, decode_rate={**rates.decode_rate, "org/big": 10.0})
    stages = sp.plan_stages(two, lengths, rates)
    # sampling work: 120 s (TP 1) + 12,000 / 10 = 1,200 s (TP 4). On 6 GPUs: packed 1,320 / 6 = 220 s, but
    # the TP-4 model fits one replica (4 GPUs): 1,200 / 4 = 300 s, which binds.
    assert sp.group_wall_s(
        [s for s in stages if s.group == "sample sources"], 6, two, rates
    ) == pytest.approx(300)
    # reference pass: one process (reference_gpus 1) whatever N is
    ref = [s for s in stages if s.group == "reference"]
    assert sp.group_wall_s(ref, 64, two, rates) == pytest.approx(0.352)
    # WRPO: global 8 / per-device 1 = at most 8 processes; on 64 GPUs still 8 (one node): 0.528 / 8
    wrpo = [s for s in stages if s.group == "wrpo"]
    assert sp.group_wall_s(wrpo, 64, two, rates) == pytest.approx(0.528 / 8)
    # 6 GPUs: the most processes that divide 8 are 4
    assert sp.group_wall_s(wrpo, 6, two, rates) == pytest.approx(0.528 / 4)


def test_training_across_nodes_uses_internode_efficiency(sp):
    setup, lengths, rates = tiny(sp)
    job = dataclasses.replace(setup.wrpo, global_batch=64, per_device_batch=1)
    setup = dataclasses.replace(setup, wrpo=job, gpus_per_node=8)
    wrpo = [s for s in sp.plan_stages(setup, lengths, rates) if s.group == "wrpo"]
    work = sum(s.gpu_s for s in wrpo)
    # 32 GPUs over 4 nodes at efficiency 0.5: work / 16; still faster than one node (work / 8)
    assert sp.group_wall_s(wrpo, 32, setup, rates) == pytest.approx(work / 16)
    slow = dataclasses.replace(rates, internode_efficiency=0.1)  # 32 x 0.1 = 3.2 < 8: stays on one node
    assert sp.group_wall_s(wrpo, 32, setup, slow) == pytest.approx(work / 8)


def test_decode_rate_interpolation_hits_the_anchors(sp):
    rates = sp.Rates()
    small = sp.Model("x/s", rates.decode_small_params_b, rates.decode_small_params_b)
    large = sp.Model("x/l", rates.decode_large_params_b, rates.decode_large_params_b)
    assert sp.decode_rate(small, rates) == pytest.approx(8088.35)
    assert sp.decode_rate(large, rates) == pytest.approx(3542.88 / 4)
    moe = sp.Model("x/moe", 236.0, 21.0)  # decodes like a dense sqrt(21 * 236) = 70.4B model
    dense = sp.Model("x/d", (21.0 * 236.0) ** 0.5, (21.0 * 236.0) ** 0.5)
    assert sp.decode_rate(moe, rates) == pytest.approx(sp.decode_rate(dense, rates))


def test_every_rate_names_its_source(sp):
    for f in dataclasses.fields(sp.Rates):
        if f.name in ("decode_rate", "params"):
            continue
        text = sp.RATE_SOURCES[f.name]
        assert any(word in text for word in ("http", "ASSUMPTION", "this repo", "bf16")), f.name


def test_model_sizes_from_flag_table_or_name(sp):
    rates = sp.Rates(params={"org/x": "30/3"})
    assert sp.model_size("org/x", rates)[:2] == (30.0, 3.0)
    assert sp.model_size("org/thing-7B-chat", rates)[:2] == (7.0, 7.0)
    with pytest.raises(SystemExit, match="org/mystery"):
        sp.model_size("org/mystery", rates)


def test_paper_config_prints_three_settings_and_writes_json(sp, tmp_path, capsys):
    rates_file = tmp_path / "rates.json"
    rates_file.write_text(json.dumps({"decode_rate": {"google/gemma-2-9b-it": 1000.0}}), encoding="utf-8")
    out_json = tmp_path / "plan.json"
    data = sp.main(["--json", str(out_json), "--rates", str(rates_file), "--train-mfu", "0.76"])
    printed = capsys.readouterr().out
    for scale in ("1x", "2x", "10x"):
        assert f"## Setting {scale}" in printed
    assert "| train_mfu | 0.76 |" in printed
    written = json.loads(out_json.read_text(encoding="utf-8"))
    assert [s["scale"] for s in written["settings"]] == [1.0, 2.0, 10.0]
    assert len(data["models"]) == 12  # ten sources, the target, the reward model
    gemma = next(m for m in data["models"] if m["model"] == "google/gemma-2-9b-it")
    assert gemma["decode_tok_s_per_gpu"] == 1000.0
    one, two = data["settings"][0], data["settings"][1]
    sample = [s for s in one["stages"] if s["group"] == "sample sources"]
    sample2 = [s for s in two["stages"] if s["group"] == "sample sources"]
    assert sum(s["gpu_h"] for s in sample2) == pytest.approx(2 * sum(s["gpu_h"] for s in sample))
    # the TP-8 sources cannot run on fewer than 8 GPUs
    small = sp.main(["--gpus", "4,8", "--scales", "1"])
    assert small["settings"][0]["wall"][0]["total_h"] is None
    assert small["settings"][0]["wall"][1]["total_h"] > 0
    # halving the training MFU doubles SFT GPU-hours (0.76 above vs the default 0.38 here)
    sft_fast = next(s["gpu_h"] for s in one["stages"] if s["group"] == "sft")
    sft_slow = next(s["gpu_h"] for s in small["settings"][0]["stages"] if s["group"] == "sft")
    assert sft_slow == pytest.approx(2 * sft_fast)


def test_unknown_rates_key_is_refused(sp, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_mfuu": 0.5}), encoding="utf-8")
    with pytest.raises(SystemExit, match="train_mfuu"):
        sp.main(["--rates", str(bad), "--scales", "1"])
