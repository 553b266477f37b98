"""The embedded default: the whole fusion offline on this machine, through the Prefect flow.

Run: `make demo` (= `python -m flows.demo --out runs/demo`). Uses Prefect's local API (a
temporary server, or PREFECT_API_URL if set), local Ray actors for sampling and scoring, local
storage under --out, and the toy world's models and exact-verifier reward. After the flow, the
DPO baseline (alpha 0) trains on the same data and report.md compares Target, Target-SFT, DPO and
WRPO per skill (`wrpo demo` runs the same without Prefect and Ray).
"""

import argparse
import sys

from flows.fusion import fusion
from tasks.blocks import load_block_options
from wrpo_core.config import FusionConfig
from wrpo_core.demo import run_demo
from wrpo_core.pipeline import layout_for, load_summary


def run_with_flow(cfg: FusionConfig) -> dict[str, dict]:
    """Runs the fusion flow on `cfg`; returns each stage's summary (read back from the manifests)."""
    result = fusion(cfg)
    layout = layout_for(cfg, load_block=load_block_options)
    return {name: load_summary(layout, name) for name in result["stages"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="the smallest settings (seconds; smoke test)")
    parser.add_argument("--executor", choices=["ray", "inline"], default="ray",
                        help="sample and score on local Ray actors (default) or in the flow's process")  # fmt: skip
    args = parser.parse_args(argv)
    run_demo(args.out, quick=args.quick, executor=args.executor, runner=run_with_flow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
