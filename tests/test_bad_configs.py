"""A corpus of bad fusion configs: each is refused by `wrpo config check` naming the file and the field.

Every case writes a YAML file, runs `wrpo config check FILE` and expects exit code 2, the file
and the bad field on stderr, and no traceback. Then the rules behind them: booleans are only
booleans, numbers never booleans, model names are storage keys that are not the pipeline's
own, and credentials are never printed or written.
"""

import json
import types
import typing

import pytest
from pydantic import BaseModel, ValidationError

from wrpo_core import cli
from wrpo_core.config import (
    ConfigError,
    FusionConfig,
    ModelSpec,
    config_json,
    credential_fields,
    redacted_config_data,
)
from wrpo_core.config.base import ConfigModel
from wrpo_core.config.names import MODEL_ROLES, PER_MODEL_STAGE_PREFIXES, STAGE_NAMES

VALID = """\
run_name: good
prompts: {path: prompts.jsonl}
sources: [{path: org/a}, {path: org/b}]
target: {path: org/t}
reward_model: {path: org/rm}
"""


def with_lines(*lines: str) -> str:
    """The valid config with top-level `lines` appended; PyYAML keeps a repeated key's last value."""
    return VALID + "".join(line + "\n" for line in lines)


def sources(*specs: str) -> str:
    return with_lines(f"sources: [{', '.join(specs)}]")


# (case id, file text, the field the message must name)
CASES = [
    ("run_name-dotdot", with_lines("run_name: ../x"), "run_name"),
    ("run_name-slash", with_lines("run_name: a/b"), "run_name"),
    ("run_name-empty", with_lines("run_name: ''"), "run_name"),
    ("run_name-hidden", with_lines("run_name: .hidden"), "run_name"),
    ("storage.url-dotdot", with_lines("storage: {url: runs/../elsewhere}"), "storage.url"),
    ("storage.url-s3-dotdot", with_lines("storage: {url: 's3://bucket/runs/../other'}"), "storage.url"),
    ("storage.url-empty", with_lines("storage: {url: ''}"), "storage.url"),
    ("launch.run_name-dotdot", with_lines("launch: {launcher: ray, run_name: ../x}"), "launch.run_name"),
    (
        "launch.storage_path-dotdot",
        with_lines("launch: {launcher: ray, storage_path: 's3://b/../x'}"),
        "launch.storage_path",
    ),
    ("source-name-dotdot", sources("{path: org/a, name: ../x}"), "sources.0.name"),
    ("source-name-slash", sources("{path: org/a, name: a/b}"), "sources.0.name"),
    ("source-name-empty", sources("{path: org/a, name: ''}"), "sources.0.name"),
    ("source-name-from-path", sources("{path: 'org/bad name'}"), "sources.0.name"),
    (
        "source-named-target-sft",
        sources("{path: org/a}", "{path: org/x, name: target-sft}"),
        "sources.1.name",
    ),
    ("source-named-wrpo", sources("{path: org/wrpo}"), "sources.0.name"),
    ("source-named-dpo", sources("{path: org/a, name: dpo}"), "sources.0.name"),
    ("source-named-SFT", sources("{path: org/a, name: SFT}"), "sources.0.name"),
    ("source-named-a-stage", sources("{path: org/a, name: select-source}"), "sources.0.name"),
    (
        "source-named-like-a-stage-of-the-run",
        sources("{path: org/a}", "{path: org/x, name: score-a}"),
        "sources.1.name",
    ),
    (
        "target-named-like-a-stage-of-the-run",
        with_lines("target: {path: org/t, name: Sample-Target-SFT}"),
        "target.name",
    ),
    ("target-named-register", with_lines("target: {path: org/t, name: register}"), "target.name"),
    ("target-named-like-a-source", with_lines("target: {path: org/t, name: a}"), "target"),
    ("duplicate-sources", sources("{path: org/a}", "{path: other/a}"), "sources"),
    ("duplicate-sources-by-case", sources("{path: org/a}", "{path: org/A}"), "sources"),
    *[
        (
            f"trust_remote_code-{value}",
            with_lines(f"target: {{path: org/t, trust_remote_code: {value}}}"),
            "target.trust_remote_code",
        )
        for value in ("'yes'", "'on'", "'1'", "'y'", "'TRUE'", "1")
    ],
    (
        "reward-trust_remote_code-yes",
        with_lines("reward_model: {path: rm, trust_remote_code: 'yes'}"),
        "reward_model.trust_remote_code",
    ),
    (
        "source-trust_remote_code-0",
        sources("{path: org/a, trust_remote_code: 0}"),
        "sources.0.trust_remote_code",
    ),
    ("packing-string", with_lines("sft: {packing: 'true'}"), "sft.packing"),
    ("n-boolean", sources("{path: org/a, sampling: {n: true}}"), "sources.0.sampling.n"),
    ("beta-boolean", with_lines("wrpo: {beta: true}"), "wrpo.beta"),
    ("typo-key", with_lines("wrpo: {alpah: 0.2}"), "wrpo.alpah"),
    ("typo-top-level-key", with_lines("sourcess: []"), "sourcess"),
    ("alpha-above-1", with_lines("wrpo: {alpha: 1.5}"), "wrpo.alpha"),
    ("alpha-negative", with_lines("wrpo: {alpha: -0.1}"), "wrpo.alpha"),
    ("beta-zero", with_lines("wrpo: {beta: 0}"), "wrpo.beta"),
    ("beta-negative", with_lines("wrpo: {beta: -1}"), "wrpo.beta"),
    ("simpo-beta-0.01", with_lines("wrpo: {loss_type: simpo, beta: 0.01}"), "wrpo.beta"),
    (
        "global-batch-does-not-divide",
        with_lines("sft: {global_batch_size: 100, per_device_train_batch_size: 8}"),
        "sft.global_batch_size",
    ),
    (
        "global-batch-does-not-divide-over-gpus",
        with_lines(
            "wrpo: {global_batch_size: 128, per_device_train_batch_size: 2}", "launch: {nproc_per_node: 3}"
        ),
        "wrpo.global_batch_size",
    ),
    ("missing-target", VALID.replace("target: {path: org/t}\n", ""), "target"),
    ("non-mapping-top-level", "- a\n- b\n", "top level"),
    ("broken-yaml", "prompts: [unclosed\n", "line"),
]


@pytest.mark.parametrize(("text", "field"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_config_is_refused_naming_file_and_field(tmp_path, capsys, text, field):
    path = tmp_path / "bad-run.yaml"
    path.write_text(text, encoding="utf-8")
    code = cli.main(["config", "check", str(path)])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert f"error: {path}: " in err  # the file, first
    assert field in err
    assert "Traceback" not in out + err
    assert out == ""  # nothing printed as if it were valid


def test_the_valid_base_config_passes(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(VALID, encoding="utf-8")
    assert cli.main(["config", "check", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["sources"] == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"run_name: caf\xe9\n", "not UTF-8"), (None, "is a folder"), (b"", "expected a mapping")],
    ids=["latin-1-file", "a-folder", "empty-file"],
)
def test_unreadable_config_files_are_refused_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "run.yaml"
    path.mkdir() if content is None else path.write_bytes(content)
    assert cli.main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: " in err and message in err and "Traceback" not in err


# --- booleans are booleans, numbers are numbers -------------------------------------------------


def _models(model: type[BaseModel], seen: list) -> list[type[BaseModel]]:
    if model not in seen:
        seen.append(model)
        for field in model.model_fields.values():
            pending = [field.annotation]
            while pending:
                annotation = pending.pop()
                if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                    _models(annotation, seen)
                pending += typing.get_args(annotation)
    return seen


def _config_models() -> list[type[ConfigModel]]:
    from wrpo_core.config import DiscoveryConfig, SFTJobConfig, WRPOJobConfig

    seen: list = []
    for root in (FusionConfig, SFTJobConfig, WRPOJobConfig, DiscoveryConfig):
        _models(root, seen)
    return seen


def _fields_accepting(kinds: set) -> list[tuple[type[BaseModel], str]]:
    found = []
    for model in _config_models():
        for name, field in model.model_fields.items():
            union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
            args = set(typing.get_args(field.annotation)) if union else {field.annotation}
            if args & kinds and not (kinds == {int, float} and bool in args):
                found.append((model, name))
    return found


def _errors_at(model: type[BaseModel], data: dict, field: str) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return [e["msg"] for e in caught.value.errors() if e["loc"] == (field,)]


def test_every_boolean_of_every_config_accepts_only_a_real_boolean():
    switches = _fields_accepting({bool})
    names = {f"{model.__name__}.{name}" for model, name in switches}
    assert {"ModelSpec.trust_remote_code", "RewardModelSpec.trust_remote_code", "WatchRule.trust_remote_code",
            "SFTJobConfig.trust_remote_code", "WRPOJobConfig.trust_remote_code", "SFTConfig.packing"} <= names  # fmt: skip
    for model, name in switches:
        for value in ("yes", "on", "1", "y", "TRUE", "true", 1, 0):
            assert _errors_at(model, {name: value}, name) == [
                f"Value error, must be true or false (a YAML boolean), got {value!r}"
            ], f"{model.__name__}.{name} = {value!r}"


def test_every_number_of_every_config_refuses_a_boolean():
    numbers = _fields_accepting({int, float})
    assert len(numbers) > 40
    for model, name in numbers:
        assert _errors_at(model, {name: True}, name) == [
            "Value error, must be a number, got the boolean true"
        ], f"{model.__name__}.{name}"


def test_yaml_booleans_and_numeric_strings_still_work(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    # YAML 1.1 reads `7e-6` (no dot) as a string: numbers written that way must keep working.
    path.write_text(
        with_lines(
            "target: {path: org/t, trust_remote_code: true}",
            "reward_model: {path: rm, trust_remote_code: yes}",  # a YAML 1.1 boolean, not a string
            "sft: {learning_rate: 7e-6, packing: false, per_device_train_batch_size: 8.0}",
            "wrpo: {beta: '0.01'}",
        ),
        encoding="utf-8",
    )
    from wrpo_core.config import load_config

    cfg = load_config(path, FusionConfig)
    assert cfg.target.trust_remote_code is True and cfg.reward_model.trust_remote_code is True
    assert cfg.sft.learning_rate == 7e-6 and cfg.sft.packing is False and cfg.wrpo.beta == 0.01
    assert cfg.sft.per_device_train_batch_size == 8 and isinstance(cfg.sft.per_device_train_batch_size, int)
    assert FusionConfig.model_validate(cfg.model_dump()) == cfg  # the round trip the flow does


# --- names ----------------------------------------------------------------------------------------


def test_the_reserved_names_cover_every_stage_and_model_the_pipeline_names(tmp_path):
    """If the plan gains a stage, its name must be reserved too (or be per-model: sample-/score-<model>)."""
    from wrpo_core.pipeline import dpo_baseline_stage, layout_for, pipeline_stages

    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    cfg = FusionConfig.model_validate(
        {
            "prompts": {"path": str(tmp_path / "p.jsonl")},
            "sources": [{"path": "org/a"}, {"path": "org/b"}],
            "target": {"path": "org/t"},
            "reward_model": {"path": "rm"},
            "evaluation": {"prompts": {"path": str(tmp_path / "p.jsonl")}},
            "storage": {"url": str(tmp_path / "runs")},
        }
    )
    layout = layout_for(cfg)
    stages = [stage.name for stage in pipeline_stages(cfg, layout)] + [dpo_baseline_stage(cfg, layout).name]
    models = {"a", "b", *MODEL_ROLES}
    per_model = {prefix + model for prefix in PER_MODEL_STAGE_PREFIXES for model in models}
    assert [name for name in stages if name not in {*STAGE_NAMES, *MODEL_ROLES} | per_model] == []
    assert set(STAGE_NAMES) <= set(stages)  # no stale reserved name either


def test_a_registry_source_named_like_a_stage_is_refused():
    # The registry (wrpo sources add) validates every entry as a ModelSpec: the same rule applies.
    with pytest.raises(ValidationError, match="reserved"):
        ModelSpec.model_validate({"path": "org/x", "name": "target-sft"})
    assert ModelSpec.model_validate({"path": "org/x", "name": "target-sft-v2"}).name == "target-sft-v2"
    # sample-/score- names collide only with a stage of the run that has the model they name
    assert ModelSpec.model_validate({"path": "score-labs/x", "name": "score-labs--x"}).name == "score-labs--x"


# --- credentials ------------------------------------------------------------------------------------

KEY_ID, SECRET, HF_TOKEN = "AKIAEXAMPLEKEYID0001", "wJalrEXAMPLESECRETKEY", "hf_EXAMPLEtokenVALUE"


def config_with_credentials(tmp_path) -> FusionConfig:
    return FusionConfig.model_validate(
        {
            "prompts": {"path": "https://user:pa55w0rd@example.org/prompts.jsonl"},
            "sources": [{"path": "org/a"}],
            "target": {"path": "org/t"},
            "reward_model": {"path": "rm"},
            "storage": {"url": str(tmp_path / "runs"), "storage_options": {"key": KEY_ID, "secret": SECRET}},
            "launch": {"env": {"HF_TOKEN": HF_TOKEN, "NCCL_DEBUG": "INFO"}},
        }
    )


def test_credentials_are_found_wherever_the_config_holds_them(tmp_path):
    assert credential_fields(config_with_credentials(tmp_path)) == [
        "prompts.path", "storage.storage_options.key", "storage.storage_options.secret", "launch.env.HF_TOKEN",
    ]  # fmt: skip


def test_config_json_refuses_a_config_holding_credentials(tmp_path):
    with pytest.raises(ConfigError) as caught:
        config_json(config_with_credentials(tmp_path), where="run.yaml")
    message = str(caught.value)
    assert "run.yaml: storage.storage_options.key: holds a credential" in message
    assert "run.yaml: launch.env.HF_TOKEN: holds a credential" in message
    assert not {KEY_ID, SECRET, HF_TOKEN, "pa55w0rd"} & set(message.split())
    clean = FusionConfig.model_validate({"prompts": {"path": "p"}, "sources": [{"path": "org/a"}],
                                         "target": {"path": "org/t"}, "reward_model": {"path": "rm"}})  # fmt: skip
    assert json.loads(config_json(clean, where="run.yaml")) == json.loads(
        clean.model_dump_json(exclude_defaults=True)
    )


def test_redacted_config_masks_every_credential(tmp_path):
    data = redacted_config_data(config_with_credentials(tmp_path))
    text = json.dumps(data)
    for value in (KEY_ID, SECRET, HF_TOKEN, "pa55w0rd"):
        assert value not in text
    assert data["storage"]["storage_options"] == {"key": "***", "secret": "***"}
    assert data["launch"]["env"] == {"HF_TOKEN": "***", "NCCL_DEBUG": "INFO"}
    assert data["prompts"]["path"] == "https://user:***@example.org/prompts.jsonl"
    assert (
        data["sources"][0]["sampling"]["max_new_tokens"] == 4096
    )  # a config field named *token* is no secret


def test_the_model_card_carries_no_credential(tmp_path):
    from wrpo_core.pipeline import layout_for
    from wrpo_core.pipeline.publishing import model_card

    cfg = config_with_credentials(tmp_path)
    card = model_card(cfg, layout_for(cfg), "wrpo", {"train_loss": 0.5}, training={"output": "x"})
    assert "## Configuration" in card and "train_loss" in card
    for value in (KEY_ID, SECRET, HF_TOKEN, "pa55w0rd"):
        assert value not in card


def test_access_key_ids_count_as_credentials_everywhere(monkeypatch):
    from wrpo_core.storage import is_secret_option, redact, redact_options

    for name in ("key", "KEY", "aws_access_key_id", "access_key", "access_key_id", "secret", "token",
                 "sas_token", "connection_string", "api_key", "HF_TOKEN", "WANDB_API_KEY"):  # fmt: skip
        assert is_secret_option(name), name
    for name in (
        "endpoint_url",
        "region",
        "max_attempts",
        "use_ssl",
        "prefect_block",
        "NCCL_DEBUG",
        "keyring",
    ):
        assert not is_secret_option(name), name
    assert redact_options({"key": KEY_ID, "endpoint_url": "http://h"}) == {
        "key": "***",
        "endpoint_url": "http://h",
    }
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)  # an id from the environment is masked in every message
    assert redact(f"denied for {KEY_ID}") == "denied for ***"
