"""The source-model registry and the fused-model log, kept in storage next to the runs.

Ops people register a new source LLM with `wrpo sources add` instead of editing a config, or let
`wrpo sources discover` register new hub models and revisions (wrpo_core.discovery); a
re-fusion (the `wrpo-fusion/refusion` deployment, started by the event the CLI emits or by its
schedule) then fuses the config's sources plus the registered ones. Files, under the storage URL:

    registry/sources.json   {"version": N, "updated_at": ..., "sources": [ModelSpec, ...], "history": [...]}
    registry/fused/<digest of the run>.json   {run, model, sources, evaluation, ...}: one per fused model

Every change is a compare-and-swap (`storage.write_if`: a lock file on local disks, conditional
writes on S3): it is written only if `sources.json` is still the one it was computed from, else it
is computed again from the new one. So concurrent `add`s never lose a registration and every
change gets its own version number.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wrpo_core.config import FusionConfig, ModelSpec
from wrpo_core.storage import BlockLoader, ConditionFailed, Storage, digest, read_tagged, write_if

SOURCES_KEY = "registry/sources.json"
MAX_ATTEMPTS = 100
"""Tries of one change while other processes keep changing the registry first."""
FUSED_PREFIX = "registry/fused"


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown or duplicate name, a corrupt file)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def open_registry(
    url: str, storage_options: Mapping[str, Any] | None = None, *, load_block: BlockLoader | None = None
) -> Storage:
    """The storage that holds the registry: the fusion config's `storage.url` (local paths made absolute).

    Absolute, so the registry's name in events (`storage.display()`) is the same from any folder.
    `load_block` reads a Prefect block named by the option `prefect_block` (see wrpo_core.storage).
    """
    if "://" not in url:
        url = str(Path(url).expanduser().resolve())
    return Storage.open(url, storage_options, load_block=load_block)


def read_sources(storage: Storage) -> dict[str, Any]:
    """The registry document (an empty one, version 0, when nothing was registered yet)."""
    return _parse(storage, storage.read_bytes_if_exists(SOURCES_KEY))


def _parse(storage: Storage, data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {"version": 0, "updated_at": None, "sources": [], "history": []}
    try:
        document = json.loads(data)
        document.setdefault("history", [])
        document["sources"] = [
            ModelSpec.model_validate(s).model_dump(mode="json") for s in document["sources"]
        ]
    except (ValueError, KeyError, TypeError, ValidationError) as error:
        raise RegistryError(
            f"{storage.display(SOURCES_KEY)}: not a valid source registry: {error}"
        ) from error
    return document


def registered_sources(storage: Storage) -> list[ModelSpec]:
    return [ModelSpec.model_validate(s) for s in read_sources(storage)["sources"]]


def _change(
    storage: Storage,
    change: Callable[[dict[str, Any]], tuple[str, str]],
    note: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Applies `change` (document -> (action, name), or RegistryError) as one compare-and-swap.

    When another process changed the registry in between, the change is made again on its
    version (so a duplicate name it registered is still refused).
    """
    for _ in range(MAX_ATTEMPTS):
        data, tag = read_tagged(storage, SOURCES_KEY)
        document = _parse(storage, data)
        action, name = change(document)
        document["version"] += 1
        document["updated_at"] = _now()
        entry = {"version": document["version"], "action": action, "name": name, "at": _now()}
        document["history"].append({**entry, **(note or {})})
        text = storage.redact(json.dumps(document, indent=2, sort_keys=True, default=str))
        try:
            write_if(storage, SOURCES_KEY, text.encode(), tag)
        except ConditionFailed:
            time.sleep(random.uniform(0.01, 0.1))  # another change won; redo ours on top of it
            continue
        return document
    raise RegistryError(
        f"{storage.display(SOURCES_KEY)}: other processes changed the registry {MAX_ATTEMPTS} times "
        "while this change was made; try again"
    )


def add_source(
    storage: Storage, spec: ModelSpec, *, replace: bool = False, note: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Registers a source model; a name already registered is an error unless `replace`.

    `note` adds fields to the history entry (discovery records its rule and the revision).
    """

    def change(document: dict[str, Any]) -> tuple[str, str]:
        names = [s["name"] for s in document["sources"]]
        if spec.name in names and not replace:
            raise RegistryError(f"source {spec.name!r} is already registered (pass --replace to change it)")
        entry = spec.model_dump(mode="json")
        document["sources"] = [s for s in document["sources"] if s["name"] != spec.name] + [entry]
        return ("replace" if spec.name in names else "add"), spec.name

    return _change(storage, change, note)


def remove_source(storage: Storage, name: str) -> dict[str, Any]:
    """Unregisters a source model by name (sources written in a config are changed in the config)."""

    def change(document: dict[str, Any]) -> tuple[str, str]:
        if name not in [s["name"] for s in document["sources"]]:
            raise RegistryError(
                f"source {name!r} is not registered; registered: {[s['name'] for s in document['sources']]}"
            )
        document["sources"] = [s for s in document["sources"] if s["name"] != name]
        return "remove", name

    return _change(storage, change)


def with_registered_sources(cfg: FusionConfig, sources: list[ModelSpec]) -> FusionConfig:
    """The config fusing its own sources plus the registered ones, as a run of its own.

    A registered source with the name of a config source replaces it. The run is named
    `<run_name>-sources-<digest of the source list>`, so the same sources resume the same run and
    a new source set starts a new one (which reuses the stored samples of unchanged sources).
    """
    merged = {s.name: s for s in cfg.sources}
    merged.update({s.name: s for s in sources})
    specs = list(merged.values())
    tag = digest([s.model_dump(mode="json") for s in specs])[:10]
    data = cfg.model_dump(mode="json")
    data.update(run_name=f"{cfg.run_name}-sources-{tag}", sources=[s.model_dump(mode="json") for s in specs])
    return FusionConfig.model_validate(data)


def fused_record_key(run: str) -> str:
    """Where the fused model of run `run` (its storage URL) is recorded."""
    return f"{FUSED_PREFIX}/{digest(run)[:16]}.json"


def record_fused_model(storage: Storage, record: Mapping[str, Any]) -> dict[str, Any]:
    """Writes a fused model's record (one file per run, so concurrent runs never overwrite each other)."""
    entry = {**record, "registered_at": _now()}
    storage.write_json(fused_record_key(str(entry["run"])), entry)
    return entry


def fused_models(storage: Storage) -> list[dict[str, Any]]:
    """Every fused model recorded, oldest first."""
    records = []
    for key in storage.list_files(FUSED_PREFIX):
        try:
            records.append(storage.read_json(key))
        except ValueError as error:
            raise RegistryError(f"{storage.display(key)}: not a fused-model record: {error}") from error
    return sorted(records, key=lambda r: r.get("registered_at", ""))
