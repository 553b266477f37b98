"""Benchmark: WRPO training with PRECOMPUTED reference log-probs vs the reference RECOMPUTED every step.

Mode A ("precomputed", our default): one batched, length-sorted pass of the frozen reference over
the quadruples (`prepare_reference`), timed on its own; training then holds only the policy.
Mode B ("on-the-fly", the authors' trainer): `precompute_reference=False`, so `WRPOTrainer` holds
a `ref_model` and runs it forward on every batch.

Both modes train the same toy Llama (random weights, character tokenizer) on the same synthetic
quadruples with the same WRPOConfig (fixed max_steps, batch, seed, constant alpha, fp32, no
gradient checkpointing, no checkpoint saving), each in its own subprocess so peak memory is per
mode. Reported per mode: training wall time (`trainer.train()` only), training tokens/s, the
reference time (A: `prepare_reference`, i.e. load + tokenize + one pass + write the cache;
B: loading the reference model), peak RSS (`ru_maxrss`, also minus the post-import baseline) and,
on CUDA, `torch.cuda.max_memory_allocated`. Training tokens = non-pad tokens (prompt + response,
all three responses of every example) fed through the POLICY, summed over all optimizer steps;
B's extra reference forward is not counted. Ratios: training throughput A/B, end-to-end speed-up
(reference + training time, B/A) and peak memory A/B. The per-step losses of the two runs (from
their metrics.jsonl) must agree within 1e-4, else the script exits non-zero.

    .venv/bin/python bench/reference_logps.py            # ~1.5 min on one CPU core
    .venv/bin/python bench/reference_logps.py --quick    # smoke check, a few seconds per mode
    .venv/bin/python bench/reference_logps.py --steps 48 --rows 96 --out /tmp/bench --json
    .venv/bin/python bench/reference_logps.py --hidden-size 2048 --layers 16 --rows 256 --steps 64  # GPU
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from wrpo_core.config import WRPOConfig, WRPOJobConfig
from wrpo_core.models import load_causal_lm, load_tokenizer
from wrpo_core.schemas import QUADRUPLES, write_parquet
from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model
from wrpo_core.toy.tokenizer import build_char_tokenizer
from wrpo_core.train.metrics import METRICS_FILE
from wrpo_core.train.wrpo import (
    WRPOTrainer,
    build_wrpo_trainer,
    load_quadruples,
    prepare_reference,
    tokenize_quadruples,
)

MODES = ("precomputed", "on-the-fly")
LOSS_TOLERANCE = 1e-4
HEAD_DIM = 32
PRINTABLE = [chr(code) for code in range(ord(" "), ord("~") + 1)]


# --- setup (parent process) -------------------------------------------------------------------


def model_sizes(args: argparse.Namespace) -> dict[str, int]:
    return {
        "hidden_size": args.hidden_size,
        "num_layers": args.layers,
        "num_heads": max(1, args.hidden_size // HEAD_DIM),
    }


def synthetic_quadruples(rows: int, *, response_chars: tuple[int, int], seed: int) -> pa.Table:
    """QUADRUPLES rows of random printable ASCII; the same seed gives the same table."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return "".join(rng.choices(PRINTABLE, k=rng.randint(low, high)))

    prompts = [f"{i}: {text(20, 60)}" for i in range(rows)]
    columns: dict[str, list] = {
        "prompt_id": [hashlib.sha256(p.encode()).hexdigest() for p in prompts],
        "prompt": prompts,
    }
    for name in ("y_ws", "y_wt", "y_l"):
        columns[name] = [text(*response_chars) for _ in range(rows)]
    columns["y_ws_model"] = ["source"] * rows
    for name in ("y_ws_score", "y_wt_score", "y_l_score", "ref_logp_ws", "ref_logp_wt", "ref_logp_l"):
        columns[name] = pa.nulls(rows, pa.float64())
    return pa.table(columns)


def make_job(args: argparse.Namespace, out: Path) -> WRPOJobConfig:
    """Saves the toy model and the quadruples under `out`; the job both modes run (mode unset)."""
    tokenizer = build_char_tokenizer()
    sizes = model_sizes(args)
    model_dir = save_tiny_model(
        build_tiny_llama(tokenizer, seed=args.seed, **sizes), tokenizer, out / "model"
    )
    response_chars = (10, 30) if args.quick else (40, 120)
    data = str(out / "quadruples.parquet")
    write_parquet(
        synthetic_quadruples(args.rows, response_chars=response_chars, seed=args.seed), data, QUADRUPLES
    )
    training = WRPOConfig(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        warmup_ratio=0.0,
        beta=0.1,
        alpha=0.1,
        alpha_schedule="constant",
        max_length=256,
        max_prompt_length=128,
        gradient_checkpointing=False,
        bf16=False,
        logging_steps=1,
        save_steps=1_000_000,
        seed=args.seed,
    )
    return WRPOJobConfig(model=model_dir, data=data, output_dir=str(out), training=training)


# --- one mode (worker subprocess) -------------------------------------------------------------


class CountingWRPOTrainer(WRPOTrainer):
    """WRPOTrainer that counts the non-pad tokens of every training batch the policy sees."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.tokens_seen += int(inputs["attention_mask"].sum())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_mode(job: WRPOJobConfig) -> dict[str, float | int | str | None]:
    """Does what `train_wrpo` does (minus saving the final model), timing the reference work and training."""
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.zeros(1, device="cuda")  # CUDA start-up is paid here, outside every timer
    baseline_rss = peak_rss_mib()
    hp = job.training
    tokenizer = load_tokenizer(job.model)
    table = load_quadruples(job.data)
    start = time.perf_counter()
    # A: load the reference, tokenize, one batched pass, write the cache. B: only load the reference.
    reference = prepare_reference(job, table, tokenizer)
    ref_model = None if reference is not None else load_causal_lm(job.reference_model or job.model)
    reference_s = time.perf_counter() - start
    rss_after_reference = peak_rss_mib()
    dataset, _ = tokenize_quadruples(table, tokenizer, hp, reference)
    trainer = build_wrpo_trainer(job, tokenizer, dataset, ref_model, trainer_class=CountingWRPOTrainer)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    return {
        "mode": "precomputed" if hp.precompute_reference else "on-the-fly",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": trainer.state.global_step,
        "train_tokens": trainer.tokens_seen,
        "train_s": train_s,
        "train_tokens_per_s": trainer.tokens_seen / train_s,
        "reference_s": reference_s,
        "baseline_rss_mib": baseline_rss,
        "rss_after_reference_mib": rss_after_reference,
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


# --- comparison (parent process) --------------------------------------------------------------


def spawn(job: WRPOJobConfig, mode: str, out: Path) -> dict:
    """Runs one mode in a fresh subprocess in a fresh `out/<mode>` folder; returns its result."""
    folder = out / mode
    shutil.rmtree(folder, ignore_errors=True)  # a stale reference cache or metrics.jsonl would skew it
    folder.mkdir(parents=True)
    training = job.training.model_copy(update={"precompute_reference": mode == "precomputed"})
    job_file = folder / "job.json"
    job_file.write_text(
        job.model_copy(update={"output_dir": str(folder), "training": training}).model_dump_json()
    )
    with (folder / "log.txt").open("w") as log:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", str(job_file)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed (exit {done.returncode}); see {folder / 'log.txt'}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["losses"] = [
        row["loss"]
        for row in map(json.loads, (folder / METRICS_FILE).read_text().splitlines())
        if "loss" in row
    ]
    return result


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(results: dict[str, dict], loss_diff: float, args: argparse.Namespace, out: Path) -> dict:
    a, b = results["precomputed"], results["on-the-fly"]
    ratios = {
        "train_throughput_A_over_B": a["train_tokens_per_s"] / b["train_tokens_per_s"],
        "end_to_end_speedup": (b["reference_s"] + b["train_s"]) / (a["reference_s"] + a["train_s"]),
        "peak_rss_A_over_B": a["peak_rss_mib"] / b["peak_rss_mib"],
        "peak_rss_above_baseline_A_over_B": (a["peak_rss_mib"] - a["baseline_rss_mib"])
        / (b["peak_rss_mib"] - b["baseline_rss_mib"]),
    }
    if a["cuda_peak_mib"] and b["cuda_peak_mib"]:
        ratios["cuda_peak_A_over_B"] = a["cuda_peak_mib"] / b["cuda_peak_mib"]
    sizes = model_sizes(args)
    print(
        f"\nWRPO reference log-probs: precomputed (A) vs on-the-fly (B) on {a['device']}, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n"
        f"toy Llama {sizes}, {args.rows} rows, {a['steps']} steps x batch {args.batch_size} "
        f"({a['steps'] * args.batch_size / args.rows:.2f} epochs), fp32; work dir {out}\n"
        "ref s: A = prepare_reference (load the reference, tokenize, one batched pass, write the cache);\n"
        "       B = loading the reference model (it then runs forward inside every training step)\n"
        "train s = trainer.train() only; tokens = non-pad tokens (prompt + 3 responses) fed to the policy\n"
    )
    header = f"{'mode':<16}{'ref s':>11}{'train s':>9}{'tokens':>9}{'tok/s':>8}{'peak RSS MiB':>14}"
    header += f"{'(above base)':>13}{'CUDA peak MiB':>15}"
    print(header)
    print("-" * len(header))
    for label, r in (("A precomputed", a), ("B on-the-fly", b)):
        print(
            f"{label:<16}{r['reference_s']:>11.2f}{r['train_s']:>9.2f}{r['train_tokens']:>9}"
            f"{r['train_tokens_per_s']:>8.0f}{r['peak_rss_mib']:>14.0f}"
            f"{r['peak_rss_mib'] - r['baseline_rss_mib']:>13.0f}{fmt(r['cuda_peak_mib'], '.0f'):>15}"
        )
    print(
        f"\ntraining throughput A/B:                 {ratios['train_throughput_A_over_B']:.2f}x\n"
        f"end-to-end speed-up (ref s + train s):   {ratios['end_to_end_speedup']:.2f}x  (B / A)\n"
        f"peak RSS A/B:                            {ratios['peak_rss_A_over_B']:.2f}"
        f"  (above the post-import baseline: {ratios['peak_rss_above_baseline_A_over_B']:.2f})"
    )
    if "cuda_peak_A_over_B" in ratios:
        print(f"CUDA peak allocated A/B:                 {ratios['cuda_peak_A_over_B']:.2f}")
    print(
        f"max |loss A - loss B| over {len(a['losses'])} steps:  {loss_diff:.2e} (tolerance {LOSS_TOLERANCE:g})"
    )
    return {"A": a, "B": b, "ratios": ratios, "max_loss_abs_diff": loss_diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default 24; 3 with --quick)"
    )
    parser.add_argument("--rows", type=int, default=None, help="quadruples (default 96; 12 with --quick)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
    parser.add_argument("--hidden-size", type=int, default=None, help="default 256; 32 with --quick")
    parser.add_argument("--layers", type=int, default=None, help="default 4; 1 with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model and data: a smoke check")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run one mode's job file
    args = parser.parse_args(argv)

    if args.worker:
        job = WRPOJobConfig.model_validate_json(args.worker.read_text())
        print(json.dumps(run_mode(job)))
        return 0

    args.steps = args.steps or (3 if args.quick else 24)
    args.rows = args.rows or (12 if args.quick else 96)
    args.hidden_size = args.hidden_size or (32 if args.quick else 256)
    args.layers = args.layers or (1 if args.quick else 4)
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        job = make_job(args, out)
        results = {mode: spawn(job, mode, out) for mode in MODES}
        a, b = results["precomputed"]["losses"], results["on-the-fly"]["losses"]
        if len(a) != args.steps or len(b) != args.steps:
            print(f"expected {args.steps} logged losses, got {len(a)} (A) and {len(b)} (B)", file=sys.stderr)
            return 1
        if results["precomputed"]["train_tokens"] != results["on-the-fly"]["train_tokens"]:
            print("the two modes trained on different tokens", file=sys.stderr)
            return 1
        loss_diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
        summary = report(results, loss_diff, args, out)
        if args.json:
            print(json.dumps(summary))
    if loss_diff > LOSS_TOLERANCE:
        print(f"FAIL: losses differ by {loss_diff:.2e} > {LOSS_TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
