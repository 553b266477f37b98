"""The source-model registry and the fused-model log, kept in storage next to the runs.

Ops people register a new source LLM with `wrpo sources add` instead of editing a config, or let
`wrpo sources discover` register new hub models and revisions (wrpo_core.discovery); a
re-fusion (the `wrpo-fusion/refusion` deployment, started by the event the CLI emits or by its
schedule) then fuses the config's sources plus the registered ones. Files, under the storage URL:

    registry/sources.json   {"version": N, "updated_at": ..., "sources": [ModelSpec, ...], "history": [...]}
    registry/fused/<digest of the run>.json   {run, model, sources, evaluation, ...}: one per fused model

Writes replace the whole object (atomic on local disks and object stores). Two `add`s at the
same instant can lose one; the registry is meant for a handful of operators.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wrpo_core.config import FusionConfig, ModelSpec
from wrpo_core.storage import BlockLoader, Storage, digest

SOURCES_KEY = "registry/sources.json"
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
    data = storage.read_bytes_if_exists(SOURCES_KEY)
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


def _write(
    storage: Storage, document: dict[str, Any], action: str, name: str, note: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    document["version"] += 1
    document["updated_at"] = _now()
    entry = {"version": document["version"], "action": action, "name": name, "at": _now()}
    document["history"].append({**entry, **(note or {})})
    storage.write_json(SOURCES_KEY, document)
    return document


def add_source(
    storage: Storage, spec: ModelSpec, *, replace: bool = False, note: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Registers a source model; a name already registered is an error unless `replace`.

    `note` adds fields to the history entry (discovery records its rule and the revision).
    """
    document = read_sources(storage)
    names = [s["name"] for s in document["sources"]]
    if spec.name in names and not replace:
        raise RegistryError(f"source {spec.name!r} is already registered (pass --replace to change it)")
    entry = spec.model_dump(mode="json")
    document["sources"] = [s for s in document["sources"] if s["name"] != spec.name] + [entry]
    return _write(storage, document, "replace" if spec.name in names else "add", spec.name, note)


def remove_source(storage: Storage, name: str) -> dict[str, Any]:
    """Unregisters a source model by name (sources written in a config are changed in the config)."""
    document = read_sources(storage)
    if name not in [s["name"] for s in document["sources"]]:
        raise RegistryError(
            f"source {name!r} is not registered; registered: {[s['name'] for s in document['sources']]}"
        )
    document["sources"] = [s for s in document["sources"] if s["name"] != name]
    return _write(storage, document, "remove", name)


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
