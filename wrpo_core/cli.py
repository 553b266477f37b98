"""The `wrpo` command line.

wrpo train sft  --config sft-job.yaml     # Target-SFT on (x, y_ws)
wrpo train wrpo --config wrpo-job.yaml    # WRPO on (x, y_ws, y_wt, y_l)
wrpo reference  --config wrpo-job.yaml    # only store reference log-probs with the quadruples
wrpo config check FILE                    # validate a fusion-run config
wrpo export --to authors|trl QUADRUPLES.parquet OUT.jsonl
wrpo demo [--out DIR]                     # the whole pipeline offline on tiny models
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from wrpo_core.config import ConfigError, FusionConfig, SFTJobConfig, WRPOJobConfig, load_config
from wrpo_core.schemas import DataError
from wrpo_core.train.launch import TrainingJobError, inside_launched_job, launch_job, train_in_process


def _train(args: argparse.Namespace) -> dict:
    job = load_config(args.config, SFTJobConfig if args.stage == "sft" else WRPOJobConfig)
    if job.launch is None or inside_launched_job():
        return train_in_process(args.stage, job)
    result = launch_job(
        args.stage, job, config_path=args.config, on_log=lambda line: print(line, file=sys.stderr)
    )
    return result.summary


def _reference(args: argparse.Namespace) -> dict:
    from wrpo_core.reference import REFERENCE_FILE
    from wrpo_core.train.common import load_tokenizer
    from wrpo_core.train.wrpo import load_quadruples, prepare_reference

    job = load_config(args.config, WRPOJobConfig)
    if not job.training.precompute_reference:
        raise ConfigError(f"{args.config}: training.precompute_reference is false; nothing to precompute")
    logps = prepare_reference(job, load_quadruples(job.data), load_tokenizer(job.model))
    return {"rows": len(logps), "stored": f"{job.output_dir}/{REFERENCE_FILE}"}


def _config_check(args: argparse.Namespace) -> dict:
    cfg = load_config(args.file, FusionConfig)
    return {"ok": True, "sources": [s.name for s in cfg.sources], "target": cfg.target.name}


def _export(args: argparse.Namespace) -> dict:
    from wrpo_core.formats import to_authors_records, to_trl_records, write_jsonl
    from wrpo_core.schemas import QUADRUPLES, read_parquet

    table = read_parquet(args.quadruples, QUADRUPLES)
    records = to_authors_records(table) if args.to == "authors" else to_trl_records(table)
    write_jsonl(records, args.out)
    return {"rows": len(records), "out": args.out, "format": args.to}


def _demo(args: argparse.Namespace) -> dict:
    from wrpo_core.demo import run_demo

    return run_demo(args.out, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wrpo", description="Implicit model fusion with WRPO.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run a training job from a YAML config")
    train.add_argument("stage", choices=["sft", "wrpo"])
    train.add_argument("--config", required=True, help="SFTJobConfig / WRPOJobConfig YAML (any fsspec URL)")
    train.set_defaults(handler=_train)

    reference = commands.add_parser("reference", help="compute and store reference log-probs for a WRPO job")
    reference.add_argument("--config", required=True)
    reference.set_defaults(handler=_reference)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a fusion-run config")
    check.add_argument("file")
    check.set_defaults(handler=_config_check)

    export = commands.add_parser("export", help="export quadruples to the authors' or TRL's JSONL format")
    export.add_argument("--to", choices=["authors", "trl"], required=True)
    export.add_argument("quadruples")
    export.add_argument("out")
    export.set_defaults(handler=_export)

    demo = commands.add_parser("demo", help="run the whole pipeline offline on tiny models")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="the smallest settings (seconds; for smoke tests)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `wrpo` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = args.handler(args)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingJobError as error:  # a launched job failed; its own output was streamed above
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
