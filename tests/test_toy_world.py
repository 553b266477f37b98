"""Tests for the toy fusion world: deterministic builds, the cache, saved folders, exact evaluation.

Everything here uses `WorldConfig.smallest()` (a world that trains in about a second); the quality
of the default world is measured by `python -m wrpo_core.toy.world`, not here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from wrpo_core.toy import world as world_module
from wrpo_core.toy import world_data, world_eval
from wrpo_core.toy.skills import SKILLS, make_prompts
from wrpo_core.toy.world import (
    MANIFEST,
    World,
    WorldConfig,
    build_world,
    evaluate_exact,
    format_accuracy_table,
    greedy_responses,
)


def _model_paths(world: World) -> dict[str, str]:
    return {**world.sources, "target": world.target}


def _tensors(model_dir: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(WorldConfig.smallest(), tmp_path_factory.mktemp("world_cache"), progress=False)


def test_default_config_has_three_specialists_over_known_skills() -> None:
    config = WorldConfig()
    assert len(config.sources) >= 3
    assert all(skills for skills in config.sources.values())
    used = {s for skills in config.sources.values() for s in skills}
    assert config.skills() == [s for s in SKILLS if s in used]


def test_config_forbids_unknown_keys_and_skills() -> None:
    with pytest.raises(ValidationError, match="extra"):
        WorldConfig.model_validate({"seeds": 1})
    with pytest.raises(ValidationError, match="unknown skills"):
        WorldConfig(sources={"src": ["juggle"]})
    with pytest.raises(ValidationError, match="no skills"):
        WorldConfig(sources={"src": []})
    with pytest.raises(ValidationError, match="skill_weights"):
        WorldConfig.model_validate(
            {"sources": {"a": ["upper"]}, "target": {"skill_weights": {"reverse": 2.0}}}
        )
    with pytest.raises(ValidationError, match="band"):
        WorldConfig.model_validate({"target": {"band": [0.5, 0.2]}})


def test_source_named_target_is_rejected() -> None:
    with pytest.raises(ValidationError, match="other than 'target'"):
        WorldConfig(sources={"target": ["upper"], "b": ["reverse"]})


def test_eval_dev_and_train_prompts_are_disjoint_and_balanced() -> None:
    config = WorldConfig.model_validate(
        {"data": {"eval_per_skill": 20, "dev_per_skill": 10, "train_per_skill": 50}}
    )
    blocks = world_data._split_rows(config)
    prompts = {name: {row["prompt"] for row in rows} for name, rows in blocks.items()}
    assert not prompts["eval"] & prompts["dev"]
    assert not prompts["eval"] & prompts["train"]
    assert not prompts["dev"] & prompts["train"]
    for name, per_skill in (("eval", 20), ("dev", 10), ("train", 50)):
        skills = [row["skill"] for row in blocks[name]]
        assert {skill: skills.count(skill) for skill in config.skills()} == dict.fromkeys(
            config.skills(), per_skill
        )
    assert world_data._eval_rows(config) == blocks["eval"]


def test_cache_key_depends_on_config() -> None:
    base = WorldConfig.smallest()
    assert base.cache_key() == WorldConfig.smallest().cache_key()
    assert base.cache_key() != WorldConfig.smallest(seed=1).cache_key()
    other = base.model_copy(update={"sources": {"only-upper": ["upper"]}})
    assert base.cache_key() != other.cache_key()


def test_world_layout_and_manifest(small_world: World) -> None:
    config = WorldConfig.smallest()
    root = Path(small_world.root)
    assert root.name == f"world-{config.cache_key()}"
    assert set(small_world.sources) == set(config.sources)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["cache_key"] == config.cache_key()
    assert manifest["skills"] == config.skills()
    assert set(small_world.accuracy) == {*config.sources, "target"}
    for per_skill in small_world.accuracy.values():
        assert list(per_skill) == config.skills()
        assert all(0.0 <= value <= 1.0 for value in per_skill.values())
    table = small_world.table()
    assert table.splitlines()[0] == "| model | " + " | ".join(config.skills()) + " |"
    assert len(table.splitlines()) == 2 + len(config.sources) + 1
    assert len(small_world.eval_prompts()) == len(config.skills()) * config.data.eval_per_skill
    # No temporary build folders are left behind.
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_same_config_gives_identical_weights(small_world: World, tmp_path: Path) -> None:
    again = build_world(WorldConfig.smallest(), tmp_path, progress=False)
    assert again.root != small_world.root
    first, second = _model_paths(small_world), _model_paths(again)
    assert first.keys() == second.keys()
    for name in first:
        a, b = _tensors(first[name]), _tensors(second[name])
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs between two builds"
    assert again.accuracy == small_world.accuracy


def test_models_differ_from_each_other(small_world: World) -> None:
    paths = list(_model_paths(small_world).values())
    weights = [_tensors(p)["model.embed_tokens.weight"] for p in paths]
    for i in range(len(weights)):
        for j in range(i + 1, len(weights)):
            assert not torch.equal(weights[i], weights[j])


def test_other_seed_gives_other_weights(small_world: World, tmp_path: Path) -> None:
    other = build_world(WorldConfig.smallest(seed=1), tmp_path, progress=False)
    assert not torch.equal(
        _tensors(other.target)["model.embed_tokens.weight"],
        _tensors(small_world.target)["model.embed_tokens.weight"],
    )


def test_cache_hit_returns_same_world_without_training(
    small_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    mtimes = {
        name: os.stat(Path(p) / "model.safetensors").st_mtime_ns
        for name, p in _model_paths(small_world).items()
    }

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached world was rebuilt")

    monkeypatch.setattr(world_module, "_build_into", fail)
    started = time.perf_counter()
    cached = build_world(WorldConfig.smallest(), Path(small_world.root).parent, progress=False)
    assert time.perf_counter() - started < 1.0
    assert cached == small_world
    assert {
        name: os.stat(Path(p) / "model.safetensors").st_mtime_ns for name, p in _model_paths(cached).items()
    } == mtimes


def test_crashed_build_leaves_no_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = world_module._build_into

    def crash_after_first_model(config: WorldConfig, folder: Path, *, progress: bool) -> None:
        (folder / "sources" / "half-written").mkdir(parents=True)
        (folder / "sources" / "half-written" / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(world_module, "_build_into", crash_after_first_model)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_world(WorldConfig.smallest(), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(world_module, "_build_into", real_build)
    world = build_world(WorldConfig.smallest(), tmp_path, progress=False)
    assert (Path(world.root) / MANIFEST).is_file()


def test_saved_folders_load_with_auto_classes(small_world: World) -> None:
    for path in _model_paths(small_world).values():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert tokenizer.eos_token == "<|end|>"
        assert tokenizer.chat_template
        assert model.config.eos_token_id == tokenizer.eos_token_id
        assert model.config.vocab_size == len(tokenizer)
        assert model.config.hidden_size == WorldConfig.smallest().model.hidden_size


def test_evaluate_exact_one_accuracy_per_requested_skill(small_world: World) -> None:
    skills = ["upper", "reverse", "add"]  # `add` is in no source of the smallest world: still scored
    prompts = [row["prompt"] for row in make_prompts(skills, 9, seed=3)]
    accuracy = evaluate_exact(small_world.target, prompts, max_new_tokens=4, batch_size=4)
    assert list(accuracy) == skills
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    with pytest.raises(ValueError, match="not a toy skill prompt"):
        evaluate_exact(small_world.target, ["hello"], max_new_tokens=2)


def test_evaluate_exact_scores_exact_answers(small_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = make_prompts(["upper", "sort_digits"], 6, seed=5)
    answers = {row["prompt"]: row["answer"] for row in rows}
    wrong = rows[0]["prompt"]

    def fake(model: object, tokenizer: object, prompts: list[str], **kwargs: object) -> list[str]:
        return [" x " if p == wrong else f" {answers[p]}\n" for p in prompts]

    monkeypatch.setattr(world_eval, "greedy_responses", fake)
    accuracy = evaluate_exact(small_world.target, [row["prompt"] for row in rows])
    assert accuracy == {"upper": pytest.approx(2 / 3), "sort_digits": 1.0}


def test_greedy_responses_do_not_depend_on_batching(small_world: World) -> None:
    tokenizer = AutoTokenizer.from_pretrained(small_world.target)
    model = AutoModelForCausalLM.from_pretrained(small_world.target)
    prompts = [row["prompt"] for row in make_prompts(["reverse", "sort_digits", "upper"], 12, seed=7)]
    one_by_one = greedy_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    batched = greedy_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=12)
    assert batched == one_by_one
    assert len(batched) == len(prompts)
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was
    assert not any(special in text for text in batched for special in ("<|end|>", "<pad>", "<s>"))


def test_format_accuracy_table() -> None:
    table = format_accuracy_table({"a": {"upper": 1.0, "reverse": 0.25}, "b": {"reverse": 0.5}})
    assert table.splitlines() == [
        "| model | upper | reverse |",
        "|---|---:|---:|",
        "| a | 100 | 25 |",
        "| b | - | 50 |",
    ]


# --- the shipped demo world -------------------------------------------------------------------


def test_the_demo_world_ships_with_the_package_for_the_demos_config():
    """The shipped world is the one the demo's config names: change the config, re-ship the world."""
    shipped = world_module.PREBUILT / f"world-{WorldConfig().cache_key()}"
    assert shipped.is_dir(), "rebuild and ship: python -m wrpo_core.toy.world, then copy it (see README)"
    assert world_module.verify_shipped_world(shipped) is None
    manifest = json.loads((shipped / MANIFEST).read_text())
    assert WorldConfig.model_validate(manifest["config"]).cache_key() == WorldConfig().cache_key()


def test_a_fresh_cache_gets_the_shipped_world_without_training(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("trained although the world ships with the package")

    monkeypatch.setattr(world_module, "_build_into", fail)
    world = build_world(WorldConfig(), tmp_path)
    shipped = world_module.PREBUILT / f"world-{WorldConfig().cache_key()}"
    for name in ("src-reverse", "src-upper", "src-sort"):
        copied = Path(world.sources[name]) / "model.safetensors"
        assert copied.read_bytes() == (shipped / "sources" / name / "model.safetensors").read_bytes()
    assert Path(world.root).parent == tmp_path and world.accuracy


def test_a_shipped_world_that_does_not_match_its_sums_is_not_used(tmp_path, monkeypatch, caplog):
    shipped = tmp_path / "prebuilt" / f"world-{WorldConfig.smallest().cache_key()}"
    (shipped / "target").mkdir(parents=True)
    (shipped / "target" / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    (shipped / "SHA256SUMS").write_text("0" * 64 + "  ./target/model.safetensors\n")
    assert world_module.verify_shipped_world(shipped) == "target/model.safetensors does not match its sha256"
    monkeypatch.setattr(world_module, "PREBUILT", tmp_path / "prebuilt")
    built = []
    real_build = world_module._build_into
    monkeypatch.setattr(world_module, "_build_into", lambda *a, **k: built.append(1) or real_build(*a, **k))
    build_world(WorldConfig.smallest(), tmp_path / "cache", progress=False)
    assert built == [1] and "the shipped copy is not used" in caplog.text
