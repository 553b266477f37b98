"""The Hugging Face Hub as source discovery uses it: listings, a revision's files, downloads.

Everything goes through `huggingface_hub`, so `HF_ENDPOINT` (a mirror or a private hub), the
token (`HF_TOKEN` or `hf auth login`), `HF_HOME` and the download cache work as users expect.

    models = list_models(author="Qwen", tags=["text-generation"], search=None, limit=50)
    files = revision_files("Qwen/Qwen2.5-7B-Instruct", models[0].sha)     # names and sizes at that commit
    folder = download("Qwen/Qwen2.5-7B-Instruct", models[0].sha, ["config.json", "tokenizer.json"])

Errors: `ModelUnavailable` when the hub says a model or revision does not exist or is gated
(discovery rejects that model); `HubError` for anything else (unreachable, offline mode, server
errors), which fails the discovery run so that it is retried rather than recorded as rejections.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

LIST_FIELDS = ["author", "sha", "lastModified", "createdAt", "downloads", "tags", "safetensors"]
"""What a listing asks the hub to include for each model (its `expand` parameter)."""


class HubError(RuntimeError):
    """The hub could not be asked (unreachable, offline mode, a server error): the run fails, to be retried."""


class ModelUnavailable(Exception):
    """The hub says this model or revision does not exist, is disabled, or is gated for this token."""


@dataclass(frozen=True)
class HubModel:
    """A model as a listing shows it: its id, current commit and the facts watch rules test."""

    repo_id: str
    sha: str | None
    tags: tuple[str, ...] = ()
    downloads: int | None = None
    last_modified: dt.datetime | None = None
    created_at: dt.datetime | None = None
    parameters_by_dtype: dict[str, int] = field(default_factory=dict)
    """Parameters per stored dtype (from the hub's safetensors metadata; empty when unknown)."""

    @property
    def licenses(self) -> list[str]:
        """The model's licenses, from its `license:...` tags."""
        return [tag.split(":", 1)[1] for tag in self.tags if tag.startswith("license:")]

    @property
    def parameters(self) -> int | None:
        return sum(self.parameters_by_dtype.values()) if self.parameters_by_dtype else None


def endpoint() -> str:
    """The hub this process talks to (`HF_ENDPOINT`, read by huggingface_hub at import)."""
    return constants.ENDPOINT


def _model(info) -> HubModel:
    safetensors = info.safetensors
    return HubModel(
        repo_id=info.id,
        sha=info.sha,
        tags=tuple(info.tags or ()),
        downloads=info.downloads,
        last_modified=info.last_modified,
        created_at=info.created_at,
        parameters_by_dtype=dict(safetensors.parameters) if safetensors else {},
    )


def _hub_error(what: str, error: Exception) -> HubError:
    if constants.is_offline_mode():
        return HubError(f"{what}: offline mode is on (HF_HUB_OFFLINE); unset it to discover models")
    return HubError(f"{what} at {endpoint()}: {type(error).__name__}: {error}")


def list_models(*, author: str | None, tags: Iterable[str], search: str | None, limit: int) -> list[HubModel]:
    """The models of `author` (None = anyone) with every tag in `tags`, newest revision first."""
    what = f"cannot list the models of {author or 'any author'} (tags {list(tags)}, search {search!r})"
    try:
        found = HfApi().list_models(
            author=author, filter=list(tags) or None, search=search, sort="last_modified", limit=limit,
            expand=LIST_FIELDS,
        )  # fmt: skip
        return [_model(info) for info in found]
    except Exception as error:
        raise _hub_error(what, error) from error


def model_at(repo_id: str, revision: str | None = None) -> tuple[HubModel, dict[str, int | None]]:
    """The model at `revision` (None = the default branch) and its files (name -> size in bytes)."""
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError, DisabledRepoError) as error:
        kind = "gated for this token" if isinstance(error, GatedRepoError) else "not found or disabled"
        raise ModelUnavailable(f"{repo_id}@{revision or 'main'} is {kind} on {endpoint()}") from error
    except Exception as error:
        raise _hub_error(f"cannot read {repo_id}@{revision or 'main'}", error) from error
    files = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
    return _model(info), files


def download(repo_id: str, revision: str, names: Iterable[str]) -> Path:
    """Downloads `names` of the repo at commit `revision` into the hub cache; returns the snapshot folder.

    Files go to `<HF cache>/models--org--name/snapshots/<revision>/`, so every file of one commit lands
    in one folder that transformers can load from.
    """
    folder: Path | None = None
    for name in names:
        try:
            path = Path(hf_hub_download(repo_id, name, revision=revision))
        except RemoteEntryNotFoundError as error:
            raise ModelUnavailable(
                f"{repo_id}@{revision}: {name} is listed but cannot be downloaded"
            ) from error
        except (RepositoryNotFoundError, RevisionNotFoundError, DisabledRepoError) as error:
            raise ModelUnavailable(
                f"{repo_id}@{revision} is not available on {endpoint()}: {error}"
            ) from error
        except Exception as error:
            raise _hub_error(f"cannot download {name} of {repo_id}@{revision}", error) from error
        folder = path.parents[len(Path(name).parts) - 1]
    if folder is None:
        raise ValueError(f"{repo_id}@{revision}: no files to download")
    return folder
