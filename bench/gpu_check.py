"""One GPU check of every GPU path: HF and vLLM sampling, batched reward scoring, plain vs ZeRO-3 WRPO.

Runs on one CUDA GPU in under 8 minutes (`bench/gpu_check.sh` wraps it: wheels, timeout) and
prints ONE Markdown table plus the environment line, ready for bench/RESULTS.md:

    HF sampling         completion tokens/s and samples/s of `load_sampler` (the pipeline's call), bf16
    vLLM sampling       the same through vLLM's engine; "vllm not importable: <error>" where it is not
    reward scoring      `SequenceClassifierScorer` at batch B and batch 1, samples/s; FAILS if the
                        batched scores differ from batch-1's by more than the dtype's tolerance
    WRPO plain / ZeRO-3 step time, tokens/s, MFU and peak GPU memory (bench/zero3_cpu.py --gpu)

Models are random-weight Llamas built here (hidden 1024, 8 layers; Llama-3's chat template from
wrpo_core/toy/families.py for sampling and scoring, the toy tokenizer for WRPO), so nothing is
downloaded. Each stage runs in its own process (`--stage`) with a time limit inside the whole
run's budget; a failed stage's rows say why and the exit status is 1. `--cpu-smoke` runs the same
code paths on the CPU at a toy size (tests/test_gpu_check.py); without it, no CUDA is a failure.
Run `bench/gpu_check.sh` on the GPU machine; `bench/gpu_check.py --cpu-smoke --json F` here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets; first match of the
# device name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
    ("H100", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0),
)  # fmt: skip
# Batched vs batch-1 scores: bf16 keeps 8 significant bits (scores near 1 lie 2^-8..2^-7 apart) and
# padding changes the kernels' summation order; a padding or pooling bug moves a score by about the
# scores' spread (0.3-1 for these models). fp32 must agree far closer.
SCORE_RTOL = {"bfloat16": 0.05, "float32": 1e-4}
RUN_ORDER = ("setup", "sampling_hf", "scoring", "wrpo", "sampling_vllm")
STAGE_ROWS = {  # the rows each stage gives, in table order
    "sampling_hf": ("sampling_hf",), "sampling_vllm": ("sampling_vllm",),
    "scoring": ("scoring_batched", "scoring_batch1"), "wrpo": ("wrpo_plain", "wrpo_zero3"),
}  # fmt: skip
TABLE_ORDER = tuple(key for keys in STAGE_ROWS.values() for key in keys)
# Per-stage wall-clock limits (s); each stage also gets no more than what is left of --budget-s.
LIMITS = {
    "gpu": {"setup": 120, "sampling_hf": 120, "scoring": 120, "wrpo": 330, "sampling_vllm": 240},
    "cpu": {"setup": 120, "sampling_hf": 120, "scoring": 120, "wrpo": 400, "sampling_vllm": 120},
}


@dataclass(frozen=True)
class Size:
    """The models and workloads of one mode (GPU, or the CPU smoke run)."""

    hidden: int
    layers: int
    prompts: int
    n: int
    max_new_tokens: int
    sample_batch: int
    pairs: int
    score_batch: int
    max_response_chars: int
    wrpo_argv: tuple[str, ...]


GPU_SIZE = Size(hidden=1024, layers=8, prompts=64, n=4, max_new_tokens=128, sample_batch=64, pairs=512,
                score_batch=64, max_response_chars=300, wrpo_argv=("--gpu",))  # fmt: skip
CPU_SIZE = Size(hidden=64, layers=2, prompts=8, n=2, max_new_tokens=16, sample_batch=8, pairs=32,
                score_batch=8, max_response_chars=80,
                wrpo_argv=("--quick", "--steps", "3", "--batch-size", "4", "--prompt-chars", "24",
                           "--response-chars", "32", "--max-length", "128"))  # fmt: skip
DTYPE = "bfloat16"


class CheckError(RuntimeError):
    """A stage that could not run (no CUDA, a failed load)."""


class Interrupted(Exception):
    """The whole check was told to stop (SIGTERM from `timeout`, Ctrl-C)."""


def _memory(cpu_smoke: bool, baseline: int | None = None):
    """A DeviceMemoryPeak on the GPU; a no-op context on the CPU (its `gib` is None)."""
    from zero3_cpu import DeviceMemoryPeak

    if cpu_smoke:
        return contextlib.nullcontext(argparse.Namespace(gib=None, method="-", baseline=None))
    return DeviceMemoryPeak(baseline=baseline)


def _policy_spec(work: Path, size: Size, backend: str):
    from wrpo_core.config import ModelSpec, SamplingConfig

    sampling = SamplingConfig(n=size.n, max_new_tokens=size.max_new_tokens, temperature=0.8, top_p=0.95)
    return ModelSpec(path=str(work / "policy"), name="toy-llama3", backend=backend, dtype=DTYPE,
                     sampling=sampling)  # fmt: skip


def _prompts(size: Size) -> tuple[list[str], list[str]]:
    from wrpo_core.prompts import prompt_id_of
    from wrpo_core.toy.skills import SKILLS, make_prompts

    prompts = [row["prompt"] for row in make_prompts(list(SKILLS), size.prompts, seed=0)]
    return [prompt_id_of(p) for p in prompts], prompts


def stage_setup(work: Path, size: Size, cpu_smoke: bool) -> dict[str, Any]:
    """The environment (fails without CUDA unless --cpu-smoke) and the two models, saved in bf16."""
    import importlib.metadata
    import platform

    import torch
    import transformers
    from transformers import LlamaForSequenceClassification

    from wrpo_core.toy.families import FAMILIES, build_family_tokenizer
    from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model, tiny_llama_config

    def version(name: str) -> str:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
        return "not installed"

    if not cpu_smoke and not torch.cuda.is_available():
        raise CheckError(
            f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
            "this check needs a CUDA GPU; --cpu-smoke runs its code paths on the CPU"
        )
    gpu = "CPU (--cpu-smoke)" if cpu_smoke else torch.cuda.get_device_name()
    env = {
        "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "deepspeed": version("deepspeed"), "vllm": version("vllm"), "packages": {name: version(name) for name in (
            "accelerate", "datasets", "fsspec", "huggingface-hub", "pyarrow", "pydantic", "tokenizers")},
    }  # fmt: skip
    family = FAMILIES["llama3"]
    tokenizer = build_family_tokenizer(family)
    shape = {"hidden_size": size.hidden, "num_layers": size.layers, "num_heads": max(1, size.hidden // 64)}
    policy = build_tiny_llama(tokenizer, seed=0, max_position_embeddings=1024, **shape)
    policy.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(list(family.generation_eos))
    save_tiny_model(policy.to(torch.bfloat16), tokenizer, work / "policy")
    config = tiny_llama_config(tokenizer, max_position_embeddings=1024, **shape)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        reward = LlamaForSequenceClassification(config)
    reward.to(torch.bfloat16).save_pretrained(work / "reward")
    tokenizer.save_pretrained(work / "reward")
    env["policy_params"] = sum(p.numel() for p in policy.parameters())
    return {"env": env, "rows": []}


def stage_sampling(work: Path, size: Size, cpu_smoke: bool, backend: str = "hf") -> dict[str, Any]:
    """Sampling through `load_sampler` as the pipeline calls it, warmed up on 4 prompts, then timed.

    vLLM: its engine reserves gpu_memory_utilization 0.9 of the device; where vLLM does not import,
    the row says why (no number).
    """
    key = f"sampling_{backend}"
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            row = {"key": key, "status": "not importable", "details": f"vllm not importable: {error!r}"}
            return {"rows": [row]}
    from wrpo_core.sampling import load_sampler

    ids, prompts = _prompts(size)
    spec = _policy_spec(work, size, backend)
    with _memory(cpu_smoke) as memory:
        sampler = load_sampler(
            spec, device="cpu" if cpu_smoke else "cuda", batch_size=size.sample_batch, progress=False
        )
        sampler.sample(ids[:4], prompts[:4])
        _, report = sampler.sample(ids, prompts)
    batching = (
        f"{size.sample_batch} prompts per generate" if backend == "hf" else "the engine holds 0.9 of the GPU"
    )
    return {"rows": [{
        "key": key, "status": "ok", "tokens_per_s": report.completion_tokens / report.seconds,
        "samples_per_s": report.samples_per_second, "peak_mem_gib": memory.gib, "mem_method": memory.method,
        "details": f"{report.samples} samples ({size.prompts} prompts x n={size.n}), {report.completion_tokens} "
        f"completion tokens in {report.seconds:.2f} s; max_new_tokens {size.max_new_tokens}, "
        f"{report.finished_by_length} cut by length; {batching}",
    }]}  # fmt: skip


def scores_agree(batched: list[float], single: list[float], dtype: str) -> tuple[float, float, bool]:
    """(max |batched - single|, tolerance, within it): tolerance = rtol(dtype) * max(1, max |single|).

    A non-finite score fails (NaN, NaN, False).
    """
    if not all(math.isfinite(v) for v in (*batched, *single)):
        return math.nan, math.nan, False
    diff = max(abs(a - b) for a, b in zip(batched, single, strict=True))
    tolerance = SCORE_RTOL[dtype] * max(1.0, *(abs(s) for s in single))
    return diff, tolerance, diff <= tolerance


def stage_scoring(work: Path, size: Size, cpu_smoke: bool) -> dict[str, Any]:
    """`SequenceClassifierScorer` at batch B and at batch 1 on the same pairs: speed and agreement."""
    import random

    from wrpo_core.config import RewardModelSpec
    from wrpo_core.rewards import SequenceClassifierScorer
    from wrpo_core.toy.skills import SKILLS, make_prompts

    rng = random.Random(0)
    prompts = [row["prompt"] for row in make_prompts(list(SKILLS), size.pairs, seed=1)]
    letters = "abcdefghijklmnopqrstuvwxyz "
    responses = ["".join(rng.choices(letters, k=rng.randint(1, size.max_response_chars))) for _ in prompts]
    measured: dict[int, dict[str, Any]] = {}
    baseline = None  # both runs against the level before the first one (the CUDA context stays)
    for batch in (size.score_batch, 1):
        with _memory(cpu_smoke, baseline) as memory:
            spec = RewardModelSpec(path=str(work / "reward"), batch_size=batch, dtype=DTYPE)
            scorer = SequenceClassifierScorer(spec, device="cpu" if cpu_smoke else "cuda", progress=False)
            scorer.score(prompts[:batch], responses[:batch])  # warm-up
            start = time.perf_counter()
            scores = scorer.score(prompts, responses)  # floats: the device has finished
            seconds = time.perf_counter() - start
            del scorer
            if not cpu_smoke:
                import torch

                torch.cuda.empty_cache()
        measured[batch] = {"scores": scores, "seconds": seconds, "gib": memory.gib, "method": memory.method}
        baseline = memory.baseline
    diff, tolerance, agree = scores_agree(measured[size.score_batch]["scores"], measured[1]["scores"], DTYPE)
    rows = [{"key": key, "status": "ok", "samples_per_s": size.pairs / m["seconds"], "peak_mem_gib": m["gib"],
             "mem_method": m["method"], "details": f"{size.pairs} pairs, batch {batch}, {DTYPE}, {m['seconds']:.2f} s"}
            for (batch, m), key in zip(measured.items(), ("scoring_batched", "scoring_batch1"), strict=True)]  # fmt: skip
    rows[0].update(max_abs_diff=diff, tolerance=tolerance, scores_equal=agree)
    rows[0]["details"] += (
        f"; max |score - batch-1 score| {diff:.2e} {'<=' if agree else '>'} tolerance {tolerance:.2e} "
        f"({SCORE_RTOL[DTYPE]:g} x max(1, max |score|), {DTYPE})"
    )
    if not agree:
        rows[0]["status"] = "FAIL"
        rows[0]["failure"] = f"batched scores differ from batch-1 scores by {diff:.3e} > {tolerance:.3e}"
    return {"rows": rows}


def stage_wrpo(work: Path, size: Size, cpu_smoke: bool) -> dict[str, Any]:
    """Plain Trainer vs DeepSpeed ZeRO-3 WRPO on 1 process, each via the local launcher (zero3_cpu)."""
    import zero3_cpu

    args = zero3_cpu.parse_args(list(size.wrpo_argv))
    out = work / "wrpo"
    out.mkdir()
    report = zero3_cpu.compare(args, out, zero3_cpu.GPU_RUNS)
    rows = [{
        "key": key, "status": "ok", "step_s": result["step_s"], "tokens_per_s": result["tokens_per_s"],
        "params": report["params"], "peak_mem_gib": result.get("peak_mem_gib"),
        "mem_method": result.get("mem_method", "-"),
        "details": f"{args.steps} steps of {args.batch_size}, {report['tokens_per_step']} tokens/step, "
        f"hidden {args.hidden_size}, {args.layers} layers, {report['params'] / 1e6:.1f}M params, "
        f"{'bf16' if args.gpu else 'fp32'}; train_runtime {result['train_s']:.1f} s",
    } for result, key in zip(report["results"], ("wrpo_plain", "wrpo_zero3"), strict=True)]  # fmt: skip
    diff, tolerance = report["max_loss_abs_diff"], report["loss_tolerance"]
    rows[1]["details"] += f"; max |loss - plain loss| {diff:.2e} (tolerance {tolerance:g})"
    if not report["losses_agree"]:
        rows[1]["status"] = "FAIL"
        rows[1]["failure"] = f"ZeRO-3 losses differ from the plain run's by {diff:.3e} > {tolerance:g}"
    return {"rows": rows}


STAGES = {
    "setup": stage_setup, "sampling_hf": stage_sampling, "sampling_vllm": partial(stage_sampling, backend="vllm"),
    "scoring": stage_scoring, "wrpo": stage_wrpo,
}  # fmt: skip


def run_stage_here(name: str, work: Path, result: Path, cpu_smoke: bool) -> int:
    """The `--stage` process: runs one stage and writes its JSON (rows, or the error) to `result`."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: a launched job is stopped
    try:
        payload = STAGES[name](work, CPU_SIZE if cpu_smoke else GPU_SIZE, cpu_smoke)
        code = 0
    except BaseException as error:
        traceback.print_exc()
        payload = {"error": f"{type(error).__name__}: {error}"}
        code = 1
    result.write_text(json.dumps(payload))
    return code


def launch_stage(name: str, work: Path, cpu_smoke: bool, limit_s: float) -> dict[str, Any]:
    """Runs one stage in its own process group, log in work/NAME.log; its JSON, or {'error': ...}."""
    result, log = work / f"{name}.json", work / f"{name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--work", str(work),
               "--result", str(result)] + (["--cpu-smoke"] if cpu_smoke else [])  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.monotonic()
    print(f"[gpu_check] {name}: running (limit {limit_s:.0f} s, log {log})", file=sys.stderr, flush=True)
    with log.open("w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=ROOT)  # fmt: skip
        try:
            process.wait(timeout=limit_s)
            payload = json.loads(result.read_text()) if result.exists() else {}
            payload.setdefault("rows", [])
            if process.returncode and "error" not in payload:
                payload["error"] = f"the stage exited {process.returncode} without a result"
        except subprocess.TimeoutExpired:
            payload = {"error": f"timed out after {limit_s:.0f} s"}
        finally:
            _stop_group(process)
    seconds = time.monotonic() - start
    outcome = f"FAILED: {payload['error']}" if "error" in payload else "done"
    print(f"[gpu_check] {name}: {outcome} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    if "error" in payload:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print("  " + "\n  ".join(tail), file=sys.stderr, flush=True)
    return payload


def _stop_group(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the stage's process group (it stops its launched jobs), SIGKILL after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)


def peak_tflops(gpu: str, override: float | None) -> tuple[float | None, str]:
    """The dense bf16 peak used for MFU and where it comes from."""
    if override is not None:
        return override, "--peak-tflops"
    for name, value in PEAK_BF16_TFLOPS:
        if name.lower() in gpu.lower():
            return value, f"NVIDIA data sheet, {name} dense bf16"
    return None, f"no known peak for {gpu!r} (pass --peak-tflops)"


def run_stages(args: argparse.Namespace, work: Path) -> tuple[dict, dict, dict]:
    """Runs the stages in RUN_ORDER within the budget: (env, rows by key, errors by stage)."""
    limits = LIMITS["cpu" if args.cpu_smoke else "gpu"]
    start = time.monotonic()
    env: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    stopped: str | None = None
    for name in RUN_ORDER:
        left = args.budget_s - (time.monotonic() - start)
        if stopped is None and left < 20:
            stopped = f"not run: {max(left, 0):.0f} s left of the {args.budget_s:.0f} s budget"
        if stopped is not None:
            errors[name] = stopped
            continue
        try:
            payload = launch_stage(name, work, args.cpu_smoke, min(limits[name], left - 5))
        except (Interrupted, KeyboardInterrupt) as error:
            stopped = f"not run: the check was stopped ({error or 'interrupted'})"
            errors[name] = f"stopped while running ({error or 'interrupted'})"
            continue
        env.update(payload.get("env", {}))
        rows.update({row["key"]: row for row in payload["rows"]})
        if "error" in payload:
            errors[name] = payload["error"]
            stopped = "not run: setup failed" if name == "setup" else None
    return env, rows, errors


def assemble(args: argparse.Namespace, env: dict, rows: dict, errors: dict, seconds: float) -> dict:
    """The report: rows in table order (a missing row says why), MFU, failures, legend, verdict."""
    size = CPU_SIZE if args.cpu_smoke else GPU_SIZE
    for stage, keys in STAGE_ROWS.items():
        for key in keys:
            if key not in rows:
                error = errors.get(stage, "no result")
                failed = not error.startswith("not run")
                rows[key] = {"key": key, "status": "FAIL" if failed else "not run"}
                rows[key]["failure" if failed else "details"] = f"{stage}: {error}" if failed else error
    if args.cpu_smoke:
        peak, peak_source = None, "none on the CPU"
    else:
        peak, peak_source = peak_tflops(env.get("gpu", ""), args.peak_tflops)
    for key in ("wrpo_plain", "wrpo_zero3"):
        if peak and rows[key].get("tokens_per_s") and rows[key].get("params"):
            rows[key]["mfu"] = 6 * rows[key]["params"] * rows[key]["tokens_per_s"] / (peak * 1e12)
    failures = list(dict.fromkeys([*(f"{s}: {e}" for s, e in errors.items() if not e.startswith("not run")),
                                   *(r["failure"] for r in rows.values() if r.get("failure"))]))  # fmt: skip
    names = {
        "sampling_hf": f"HF sampling ({DTYPE})", "sampling_vllm": f"vLLM sampling ({DTYPE})",
        "scoring_batched": f"reward scoring, batch {size.score_batch}", "scoring_batch1": "reward scoring, batch 1",
        "wrpo_plain": "WRPO plain Trainer, 1 process", "wrpo_zero3": "WRPO DeepSpeed ZeRO-3, 1 process",
    }  # fmt: skip
    ordered = [{"title": names[key], **rows[key]} for key in TABLE_ORDER]
    methods = sorted({r["mem_method"] for r in ordered if r.get("mem_method") not in (None, "-")})
    legend = [
        "tokens/s: sampling = completion tokens (end token included) / wall time of the timed call after a "
        "4-prompt warm-up; WRPO = policy tokens (prompt + response, all 3 responses) per steady step.",
        "step s: mean over the logged steps after the first (metrics.jsonl stamps); samples/s: responses "
        "sampled or scored per second.",
        "MFU: 6 x model params x tokens/s / peak; peak "
        + (f"{peak:g} TFLOP/s ({peak_source})" if peak else f"unknown: {peak_source}")
        + "; attention FLOPs not counted.",
        "peak GPU mem: " + ("- on the CPU." if args.cpu_smoke else "device memory in use above its level at "
        f"the stage's start ({', '.join(methods) or 'not measured'}) over load, warm-up and run; includes "
        "CUDA contexts."),
    ]  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d"), "seconds": seconds, "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "env": {**env, "peak_tflops": peak, "peak_source": peak_source}, "rows": ordered, "legend": legend,
        "failures": failures, "size": asdict(size),
        "passed": not failures and all(r["status"] in ("ok", "not importable") for r in ordered),
    }  # fmt: skip


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(report: dict[str, Any]) -> str:
    """The Markdown table with its environment line and legend."""
    env = {key: "?" for key in ("gpu", "python", "torch", "cuda", "transformers", "deepspeed", "vllm")}
    env.update(report["env"])
    lines = [
        f"GPU check {report['date']}: {env['gpu']}; python {env['python']}, torch {env['torch']} (CUDA "
        f"{env['cuda']}), transformers {env['transformers']}, deepspeed {env['deepspeed']}, vllm {env['vllm']}; "
        f"{report['seconds']:.0f} s in all",
        "packages: " + (", ".join(f"{k} {v}" for k, v in report["env"].get("packages", {}).items()) or "?"),
        "",
        "| check | status | tokens/s | samples/s | step s | MFU | peak GPU mem GiB | details |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        mfu = None if row.get("mfu") is None else f"{100 * row['mfu']:.2f}%"
        parts = [f"**{row['failure']}**" if row.get("failure") else "", str(row.get("details", ""))]
        details = "; ".join(p for p in parts if p).replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {row['title']} | {row['status']} | {_cell(row.get('tokens_per_s'), '.0f')} | "
            f"{_cell(row.get('samples_per_s'), '.1f')} | {_cell(row.get('step_s'), '.3f')} | {mfu or '-'} | "
            f"{_cell(row.get('peak_mem_gib'), '.2f')} | {details[:500]} |"
        )
    lines += ["", *report["legend"], "", "RESULT: " + ("PASS" if report["passed"] else "FAIL")]
    return "\n".join(lines + [f"  - {failure}" for failure in report["failures"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code paths on the CPU, toy size")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--work", type=Path, help="work folder, kept (default: a temporary one, removed)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="whole run's wall-clock budget (s)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        if args.work is None or args.result is None:
            parser.error("--stage needs --work and --result")
        return run_stage_here(args.stage, args.work, args.result, args.cpu_smoke)

    def on_term(signum: int, _frame: object) -> None:
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_term)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        env, rows, errors = run_stages(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = assemble(args, env, rows, errors, time.monotonic() - start)
    print(render(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
