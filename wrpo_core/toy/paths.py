"""Machine-independent `toy-world:` paths, so a fusion config can name the offline toy world's models.

A config (a YAML file, a Prefect deployment's default parameters, the UI form) cannot hold the
absolute cache folder of models that are built on first use. It names them instead:

    toy-world:<preset>/<item>     e.g. toy-world:demo/reverse, toy-world:smallest/target

`preset` is `demo` (the demo's world and prompt counts) or `smallest` (builds in seconds; its
models are not competent: for smoke tests). `item` is a source name of the world, `target`,
`prompts` (training prompts, JSONL) or `held-out` (evaluation prompts disjoint from them, JSONL with
a `skill` column). `resolve_path` builds (or loads from the cache) the world and returns the local
folder or file; any other path is returned unchanged. Stages resolve paths when they load a model,
so manifests and config hashes keep the symbolic path and stay valid on every machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TOY_PREFIX = "toy-world:"
PROMPT_ITEMS = ("prompts", "held-out")


def demo_settings(quick: bool) -> dict[str, Any]:
    """Sizes and hyper-parameters of the toy runs (quick: seconds-long smoke run, quality irrelevant)."""
    from wrpo_core.toy.world import WorldConfig

    if quick:
        # The smallest world's models are not competent: most samples run into the length limit.
        return {"world": WorldConfig.smallest(), "train_prompts": 24, "eval_prompts": 24, "n": 2, "max_new_tokens": 12,
                "drop_length_stopped": False,
                "sft": {"num_train_epochs": 1, "max_steps": 2, "logging_steps": 1},
                "wrpo": {"num_train_epochs": 1, "max_steps": 2, "logging_steps": 1}}  # fmt: skip
    # SFT sees 1/6 of 3600 prompts for one epoch and preference optimization the other 3000, so that,
    # as in the paper (SFT +1.2 AlpacaEval LC, DPO then +23), the sources' knowledge reaches the target
    # mostly through the preference stage, where y_ws carries it. Alpha 1 and beta 1 were chosen on
    # dev over 5 worlds (bench/fusion_quality.py --ablation --setting sft-light; bench/RESULTS.md).
    return {"world": WorldConfig(), "train_prompts": 3600, "eval_prompts": 600, "n": 4, "max_new_tokens": 16,
            "drop_length_stopped": True, "split": {"sft_fraction": 1 / 6}, "sft": {"num_train_epochs": 1},
            "wrpo": {"num_train_epochs": 2, "alpha": 1.0, "beta": 1.0}}  # fmt: skip


def _presets() -> dict[str, dict[str, Any]]:
    return {"demo": demo_settings(quick=False), "smallest": demo_settings(quick=True)}


def toy_config_data(
    *,
    sources: dict[str, str],
    target: str,
    prompts: str,
    held_out: str | None,
    storage_url: str,
    settings: dict[str, Any],
    run_name: str,
    executor: str = "inline",
) -> dict[str, Any]:
    """A fusion config (plain data) of a toy run: beta/lr scaled for tiny models (the paper's 0.01/3e-7 suit 8B).

    With `held_out` the pipeline's evaluation stage runs too (win rates vs target and Target-SFT).
    """
    sampling = {
        "n": settings["n"],
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": settings["max_new_tokens"],
        "drop_length_stopped": settings["drop_length_stopped"],
    }
    common = {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
              "bf16": False, "logging_steps": 10, "save_steps": 10_000, "warmup_ratio": 0.1}  # fmt: skip
    return {
        "run_name": run_name,
        "prompts": {"path": prompts},
        "sources": [{"path": path, "name": name, "sampling": sampling} for name, path in sources.items()],
        "target": {"path": target, "name": "target", "sampling": {**sampling, "temperature": 1.0}},
        "reward_model": {"path": "toy-verifier", "kind": "toy_verifier"},
        "sft": {
            **common,
            "learning_rate": 3e-4,
            "max_seq_length": 96,
            "max_prompt_length": 64,
            **settings["sft"],
        },
        "wrpo": {
            **common,
            "learning_rate": 1e-4,
            "beta": 1.0,
            "alpha": 0.5,
            "max_length": 96,
            "max_prompt_length": 64,
            **settings["wrpo"],
        },
        "evaluation": {
            "prompts": None if held_out is None else {"path": held_out},
            "max_new_tokens": settings["max_new_tokens"],
        },
        "split": settings.get("split", {}),
        "storage": {"url": storage_url},
        "compute": {"executor": executor},
    }


def default_cache_dir() -> Path:
    """Where toy worlds are built: `$WRPO_CACHE/toy-world` (default `~/.cache/wrpo-fusion/toy-world`)."""
    from wrpo_core.storage.filesystem import cache_root

    return cache_root() / "toy-world"


def is_toy_path(path: str | None) -> bool:
    return bool(path) and str(path).startswith(TOY_PREFIX)


def parse_toy_path(path: str) -> tuple[str, str]:
    """(preset, item) of a `toy-world:<preset>/<item>` path; ValueError naming what is wrong."""
    body = path.removeprefix(TOY_PREFIX)
    preset, _, item = body.partition("/")
    presets = _presets()
    if preset not in presets or not item:
        raise ValueError(f"{path!r}: expected toy-world:<preset>/<item> with preset one of {sorted(presets)}")
    items = [*presets[preset]["world"].sources, "target", *PROMPT_ITEMS]
    if item not in items:
        raise ValueError(f"{path!r}: unknown item {item!r}; the {preset} toy world has {items}")
    return preset, item


def toy_prompts(world_config: Any, n_train: int, n_eval: int, *, seed: int) -> tuple[list[dict], list[dict]]:
    """Training prompts and disjoint held-out prompts over the sources' skills, deterministic by seed."""
    from wrpo_core.toy.skills import make_prompts

    skills = sorted({s for names in world_config.sources.values() for s in names})
    train = make_prompts(skills, n_train, seed=seed)
    seen = {r["prompt"] for r in train}
    held_out = [r for r in make_prompts(skills, n_eval + n_train, seed=seed + 1) if r["prompt"] not in seen]
    return train, held_out[:n_eval]


def toy_prompt_rows(preset: str) -> tuple[list[dict], list[dict]]:
    """The preset's training and held-out prompts (rows with prompt, answer, skill): the demo's."""
    settings = _presets()[preset]
    world = settings["world"]
    return toy_prompts(world, settings["train_prompts"], settings["eval_prompts"], seed=world.seed + 1000)


def _write_once(path: Path, rows: list[dict]) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # atomic: readers never see half a file


def _version_key(preset: str, item: str) -> str:
    """The preset's world cache key and, for prompt files, its prompt counts: what the files behind
    `toy-world:<preset>/<item>` depend on."""
    settings = _presets()[preset]
    key = settings["world"].cache_key()
    return f"{key}-{settings['train_prompts']}-{settings['eval_prompts']}" if item in PROMPT_ITEMS else key


def toy_path_version(path: str) -> str:
    """What a `toy-world:` path stands for now, without building anything: the path, its world's cache
    key and, for prompt files, the preset's prompt counts. A stage keyed on it reruns when they change."""
    return f"{path}@{_version_key(*parse_toy_path(path))}"


def resolve_path(path: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The local folder/file behind a `toy-world:` path (building the world once); other paths as given."""
    if not is_toy_path(path):
        return path
    from wrpo_core.toy.world import build_world

    preset, item = parse_toy_path(path)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if item in PROMPT_ITEMS:
        train, held_out = toy_prompt_rows(preset)
        # The counts are in the name: a cached file of other counts is never returned for these.
        file = cache / f"prompts-{preset}-{_version_key(preset, item)}" / f"{item}.jsonl"
        _write_once(file, train if item == "prompts" else held_out)
        return str(file)
    world = build_world(_presets()[preset]["world"], cache)
    return world.target if item == "target" else world.sources[item]


def toy_fusion_parameters(preset: str = "demo") -> dict[str, Any]:
    """A complete fusion config (plain data) on the preset's toy world: the deployment's default.

    Every model and prompt file is a `toy-world:` path, so the config is valid on any machine.
    """
    settings = _presets()[preset]
    return toy_config_data(
        sources={name: f"{TOY_PREFIX}{preset}/{name}" for name in settings["world"].sources},
        target=f"{TOY_PREFIX}{preset}/target",
        prompts=f"{TOY_PREFIX}{preset}/prompts",
        held_out=f"{TOY_PREFIX}{preset}/held-out",
        storage_url="./runs",
        settings=settings,
        run_name=f"toy-{preset}",
    )
