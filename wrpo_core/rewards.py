"""Reward models that score (prompt, response) pairs: HF sequence classifiers and the toy verifier.

Scores are stored per sample with the reward model's id (SCORES schema). A NaN or infinite
score fails, naming the sample. Custom-code reward models such as ArmoRM load only with an
explicit `trust_remote_code: true` on that reward model's config, through
`wrpo_core.remote_code` (stand-ins for the docstring names transformers 5 removed; anything else
missing is a permanent error). Tokenizer and model are loaded at the spec's `revision`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from wrpo_core.config import RewardModelSpec
from wrpo_core.kv_cache import cache_keyword, plain_dynamic_cache, prefill
from wrpo_core.remote_code import check_remote_code, remote_code_import_error
from wrpo_core.schemas import SCORES, DataError, conform

if TYPE_CHECKING:
    from transformers import DynamicCache


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


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all `rows` share, leaving every row at least one token of its own."""
    shortest = min(len(row) for row in rows)
    for i in range(shortest - 1):
        if any(row[i] != rows[0][i] for row in rows):
            return i
    return max(shortest - 1, 0)


def prefix_batches(
    encoded: Sequence[Sequence[int]], prompts: Sequence[str], batch_size: int
) -> list[list[tuple[int, int]]]:
    """Batches of (conversation index, shared prefix length) that keep a prompt's conversations together.

    Conversations of one prompt (up to `batch_size` at a time) form a unit whose common leading
    tokens (`shared_prefix_length`: the chat-templated prompt) go through the model once per batch;
    a unit of one conversation shares nothing (length 0). Units are sorted longest remainder, then
    longest prefix, first (little padding in either pass) and packed into batches of at most
    `batch_size` conversations.
    """
    by_prompt: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_prompt.setdefault(prompt, []).append(index)
    units: list[tuple[int, int, list[int]]] = []
    for indices in by_prompt.values():
        for start in range(0, len(indices), batch_size):
            part = indices[start : start + batch_size]
            prefix = shared_prefix_length([encoded[i] for i in part]) if len(part) > 1 else 0
            units.append((prefix, max(len(encoded[i]) for i in part) - prefix, part))
    units.sort(key=lambda unit: (unit[1], unit[0]), reverse=True)
    batches: list[list[tuple[int, int]]] = [[]]
    for prefix, _, part in units:
        if len(batches[-1]) + len(part) > batch_size:
            batches.append([])
        batches[-1].extend((i, prefix) for i in part)
    return [batch for batch in batches if batch]


def length_classes(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of `lengths`, longest first, cut wherever a length falls below half its class's longest.

    Each class is one padded pass, so padding stays under half of any pass however unequal the
    lengths, in at most log2(longest / shortest) + 1 passes.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    classes: list[list[int]] = []
    for i in order:
        if not classes or 2 * lengths[i] < lengths[classes[-1][0]]:
            classes.append([])
        classes[-1].append(i)
    return classes


def right_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with `pad` to the longest row, and the attention mask (1 on real tokens)."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[*row, *[pad] * (width - len(row))] for row in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    return ids, mask


def shares_prefixes(model: torch.nn.Module) -> bool:
    """Whether `model` can score a batch's shared prompt prefixes once, through its KV cache.

    Only transformers' own sequence classifiers (`GenericForSequenceClassification`: they pool at
    the last non-pad token of `input_ids`) whose cache is plain full-attention `DynamicLayer`s.
    Custom code (ArmoRM reads positions in the whole conversation) and sliding-window or
    linear-attention models are scored whole.
    """
    from transformers.modeling_layers import GenericForSequenceClassification

    if not isinstance(model, GenericForSequenceClassification):
        return False
    if not type(model).__module__.startswith("transformers."):
        return False
    return plain_dynamic_cache(model) is not None


class SequenceClassifierScorer:
    """A Hugging Face sequence classifier scoring the chat-templated [user, assistant] conversation.

    Batched longest-first to minimise padding. Conversations longer than `max_length` tokens are
    truncated from the LEFT, so the response (what is judged) is kept whole and the start of the
    prompt goes first. Uses the model's `score` output when it has one (ArmoRM), else logit 0.

    With `batch_size` > 1 and a transformers-native classifier (`shares_prefixes`), a prompt's
    conversations share a batch and their common leading tokens (the templated prompt) go through
    the model once (`prefix_batches`): a first pass fills a KV cache with each distinct prefix, whose
    rows are copied to its conversations, and a second pass runs only the rest of each conversation
    on it, with positions continuing the prefix's, one pass per class of similar remaining lengths
    (`length_classes`). Scores equal unshared ones up to float rounding.
    Batch size 1 (and custom code such as ArmoRM) scores each conversation whole.

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
        self.shares_prefixes = shares_prefixes(self.model)

    def _texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
            for p, r in zip(prompts, responses, strict=True)
        ]

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response): the classifier's output on the chat-templated conversation."""
        texts = self._texts(prompts, responses)
        if not texts:
            return []
        encoded = self.tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=self.max_length
        )["input_ids"]
        pad = choose_pad_id(
            encoded, preferred=self.tokenizer.pad_token_id, special_ids=self._special_ids, size=self._id_limit
        )
        self.pad_token_id = self.model.config.pad_token_id = pad
        if self.shares_prefixes and self.batch_size > 1:
            batches = prefix_batches(encoded, prompts, self.batch_size)
        else:
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
            size = self.batch_size
            batches = [[(i, 0) for i in order[start : start + size]] for start in range(0, len(order), size)]
        scores = [0.0] * len(encoded)
        done = 0
        for batch in tqdm(batches, desc=f"scoring {self.name}", disable=not self.progress):
            values = self._score_batch([(encoded[i], prefix) for i, prefix in batch], pad)
            for (i, _), value in zip(batch, values.float().reshape(-1).tolist(), strict=True):
                scores[i] = value
            done += len(batch)
            if self.on_progress is not None:
                self.on_progress(done, len(encoded))
        return scores

    def _score_batch(self, rows: list[tuple[list[int], int]], pad: int) -> torch.Tensor:
        """Scores of (conversation ids, shared prefix length) rows; prefixes of length 0 are not shared.

        With shared prefixes: one pass over the batch's distinct prefixes fills a KV cache, then one
        pass per `length_classes` class of the rows' remaining lengths runs on a copy of it.
        """
        device = self.model.device
        prefixes: dict[tuple[int, ...], int] = {}
        for ids, length in rows:
            if length:
                prefixes.setdefault(tuple(ids[:length]), len(prefixes))
        if not prefixes:
            ids, mask = right_padded([ids for ids, _ in rows], pad)
            return self._values(self.model(input_ids=ids.to(device), attention_mask=mask.to(device)))
        cache, prefix_mask = self._prefix_cache(list(prefixes), pad)
        values = torch.empty(len(rows), device=device)
        parts = length_classes([len(ids) - length for ids, length in rows])
        for number, part in enumerate(parts):
            part_rows = [rows[i] for i in part]
            # Every row reads its prefix's cache row; a row without a shared prefix masks the one it gets.
            source = torch.tensor([prefixes[tuple(ids[:n])] if n else 0 for ids, n in part_rows])
            part_cache = cache if number == len(parts) - 1 else copy.deepcopy(cache)
            part_cache.batch_select_indices(source.to(device))
            lengths = torch.tensor([length for _, length in part_rows])
            past_mask = prefix_mask[source] * (lengths > 0).unsqueeze(-1)
            rest_ids, rest_mask = right_padded([ids[length:] for ids, length in part_rows], pad)
            output = self.model(
                input_ids=rest_ids.to(device),
                attention_mask=torch.cat([past_mask, rest_mask], dim=-1).to(device),
                position_ids=(lengths.unsqueeze(-1) + torch.arange(rest_ids.shape[1])).to(device),
                **{cache_keyword(self.model): part_cache},
            )
            values[torch.tensor(part, device=device)] = self._values(output).float().reshape(-1)
        return values

    def _prefix_cache(self, prefixes: list[tuple[int, ...]], pad: int) -> tuple[DynamicCache, torch.Tensor]:
        """The decoder's KV cache over `prefixes` (right-padded, one row each) and their attention mask."""
        device = self.model.device
        ids, mask = right_padded(prefixes, pad)
        positions = torch.arange(ids.shape[1]).expand(len(prefixes), -1)
        cache = prefill(
            self.model, plain_dynamic_cache(self.model), ids.to(device), mask.to(device), positions.to(device)
        )
        return cache, mask

    @staticmethod
    def _values(output) -> torch.Tensor:
        """The model's `score` output when it has one (ArmoRM), else logit 0: one value per row."""
        return output.score if getattr(output, "score", None) is not None else output.logits[:, 0]


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
