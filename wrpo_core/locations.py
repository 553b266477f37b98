"""Where a path that a config names becomes something this machine can open: the toy world's one door.

Configs name models and prompt files by Hugging Face hub id, local path, fsspec URL, or
`toy-world:<preset>/<item>` (the offline toy world, built on first use and cached; see
`wrpo_core.toy.paths`). Loaders call `resolve_location` just before they open a path, so
configs, manifests and stage keys keep the symbolic path and stay valid on every machine;
no stage, sampler or trainer needs to know that the toy world exists.

    resolve_location("toy-world:demo/reverse")   # -> ~/.cache/wrpo-fusion/toy-world/.../reverse
    resolve_location("meta-llama/Meta-Llama-3-8B-Instruct")   # unchanged
    resolve_model_location("s3://bucket/runs/x/models/target-sft")   # -> this machine's checked copy
"""

from __future__ import annotations

from wrpo_core.storage.model_folders import fetch_model_folder, is_storage_url
from wrpo_core.storage.provenance import digest
from wrpo_core.toy.paths import is_toy_path, resolve_path, toy_path_version


def resolve_location(path: str) -> str:
    """The local folder or file behind a `toy-world:` path (built once, cached); any other path as given."""
    return resolve_path(path) if is_toy_path(path) else path


def resolve_model_location(path: str) -> str:
    """Where a model loads from on this machine: a storage URL of a model folder (`s3://...`) becomes
    this machine's verified copy (`storage.model_folders.fetch_model_folder`); else `resolve_location`."""
    if is_storage_url(path):
        return str(fetch_model_folder(path))
    return resolve_location(path)


def location_fingerprint(path: str) -> str | None:
    """What identifies the current content at `path`, so an edited prompt file is read again.

    A digest of every file's name, size and modification tag (ETag or mtime); a `toy-world:`
    path is its `toy_path_version` (the path, its world's cache key and the preset's prompt
    counts: the files behind it change only with those); None for
    what fsspec cannot stat (a hub dataset id: pin a revision-specific path instead).
    """
    if is_toy_path(path):
        return toy_path_version(path)
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path)
        found = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    except (OSError, ValueError, ImportError):
        return None
    tags = sorted(
        (name, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""))
        for name, info in found.items()
    )
    return digest(tags)
