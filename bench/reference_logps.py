"""Benchmark: WRPO training with PRECOMPUTED reference log-probs vs the reference RECOMPUTED every step, packed and not.

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

Each mode also runs with and without shared-prompt packing (`WRPOConfig.pack_prompt`,
`wrpo_core.packing`: one sequence [prompt, y_ws, y_wt, y_l] per example, the prompt encoded once,
in the reference pass and in training), so four runs by default (`--packing on|off` runs two).
Reported besides: the reference pass alone (`compute_reference_logps`, A only), seconds per
training step, and the packing speed-ups (unpacked time / packed time) of the reference pass, the
training step and the end-to-end time; the A/B end-to-end ratio with packing on and off. All runs'
losses must agree within 1e-4 (packing changes only the float rounding). With packing, "tokens" are
the packed ones (each prompt once), so they differ between packed and unpacked runs.

    .venv/bin/python bench/reference_logps.py            # ~1.5 min on one CPU core
    .venv/bin/python bench/reference_logps.py --quick    # smoke check, a few seconds per mode
    .venv/bin/python bench/reference_logps.py --steps 48 --rows 96 --out /tmp/bench --json
    .venv/bin/python bench/reference_logps.py --hidden-size 2048 --layers 16 --rows 256 --steps 64  # GPU
    .venv/bin/python bench/reference_logps.py --packing on   # only the packed runs (A and B)
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import torch

import wrpo_core.train.wrpo as wrpo_module
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
PACKINGS = {"both": (True, False), "on": (True,), "off": (False,)}
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


@contextmanager
def timed(into: list[tuple[float, float]]) -> Iterator[None]:
    """Appends (wall seconds, this process's CPU seconds) of the block to `into`.

    CPU seconds (one thread: OMP_NUM_THREADS=1) count only this process's work, so they hold
    still when other processes share the cores; wall seconds do not.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        into.append((time.perf_counter() - wall, time.process_time() - cpu))


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
    passes: list[tuple[float, float]] = []
    compute = wrpo_module.compute_reference_logps

    def timed_pass(*args, **kwargs):  # the reference pass alone, inside prepare_reference
        with timed(passes):
            return compute(*args, **kwargs)

    wrpo_module.compute_reference_logps = timed_pass
    reference_time: list[tuple[float, float]] = []
    with timed(reference_time):
        # A: load the reference, tokenize, one batched pass, write the cache. B: only load the reference.
        reference = prepare_reference(job, table, tokenizer)
        ref_model = None if reference is not None else load_causal_lm(job.reference_model or job.model)
    rss_after_reference = peak_rss_mib()
    dataset, _ = tokenize_quadruples(table, tokenizer, hp, reference)
    trainer = build_wrpo_trainer(job, tokenizer, dataset, ref_model, trainer_class=CountingWRPOTrainer)
    train_time: list[tuple[float, float]] = []
    with timed(train_time):
        trainer.train()
    (reference_s, reference_cpu_s), (train_s, train_cpu_s) = reference_time[0], train_time[0]
    steps = max(1, trainer.state.global_step)
    return {
        "mode": "precomputed" if hp.precompute_reference else "on-the-fly",
        "packed": hp.pack_prompt,
        "collator": type(trainer.data_collator).__name__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": trainer.state.global_step,
        "train_tokens": trainer.tokens_seen,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "step_s": train_s / steps,
        "step_cpu_s": train_cpu_s / steps,
        "reference_pass_s": sum(w for w, _ in passes) if passes else None,
        "reference_pass_cpu_s": sum(c for _, c in passes) if passes else None,
        "train_tokens_per_s": trainer.tokens_seen / train_s,
        "reference_s": reference_s,
        "reference_cpu_s": reference_cpu_s,
        "baseline_rss_mib": baseline_rss,
        "rss_after_reference_mib": rss_after_reference,
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


# --- comparison (parent process) --------------------------------------------------------------


def run_name(mode: str, packed: bool) -> str:
    return f"{mode}-{'packed' if packed else 'unpacked'}"


def spawn(job: WRPOJobConfig, mode: str, packed: bool, out: Path) -> dict:
    """Runs one mode in a fresh subprocess in a fresh `out/<mode>-<packing>` folder; returns its result."""
    folder = out / run_name(mode, packed)
    shutil.rmtree(folder, ignore_errors=True)  # a stale reference cache or metrics.jsonl would skew it
    folder.mkdir(parents=True)
    update = {"precompute_reference": mode == "precomputed", "pack_prompt": packed}
    training = job.training.model_copy(update=update)
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
        raise SystemExit(f"{folder.name} run failed (exit {done.returncode}); see {folder / 'log.txt'}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["losses"] = [
        row["loss"]
        for row in map(json.loads, (folder / METRICS_FILE).read_text().splitlines())
        if "loss" in row
    ]
    if result["packed"] != (result["collator"] == "PackedResponseCollator"):
        raise SystemExit(
            f"{folder.name}: packing was requested {packed} but training used {result['collator']}"
        )
    return result


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


CLOCKS = {"s": "wall", "cpu_s": "CPU"}
"""Result-key suffixes of the two clocks and their names."""


def end_to_end(r: dict, clock: str = "s") -> float:
    return r[f"reference_{clock}"] + r[f"train_{clock}"]


def ab_ratios(a: dict, b: dict) -> dict[str, float]:
    """A (precomputed) against B (on-the-fly) at one packing setting."""
    ratios = {
        "train_throughput_A_over_B": a["train_tokens_per_s"] / b["train_tokens_per_s"],
        "end_to_end_speedup": end_to_end(b) / end_to_end(a),
        "end_to_end_speedup_cpu": end_to_end(b, "cpu_s") / end_to_end(a, "cpu_s"),
        "peak_rss_A_over_B": a["peak_rss_mib"] / b["peak_rss_mib"],
        "peak_rss_above_baseline_A_over_B": (a["peak_rss_mib"] - a["baseline_rss_mib"])
        / (b["peak_rss_mib"] - b["baseline_rss_mib"]),
    }
    if a["cuda_peak_mib"] and b["cuda_peak_mib"]:
        ratios["cuda_peak_A_over_B"] = a["cuda_peak_mib"] / b["cuda_peak_mib"]
    return ratios


def packing_ratios(results: dict[str, dict], clock: str) -> dict[str, float]:
    """Packing speed-ups (unpacked time / packed time) and our default (A packed) vs the authors' (B unpacked)."""
    a, b = results[run_name("precomputed", True)], results[run_name("on-the-fly", True)]
    a0, b0 = results[run_name("precomputed", False)], results[run_name("on-the-fly", False)]
    return {
        "reference_pass_A": a0[f"reference_pass_{clock}"] / a[f"reference_pass_{clock}"],
        "reference_A": a0[f"reference_{clock}"] / a[f"reference_{clock}"],
        "train_step_A": a0[f"step_{clock}"] / a[f"step_{clock}"],
        "train_step_B": b0[f"step_{clock}"] / b[f"step_{clock}"],
        "end_to_end_A": end_to_end(a0, clock) / end_to_end(a, clock),
        "end_to_end_B": end_to_end(b0, clock) / end_to_end(b, clock),
        "end_to_end_B_unpacked_over_A_packed": end_to_end(b0, clock) / end_to_end(a, clock),
    }


def label(name: str, r: dict) -> str:
    return ("A " if r["mode"] == "precomputed" else "B ") + name


def print_table(results: dict[str, dict]) -> None:
    header = f"{'run':<26}{'ref s':>7}{'pass s':>8}{'train s':>9}{'s/step':>8}{'end s':>8}{'tokens':>8}"
    header += f"{'tok/s':>7}{'peak RSS MiB':>14}{'(above base)':>13}{'CUDA peak MiB':>15}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{label(name, r):<26}{r['reference_s']:>7.2f}{fmt(r['reference_pass_s'], '.2f'):>8}"
            f"{r['train_s']:>9.2f}{r['step_s']:>8.3f}{end_to_end(r):>8.2f}{r['train_tokens']:>8}"
            f"{r['train_tokens_per_s']:>7.0f}{r['peak_rss_mib']:>14.0f}"
            f"{r['peak_rss_mib'] - r['baseline_rss_mib']:>13.0f}{fmt(r['cuda_peak_mib'], '.0f'):>15}"
        )
    print("\nthe same in CPU seconds of each run's process (robust to other processes on the cores):\n")
    header = f"{'run':<26}{'ref':>7}{'pass':>8}{'train':>9}{'/step':>8}{'end':>8}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{label(name, r):<26}{r['reference_cpu_s']:>7.2f}{fmt(r['reference_pass_cpu_s'], '.2f'):>8}"
            f"{r['train_cpu_s']:>9.2f}{r['step_cpu_s']:>8.3f}{end_to_end(r, 'cpu_s'):>8.2f}"
        )


def report(results: dict[str, dict], loss_diff: float, args: argparse.Namespace, out: Path) -> dict:
    first = next(iter(results.values()))
    sizes = model_sizes(args)
    print(
        f"\nWRPO reference log-probs: precomputed (A) vs on-the-fly (B), packed and unpacked, on "
        f"{first['device']}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n"
        f"toy Llama {sizes}, {args.rows} rows, {first['steps']} steps x batch {args.batch_size} "
        f"({first['steps'] * args.batch_size / args.rows:.2f} epochs), fp32; work dir {out}\n"
        "ref s: A = prepare_reference (load the reference, tokenize, one batched pass, write the cache);\n"
        "       B = loading the reference model (it then runs forward inside every training step)\n"
        "pass s = the reference pass alone (compute_reference_logps, A only); end s = ref s + train s\n"
        "train s = trainer.train() only; tokens = non-pad tokens fed to the policy (packed: each prompt once)\n"
    )
    print_table(results)
    summary: dict = {"runs": results, "ratios": {}, "max_loss_abs_diff": loss_diff}
    for packed in (True, False):
        a, b = results.get(run_name("precomputed", packed)), results.get(run_name("on-the-fly", packed))
        if a is None or b is None:
            continue
        ratios = ab_ratios(a, b)
        summary["ratios"]["packed" if packed else "unpacked"] = ratios
        print(
            f"\n{'packed' if packed else 'unpacked'}: training throughput A/B "
            f"{ratios['train_throughput_A_over_B']:.2f}x; end-to-end speed-up (ref s + train s) B/A "
            f"{ratios['end_to_end_speedup']:.2f}x wall, {ratios['end_to_end_speedup_cpu']:.2f}x CPU; peak RSS "
            f"A/B {ratios['peak_rss_A_over_B']:.2f} (above the post-import baseline: "
            f"{ratios['peak_rss_above_baseline_A_over_B']:.2f})"
        )
        if "cuda_peak_A_over_B" in ratios:
            print(f"CUDA peak allocated A/B: {ratios['cuda_peak_A_over_B']:.2f}")
    if len(results) == 4:
        speedups: dict = {CLOCKS[clock]: packing_ratios(results, clock) for clock in CLOCKS}
        a, a0 = results[run_name("precomputed", True)], results[run_name("precomputed", False)]
        speedups["tokens_unpacked_over_packed"] = a0["train_tokens"] / a["train_tokens"]
        summary["ratios"]["packing"] = speedups

        def both(key: str) -> str:
            return f"{speedups['wall'][key]:.2f}x wall, {speedups['CPU'][key]:.2f}x CPU"

        print(
            "\npacking speed-ups (unpacked time / packed time):\n"
            f"  reference pass (A):              {both('reference_pass_A')}"
            f"  (prepare_reference: {both('reference_A')})\n"
            f"  training step A:                 {both('train_step_A')}\n"
            f"  training step B:                 {both('train_step_B')}\n"
            f"  end to end A:                    {both('end_to_end_A')}\n"
            f"  end to end B:                    {both('end_to_end_B')}\n"
            f"  tokens encoded, unpacked/packed: {speedups['tokens_unpacked_over_packed']:.2f}x\n"
            "A packed (our default) vs B unpacked (the authors' trainer), end to end: "
            f"{both('end_to_end_B_unpacked_over_A_packed')}"
        )
    print(
        f"max |loss - loss of {next(iter(results))}| over {len(first['losses'])} steps, all runs:  "
        f"{loss_diff:.2e} (tolerance {LOSS_TOLERANCE:g})"
    )
    return summary


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
    parser.add_argument(
        "--packing",
        choices=sorted(PACKINGS),
        default="both",
        help="shared-prompt packing: both (4 runs), on, off",
    )
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
        results = {
            run_name(mode, packed): spawn(job, mode, packed, out)
            for mode in MODES
            for packed in PACKINGS[args.packing]  # packed and unpacked back to back: less drift between them
        }
        for name, result in results.items():
            if len(result["losses"]) != args.steps:
                print(
                    f"{name}: expected {args.steps} logged losses, got {len(result['losses'])}",
                    file=sys.stderr,
                )
                return 1
        for packed in PACKINGS[args.packing]:
            a, b = results[run_name("precomputed", packed)], results[run_name("on-the-fly", packed)]
            if a["train_tokens"] != b["train_tokens"]:
                print(f"A and B (packed {packed}) trained on different tokens", file=sys.stderr)
                return 1
        baseline = next(iter(results.values()))["losses"]
        loss_diff = max(
            abs(x - y) for r in results.values() for x, y in zip(r["losses"], baseline, strict=True)
        )
        summary = report(results, loss_diff, args, out)
        if args.json:
            print(json.dumps(summary))
    if loss_diff > LOSS_TOLERANCE:
        print(f"FAIL: losses differ by {loss_diff:.2e} > {LOSS_TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
