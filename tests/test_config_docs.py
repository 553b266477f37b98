"""Every config field documents itself: the Prefect UI form and the docs render these descriptions."""

import inspect
import re
import typing

from pydantic import BaseModel

from wrpo_core import config
from wrpo_core.config import FusionConfig, WRPOConfig


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The pydantic model classes inside a field's annotation (through Optional, list, dict, ...)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def config_models() -> list[type[BaseModel]]:
    """Every pydantic model defined in wrpo_core.config, and every model reachable through their fields."""
    pending = [
        value
        for value in vars(config).values()
        if inspect.isclass(value)
        and issubclass(value, BaseModel)
        and value.__module__.startswith(config.__name__)
    ]
    seen: list[type[BaseModel]] = []
    while pending:
        model = pending.pop()
        if model not in seen:
            seen.append(model)
            pending += [m for field in model.model_fields.values() for m in _models_in(field.annotation)]
    return sorted(seen, key=lambda model: model.__name__)


def test_discovery_finds_the_config_models():
    names = {model.__name__ for model in config_models()}
    assert names >= {
        "SamplingConfig", "ModelSpec", "RewardModelSpec", "PromptsConfig", "SplitConfig",
        "_TrainingHyperparameters", "SFTConfig", "WRPOConfig", "StorageConfig", "ComputeConfig",
        "LaunchConfig", "EvaluationConfig", "FusionConfig", "SFTJobConfig", "WRPOJobConfig",
    }  # fmt: skip


def test_every_field_has_a_description():
    missing = [
        f"{model.__name__}.{name}"
        for model in config_models()
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not missing, f"config fields without a description: {', '.join(missing)}"


def code_span_touching_text(description: str) -> bool:
    """A `code` span with no space on one side: the form shows it as its own text node, so the
    description no longer reads as one string there (e.g. "(`x`," shows as "( x ,")."""
    for span in re.finditer(r"`[^`]+`", description):
        before = description[span.start() - 1] if span.start() else " "
        after = description[span.end()] if span.end() < len(description) else " "
        if not (before.isspace() and after.isspace()):
            return True
    return False


def test_code_span_check_finds_a_span_next_to_punctuation():
    assert code_span_touching_text("counted (`x`, `y`)") and code_span_touching_text("by `max`:")
    assert not code_span_touching_text("or a `toy-world:` path, or `x` here")
    assert code_span_touching_text("ends with `x`.")


def test_descriptions_survive_the_forms_markdown():
    """The Prefect form renders descriptions as markdown: `<word>` would vanish as an HTML tag, and a
    code span next to punctuation splits the text (tests/test_prefect_deployments.py reads it)."""
    bad = [
        f"{model.__name__}.{name}"
        for model in config_models()
        for name, field in model.model_fields.items()
        if re.search(r"<[A-Za-z_/]", field.description or "")
        or code_span_touching_text(field.description or "")
    ]
    assert not bad, f"descriptions the form cannot show as one string: {', '.join(bad)}"


def _definition(schema: dict, prop: dict) -> dict:
    """The `$defs` entry a property refers to (directly or through allOf/anyOf)."""
    refs = [prop.get("$ref")] + [item.get("$ref") for item in prop.get("allOf", []) + prop.get("anyOf", [])]
    ref = next(r for r in refs if r)
    return schema["$defs"][ref.rsplit("/", 1)[-1]]


def test_fusion_schema_carries_the_wrpo_descriptions():
    schema = FusionConfig.model_json_schema()
    wrpo = _definition(schema, schema["properties"]["wrpo"])
    for name in ("alpha", "beta", "loss_type", "label_smoothing"):
        description = wrpo["properties"][name].get("description", "")
        assert description.strip(), f"FusionConfig JSON schema: wrpo.{name} has no description"
        assert description == WRPOConfig.model_fields[name].description
