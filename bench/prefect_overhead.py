"""Orchestration overhead: the fusion flow (Prefect tasks + Ray actors) vs calling the stages directly.

Runs the same toy fusion config (every stage: ingest ... WRPO, evaluate, register) in fresh run
folders, in one process:
  baseline  `wrpo_core.pipeline.run_pipeline` (plain function calls, inline sampling),
  prefect   the `wrpo-fusion` flow with inline sampling (Prefect's overhead alone),
  prefect+ray the flow with `compute.executor: ray` (local Ray actors sample and score),
and prints each wall time and its ratio to the baseline, repeated `--repeats` times (Prefect's
temporary local API starts on the first flow call; that start is timed separately). The toy
world is built (or loaded from cache) and one untimed smallest-world pipeline warms the process
up before anything is timed.

Run: `.venv/bin/python bench/prefect_overhead.py [--preset smallest|demo] [--repeats 2]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wrpo_core import pipeline
from wrpo_core.config import FusionConfig
from wrpo_core.toy.paths import resolve_path, toy_fusion_parameters


def config(preset: str, root: Path, name: str, executor: str) -> FusionConfig:
    data = toy_fusion_parameters(preset)
    data.update(run_name=name, storage={"url": str(root)}, compute={"executor": executor, "device": "cpu"})
    return FusionConfig.model_validate(data)


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["smallest", "demo"], default="smallest")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    for item in ("prompts", "held-out", "target"):  # build the world before timing anything
        resolve_path(f"toy-world:{args.preset}/{item}")

    from prefect import flow

    from flows.fusion import fusion

    started = time.perf_counter()
    flow(lambda: None, name="warm-up")()  # starts Prefect's temporary local API once
    api_start = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="wrpo-warm-up-") as tmp:  # first model loads etc., untimed
        pipeline.run_pipeline(config("smallest", Path(tmp), "warm-up", "inline"), reuse=False)

    times: dict[str, list[float]] = {"baseline": [], "prefect": [], "prefect+ray": []}
    with tempfile.TemporaryDirectory(prefix="wrpo-bench-") as tmp:
        for repeat in range(args.repeats):
            for name in times:
                # reuse_other_runs off: every run samples for itself, as the baseline does.
                cfg = config(
                    args.preset, Path(tmp) / name, f"r{repeat}", "ray" if "ray" in name else "inline"
                )
                if name == "baseline":
                    seconds = timed(lambda c=cfg: pipeline.run_pipeline(c, reuse=False))
                else:
                    seconds = timed(lambda c=cfg: fusion(c, reuse_other_runs=False))
                times[name].append(seconds)
                print(f"repeat {repeat}: {name:12s} {seconds:7.1f} s", flush=True)
    base = statistics.median(times["baseline"])
    print(f"\nPrefect temporary API start (once per process): {api_start:.1f} s")
    print(f"{'runner':12s} {'median s':>9s} {'ratio vs baseline':>18s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:12s} {median:9.1f} {median / base:18.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
