"""Toy quadruples for the trainer tests: y_ws is the word reversed (right), y_wt the same minus its
last letter (close), y_l the word itself (wrong); no reference log-probs (the job computes them)."""

from __future__ import annotations

import pyarrow as pa

WORDS = ["abc", "dog", "tree", "house", "mouse", "pen", "lamp", "cup"]


def quadruples_table(
    words: list[str] = WORDS, *, prompts: list[str] | None = None, y_wt: list[str] | None = None
) -> pa.Table:
    """QUADRUPLES rows for `words` (prompts default to 'reverse: WORD')."""
    n = len(words)
    return pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "prompt": prompts or [f"reverse: {w}" for w in words],
            "y_ws": [w[::-1] for w in words],
            "y_ws_model": ["src"] * n,
            "y_ws_score": [1.0] * n,
            "y_wt": y_wt or [w[::-1][:-1] for w in words],
            "y_wt_score": [0.8] * n,
            "y_l": list(words),
            "y_l_score": [0.1] * n,
            "ref_logp_ws": pa.nulls(n, pa.float64()),
            "ref_logp_wt": pa.nulls(n, pa.float64()),
            "ref_logp_l": pa.nulls(n, pa.float64()),
        }
    )
