"""Reward models that score (prompt, response) pairs: HF sequence classifiers and the toy verifier.

Scores are stored per sample with the reward model's id (SCORES schema). A NaN or infinite
score fails, naming the sample. Custom-code reward models such as ArmoRM load only with an
explicit `trust_remote_code: true` on that reward model's config, through
`wrpo_core.remote_code` (stand-ins for the docstring names transformers 5 removed; anything else
missing is a permanent error). Tokenizer and model are loaded at the spec's `revision`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from wrpo_core.config import RewardModelSpec
from wrpo_core.remote_code import check_remote_code, remote_code_import_error
from wrpo_core.schemas import SCORES, DataError, conform


class RewardScorer(Protocol):
    """Anything that scores responses to prompts; `name` is stored with every score."""

    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


@dataclass
class ToyVerifierScorer:
    """The toy world's exact verifier: 1.0 for an exact answer, partial credit otherwise."""

    name: str = "toy-verifier"

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        from wrpo_core.toy.skills import score_batch

        return score_batch(list(prompts), list(responses))


def choose_pad_id(
    rows: Sequence[Sequence[int]], *, preferred: int | None, special_ids: set[int], size: int
) -> int:
    """A pad id that occurs in none of `rows`: the tokenizer's pad when dedicated, else the highest free id.

    `preferred` (the tokenizer's pad) is used when it is no other special token (`special_ids`, e.g.
    not EOS / end-of-turn, which chat templates write inside the text) and occurs in no row. Else
    the highest id below `size` (the embedding rows) that occurs in no row. Any such id gives the
    same scores: right padding with an attention mask hides pad positions from real ones.
    """
    used: set[int] = set().union(*map(set, rows)) if rows else set()
    if preferred is not None and preferred not in special_ids and preferred not in used and preferred < size:
        return preferred
    free = next((i for i in range(size - 1, -1, -1) if i not in used), None)
    if free is None:
        raise DataError(f"no pad id is free: the conversations to score use all {size} token ids")
    return free


class SequenceClassifierScorer:
    """A Hugging Face sequence classifier scoring the chat-templated [user, assistant] conversation.

    Batched longest-first to minimise padding. Conversations longer than `max_length` tokens are
    truncated from the LEFT, so the response (what is judged) is kept whole and the start of the
    prompt goes first. Uses the model's `score` output when it has one (ArmoRM), else logit 0.

    Padding is on the right, with an attention mask, and the pad id is one that occurs in none of
    the conversations of the call (`choose_pad_id`); it is set as `model.config.pad_token_id`, so
    both standard HF classifiers (pool at the last non-pad token) and ArmoRM-like models (pool just
    before the FIRST pad token) read the last real token, and a batch scores like batch size 1.
    Never EOS: chat templates write it (or the end-of-turn token) inside the text, where an
    ArmoRM-like model would pool instead. `pad_token_id` holds the id the last call used.

    A model with its own code (config.json `auto_map`) loads only with `trust_remote_code`, through
    `wrpo_core.remote_code.check_remote_code`; `remote_code_stand_ins` lists the removed transformers
    names it supplied for that code, and an ImportError from that code is a permanent RemoteCodeError.

    `on_progress(done, total)`, when set, is called with the conversations scored after each batch.
    """

    def __init__(self, spec: RewardModelSpec, *, device: str | None = None, progress: bool = True):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        # Scores of another revision come from another reward model: the name says which.
        self.name = spec.path if spec.revision is None else f"{spec.path}@{spec.revision}"
        self.batch_size = spec.batch_size
        self.max_length = spec.max_length
        self.progress = progress
        self.remote_code_stand_ins = check_remote_code(
            spec.path, spec.revision, trusted=spec.trust_remote_code
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                spec.path, trust_remote_code=spec.trust_remote_code, revision=spec.revision
            )
            self.model = AutoModelForSequenceClassification.from_pretrained(
                spec.path, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code, revision=spec.revision
            ).eval()
        except ImportError as error:
            if spec.trust_remote_code:  # the model's own code does not import: a retry cannot help
                raise remote_code_import_error(spec.path, error) from error
            raise
        self.tokenizer.truncation_side = "left"
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pad = self.tokenizer.pad_token
        self._special_ids = {
            self.tokenizer.convert_tokens_to_ids(t) for t in self.tokenizer.all_special_tokens if t != pad
        }
        embeddings = self.model.get_input_embeddings()
        self._id_limit = int(
            embeddings.num_embeddings if embeddings is not None else self.model.config.vocab_size
        )
        self.pad_token_id: int | None = None
        self.on_progress: Callable[[int, int], None] | None = None

    def _texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
            for p, r in zip(prompts, responses, strict=True)
        ]

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        encoded = [
            self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=self.max_length)[
                "input_ids"
            ]
            for text in self._texts(prompts, responses)
        ]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        scores = [0.0] * len(encoded)
        pad = choose_pad_id(
            encoded, preferred=self.tokenizer.pad_token_id, special_ids=self._special_ids, size=self._id_limit
        )
        self.pad_token_id = self.model.config.pad_token_id = pad
        for start in tqdm(
            range(0, len(order), self.batch_size), desc=f"scoring {self.name}", disable=not self.progress
        ):
            index = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in index)
            ids = torch.full((len(index), width), pad, dtype=torch.long)
            mask = torch.zeros((len(index), width), dtype=torch.long)
            for row, i in enumerate(index):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            output = self.model(
                input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)
            )
            values = output.score if getattr(output, "score", None) is not None else output.logits[:, 0]
            for row, i in enumerate(index):
                scores[i] = float(values[row].float())
            if self.on_progress is not None:
                self.on_progress(start + len(index), len(order))
        return scores


def load_scorer(spec: RewardModelSpec, *, progress: bool = True) -> RewardScorer:
    """The scorer a reward-model config names."""
    if spec.kind == "toy_verifier":
        return ToyVerifierScorer()
    return SequenceClassifierScorer(spec, progress=progress)


def score_samples(samples: pa.Table, prompt_by_id: dict[str, str], scorer: RewardScorer) -> pa.Table:
    """SCORES rows for every sample; a missing prompt or a non-finite score fails naming the sample."""
    ids = samples["prompt_id"].to_pylist()
    missing = next((pid for pid in ids if pid not in prompt_by_id), None)
    if missing is not None:
        raise DataError(f"samples: prompt_id {missing} has no prompt text to score against")
    values = scorer.score([prompt_by_id[pid] for pid in ids], samples["text"].to_pylist())
    models, indices = samples["model"].to_pylist(), samples["sample_index"].to_pylist()
    for pid, model, k, value in zip(ids, models, indices, values, strict=True):
        if not math.isfinite(value):
            raise DataError(
                f"reward model {scorer.name} gave a non-finite score {value} to sample "
                f"(prompt_id={pid}, model={model}, sample_index={k})"
            )
    table = pa.table(
        {
            "prompt_id": ids,
            "model": models,
            "sample_index": pa.array(indices, pa.int32()),
            "reward_model": [scorer.name] * len(ids),
            "score": pa.array(values, pa.float64()),
        }
    )
    return conform(table, SCORES, where=f"scores by {scorer.name}")
