"""Sampling and scoring throughput: batching, length-sorted scoring, Ray actor scaling, incremental sources.

Prints four ratios, each against a baseline measured in the same run (1 and 2: fastest of
REPEATS interleaved runs per side, after a warm-up run each):
1. batched HF sampling (n samples per prompt in one `generate`, length-grouped batches) vs one
   prompt at a time, in completion tokens/s;
2. batched, length-sorted reward scoring (a prompt's n responses share one pass over the prompt)
   vs batch size 1 (as the SimPO scripts score), samples/s;
3. 2 Ray actors vs 1 on the same shards (scaling efficiency = speed-up / 2), cold (a stage's own
   pool: start-up and model load timed) and warm (a pool whose actors loaded before timing);
4. adding one source to a run whose other sources are stored (only the new one is sampled) vs
   sampling every source again.

Run: `.venv/bin/python bench/sampling.py` (about 3-5 minutes on 2 cores; `--quick` for a smoke check).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow as pa
import torch
from transformers import LlamaForSequenceClassification

from wrpo_core.actor_pools import ActorPool, actor_options
from wrpo_core.config import ComputeConfig, ModelSpec, RewardModelSpec, SamplingConfig
from wrpo_core.fanout import SamplingWorker, plan_shards, run_shards, sample_model
from wrpo_core.prompts import prompt_id_of
from wrpo_core.rewards import SequenceClassifierScorer
from wrpo_core.sampling import HFSampler
from wrpo_core.storage import Storage
from wrpo_core.toy.skills import SKILLS, make_prompts
from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model, tiny_llama_config
from wrpo_core.toy.tokenizer import build_char_tokenizer

SIZE = {"hidden_size": 128, "num_layers": 2, "num_heads": 4}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


REPEATS = 3
"""Measures 1 and 2 time each side REPEATS times, interleaved, after one untimed warm-up call each,
and keep each side's fastest run: the machine is shared, and the first call of a process pays
one-off imports (pyarrow/pandas conversions) that would otherwise fall on whichever side runs first."""


def fastest(fns: dict[int, Callable[[], object]]) -> tuple[dict[int, object], dict[int, float]]:
    """Each function's result and its fastest of REPEATS timed runs, interleaved, after one warm-up run each."""
    results: dict[int, object] = {key: fn() for key, fn in fns.items()}
    seconds = {key: float("inf") for key in fns}
    for _ in range(REPEATS):
        for key, fn in fns.items():
            results[key], elapsed = timed(fn)
            seconds[key] = min(seconds[key], elapsed)
    return results, seconds


def bench_batching(model_dir: str, prompts: list[str], n: int, max_new_tokens: int) -> dict:
    """Completion tokens/s: all prompts in one `generate` (batch 64 prompts x n samples) vs one prompt at a time."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0, **SIZE).eval()
    sampling = SamplingConfig(n=n, max_new_tokens=max_new_tokens, temperature=0.8)
    ids = [prompt_id_of(p) for p in prompts]
    samplers = {
        batch_size: HFSampler(model, tokenizer, "m", sampling, batch_size=batch_size, progress=False)
        for batch_size in (64, 1)
    }
    results, seconds = fastest({size: (lambda s=s: s.sample(ids, prompts)) for size, s in samplers.items()})
    rates = {size: results[size][1].completion_tokens / seconds[size] for size in samplers}
    return {
        "batched_tok_s": rates[64],
        "one_at_a_time_tok_s": rates[1],
        "ratio": rates[64] / rates[1],
        "batched_s": seconds[64],
        "one_at_a_time_s": seconds[1],
        "tokens": results[64][1].completion_tokens,
    }


def bench_scoring(out: Path, prompts: list[str], responses: list[str]) -> dict:
    """Samples/s: length-sorted batches of 32 (a prompt's n responses share its prefix) vs batch size 1."""
    tokenizer = build_char_tokenizer()
    config = tiny_llama_config(tokenizer, hidden_size=256, num_layers=4, num_heads=8)
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out / "rm")
    tokenizer.save_pretrained(out / "rm")
    scorers = {
        size: SequenceClassifierScorer(RewardModelSpec(path=str(out / "rm"), batch_size=size), progress=False)
        for size in (32, 1)
    }
    scores, seconds = fastest(
        {size: (lambda s=s: s.score(prompts, responses)) for size, s in scorers.items()}
    )
    rates = {size: len(prompts) / seconds[size] for size in scorers}
    diff = max(abs(a - b) for a, b in zip(scores[32], scores[1], strict=True))
    return {
        "batched_samples_s": rates[32],
        "one_at_a_time_samples_s": rates[1],
        "ratio": rates[32] / rates[1],
        "max_score_diff": diff,
        "batched_s": seconds[32],
        "one_at_a_time_s": seconds[1],
    }


def prompts_table(prompts: list[str]) -> pa.Table:
    return pa.table({"prompt_id": [prompt_id_of(p) for p in prompts], "prompt": prompts})


def _run_call(actor, shard):
    return actor.run.remote(shard)


def bench_actors(
    model_dir: str, prompts: pa.Table, out: Path, shard_size: int, n: int, max_new_tokens: int
) -> dict:
    """2 actors vs 1 on the same shards: cold (actor start-up and model load inside the time, as one
    stage's own pool pays) and warm (a pool whose actors have loaded, as the run's shared pools serve
    later stages)."""
    import ray

    spec = ModelSpec(path=model_dir, name="m", sampling={"n": n, "max_new_tokens": max_new_tokens})
    cold, warm = {}, {}
    compute = ComputeConfig()  # the actor shape sample_model gives the cold side
    for actors in (1, 2):
        storage = (str(out / f"actors-{actors}"), {})
        _, cold[actors] = timed(
            lambda a=actors, st=storage: sample_model(
                spec, prompts, st, "samples/m", ComputeConfig(), shard_size=shard_size, num_actors=a
            )
        )
        worker = ray.remote(SamplingWorker).options(**actor_options(spec, compute))
        table, root = ray.put(prompts), str(out / f"warm-{actors}")
        pool = ActorPool(
            lambda w=worker, t=table, r=root: w.remote(
                spec, t, (r, {}), device="cpu", num_cpus=compute.num_cpus_per_actor
            ),
            actors,
        )
        storage_now = Storage.open(root)
        warm_up = plan_shards(actors * shard_size, shard_size, "warm-up")  # one shard per actor: each loads
        run_shards(pool, storage_now, warm_up, _run_call)
        shards = plan_shards(prompts.num_rows, shard_size, "samples/m")
        _, warm[actors] = timed(lambda p=pool, st=storage_now, sh=shards: run_shards(p, st, sh, _run_call))
        pool.release()
    return {
        "one_actor_s": cold[1],
        "two_actors_s": cold[2],
        "speedup": cold[1] / cold[2],
        "efficiency": cold[1] / cold[2] / 2,
        "warm_one_actor_s": warm[1],
        "warm_two_actors_s": warm[2],
        "warm_speedup": warm[1] / warm[2],
    }


def bench_incremental(
    models: dict[str, str], prompts: pa.Table, out: Path, shard_size: int, n: int, max_new_tokens: int
) -> dict:
    def sample(names: list[str], root: Path) -> None:
        for name in names:
            spec = ModelSpec(
                path=models[name], name=name, sampling={"n": n, "max_new_tokens": max_new_tokens}
            )
            sample_model(spec, prompts, (str(root), {}), f"samples/{name}", ComputeConfig(),
                         shard_size=shard_size, num_actors=2)  # fmt: skip

    names = list(models)
    sample(names[:-1], out / "incremental")  # the run as it was before the new source was registered
    _, incremental = timed(lambda: sample(names, out / "incremental"))  # stored shards are skipped
    _, everything = timed(lambda: sample(names, out / "fresh"))
    return {"incremental_s": incremental, "all_again_s": everything, "ratio": everything / incremental}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompts_n, n, new_tokens = (24, 2, 8) if args.quick else (192, 4, 16)
    rows = make_prompts(list(SKILLS), prompts_n, seed=0)
    prompts = [r["prompt"] for r in rows]
    out = Path(tempfile.mkdtemp(prefix="bench-sampling-"))
    tokenizer = build_char_tokenizer()
    models = {
        f"src-{i}": save_tiny_model(build_tiny_llama(tokenizer, seed=i, **SIZE), tokenizer, out / f"m{i}")
        for i in range(4)
    }
    table = prompts_table(prompts)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {
        "batching": bench_batching(models["src-0"], prompts[: max(8, prompts_n // 4)], n, new_tokens),
        "scoring": bench_scoring(
            out, prompts * n, [r["answer"] * (1 + i % 5) for i, r in enumerate(rows * n)]
        ),
        "actors": bench_actors(models["src-0"], table, out, max(4, prompts_n // 8), n, new_tokens),
        "incremental": bench_incremental(models, table, out, max(4, prompts_n // 8), n, new_tokens),
    }
    ray.shutdown()
    b, s, a, i = results["batching"], results["scoring"], results["actors"], results["incremental"]
    print(
        f"prompts {prompts_n}, n {n}, max_new_tokens {new_tokens}, cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}"
    )
    print(f"1. batched sampling vs one prompt at a time: {b['batched_tok_s']:.0f} vs {b['one_at_a_time_tok_s']:.0f} tok/s "
          f"-> {b['ratio']:.1f}x ({b['tokens']} tokens in {b['batched_s']:.3f} s vs {b['one_at_a_time_s']:.3f} s)")  # fmt: skip
    print(f"2. length-sorted batched scoring vs batch 1: {s['batched_samples_s']:.0f} vs {s['one_at_a_time_samples_s']:.0f} samples/s "
          f"-> {s['ratio']:.1f}x (max |score diff| {s['max_score_diff']:.1e}; {s['batched_s']:.2f} s vs "
          f"{s['one_at_a_time_s']:.2f} s)")  # fmt: skip
    print(f"3. 2 Ray actors vs 1, cold (start-up and model load timed): {a['two_actors_s']:.1f} s vs {a['one_actor_s']:.1f} s "
          f"-> speed-up {a['speedup']:.2f}x, efficiency {a['efficiency']:.0%}; warm pool (loaded before timing): "
          f"{a['warm_two_actors_s']:.1f} s vs {a['warm_one_actor_s']:.1f} s -> speed-up {a['warm_speedup']:.2f}x")  # fmt: skip
    print(
        f"4. one added source vs all sources again: {i['incremental_s']:.1f} s vs {i['all_again_s']:.1f} s -> {i['ratio']:.1f}x"
    )


if __name__ == "__main__":
    main()
