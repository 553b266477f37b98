"""Training the toy world's models from scratch: the plain torch loop and the source/target recipes.

`_train` is the loop (AdamW, warmup + cosine, cross-entropy on response tokens only, dev checks
that may change the skill mix and keep the best snapshot); `_train_source` trains a specialist
until its own skills are (nearly) exact, `_train_target` a generalist kept inside an accuracy band.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wrpo_core.tokenization import IGNORE_INDEX, ResponseCollator
from wrpo_core.toy.skills import accuracy_by_skill
from wrpo_core.toy.tiny_models import build_tiny_llama
from wrpo_core.toy.world_config import WorldConfig, _Optimization
from wrpo_core.toy.world_data import _derive_seed
from wrpo_core.toy.world_eval import greedy_responses

_DEV_MAX_NEW_TOKENS = 12
"""Longest exact answer of any skill (8 characters) plus `<|end|>`, with a little room to spare."""


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
