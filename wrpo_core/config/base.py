"""What every config model shares: unknown keys are errors, no surprising coercion, errors naming the field.

Coercion rules (every field of every config model, see `ConfigModel`):
- a boolean is only a real boolean (YAML true/false): 'yes', 'on', '1', 1 are errors, because
  pydantic would turn them into true and a switch such as trust_remote_code runs downloaded code;
- a number is never a boolean (`n: true` would be one sample);
- a number may be written as a numeric string: YAML 1.1 reads `7e-6` (no dot) as the string
  '7e-6', and refusing it would refuse the paper's learning rates written that way;
- an integer may be a float without a fraction (2.0 is 2); 2.5 is an error.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from wrpo_core.config.names import reserved_name_problem
from wrpo_core.storage.errors import StorageError
from wrpo_core.storage.keys import safe_name


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and field."""


class FieldProblem(ValueError):
    """A cross-field rule broken by one field: raised in a model validator, reported at `field` below it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _scalar_types(annotation: object) -> set[object]:
    """The types a field accepts directly, through `X | None` (not inside lists or dicts)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {t for arg in typing.get_args(annotation) for t in _scalar_types(arg)}
    return {annotation}


class ConfigModel(BaseModel):
    """A config section: unknown keys are errors (a typo names its field), assignments are validated.

    Booleans accept only true/false and numbers never accept a boolean (see the module's rules).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_surprising_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or value is None:
            return value
        accepted = _scalar_types(field.annotation)
        if bool in accepted and not isinstance(value, bool):
            raise ValueError(f"must be true or false (a YAML boolean), got {value!r}")
        if bool not in accepted and accepted & {int, float} and isinstance(value, bool):
            raise ValueError(f"must be a number, got the boolean {str(value).lower()}")
        return value


def checked_name(value: str, what: str) -> str:
    """`value` if it can be one storage-key segment (wrpo_core.storage.keys.safe_name); ValueError if not."""
    try:
        return safe_name(value, what)
    except StorageError as error:
        raise ValueError(str(error)) from None


def checked_model_name(value: str) -> str:
    """A source or target model's name: one storage-key segment that is not one of the pipeline's own names."""
    try:
        safe_name(value, "name")
    except StorageError as error:
        raise ValueError(
            f"{error} (it becomes a storage key; unset, it is the last part of `path`)"
        ) from None
    problem = reserved_name_problem(value)
    if problem:
        raise ValueError(f"{problem}; set `name` to another name")
    return value


def checked_root_url(value: str, what: str) -> str:
    """A storage root (local path or fsspec URL) that names its folder directly: no '..' part, no control chars.

    The URL itself may be absolute, start with '~' or carry a protocol (it is a root, not a key);
    a '..' part would put the run, its registry and its sibling runs somewhere else than written.
    """
    if not value.strip():
        raise ValueError(f"{what} must be a local path or an fsspec URL, got an empty string")
    if any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{what} {value!r} contains a control character")
    path = value.split("://", 1)[-1]
    if ".." in path.replace("\\", "/").split("/"):
        raise ValueError(
            f"{what} {value!r} has a '..' part: write the folder it means directly (an absolute path, or "
            "a URL without '..')"
        )
    return value


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def format_validation_error(error: ValidationError, where: str) -> str:
    """Turns a pydantic error into lines 'where: field.path: message' a user can act on."""
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        message = item["msg"].removeprefix("Value error, ")
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, FieldProblem):
            loc.append(cause.field)
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see the documented fields)"
        lines.append(f"{where}: {'.'.join(loc) or '(top level)'}: {message}")
    return "\n".join(lines)


def parse_config(data: object, model: type[ConfigT], *, where: str) -> ConfigT:
    """Validates a mapping against a config model, raising ConfigError naming each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping of fields at the top level, got {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, where)) from None


def load_config(path: str | Path, model: type[ConfigT]) -> ConfigT:
    """Loads a YAML file (any fsspec URL) into a config model; errors name the file and the field."""
    where = str(path)
    try:
        with fsspec.open(where, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a folder, not a config file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{where}: not UTF-8 text (byte {error.start}): save the file as UTF-8") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {error}") from None
    except OSError as error:
        raise ConfigError(f"{where}: cannot read the config file: {error.strerror or error}") from None
    return parse_config(data, model, where=where)
