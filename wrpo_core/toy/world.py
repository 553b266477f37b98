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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from wrpo_core.tokenization import IGNORE_INDEX, ResponseCollator, encode_example, end_of_turn_id, prompt_text
from wrpo_core.toy.skills import SKILLS, accuracy_by_skill, make_prompts
from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model
from wrpo_core.toy.tokenizer import build_char_tokenizer

CODE_VERSION = 1
"""Part of the cache key: bump it whenever the training recipe or data layout changes."""

MANIFEST = "world.json"
"""File in a built world's folder that describes it; a folder without it is not a finished world."""

_MAX_LENGTH = 96
_MAX_PROMPT_LENGTH = 64
"""Toy prompts are at most ~30 tokens and answers at most ~10, so nothing is ever truncated."""
_DEV_MAX_NEW_TOKENS = 12
"""Longest exact answer of any skill (8 characters) plus `<|end|>`, with a little room to spare."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSize(_Model):
    """Shape of every tiny Llama in the world (sources and target alike)."""

    hidden_size: Annotated[int, Field(ge=4)] = 128
    num_layers: Annotated[int, Field(ge=1)] = 2
    num_heads: Annotated[int, Field(ge=1)] = 4
    intermediate_size: Annotated[int | None, Field(ge=4)] = Field(
        default=None, description="MLP width; None means 2 * hidden_size."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSize:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self

    def kwargs(self) -> dict[str, int]:
        """Keyword arguments for `build_tiny_llama`."""
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size or 2 * self.hidden_size,
        }


class _Optimization(_Model):
    max_steps: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)] = 32
    lr: Annotated[float, Field(gt=0)] = 3e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 30
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.1, description="Cosine decay from lr to lr * min_lr_ratio over max_steps."
    )
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    check_every: Annotated[int, Field(ge=1)] = Field(
        default=50, description="Steps between dev-set checks (early stopping, snapshots, capping)."
    )


class SourceRecipe(_Optimization):
    """How every source is trained: its own skills only, until all reach `stop_accuracy` on dev."""

    max_steps: Annotated[int, Field(ge=1)] = 1200
    batch_size: Annotated[int, Field(ge=1)] = 64
    stop_accuracy: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.98, description="Stop once every own skill reaches this exact accuracy on the dev set."
    )


class TargetRecipe(_Optimization):
    """How the partly competent target is trained.

    It trains on all the sources' skills (weighted by `skill_weights`, default 1 each); at every
    check a skill whose dev accuracy is >= `cap` leaves the mix until it drops below again.
    Training stops when every skill's dev accuracy lies inside `band`, or at `max_steps`; the
    kept weights are the snapshot (one per check) whose dev accuracies fit `band` best.
    """

    max_steps: Annotated[int, Field(ge=1)] = 1500
    check_every: Annotated[int, Field(ge=1)] = 25
    cap: Annotated[float, Field(gt=0, le=1)] = 0.25
    band: tuple[float, float] = (0.15, 0.35)
    skill_weights: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)

    @field_validator("band")
    @classmethod
    def _ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        low, high = band
        if not 0 <= low <= high <= 1:
            raise ValueError(f"band must satisfy 0 <= low <= high <= 1, got {band}")
        return band


class DataSizes(_Model):
    """Prompts per skill in each disjoint block drawn for the world."""

    eval_per_skill: Annotated[int, Field(ge=1)] = 100
    dev_per_skill: Annotated[int, Field(ge=1)] = 100
    train_per_skill: Annotated[int, Field(ge=1)] = 5000


def _default_sources() -> dict[str, list[str]]:
    # One skill per specialist: each reaches 98% dev accuracy in 300-700 steps of batch 64, while
    # two word skills in one model interfere and take far longer (measured). Left
    # out of the default world (usable in a custom config): `add` (a tiny Llama stays near 0%
    # after 2000 steps), `caesar` (needs 1100-1500+ steps, some seeds stall at 60-70%) and
    # `max_digit` (its answer is the last digit of `sort_digits`' answer, so a generalist that
    # learns sorting at all gets max_digit 60-100% right: no partly competent target).
    return {
        "src-reverse": ["reverse"],
        "src-upper": ["upper"],
        "src-sort": ["sort_digits"],
    }


class WorldConfig(_Model):
    """Everything that determines a toy world; its hash (with `CODE_VERSION`) is the cache key."""

    seed: int = 0
    model: ModelSize = Field(default_factory=ModelSize)
    sources: dict[str, list[str]] = Field(
        default_factory=_default_sources, description="Source name -> the skills it specializes in."
    )
    source_training: SourceRecipe = Field(default_factory=SourceRecipe)
    target: TargetRecipe = Field(default_factory=TargetRecipe)
    data: DataSizes = Field(default_factory=DataSizes)

    @field_validator("sources")
    @classmethod
    def _known_skills(cls, sources: dict[str, list[str]]) -> dict[str, list[str]]:
        if not sources:
            raise ValueError("a world needs at least one source")
        for name, skills in sources.items():
            if not name or "/" in name or "\\" in name or name.startswith(".") or name == "target":
                raise ValueError(f"source name {name!r} must be a plain folder name other than 'target'")
            if not skills:
                raise ValueError(f"source {name!r} has no skills")
            unknown = [s for s in skills if s not in SKILLS]
            if unknown:
                raise ValueError(f"source {name!r}: unknown skills {unknown}; known: {sorted(SKILLS)}")
            if len(set(skills)) != len(skills):
                raise ValueError(f"source {name!r}: skills repeat: {skills}")
        return sources

    @model_validator(mode="after")
    def _weights_known(self) -> WorldConfig:
        extra = sorted(set(self.target.skill_weights) - set(self.skills()))
        if extra:
            raise ValueError(f"target.skill_weights names skills no source has: {extra}")
        return self

    def skills(self) -> list[str]:
        """The world's skills: every source's skills, in `SKILLS` order."""
        used = {s for skills in self.sources.values() for s in skills}
        return [s for s in SKILLS if s in used]

    def cache_key(self) -> str:
        """Hex digest of the config and `CODE_VERSION`: the name of the world's cache folder."""
        payload = json.dumps(
            {"code_version": CODE_VERSION, "config": self.model_dump(mode="json")}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def smallest(cls, seed: int = 0) -> WorldConfig:
        """A world that builds in a few seconds, for smoke tests; its models are not competent."""
        return cls(
            seed=seed,
            model=ModelSize(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
            source_training=SourceRecipe(max_steps=4, batch_size=4, warmup_steps=1, check_every=2),
            target=TargetRecipe(max_steps=4, batch_size=4, warmup_steps=1, check_every=2),
            data=DataSizes(eval_per_skill=3, dev_per_skill=2, train_per_skill=8),
        )


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


# ---------------------------------------------------------------------------------------------
# Data


def _split_rows(config: WorldConfig) -> dict[str, list[dict[str, str]]]:
    """Disjoint eval / dev / train prompt rows over the world's skills (one `make_prompts` call).

    Every block holds the same number of prompts per skill (`make_prompts` cycles the skills).
    """
    skills = config.skills()
    k = len(skills)
    sizes = config.data
    n_eval, n_dev = k * sizes.eval_per_skill, k * sizes.dev_per_skill
    rows = make_prompts(
        skills, n_eval + n_dev + k * sizes.train_per_skill, seed=_derive_seed(config.seed, "data")
    )
    return {"eval": rows[:n_eval], "dev": rows[n_eval : n_eval + n_dev], "train": rows[n_eval + n_dev :]}


def _eval_rows(config: WorldConfig) -> list[dict[str, str]]:
    """The eval block of `_split_rows`, drawn alone: `make_prompts` rows depend only on earlier rows."""
    skills = config.skills()
    return make_prompts(
        skills, len(skills) * config.data.eval_per_skill, seed=_derive_seed(config.seed, "data")
    )


def _encode_pool(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Mapping[str, str]]
) -> dict[str, list[dict[str, list]]]:
    """Tokenize (prompt, answer) rows with the production encoder, grouped by skill."""
    eot = end_of_turn_id(tokenizer)
    pools: dict[str, list[dict[str, list]]] = {}
    for row in rows:
        example = encode_example(
            tokenizer,
            row["prompt"],
            [row["answer"]],
            max_length=_MAX_LENGTH,
            max_prompt_length=_MAX_PROMPT_LENGTH,
            eot_id=eot,
        )
        pools.setdefault(row["skill"], []).append(
            {"prompt_ids": example.prompt_ids, "response_ids": example.response_ids}
        )
    return pools


def _derive_seed(seed: int, name: str) -> int:
    """A stable 31-bit seed for one part of the world (a model, the data), from the world seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big") >> 1


# ---------------------------------------------------------------------------------------------
# Generation and evaluation


@torch.no_grad()
def greedy_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 128,
) -> list[str]:
    """Greedy responses of a loaded model: batched, left-padded, chat-templated, stopped at eos.

    Each prompt is wrapped as one user turn plus the assistant header (`prompt_text`), so the
    model sees exactly what the pipeline's samplers send. Generation stops at the tokenizer's eos
    (`<|end|>` for the toy tokenizer) or after `max_new_tokens`; only the new tokens are decoded,
    with special tokens skipped. The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    eot = end_of_turn_id(tokenizer)
    was_training = model.training
    model.eval()
    responses: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
            batch = tokenizer(
                texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
            )
            batch = {key: value.to(model.device) for key, value in batch.items()}
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eot,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return responses


def evaluate_exact(
    model_path: str | os.PathLike[str],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 128,
) -> dict[str, float]:
    """Exact-match accuracy per skill of the model saved at `model_path` on toy `prompts`.

    Loads the model and tokenizer with `AutoModelForCausalLM` / `AutoTokenizer`, answers every
    prompt greedily (see `greedy_responses`: batched, left-padded, chat template's generation
    prompt, stops at `<|end|>`, new tokens decoded with special tokens skipped) and scores them
    with `skills.accuracy_by_skill`: a response is correct when it equals the exact answer after
    stripping surrounding whitespace. Returns `{skill: accuracy in [0, 1]}` for every skill present
    in `prompts`, in first-seen order. ValueError on a prompt that is not a toy skill prompt.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    responses = greedy_responses(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return accuracy_by_skill(prompts, responses)


def format_accuracy_table(accuracy: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: one row per model, one column per skill, exact accuracy in percent."""
    skills: list[str] = []
    for per_skill in accuracy.values():
        skills.extend(s for s in per_skill if s not in skills)
    lines = ["| model | " + " | ".join(skills) + " |", "|---|" + "---:|" * len(skills)]
    for model, per_skill in accuracy.items():
        cells = [f"{100 * per_skill[s]:.0f}" if s in per_skill else "-" for s in skills]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class _Check:
    """What a dev check decides: the new skill weights (empty: stop) and a snapshot score."""

    weights: dict[str, float]
    score: float
    postfix: str


def _train(
    model: PreTrainedModel,
    pools: Mapping[str, Sequence[dict[str, list]]],
    weights: dict[str, float],
    recipe: _Optimization,
    *,
    seed: int,
    pad_token_id: int,
    check: Callable[[int], _Check],
    desc: str,
    progress: bool,
) -> int:
    """Train `model` in place; keep the best-scoring snapshot. Return the kept snapshot's step.

    Each step draws `batch_size` examples: a skill by `weights`, then a row of that skill's pool.
    Every `check_every` steps (and at the end) `check(step)` scores the model and may change the
    weights; an empty weight map stops training.
    """
    rng = random.Random(seed)
    collator = ResponseCollator(pad_token_id=pad_token_id)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay
    )
    best: tuple[float, int, dict[str, torch.Tensor], str] | None = None
    model.train()
    bar = tqdm(total=recipe.max_steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        step = 0
        while step < recipe.max_steps and weights:
            names = list(weights)
            chosen = rng.choices(names, weights=[weights[n] for n in names], k=recipe.batch_size)
            batch = collator([rng.choice(pools[name]) for name in chosen])
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, recipe)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                batch["labels"][:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update(1)
            if step % recipe.check_every == 0 or step == recipe.max_steps:
                result = check(step)
                if best is None or result.score >= best[0]:
                    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best = (result.score, step, state, result.postfix)
                weights = result.weights
                bar.set_postfix_str(f"loss {loss.item():.3f} {result.postfix}")
    finally:
        bar.close()
    model.eval()
    if best is None:
        return 0
    model.load_state_dict(best[2])
    if progress:
        tqdm.write(f"{desc}: {step} steps, kept the snapshot of step {best[1]} ({best[3]})")
    return best[1]


def _lr_at(step: int, recipe: _Optimization) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at `max_steps`."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.max_steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    floor = recipe.min_lr_ratio
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _dev_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dev: Mapping[str, Sequence[str]],
    skills: Sequence[str],
) -> dict[str, float]:
    prompts = [p for s in skills for p in dev[s]]
    responses = greedy_responses(model, tokenizer, prompts, max_new_tokens=_DEV_MAX_NEW_TOKENS)
    accuracy = accuracy_by_skill(prompts, responses)
    return {s: accuracy.get(s, 0.0) for s in skills}


def _fmt(accuracy: Mapping[str, float]) -> str:
    return " ".join(f"{name[:4]}={value:.2f}" for name, value in accuracy.items())


def _train_source(
    name: str,
    skills: Sequence[str],
    config: WorldConfig,
    tokenizer: PreTrainedTokenizerBase,
    pools: Mapping[str, Sequence[dict[str, list]]],
    dev: Mapping[str, Sequence[str]],
    progress: bool,
) -> tuple[PreTrainedModel, int]:
    recipe = config.source_training
    model = build_tiny_llama(
        tokenizer, seed=_derive_seed(config.seed, f"model:{name}"), **config.model.kwargs()
    )
    weights = dict.fromkeys(skills, 1.0)

    def check(step: int) -> _Check:
        accuracy = _dev_accuracy(model, tokenizer, dev, skills)
        worst = min(accuracy.values())
        done = worst >= recipe.stop_accuracy
        # Score: worst skill first, then the mean; later snapshots win ties.
        score = worst + 1e-3 * sum(accuracy.values()) / len(accuracy)
        return _Check({} if done else weights, score, _fmt(accuracy))

    steps = _train(
        model,
        pools,
        weights,
        recipe,
        seed=_derive_seed(config.seed, f"batches:{name}"),
        pad_token_id=tokenizer.pad_token_id,
        check=check,
        desc=f"toy source {name}",
        progress=progress,
    )
    return model, steps


def _train_target(
    config: WorldConfig,
    tokenizer: PreTrainedTokenizerBase,
    pools: Mapping[str, Sequence[dict[str, list]]],
    dev: Mapping[str, Sequence[str]],
    progress: bool,
) -> tuple[PreTrainedModel, int]:
    recipe = config.target
    skills = config.skills()
    base = {s: recipe.skill_weights.get(s, 1.0) for s in skills}
    low, high = recipe.band
    center = (low + high) / 2
    model = build_tiny_llama(
        tokenizer, seed=_derive_seed(config.seed, "model:target"), **config.model.kwargs()
    )

    def check(step: int) -> _Check:
        accuracy = _dev_accuracy(model, tokenizer, dev, skills)
        outside = sum(max(0.0, low - a, a - high) for a in accuracy.values())
        off_center = sum(abs(a - center) for a in accuracy.values())
        in_band = outside == 0
        weights = {s: w for s, w in base.items() if accuracy[s] < recipe.cap}
        if not weights:  # every skill at or above the cap: keep training none, i.e. stop
            in_band = True
        return _Check({} if in_band else weights, -outside - 1e-3 * off_center, _fmt(accuracy))

    steps = _train(
        model,
        pools,
        base,
        recipe,
        seed=_derive_seed(config.seed, "batches:target"),
        pad_token_id=tokenizer.pad_token_id,
        check=check,
        desc="toy target",
        progress=progress,
    )
    return model, steps


# ---------------------------------------------------------------------------------------------
# Building and caching


def build_world(config: WorldConfig, cache_dir: str | os.PathLike[str], *, progress: bool = True) -> World:
    """Build (or load from `cache_dir`) the toy world of `config`: trained sources and target.

    The world lives in `cache_dir/world-<config.cache_key()>`; if that folder holds a manifest the
    world is returned from it without training. Otherwise every model is trained into a temporary
    folder beside it, evaluated on the held-out prompts, and the folder is renamed into place
    (when another process finished first, its world is kept and this one discarded).
    """
    cache = Path(cache_dir).expanduser()
    root = cache / f"world-{config.cache_key()}"
    if (root / MANIFEST).is_file():
        return _load_world(root)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=cache))
    try:
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
