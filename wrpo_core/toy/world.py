"""The toy fusion world: specialist SOURCE models and a partly competent TARGET, trained from scratch.

Model hubs are out of reach, so the toy pipeline fuses tiny Llamas that this module trains itself
on the synthetic skills of `wrpo_core.toy.skills` (character tokenizer, chat template, exact
verifiers):

- every SOURCE is a specialist: trained only on its own skills until it answers (nearly) all of
  them exactly; on other skills it still emits a short (wrong) answer, so the verifier reward
  ranks the right specialist's sample first and y_ws comes from it;
- the TARGET is a generalist that is only partly competent (about 10-40% exact on each skill):
  trained on all the sources' skills, a skill leaves its training mix while its accuracy on a
  dev set is at or above a cap, and the snapshot whose dev accuracies sit best inside a band is
  kept. That leaves SFT on y_ws and preference optimization something to sharpen.

Training is a plain torch loop (AdamW, warmup + cosine, cross-entropy on response tokens only)
over examples built by `encode_example` + `ResponseCollator`, i.e. exactly the tokenization the
SFT and WRPO trainers use. Everything is deterministic in `WorldConfig.seed` (on one machine
with one thread count: run with `OMP_NUM_THREADS=1` and `torch.set_num_threads(1)`).

    world = build_world(WorldConfig(), "runs/toy-worlds")     # ~3.5 min of one core, then cached
    world.sources["src-sort"], world.target                   # Hugging Face model folders
    world.skills                                               # the skills to draw prompts from
    evaluate_exact(world.target, prompts, max_new_tokens=16)  # {skill: exact accuracy}

Default world (seed 0), exact accuracy (%) on its 300 held-out prompts; 196 s of CPU on one core:

    | model       | reverse | sort_digits | upper |
    |-------------|--------:|------------:|------:|
    | src-reverse |      95 |           0 |     0 |
    | src-upper   |       0 |           0 |    99 |
    | src-sort    |       0 |          96 |     0 |
    | target      |      36 |          22 |    19 |

`build_world` caches by a hash of the config and `CODE_VERSION`: a second call with the same
config reads one JSON file. Builds write into a temporary folder renamed into place, so a crash
never leaves a half-written world (a killed build may leave a hidden `.tmp-world-*` folder,
which is never read and can be deleted). Run `python -m wrpo_core.toy.world` to build the default world
and print its accuracy table.

Held-out data: prompts come from one `make_prompts(world skills, n, seed)` call split into an
evaluation block, a dev block (early stopping, target capping) and a training pool, all disjoint.
Prompts a pipeline draws elsewhere may overlap the training pool a little (the argument spaces are
large, so rarely); `World.eval_prompts` rebuilds the world's own held-out evaluation prompts.

Layout: `world_config` (the config models and `CODE_VERSION`), `world_data` (prompt blocks and
tokenized pools), `world_eval` (greedy responses, exact evaluation, accuracy table) and
`world_training` (the training loop and recipes); this module builds, caches and loads worlds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wrpo_core.toy.skills import SKILLS, accuracy_by_skill
from wrpo_core.toy.tiny_models import save_tiny_model
from wrpo_core.toy.tokenizer import build_char_tokenizer
from wrpo_core.toy.world_config import CODE_VERSION, WorldConfig
from wrpo_core.toy.world_data import _encode_pool, _eval_rows, _split_rows
from wrpo_core.toy.world_eval import evaluate_exact, format_accuracy_table, greedy_responses
from wrpo_core.toy.world_training import _train_source, _train_target

__all__ = [
    "MANIFEST",
    "World",
    "WorldConfig",
    "build_world",
    "evaluate_exact",
    "format_accuracy_table",
    "greedy_responses",
    "main",
]

MANIFEST = "world.json"
"""File in a built world's folder that describes it; a folder without it is not a finished world."""


@dataclass(frozen=True)
class World:
    """A built toy world: Hugging Face model folders of the sources and the target, and their report."""

    config: WorldConfig
    root: str
    sources: dict[str, str]
    """Source name -> saved model folder (model + tokenizer with chat template)."""
    target: str
    """Saved model folder of the partly competent target."""
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    """Model name ('target' or a source name) -> skill -> exact accuracy on the held-out eval prompts."""
    build_seconds: float = 0.0
    steps: dict[str, int] = field(default_factory=dict)
    """Model name -> optimizer steps trained (the kept snapshot's step)."""

    @property
    def skills(self) -> list[str]:
        return self.config.skills()

    def eval_prompts(self) -> list[str]:
        """The held-out prompts the accuracy table was measured on (never trained on)."""
        return [row["prompt"] for row in _eval_rows(self.config)]

    def table(self) -> str:
        """Markdown table of `accuracy` (percent exact), one row per model."""
        return format_accuracy_table(self.accuracy)


logger = logging.getLogger(__name__)

PREBUILT = Path(__file__).resolve().parent / "prebuilt"
"""Worlds shipped with the package (the demo's), one folder per cache key with a SHA256SUMS file."""


def build_world(config: WorldConfig, cache_dir: str | os.PathLike[str], *, progress: bool = True) -> World:
    """Build (or load from `cache_dir`) the toy world of `config`: trained sources and target.

    The world lives in `cache_dir/world-<config.cache_key()>`; if that folder holds a manifest the
    world is returned from it without training. Else a world shipped with the package for this
    key (`PREBUILT`, checked against its SHA256SUMS) is copied there, so every machine runs the
    demo on the same models; a copy that does not match its sums is reported and not used.
    Otherwise every model is trained into a temporary folder beside it, evaluated on the held-out
    prompts, and the folder is renamed into place (when another process finished first, its
    world is kept and this one discarded).
    """
    cache = Path(cache_dir).expanduser()
    root = cache / f"world-{config.cache_key()}"
    if (root / MANIFEST).is_file():
        return _load_world(root)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=cache))
    try:
        shipped = PREBUILT / root.name
        problem = verify_shipped_world(shipped) if shipped.is_dir() else "none shipped"
        if problem is None:
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        else:
            if shipped.is_dir():
                logger.warning(
                    "toy world %s: the shipped copy is not used (%s); building it", root.name, problem
                )
            _build_into(config, tmp, progress=progress)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / MANIFEST).is_file():
                raise
            # Another builder won the race with the same config; its world is identical.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _load_world(root)


def verify_shipped_world(folder: Path) -> str | None:
    """What is wrong with a shipped world's files against its SHA256SUMS (a missing, extra or changed
    file, e.g. a Git LFS pointer instead of the weights), or None when every file matches."""
    sums_file = folder / "SHA256SUMS"
    if not sums_file.is_file():
        return "no SHA256SUMS"
    expected = {}
    for line in sums_file.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        expected[name.removeprefix("./")] = digest
    present = {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS"
    }
    if present != set(expected):
        return f"files differ from SHA256SUMS: {sorted(present ^ set(expected))[:5]}"
    for name, digest in sorted(expected.items()):
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
            return f"{name} does not match its sha256"
    return None


def _build_into(config: WorldConfig, folder: Path, *, progress: bool) -> None:
    started = time.perf_counter()
    tokenizer = build_char_tokenizer()
    blocks = _split_rows(config)
    pools = _encode_pool(tokenizer, blocks["train"])
    dev: dict[str, list[str]] = {}
    for row in blocks["dev"]:
        dev.setdefault(row["skill"], []).append(row["prompt"])
    eval_prompts = [row["prompt"] for row in blocks["eval"]]

    models: dict[str, str] = {}
    steps: dict[str, int] = {}
    accuracy: dict[str, dict[str, float]] = {}
    for name, skills in config.sources.items():
        model, steps[name] = _train_source(name, skills, config, tokenizer, pools, dev, progress)
        models[name] = f"sources/{name}"
        save_tiny_model(model, tokenizer, folder / models[name])
        accuracy[name] = _ordered(
            accuracy_by_skill(eval_prompts, greedy_responses(model, tokenizer, eval_prompts))
        )
    model, steps["target"] = _train_target(config, tokenizer, pools, dev, progress)
    models["target"] = "target"
    save_tiny_model(model, tokenizer, folder / "target")
    accuracy["target"] = _ordered(
        accuracy_by_skill(eval_prompts, greedy_responses(model, tokenizer, eval_prompts))
    )

    manifest = {
        "code_version": CODE_VERSION,
        "cache_key": config.cache_key(),
        "config": config.model_dump(mode="json"),
        "skills": config.skills(),
        "sources": {name: models[name] for name in config.sources},
        "target": models["target"],
        "accuracy": accuracy,
        "eval_prompts": len(eval_prompts),
        "steps": steps,
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    # Written last: a folder with a manifest is a complete world.
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _ordered(accuracy: Mapping[str, float]) -> dict[str, float]:
    return {s: accuracy[s] for s in SKILLS if s in accuracy}


def _load_world(root: Path) -> World:
    manifest: dict[str, Any] = json.loads((root / MANIFEST).read_text())
    config = WorldConfig.model_validate(manifest["config"])
    return World(
        config=config,
        root=str(root),
        sources={name: str(root / rel) for name, rel in manifest["sources"].items()},
        target=str(root / manifest["target"]),
        accuracy=manifest["accuracy"],
        build_seconds=manifest["build_seconds"],
        steps=manifest["steps"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or load) a toy world and print its per-skill accuracy table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=os.environ.get("WRPO_TOY_CACHE", "runs/toy-worlds"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smallest", action="store_true", help="the seconds-long smoke-test world")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = WorldConfig.smallest(args.seed) if args.smallest else WorldConfig(seed=args.seed)
    started = time.perf_counter()
    world = build_world(config, args.cache_dir)
    print(
        f"world {world.root} (built in {world.build_seconds:.0f} s; this call {time.perf_counter() - started:.1f} s)"
    )
    print(f"exact accuracy (%) on {len(world.eval_prompts())} held-out prompts; steps {world.steps}")
    print(world.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
