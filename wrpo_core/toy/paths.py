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


def _presets() -> dict[str, dict[str, Any]]:
    from wrpo_core.toy.world import WorldConfig

    return {
        "demo": {"world": WorldConfig(), "train_prompts": 1800, "eval_prompts": 600},
        "smallest": {"world": WorldConfig.smallest(), "train_prompts": 24, "eval_prompts": 24},
    }


def default_cache_dir() -> Path:
    """Where toy worlds are built: `$WRPO_CACHE/toy-world` (default `~/.cache/wrpo-fusion/toy-world`)."""
    return Path(os.environ.get("WRPO_CACHE", Path.home() / ".cache" / "wrpo-fusion")) / "toy-world"


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


def toy_prompt_rows(preset: str) -> tuple[list[dict], list[dict]]:
    """The preset's training prompts and disjoint held-out prompts (rows with prompt, answer, skill)."""
    from wrpo_core.toy.skills import make_prompts

    settings = _presets()[preset]
    world_config = settings["world"]
    skills = sorted({s for names in world_config.sources.values() for s in names})
    seed = world_config.seed + 1000
    train = make_prompts(skills, settings["train_prompts"], seed=seed)
    seen = {r["prompt"] for r in train}
    held_out = [
        r
        for r in make_prompts(skills, settings["eval_prompts"] + settings["train_prompts"], seed=seed + 1)
        if r["prompt"] not in seen
    ]
    return train, held_out[: settings["eval_prompts"]]


def _write_once(path: Path, rows: list[dict]) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # atomic: readers never see half a file


def resolve_path(path: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The local folder/file behind a `toy-world:` path (building the world once); other paths as given."""
    if not is_toy_path(path):
        return path
    from wrpo_core.toy.world import build_world

    preset, item = parse_toy_path(path)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if item in PROMPT_ITEMS:
        train, held_out = toy_prompt_rows(preset)
        file = cache / f"prompts-{preset}-{_presets()[preset]['world'].cache_key()}" / f"{item}.jsonl"
        _write_once(file, train if item == "prompts" else held_out)
        return str(file)
    world = build_world(_presets()[preset]["world"], cache)
    return world.target if item == "target" else world.sources[item]


def toy_fusion_parameters(preset: str = "demo") -> dict[str, Any]:
    """A complete fusion config (as plain data) on the preset's toy world: the deployment's default.

    Hyper-parameters are the demo's (beta and learning rates scaled for tiny models); the reward
    model is the exact verifier. Plain data, so it can be written into prefect.yaml or a YAML file.
    """
    settings = _presets()[preset]
    quick = preset == "smallest"
    sampling = {
        "n": 2 if quick else 4,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 12 if quick else 16,
    }
    common = {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
              "bf16": False, "logging_steps": 1 if quick else 10, "save_steps": 10_000, "warmup_ratio": 0.1}  # fmt: skip
    steps = {"num_train_epochs": 1, "max_steps": 2} if quick else {}
    return {
        "run_name": f"toy-{preset}",
        "prompts": {"path": f"{TOY_PREFIX}{preset}/prompts"},
        "sources": [
            {"path": f"{TOY_PREFIX}{preset}/{name}", "name": name, "sampling": sampling}
            for name in settings["world"].sources
        ],
        "target": {
            "path": f"{TOY_PREFIX}{preset}/target",
            "name": "target",
            "sampling": {**sampling, "temperature": 1.0},
        },
        "reward_model": {"path": "toy-verifier", "kind": "toy_verifier"},
        "sft": {
            **common,
            "learning_rate": 3e-4,
            "max_seq_length": 96,
            "max_prompt_length": 64,
            **({"num_train_epochs": 2} | steps),
        },
        "wrpo": {
            **common,
            "learning_rate": 1e-4,
            "beta": 1.0,
            "alpha": 0.5,
            "max_length": 96,
            "max_prompt_length": 64,
            **({"num_train_epochs": 3} | steps),
        },
        "evaluation": {
            "prompts": {"path": f"{TOY_PREFIX}{preset}/held-out"},
            "max_new_tokens": sampling["max_new_tokens"],
        },
        "storage": {"url": "./runs"},
    }
