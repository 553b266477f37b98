"""The stage runner: runs a stage unless it is done, records it in a manifest, and names failures.

A stage writes its outputs under deterministic keys and its manifest `manifests/<name>.json`
LAST (see wrpo_core.storage.layout), so it counts as done only once all of its outputs are
complete. `run_stage_outcome` skips a stage that is done with the same settings (its `key`) and
inputs, runs it again when either changed, and copies it from another run under the same
storage when that run holds the same result ("reused"). Every failure becomes a `StageError`
naming the stage and its model, marked permanent (bad config or data: retrying cannot help) or
possibly transient (retried by the flow).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from wrpo_core.config import FusionConfig, redacted_config_data
from wrpo_core.failures import is_permanent
from wrpo_core.storage import ManifestError, RunLayout, Storage, digest

logger = logging.getLogger(__name__)


def config_hash(cfg: FusionConfig) -> str:
    """Short hash of what a run's results depend on: the config without run name, storage, compute."""
    return digest(cfg.model_dump(mode="json", exclude={"run_name", "storage", "compute"}))


def redacted_config(cfg: FusionConfig) -> dict[str, Any]:
    """The config as a plain dict with every credential (storage options, launch env, URL passwords) masked."""
    return redacted_config_data(cfg)


def load_summary(layout: RunLayout, stage: str) -> dict:
    """The summary a completed stage recorded in its manifest."""
    manifest = layout.read_manifest(stage)
    if manifest is None:
        raise ManifestError(f"stage {stage} of {layout.storage.display()} has not completed")
    return manifest["summary"]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: its name, how to run it, and what its result depends on."""

    name: str
    run: Callable[[], dict]
    key: Any = None
    """The settings its result depends on besides its input data (stored digested in its manifest)."""
    after: tuple[str, ...] = ()
    """Stages that must be complete first (the flow runs the others concurrently)."""
    model: str | None = None
    """The model it samples, scores or trains, for error messages."""
    reusable: bool = False
    """A data-only stage: another run's result with the same key and inputs can be copied instead."""


Outcome = Literal["ran", "skipped", "reused"]


class StageError(RuntimeError):
    """A failed stage, naming it and its model; the cause (with shard and file) is in the message."""

    def __init__(self, stage: str, model: str | None, error: BaseException):
        self.stage, self.model = stage, model
        # A StorageError says itself whether a retry can help (a full disk cannot; a dropped connection can).
        self.permanent = is_permanent(error)
        where = f"stage {stage}" + (f" (model {model})" if model else "")
        kind = "permanent" if self.permanent else "possibly transient"
        super().__init__(f"{where} failed ({kind}): {type(error).__name__}: {error}")


def _stale_reason(
    layout: RunLayout, manifest: dict, key_digest: str | None, cfg: FusionConfig | None
) -> str | None:
    """Why a completed stage must run again (its settings or its inputs changed), or None.

    A manifest written before stages had settings keys counts as current when the whole
    config's hash still matches.
    """
    if key_digest is not None:
        if "stage_key" in manifest and manifest["stage_key"] is not None:
            if manifest["stage_key"] != key_digest:
                return "its settings changed"
        elif cfg is None or manifest.get("config_hash") != config_hash(cfg):
            return "it ran before settings were recorded, with another configuration"
    changed = layout.changed_inputs(manifest)
    return f"inputs changed since it ran ({', '.join(changed)})" if changed else None


def run_stage_outcome(
    layout: RunLayout,
    name: str,
    run: Callable[[], dict],
    *,
    cfg: FusionConfig | None = None,
    key: Any = None,
    model: str | None = None,
    reuse_from: Sequence[RunLayout] = (),
) -> tuple[Outcome, dict]:
    """Runs one stage unless it is done with the same settings and inputs: (outcome, summary).

    A stage that ran before but whose inputs or settings (`key`) changed since runs again. A stage
    not done here whose result another run in `reuse_from` holds (same key, same inputs) is copied
    from it ("reused"). Any failure raises StageError naming the stage and model.
    """
    key_digest = None if key is None else digest(key)
    try:
        manifest = layout.read_manifest(name)
        if manifest is not None:
            reason = _stale_reason(layout, manifest, key_digest, cfg)
            if reason is None:
                logger.info("stage %s: done before, skipped", name)
                return "skipped", manifest["summary"]
            logger.info("stage %s: %s; running it again", name, reason)
        for other in reuse_from:
            summary = reuse_stage(layout, other, name, key_digest)
            if summary is not None:
                return "reused", summary
        logger.info("stage %s: running", name)
        layout.begin(name)
        summary = run()
        manifest = layout.commit(
            name, summary, config_hash=config_hash(cfg) if cfg is not None else None, stage_key=key_digest
        )
    except StageError:
        raise
    except Exception as error:
        raise StageError(name, model, error) from error
    return "ran", manifest["summary"]


def reuse_stage(layout: RunLayout, other: RunLayout, name: str, key_digest: str | None) -> dict | None:
    """Copies stage `name` from another run when it is complete there with the same key and inputs.

    The inputs are compared by their manifest entries (file keys, rows and sha256), so the copy is
    exactly what running the stage here would read. Files are copied, checked against the
    manifest's sha256 (the other run may be rewriting them), and the manifest is written last.
    Returns the stage's summary, or None when the other run has no such result.
    """
    if other.storage.root == layout.storage.root and other.storage.protocol == layout.storage.protocol:
        return None
    manifest = other.read_manifest(name)
    if (
        manifest is None
        or manifest.get("models")
        or key_digest is None
        or manifest.get("stage_key") != key_digest
    ):
        return None
    if layout.changed_inputs(manifest):
        return None
    files = [f for entry in manifest["datasets"].values() for f in entry["files"]]
    copy_files(other.storage, layout.storage, [f["key"] for f in files])
    for f in files:
        if hashlib.sha256(layout.storage.read_bytes(f["key"])).hexdigest() != f["sha256"]:
            logger.warning("stage %s: %s changed while it was copied from %s; running the stage instead",
                           name, f["key"], other.storage.display())  # fmt: skip
            return None
    manifest = {**manifest, "run": layout.storage.display(), "reused_from": other.storage.display()}
    layout.storage.write_json(layout.manifest_key(name), manifest)
    layout.index(refresh=True)
    logger.info("stage %s: reused from %s", name, other.storage.display())
    return manifest["summary"]


def copy_files(source: Storage, target: Storage, keys: list[str]) -> None:
    """Copies files between storages (server-side within one filesystem, else through this process)."""
    same_fs = source.protocol == target.protocol and source.options == target.options
    for key in keys:
        if same_fs:
            with target.guard("cannot copy to", key):
                target.fs.makedirs(posixpath.dirname(target.path(key)), exist_ok=True)
                target.fs.copy(source.path(key), target.path(key))
        else:
            target.write_bytes(key, source.read_bytes(key))


def sibling_runs(cfg: FusionConfig, layout: RunLayout) -> list[RunLayout]:
    """The other runs under the config's storage URL with stage manifests: where results may be reused."""
    base = layout.storage.open_other(cfg.storage.url)
    with base.guard("cannot list runs under"):
        found = base.fs.glob(base.path("*/manifests/*.json"))
    runs = sorted({path.rstrip("/")[len(base.root) + 1 :].split("/")[0] for path in found})
    return [
        RunLayout(base.url_of(run), storage=base.child(run), cache_dir=layout.cache_dir)
        for run in runs
        if f"{base.root}/{run}" != layout.storage.root
    ]
