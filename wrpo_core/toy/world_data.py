"""The toy world's data: disjoint eval / dev / train prompt blocks, tokenized pools, derived seeds.

All prompts come from one `make_prompts` call seeded from the world seed (`_split_rows`), so the
blocks are disjoint and deterministic; `_eval_rows` redraws the held-out block alone, and
`_derive_seed` gives every part of the world (data, each model, each batch stream) its own seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from wrpo_core.tokenization import encode_example, end_of_turn_id
from wrpo_core.toy.skills import make_prompts
from wrpo_core.toy.world_config import WorldConfig

_MAX_LENGTH = 96
_MAX_PROMPT_LENGTH = 64
"""Toy prompts are at most ~30 tokens and answers at most ~10, so nothing is ever truncated."""


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
