"""Benchmark: WRPO training tokens/s under DeepSpeed ZeRO-3 with 2 CPU processes vs 1 process.

Every run is the same WRPO job (toy Llama with random weights, synthetic quadruples whose
examples all have the same token count, stored reference log-probs, fp32, constant alpha, the
same global batch, the same steps) started by our local launcher (`torchrun`, gloo on CPU):

    zero3 x1   DeepSpeed ZeRO-3 (infra/deepspeed/zero3.json), 1 process, batch B per process
    zero3 x2   DeepSpeed ZeRO-3, 2 processes, batch B/2 per process (same global batch)
    plain x1   transformers' Trainer without DeepSpeed, 1 process (for reference)

Tokens = non-pad tokens fed through the policy (prompt + response, for all three responses of
every example), the same count every step. Step time and tokens/s are measured over the steady
steps, from the first to the last logged step's wall-clock stamp in metrics.jsonl (so process
start-up, DeepSpeed initialisation and the first step are left out); `train s` is the Trainer's
own train_runtime. The losses of every run must agree within 1e-4, else the script exits 1.
With `--gpu` (one CUDA GPU, bf16) it runs plain x1 and zero3 x1 only, adds each run's peak GPU
memory (NVML, see `DeviceMemoryPeak`) and allows a loss difference of 0.1 (bf16).

    .venv/bin/python bench/zero3_cpu.py                 # ~3 min on 2 CPU cores
    .venv/bin/python bench/zero3_cpu.py --quick         # smoke check
    .venv/bin/python bench/zero3_cpu.py --pin           # ranks pinned to their own cores (clean 2 vs 1)
    .venv/bin/python bench/zero3_cpu.py --gpu           # one GPU: plain vs ZeRO-3, bf16
    bench/gpu_check.sh                                   # the whole GPU check (this is one stage)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/wrpo-fusion/torch_extensions"))

import argparse
import contextlib
import json
import math
import random
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from wrpo_core.config import LaunchConfig, WRPOConfig, WRPOJobConfig
from wrpo_core.reference import REFERENCE_FILE
from wrpo_core.schemas import QUADRUPLES, write_parquet
from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model
from wrpo_core.toy.tokenizer import build_char_tokenizer
from wrpo_core.train.jobs import TrainingJobError, write_job_config
from wrpo_core.train.launch import launch_job

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = str(ROOT / "infra" / "deepspeed" / "zero3.json")
LOSS_TOLERANCE = 1e-4
BF16_LOSS_TOLERANCE = 1e-1
LETTERS = "abcdefghijklmnopqrstuvwxyz"
GIB = 2**30


class BenchError(RuntimeError):
    """A benchmark run that could not be measured (a failed launch, unequal examples)."""


@dataclass(frozen=True)
class Run:
    """One configuration of the comparison."""

    name: str
    nproc: int
    deepspeed: bool


CPU_RUNS = (Run("zero3 x1", 1, True), Run("zero3 x2", 2, True), Run("plain x1", 1, False))
GPU_RUNS = (Run("plain x1", 1, False), Run("zero3 x1", 1, True))


class DeviceMemoryPeak:
    """Peak memory in use on the first visible CUDA device while the block runs, above its level at entry.

    Sampled every `interval_s` from NVML (`pynvml`, from nvidia-ml-py) or, without it, from
    `nvidia-smi`; device-wide, so it covers every process of the run (torchrun workers, vLLM's
    engine) and their CUDA contexts, and needs no CUDA in this process. `method` says which.
    `baseline` (bytes) replaces the level at entry, for blocks measured against one start.
    """

    def __init__(self, interval_s: float = 0.05, baseline: int | None = None):
        self.interval_s = interval_s
        self._fixed_baseline = baseline
        self.baseline = 0
        self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader()

    @staticmethod
    def _visible_device() -> str:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        return visible or "0"

    def _reader(self):
        device = self._visible_device()
        try:
            import pynvml
        except ImportError:
            self.method = "nvidia-smi memory.used, sampled"
            command = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", device]

            def read_smi() -> int:
                text = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                return int(float(text.strip().splitlines()[0]) * 2**20)

            self.interval_s = max(self.interval_s, 0.2)
            return read_smi
        pynvml.nvmlInit()
        handle = (
            pynvml.nvmlDeviceGetHandleByUUID(device)
            if device.startswith(("GPU-", "MIG-"))
            else pynvml.nvmlDeviceGetHandleByIndex(int(device))
        )
        self.method = "NVML memory used, sampled"
        return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._read())

    def __enter__(self) -> DeviceMemoryPeak:
        self.peak = self._read()
        self.baseline = self.peak if self._fixed_baseline is None else self._fixed_baseline
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def gib(self) -> float:
        """Peak above the level at entry, in GiB."""
        return (self.peak - self.baseline) / GIB


class CorePinner:
    """Pins each training process of a run to its own core (local rank r -> core r) while the block runs.

    torchrun starts the ranks; this polls this process's descendants every `interval_s` and sets
    the CPU affinity of each one whose environment has LOCAL_RANK (a rank and the processes it
    starts), so two ranks never share a core and a 1-process run keeps one core. `pinned` lists
    (pid, core) as set.
    """

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.pinned: list[tuple[int, int]] = []
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        cores = os.cpu_count() or 1
        while not self._stop.wait(self.interval_s):
            for proc in psutil.Process().children(recursive=True):
                if proc.pid in self._seen:
                    continue
                try:
                    rank = proc.environ().get("LOCAL_RANK")
                    if rank is None:
                        continue
                    proc.cpu_affinity([int(rank) % cores])
                    self._seen.add(proc.pid)
                    self.pinned.append((proc.pid, int(rank) % cores))
                except (psutil.Error, ValueError):
                    continue

    def __enter__(self) -> CorePinner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fixed_length_quadruples(rows: int, prompt_chars: int, response_chars: int, seed: int) -> pa.Table:
    """QUADRUPLES rows of random letters, every prompt and response exactly the given length."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return "".join(rng.choices(LETTERS, k=n))

    prompts = [f"{i:05d} {text(prompt_chars - 6)}" for i in range(rows)]
    columns: dict[str, object] = {"prompt_id": [f"p{i:05d}" for i in range(rows)], "prompt": prompts}
    for name in ("y_ws", "y_wt", "y_l"):
        columns[name] = [text(response_chars) for _ in range(rows)]
    columns["y_ws_model"] = ["source"] * rows
    for name in ("y_ws_score", "y_wt_score", "y_l_score", "ref_logp_ws", "ref_logp_wt", "ref_logp_l"):
        columns[name] = pa.nulls(rows, pa.float64())
    return pa.table(columns)


def tokens_per_example(job: WRPOJobConfig) -> int:
    """Tokens one example feeds through the policy; fails unless every example has the same count."""
    from wrpo_core.models import load_tokenizer
    from wrpo_core.train.wrpo import load_quadruples, tokenize_quadruples

    dataset, report = tokenize_quadruples(load_quadruples(job.data), load_tokenizer(job.model), job.training)
    if report.prompts_truncated or report.responses_truncated:
        raise BenchError("examples were truncated; raise --max-length")
    counts = {
        sum(len(prompt) + len(response) for response in responses)
        for prompt, responses in zip(dataset["prompt_ids"], dataset["response_ids"], strict=True)
    }
    if len(counts) != 1:
        raise BenchError(f"examples differ in length: {sorted(counts)}")
    return counts.pop()


def make_job(args: argparse.Namespace, out: Path) -> tuple[WRPOJobConfig, int]:
    """The toy model, the quadruples with stored reference log-probs, the job every run shares; and
    the model's parameter count."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(
        tokenizer, seed=0, hidden_size=args.hidden_size, num_layers=args.layers,
        num_heads=max(1, args.hidden_size // 64), max_position_embeddings=args.max_length,
    )  # fmt: skip
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    model_dir = save_tiny_model(model, tokenizer, out / "model")
    data = out / "quadruples.parquet"
    rows = args.steps * args.batch_size
    write_parquet(
        fixed_length_quadruples(rows, args.prompt_chars, args.response_chars, 0), str(data), QUADRUPLES
    )
    training = WRPOConfig(
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_ratio=0.0, beta=0.1, alpha=0.1,
        alpha_schedule="constant", max_length=args.max_length, max_prompt_length=args.max_length // 2,
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.gpu, logging_steps=1,
        save_steps=1_000_000, seed=0,
    )  # fmt: skip
    job = WRPOJobConfig(model=model_dir, data=str(data), output_dir=str(out / "reference"), training=training)
    config = write_job_config(job, out / "reference" / "job.yaml")
    reference = subprocess.run(
        [sys.executable, "-m", "wrpo_core.cli", "reference", "--config", config],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if reference.returncode != 0:
        raise BenchError(f"reference log-probs failed: {reference.stderr.strip()[-2000:]}")
    return job.model_copy(update={"data": str(out / "reference" / REFERENCE_FILE)}), params


def run_one(
    job: WRPOJobConfig, run: Run, out: Path, tokens_per_step: int, *, gpu: bool = False, pin: bool = False
) -> dict:
    """Launches one configuration and measures it from its metrics rows (and, on a GPU, its memory).

    `pin`: each rank on its own core (`CorePinner`); the load average before and after is recorded.
    """
    training = job.training.model_copy(
        update={
            "per_device_train_batch_size": job.training.per_device_train_batch_size // run.nproc,
            "deepspeed": ZERO3 if run.deepspeed else None,
        }
    )
    folder = out / run.name.replace(" ", "-")
    this = job.model_copy(
        update={
            "output_dir": str(folder),
            "training": training,
            "launch": LaunchConfig(launcher="local", nproc_per_node=run.nproc),
        }
    )
    log: list[str] = []
    memory = DeviceMemoryPeak() if gpu else contextlib.nullcontext()
    pinner = CorePinner() if pin else contextlib.nullcontext()
    load_before = os.getloadavg()[0]
    try:
        with memory, pinner:
            result = launch_job("wrpo", this, on_log=log.append)
    except TrainingJobError as error:
        (out / "failed.log").write_text("\n".join(log))
        raise BenchError(f"{run.name} failed: {error.error} (log: {out / 'failed.log'})") from None
    steps = [row for row in result.metrics if "loss" in row]
    if len(steps) < 2:
        raise BenchError(f"{run.name}: {len(steps)} logged steps; step time needs at least 2 (raise --steps)")
    first, last = steps[0], steps[-1]
    step_s = (last["time"] - first["time"]) / (last["step"] - first["step"])
    measured: dict[str, Any] = {
        "run": run.name,
        "steps": last["step"],
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "train_s": result.summary["train_runtime"],
        "train_tokens_per_s": last["step"] * tokens_per_step / result.summary["train_runtime"],
        "losses": [row["loss"] for row in steps],
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    if pin:
        measured["pinned_cores"] = sorted({core for _, core in pinner.pinned})
        if len(measured["pinned_cores"]) != min(run.nproc, os.cpu_count() or 1):
            raise BenchError(
                f"{run.name}: ranks pinned to cores {measured['pinned_cores']}, expected {run.nproc}"
            )
    if gpu:
        measured.update(peak_mem_gib=memory.gib, mem_method=memory.method)
    return measured


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (`resolve_presets` fills the size defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="one GPU, bf16: plain vs ZeRO-3 on 1 process")
    parser.add_argument("--quick", action="store_true", help="a smoke check: tiny model, few steps")
    parser.add_argument(
        "--steps", type=int, help="optimizer steps (default 16; 40 with --gpu; 4 with --quick)"
    )
    parser.add_argument("--batch-size", type=int, help="global batch (default 8; 16 with --gpu)")
    parser.add_argument("--hidden-size", type=int, help="default 256; 1024 with --gpu; 64 with --quick")
    parser.add_argument("--layers", type=int, help="default 4; 8 with --gpu; 2 with --quick")
    parser.add_argument("--prompt-chars", type=int, default=48)
    parser.add_argument("--response-chars", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    parser.add_argument(
        "--pin", action="store_true", help="pin each rank to its own core (local rank r -> core r)"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed options with the presets of --gpu / --quick filled in where an option was not given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = {"steps": 40, "batch_size": 16, "hidden_size": 1024, "layers": 8} if args.gpu else {
        "steps": 16, "batch_size": 8, "hidden_size": 256, "layers": 4}  # fmt: skip
    if args.quick:
        preset.update(steps=4, hidden_size=64, layers=2)
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch_size % 2:
        parser.error("--batch-size must be even (it is split over 2 processes)")
    return args


def compare(args: argparse.Namespace, out: Path, runs: tuple[Run, ...]) -> dict[str, Any]:
    """Runs `runs` on one shared job in `out`: per-run results, tokens/step, parameters, loss agreement."""
    job, params = make_job(args, out)
    tokens_per_step = tokens_per_example(job) * args.batch_size
    results = [run_one(job, run, out, tokens_per_step, gpu=args.gpu, pin=args.pin) for run in runs]
    reference = results[0]["losses"]
    diffs = [abs(a - b) for r in results for a, b in zip(r["losses"], reference, strict=True)]
    loss_diff = float("nan") if any(math.isnan(d) for d in diffs) else max(diffs)  # max() can skip a NaN
    # fp32: the runs must agree. bf16: ZeRO-3 keeps bf16 weights where the plain Trainer autocasts
    # over fp32 ones, so only a gross difference (a broken run) fails.
    tolerance = BF16_LOSS_TOLERANCE if args.gpu else LOSS_TOLERANCE
    return {
        "results": results,
        "tokens_per_step": tokens_per_step,
        "params": params,
        "max_loss_abs_diff": loss_diff,
        "loss_tolerance": tolerance,
        "losses_agree": bool(loss_diff <= tolerance),  # False on NaN too
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            build_parser().error("--gpu needs a CUDA GPU")
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} per process"

    with tempfile.TemporaryDirectory(prefix="bench-zero3-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        try:
            report = compare(args, out, GPU_RUNS if args.gpu else CPU_RUNS)
        except BenchError as error:
            print(f"FAIL: {error}", file=sys.stderr)
            return 1

    results, tokens_per_step = report["results"], report["tokens_per_step"]
    print(
        f"\nWRPO under DeepSpeed ZeRO-3 vs 1 process, {device}; toy Llama hidden {args.hidden_size}, "
        f"{args.layers} layers, {'bf16' if args.gpu else 'fp32'}; global batch {args.batch_size}, "
        f"{tokens_per_step} tokens/step, {args.steps} steps\n"
        "step s / tok/s: steady steps (first to last logged step); train s: Trainer train_runtime\n"
    )
    memory = " peak GiB" if args.gpu else ""
    header = (
        f"{'run':<10}{'step s':>9}{'tok/s':>9}{'train s':>9}{'tok/s (train s)':>17}{'load 1m':>9}{memory}"
    )
    print(header + "\n" + "-" * len(header))
    for r in results:
        print(
            f"{r['run']:<10}{r['step_s']:>9.3f}{r['tokens_per_s']:>9.0f}{r['train_s']:>9.2f}"
            f"{r['train_tokens_per_s']:>17.0f}{r['load_before']:>5.1f}-{r['load_after']:<3.1f}"
            + (f"{r['peak_mem_gib']:>9.2f}" if args.gpu else "")
            + (f"  cores {r['pinned_cores']}" if args.pin else "")
        )
    by_name = {r["run"]: r for r in results}
    if not args.gpu:
        ratio = by_name["zero3 x2"]["tokens_per_s"] / by_name["zero3 x1"]["tokens_per_s"]
        print(f"\nZeRO-3 tokens/s, 2 processes / 1 process: {ratio:.2f}x")
    zero3_vs_plain = by_name["zero3 x1"]["tokens_per_s"] / by_name["plain x1"]["tokens_per_s"]
    print(f"ZeRO-3 x1 tokens/s / plain x1 tokens/s:    {zero3_vs_plain:.2f}x")
    loss_diff = report["max_loss_abs_diff"]
    print(f"max |loss - loss({results[0]['run']})| over {len(results[0]['losses'])} steps: {loss_diff:.2e}")
    if args.json:
        print(json.dumps({"device": device, "results": results, "max_loss_abs_diff": loss_diff}))
    if not report["losses_agree"]:
        print(f"FAIL: losses differ by {loss_diff:.2e} > {report['loss_tolerance']:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
