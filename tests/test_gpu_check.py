"""bench/gpu_check.py: its verdicts (score agreement, MFU peak, memory peak, failed stages) and a CPU smoke run.

The GPU check itself runs on a lent GPU machine only; `--cpu-smoke` runs the same code paths on the
CPU at a toy size, so the integration test keeps them from rotting.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
ROW_KEYS = ("sampling_hf", "sampling_vllm", "scoring_batched", "scoring_batch1", "wrpo_plain", "wrpo_zero3")


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check() -> types.ModuleType:
    return _load("gpu_check", SCRIPT)


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def test_scores_agree_within_bf16_tolerance_only(gpu_check):
    single = [0.5, -1.5, 2.0]
    diff, tolerance, ok = gpu_check.scores_agree([0.52, -1.5, 2.0], single, "bfloat16")
    assert diff == pytest.approx(0.02) and tolerance == pytest.approx(0.05 * 2.0) and ok
    # A padding/pooling bug moves scores by about their spread: fails.
    assert not gpu_check.scores_agree([0.5, -1.2, 2.0], single, "bfloat16")[2]
    assert not gpu_check.scores_agree([0.5005, -1.5, 2.0], single, "float32")[2]  # fp32: 2e-4 limit
    diff, _, ok = gpu_check.scores_agree([math.nan, -1.5, 2.0], single, "bfloat16")
    assert math.isnan(diff) and not ok


@pytest.mark.parametrize(
    ("name", "peak"),
    [("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
     ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
     ("Tesla T4", None)],
)  # fmt: skip
def test_peak_tflops_by_device_name(gpu_check, name, peak):
    assert gpu_check.peak_tflops(name, None)[0] == peak
    assert gpu_check.peak_tflops(name, 123.0) == (123.0, "--peak-tflops")


def test_device_memory_peak_is_the_highest_reading_above_the_start(monkeypatch):
    zero3 = _load("zero3_cpu", ROOT / "bench" / "zero3_cpu.py")
    readings = iter([3 * 2**30, 5 * 2**30, 9 * 2**30, 4 * 2**30])
    last = {"value": 0}

    def used(_handle):
        last["value"] = next(readings, last["value"])
        return types.SimpleNamespace(used=last["value"])

    stub = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
                                 nvmlDeviceGetMemoryInfo=used)  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", stub)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with zero3.DeviceMemoryPeak(interval_s=0.001) as memory:
        deadline = time.monotonic() + 10
        while last["value"] != 4 * 2**30 and time.monotonic() < deadline:
            time.sleep(0.001)  # the sampling thread reads until the stub's last value
    assert memory.gib == pytest.approx(6.0)  # 9 GiB peak - 3 GiB at entry
    assert memory.method.startswith("NVML")
    with zero3.DeviceMemoryPeak(baseline=2**30) as fixed:  # reads 4 GiB throughout
        pass
    assert fixed.gib == pytest.approx(3.0)


def _gpu_rows(gpu_check) -> dict:
    rows = {key: {"key": key, "status": "ok"} for key in ROW_KEYS}
    rows["sampling_vllm"] = {
        "key": "sampling_vllm",
        "status": "not importable",
        "details": "vllm not importable",
    }
    rows["wrpo_plain"].update(tokens_per_s=50_000.0, params=134_000_000, step_s=0.1)
    rows["wrpo_zero3"].update(tokens_per_s=25_000.0, params=134_000_000, step_s=0.2)
    return rows


def test_report_computes_mfu_and_passes_without_vllm(gpu_check):
    args = Namespace(cpu_smoke=False, peak_tflops=None)
    report = gpu_check.assemble(args, {"gpu": "NVIDIA H200"}, _gpu_rows(gpu_check), {}, 1.0)
    rows = {row["key"]: row for row in report["rows"]}
    assert report["passed"] and report["failures"] == []
    assert rows["wrpo_plain"]["mfu"] == pytest.approx(6 * 134e6 * 50_000 / 989e12)
    assert rows["wrpo_zero3"]["mfu"] == pytest.approx(6 * 134e6 * 25_000 / 989e12)
    table = gpu_check.render(report)
    assert "| WRPO plain Trainer, 1 process | ok | 50000 | - | 0.100 | 4.06% |" in table
    assert "989 TFLOP/s" in table and table.endswith("RESULT: PASS")


def test_report_fails_on_a_failed_stage_and_on_a_failed_check(gpu_check):
    args = Namespace(cpu_smoke=False, peak_tflops=None)
    rows = _gpu_rows(gpu_check)
    del rows["wrpo_plain"], rows["wrpo_zero3"]
    rows["scoring_batched"].update(status="FAIL", failure="batched scores differ")
    report = gpu_check.assemble(args, {"gpu": "NVIDIA H200"}, rows, {"wrpo": "timed out after 330 s"}, 1.0)
    by_key = {row["key"]: row for row in report["rows"]}
    assert not report["passed"]
    assert by_key["wrpo_zero3"]["status"] == "FAIL"
    assert report["failures"] == ["wrpo: timed out after 330 s", "batched scores differ"]


def test_no_budget_left_prints_the_table_and_fails():
    result = _run("--budget-s", "5", timeout=60)
    assert result.returncode == 1
    assert result.stdout.count("| not run |") == len(ROW_KEYS)
    assert "RESULT: FAIL" in result.stdout


def test_without_cuda_the_check_fails_loudly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _run(timeout=300)
    assert result.returncode == 1
    assert "torch.cuda.is_available() is False" in result.stdout + result.stderr
    assert result.stdout.count("not run: setup failed") == len(ROW_KEYS)


@pytest.mark.integration
def test_cpu_smoke_runs_every_path(tmp_path):
    out = tmp_path / "check.json"
    result = _run("--cpu-smoke", "--json", str(out), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    rows = {row["key"]: row for row in report["rows"]}
    assert tuple(rows) == ROW_KEYS
    for key in ("sampling_hf", "wrpo_plain", "wrpo_zero3"):
        assert rows[key]["status"] == "ok" and rows[key]["tokens_per_s"] > 0, rows[key]
    for key in ("sampling_hf", "scoring_batched", "scoring_batch1"):
        assert rows[key]["status"] == "ok" and rows[key]["samples_per_s"] > 0, rows[key]
    for key in ("wrpo_plain", "wrpo_zero3"):
        assert rows[key]["step_s"] > 0 and rows[key]["params"] > 0
    scoring = rows["scoring_batched"]
    assert scoring["scores_equal"] is True and 0 <= scoring["max_abs_diff"] <= scoring["tolerance"]
    if importlib.util.find_spec("vllm") is None:
        assert rows["sampling_vllm"]["status"] == "not importable"
        assert rows["sampling_vllm"]["details"].startswith("vllm not importable: ")
    assert "RESULT: PASS" in result.stdout and report["passed"]
    for title in ("HF sampling", "vLLM sampling", "reward scoring, batch 1", "WRPO DeepSpeed ZeRO-3"):
        assert f"| {title}" in result.stdout
