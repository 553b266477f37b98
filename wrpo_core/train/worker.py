"""The entry point of every torchrun worker process: one rank's part of a launched training job.

`torchrun_command` starts `python -m wrpo_core.train.worker train STAGE --config FILE` on every
rank; `launch_local` runs `... reference --config FILE` in one process before a WRPO job on
several. A worker loads the job config, calls `train_in_process` or `store_reference` directly,
prints a user error (a bad config or data) as `error: ...` with exit code 2 as the `wrpo` CLI
does, and ends through `exit_without_teardown`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys
from typing import NoReturn

from wrpo_core.config import ConfigError, SFTJobConfig, WRPOJobConfig, load_config
from wrpo_core.schemas import DataError
from wrpo_core.train.jobs import reference_job, train_in_process

WORKER_MODULE = "wrpo_core.train.worker"
"""What torchrun runs in each worker process: this module (`run_torchrun_worker`)."""


def build_parser() -> argparse.ArgumentParser:
    """`train STAGE --config FILE` or `reference --config FILE`."""
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one stage in this process (one rank of the job)")
    train.add_argument("stage", choices=["sft", "wrpo"])
    train.add_argument("--config", required=True, help="the job's YAML (SFTJobConfig or WRPOJobConfig)")
    reference = commands.add_parser("reference", help="only store a WRPO job's reference log-probs")
    reference.add_argument("--config", required=True, help="the job's YAML (a WRPOJobConfig)")
    return parser


def run_worker(argv: list[str]) -> int:
    """Runs one worker's command (see `build_parser`), prints its summary as JSON; the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "train":
            job = load_config(args.config, SFTJobConfig if args.stage == "sft" else WRPOJobConfig)
            result = train_in_process(args.stage, job)
        else:
            result = reference_job(load_config(args.config, WRPOJobConfig), where=args.config)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


def run_torchrun_worker(argv: list[str]) -> NoReturn:
    """Entry point of every torchrun worker: runs `run_worker(argv)` here, then ends the process.

    A worker that returns ends through `exit_without_teardown`, not the interpreter's shutdown.
    An exception that escapes is recorded for torchrun's failure summary (`record`) and ends the
    process as usual.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    exit_without_teardown(record(run_worker)(argv) or 0)


def exit_without_teardown(code: int) -> NoReturn:
    """Ends this process with `code` like sys.exit does, minus the interpreter's own teardown.

    The atexit handlers run (logging flushes its handlers) and stdout/stderr are flushed while
    every thread can still run; then os._exit ends all threads at once.

    Why: in the interpreter's shutdown, a gloo work thread may still be releasing the tensors of
    a finished collective, which takes the GIL; Python (before 3.14) ends a thread that asks for
    the GIL while it finalizes with pthread_exit, whose unwind through a noexcept destructor calls
    std::terminate, and the worker dies of SIGABRT ("terminate called without an active
    exception") after it trained and saved everything. destroy_process_group() does not prevent
    it: DeepSpeed's ZeRO-3 objects keep the groups, and so their threads, alive until the
    interpreter's teardown.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # a torchrun worker (see torchrun_command)
    run_torchrun_worker(sys.argv[1:])
