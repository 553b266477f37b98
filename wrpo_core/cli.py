"""The `wrpo` command line.

wrpo train sft  --config sft-job.yaml     # Target-SFT on (x, y_ws)
wrpo train wrpo --config wrpo-job.yaml    # WRPO on (x, y_ws, y_wt, y_l)
wrpo reference  --config wrpo-job.yaml    # only store reference log-probs with the quadruples
wrpo config check FILE                    # validate a fusion-run config
wrpo config json FILE                     # ... and print it as JSON (prefect --param config=...)
wrpo config check|json --rules FILE       # the same for discovery watch rules (--param discovery=...)
wrpo export --to authors|trl QUADRUPLES.parquet OUT.jsonl
wrpo demo [--out DIR]                     # the whole pipeline offline on tiny models
wrpo run --config fusion.yaml [--registry] # the fusion pipeline in this process (no Prefect)
wrpo sources add NAME PATH [--storage URL] # register a source model (emits a Prefect event)
wrpo sources list|remove NAME [--storage URL]
wrpo sources discover --config fusion.yaml --rules discovery.yaml [--dry-run]   # new hub models -> registry

The installed `wrpo` command is `flows.cli:main`: this CLI with the Prefect layer's `CliHooks`
(registry events, Prefect-block credentials) plugged in; `python -m wrpo_core.cli` runs it without.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec

from wrpo_core.config import (
    ConfigError,
    DiscoveryConfig,
    FusionConfig,
    SFTJobConfig,
    WRPOJobConfig,
    config_json,
    load_config,
)
from wrpo_core.config.base import parse_config
from wrpo_core.config.training import planned_global_batch
from wrpo_core.registry import RegistryError
from wrpo_core.schemas import DataError, file_not_found
from wrpo_core.storage import BlockLoader, StorageError
from wrpo_core.train.jobs import TrainingJobError, inside_launched_job, reference_job, train_in_process
from wrpo_core.train.launch import launch_job


class CommandError(RuntimeError):
    """A command that failed for a reason its message explains (e.g. a pipeline stage)."""


class UserInputError(CommandError):
    """A command refused because of what the user gave it (a file, a name, a format): exit code 2."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, RegistryError, StorageError, UserInputError,
)  # fmt: skip
"""Errors whose message tells the user what to fix: printed as `error: ...`, exit code 2, no traceback."""

_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
"""OS errors about a path the user named: reported with the path, exit code 2 (other OS errors keep the
traceback: they are not the user's input)."""


RegistryEventSender = Callable[[str, str, str, str, int], Any]
"""Sends a registry change (action, source name, path, registry URL, version); returns the event."""


@dataclass(frozen=True)
class CliHooks:
    """What the orchestration layer plugs into the CLI; wrpo_core itself never imports Prefect."""

    load_block: BlockLoader | None = None
    """Reads the storage options of a Prefect block (storage option `prefect_block`)."""
    send_registry_event: RegistryEventSender | None = None
    """Emits `wrpo.source.<action>` so the re-fusion deployment's trigger starts a run."""


def _train(args: argparse.Namespace, hooks: CliHooks) -> dict:
    job = load_config(args.config, SFTJobConfig if args.stage == "sft" else WRPOJobConfig)
    if job.launch is None or inside_launched_job():
        return train_in_process(args.stage, job)
    result = launch_job(
        args.stage, job, config_path=args.config, on_log=lambda line: print(line, file=sys.stderr)
    )
    return result.summary


def _reference(args: argparse.Namespace, hooks: CliHooks) -> dict:
    return reference_job(load_config(args.config, WRPOJobConfig), where=args.config)


def _config_check(args: argparse.Namespace, hooks: CliHooks) -> dict:
    if args.rules:
        rules = load_config(args.file, DiscoveryConfig)
        return {"ok": True, "watch": [rule.name for rule in rules.watch]}
    cfg = load_config(args.file, FusionConfig)
    return {
        "ok": True,
        "sources": [s.name for s in cfg.sources],
        "target": cfg.target.name,
        # Examples per optimizer step as the run will launch its jobs (the paper's: 128 and 128).
        "global_batch": {
            "sft": planned_global_batch(cfg.sft, cfg.launch),
            "wrpo": planned_global_batch(cfg.wrpo, cfg.launch),
        },
    }


def _config_json(args: argparse.Namespace, hooks: CliHooks) -> None:
    """Prints the validated config as one line of JSON (for `prefect deployment run --param config=...`).

    A config holding a credential is refused (Prefect stores and shows flow parameters).
    """
    print(
        config_json(load_config(args.file, DiscoveryConfig if args.rules else FusionConfig), where=args.file)
    )


def _export(args: argparse.Namespace, hooks: CliHooks) -> dict:
    from wrpo_core.formats import to_authors_records, to_trl_records, write_jsonl
    from wrpo_core.schemas import QUADRUPLES, read_parquet

    fs, path = fsspec.core.url_to_fs(args.quadruples)
    if not fs.isfile(path):
        raise file_not_found(args.quadruples, "quadruples Parquet file")
    table = read_parquet(args.quadruples, QUADRUPLES)
    records = to_authors_records(table) if args.to == "authors" else to_trl_records(table)
    write_jsonl(records, args.out)
    return {"rows": len(records), "out": args.out, "format": args.to}


def _demo(args: argparse.Namespace, hooks: CliHooks) -> dict:
    from wrpo_core.demo import run_demo

    return run_demo(args.out, quick=args.quick)


def _run(args: argparse.Namespace, hooks: CliHooks) -> dict:
    from wrpo_core.pipeline import StageError, layout_for, run_pipeline
    from wrpo_core.registry import open_registry, registered_sources, with_registered_sources

    cfg = load_config(args.config, FusionConfig)
    if args.registry:
        registry = open_registry(cfg.storage.url, cfg.storage.storage_options, load_block=hooks.load_block)
        cfg = with_registered_sources(cfg, registered_sources(registry))
    layout = layout_for(cfg, load_block=hooks.load_block)
    try:
        summaries = run_pipeline(cfg, layout=layout, break_lease=args.break_lease)
    except StageError as error:
        # A stage refused the user's input (prompt file, data, config): exit 2, like the other commands.
        user = isinstance(error.__cause__, (ConfigError, DataError))
        raise (UserInputError if user else CommandError)(str(error)) from error
    return {
        "run": layout.storage.display(),
        "stages": list(summaries),
        "register": summaries["register"],
    }


def _registry_storage(args: argparse.Namespace, hooks: CliHooks):
    from wrpo_core.registry import open_registry

    if args.config:
        cfg = load_config(args.config, FusionConfig)
        return open_registry(cfg.storage.url, cfg.storage.storage_options, load_block=hooks.load_block)
    return open_registry(args.storage, load_block=hooks.load_block)


def _notify(
    args: argparse.Namespace, hooks: CliHooks, action: str, name: str, path: str, storage, version: int
) -> str:
    """Emits the registry event to Prefect (per --event); returns what happened, for the output."""
    if args.event == "never":
        return "not sent (--event never)"
    if not os.environ.get("PREFECT_API_URL"):
        if args.event == "auto":
            return "not sent: PREFECT_API_URL is not set (a scheduled re-fusion picks the change up)"
        raise CommandError(f"registry updated (version {version}), but --event always needs PREFECT_API_URL")
    if hooks.send_registry_event is None:
        raise CommandError(
            f"registry updated (version {version}), but this command cannot send Prefect events: use the "
            "installed `wrpo` command (flows.cli), which plugs in the Prefect layer"
        )
    try:
        event = hooks.send_registry_event(action, name, path, storage.display(), version)
    except ImportError as error:
        raise CommandError(
            f"registry updated (version {version}), but the event needs Prefect: {error}; "
            "pip install 'wrpo-fusion[orchestration]'"
        ) from error
    except Exception as error:
        raise CommandError(
            f"registry updated (version {version}), but the event was not sent: {error}. Start the "
            "re-fusion by hand (prefect deployment run 'wrpo-fusion/refusion') or let its schedule do it"
        ) from error
    return f"sent {event.event} ({event.id})"


def _sources(args: argparse.Namespace, hooks: CliHooks) -> dict:
    from wrpo_core.config import ModelSpec
    from wrpo_core.registry import add_source, read_sources, remove_source

    storage = _registry_storage(args, hooks)
    if args.sources_command == "list":
        document = read_sources(storage)
        return {"registry": storage.display(), "version": document["version"], "sources": document["sources"]}
    if args.sources_command == "add":
        sampling = {
            k: v for k, v in (("n", args.n), ("max_new_tokens", args.max_new_tokens)) if v is not None
        }
        spec = parse_config(
            {
                "name": args.name,
                "path": args.path,
                "backend": args.backend,
                "revision": args.revision,
                "trust_remote_code": args.trust_remote_code,
                "tensor_parallel_size": args.tensor_parallel_size,
                "sampling": sampling,
            },
            ModelSpec,
            where=f"wrpo sources add {args.name!r}",
        )
        document = add_source(storage, spec, replace=args.replace)
        event = _notify(args, hooks, "added", spec.name, spec.path, storage, document["version"])
    else:
        document = remove_source(storage, args.name)
        event = _notify(args, hooks, "removed", args.name, "", storage, document["version"])
    return {"registry": storage.display(), "version": document["version"], "event": event,
            "sources": [s["name"] for s in document["sources"]]}  # fmt: skip


def _discover(args: argparse.Namespace, hooks: CliHooks) -> dict:
    """Registers the new hub models and revisions the config's watch rules accept; one event per source."""
    from wrpo_core.discovery import discover_sources
    from wrpo_core.hub import HubError
    from wrpo_core.registry import open_registry

    cfg = load_config(args.config, FusionConfig)
    rules = load_config(args.rules, DiscoveryConfig)
    storage = open_registry(cfg.storage.url, cfg.storage.storage_options, load_block=hooks.load_block)
    try:
        report = discover_sources(cfg, rules, storage, dry_run=args.dry_run)
    except HubError as error:
        raise CommandError(str(error)) from error
    result = report.to_dict()
    print(f"discovery: {len(report.registered)} {'to register' if args.dry_run else 'registered'}, "
          f"{len(report.unchanged)} unchanged, {len(report.rejected)} rejected", file=sys.stderr)  # fmt: skip
    if not args.dry_run:
        result["events"] = [
            _notify(args, hooks, "added", r.spec.name, r.spec.path, storage, r.version)
            for r in report.registered
        ]
    return result


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
    as_json = config_commands.add_parser("json", help="print a fusion-run config as JSON (validated)")
    for sub in (check, as_json):
        sub.add_argument("file")
        sub.add_argument("--rules", action="store_true",
                         help="the file is discovery watch rules (DiscoveryConfig), not a fusion-run config")  # fmt: skip
    check.set_defaults(handler=_config_check)
    as_json.set_defaults(handler=_config_json)

    export = commands.add_parser("export", help="export quadruples to the authors' or TRL's JSONL format")
    export.add_argument("--to", choices=["authors", "trl"], required=True)
    export.add_argument("quadruples")
    export.add_argument("out")
    export.set_defaults(handler=_export)

    demo = commands.add_parser("demo", help="run the whole pipeline offline on tiny models")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="the smallest settings (seconds; for smoke tests)")
    demo.set_defaults(handler=_demo)

    run = commands.add_parser("run", help="run the fusion pipeline of a config in this process (no Prefect)")
    run.add_argument("--config", required=True, help="FusionConfig YAML")
    run.add_argument("--registry", action="store_true", help="also fuse the sources registered in storage")
    run.add_argument(
        "--break-lease", action="store_true",
        help="take the run folder's lease even if another run holds it (only when that run is gone)",
    )  # fmt: skip
    run.set_defaults(handler=_run)

    sources = commands.add_parser("sources", help="the source-model registry (in storage)")
    sources_commands = sources.add_subparsers(dest="sources_command", required=True)
    for name, text in (("add", "register a source model"), ("list", "show the registry"),
                       ("remove", "unregister a source model")):  # fmt: skip
        sub = sources_commands.add_parser(name, help=text)
        where = sub.add_mutually_exclusive_group()
        where.add_argument("--storage", default=os.environ.get("WRPO_STORAGE", "./runs"),
                           help="storage URL holding registry/ (default $WRPO_STORAGE or ./runs)")  # fmt: skip
        where.add_argument("--config", help="take the storage URL and options from this FusionConfig YAML")
        if name != "list":
            sub.add_argument("name", help="the source's name (unique; used in sample keys)")
            sub.add_argument("--event", choices=["auto", "always", "never"], default="auto",
                             help="emit a Prefect event (auto: when PREFECT_API_URL is set)")  # fmt: skip
        if name == "add":
            sub.add_argument(
                "path", help="Hugging Face hub id or local folder (or toy-world:<preset>/<name>)"
            )
            sub.add_argument("--backend", choices=["hf", "vllm"], default="hf")
            sub.add_argument("--revision")
            sub.add_argument("--n", type=int, help="responses sampled per prompt (default 5, the paper's)")
            sub.add_argument("--max-new-tokens", type=int, help="response length limit (default 2048)")
            sub.add_argument("--tensor-parallel-size", type=int, default=1)
            sub.add_argument("--trust-remote-code", action="store_true")
            sub.add_argument("--replace", action="store_true", help="change an already registered source")
        sub.set_defaults(handler=_sources)
    discover = sources_commands.add_parser(
        "discover", help="register the new hub models and revisions the config's watch rules accept"
    )
    discover.add_argument("--config", required=True,
                          help="the re-fusion's FusionConfig YAML: its storage holds the registry, its sources count as known")  # fmt: skip
    discover.add_argument(
        "--rules", required=True, help="DiscoveryConfig YAML: the watch rules and the sampling cluster"
    )
    discover.add_argument("--dry-run", action="store_true",
                          help="list what would be registered; register nothing, send no event")  # fmt: skip
    discover.add_argument("--event", choices=["auto", "always", "never"], default="auto",
                          help="emit wrpo.source.added per registered source (auto: when PREFECT_API_URL is set)")  # fmt: skip
    discover.set_defaults(handler=_discover)
    return parser


def main(argv: list[str] | None = None, *, hooks: CliHooks | None = None) -> int:
    """Runs one `wrpo` command; `hooks` plug in the orchestration layer (see `CliHooks`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = args.handler(args, hooks or CliHooks())
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except _PATH_ERRORS as error:
        path = error.filename if error.filename is not None else ""
        print(f"error: {path}{': ' if path else ''}{error.strerror or error}", file=sys.stderr)
        return 2
    except (
        TrainingJobError,
        CommandError,
    ) as error:  # a launched job failed; its own output was streamed above
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
