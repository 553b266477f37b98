"""What every config model shares: unknown keys are errors, and YAML loading with errors naming the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
"""A name usable as one storage-key segment: letters, digits, '.', '_', '-', starting with a letter/digit."""


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and field."""


class ConfigModel(BaseModel):
    """A config section: unknown keys are errors (a typo names its field), assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def format_validation_error(error: ValidationError, where: str) -> str:
    """Turns a pydantic error into lines 'where: field.path: message' a user can act on."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see the documented fields)"
        lines.append(f"{where}: {field}: {message}")
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
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {error}") from None
    return parse_config(data, model, where=where)
