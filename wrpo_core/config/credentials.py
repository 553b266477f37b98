"""Credentials inside a config: where they are, the config with them redacted, and JSON that refuses them.

A credential (see wrpo_core.storage.secrets: secrets and access key ids alike) can sit in any
free-form mapping of a config (`storage.storage_options`, `launch.env`) or in a URL with a
password in any string field. What is written (model cards, manifests, logs) uses
`redacted_config_data`; what is printed for Prefect parameters (`wrpo config json`) uses
`config_json`, which refuses a config holding one: Prefect stores parameters and shows them in
its UI, and a redacted '***' would only fail later as a wrong credential.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from wrpo_core.config.base import ConfigError
from wrpo_core.storage.secrets import REDACTED, is_secret_option, redact, secret_values

Path = tuple[str | int, ...]


def _options_secrets(cfg: BaseModel) -> list[str]:
    storage = getattr(cfg, "storage", None)
    options = getattr(storage, "storage_options", None) or {}
    return secret_values(options)


def _credentials(value: Any, path: Path, known: list[str]) -> Iterator[tuple[Path, Any]]:
    """(path, redacted value) of every credential below `value` (a config model, mapping, list or scalar)."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _credentials(getattr(value, name), (*path, name), known)
    elif isinstance(value, Mapping):  # free-form: the keys are option or variable names
        for name, item in value.items():
            if is_secret_option(str(name)) and item not in (None, ""):
                yield (*path, str(name)), REDACTED
            else:
                yield from _credentials(item, (*path, str(name)), known)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _credentials(item, (*path, index), known)
    elif isinstance(value, str) and (clean := redact(value, known)) != value:
        yield path, clean  # a URL password, a request signature or a known secret value


def credential_fields(cfg: BaseModel) -> list[str]:
    """The dotted paths of the config's fields that hold a credential (e.g. storage.storage_options.key)."""
    return [".".join(str(p) for p in path) for path, _ in _credentials(cfg, (), _options_secrets(cfg))]


def redacted_config_data(cfg: BaseModel, **dump: Any) -> dict[str, Any]:
    """The config as plain JSON data (`model_dump(mode="json", **dump)`) with every credential masked.

    Secret-named options and environment variables become '***'; URLs keep all but their password.
    """
    data = cfg.model_dump(mode="json", **dump)
    for path, clean in _credentials(cfg, (), _options_secrets(cfg)):
        holder: Any = data
        for part in path[:-1]:
            holder = holder.get(part) if isinstance(holder, dict) else holder[part]
            if holder is None:
                break
        else:
            if (isinstance(holder, dict) and path[-1] in holder) or isinstance(holder, list):
                holder[path[-1]] = clean  # absent when the dump left it out (exclude_defaults)
    return data


def config_json(cfg: BaseModel, *, where: str) -> str:
    """The config as one line of JSON for Prefect parameters; ConfigError naming each field holding a credential.

    Prefect stores flow parameters and shows them in its UI, so a credential there leaks; a
    redacted value would fail later as a wrong credential. The error says where credentials go.
    """
    fields = credential_fields(cfg)
    if fields:
        raise ConfigError(
            "\n".join(
                f"{where}: {field}: holds a credential; `config json` output becomes Prefect parameters, "
                "which Prefect stores and shows: keep credentials in the worker's environment "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...) or in a Prefect block "
                "(storage_options: {prefect_block: BLOCK-NAME})"
                for field in fields
            )
        )
    return cfg.model_dump_json(exclude_defaults=True)
