"""Choose y_ws (best source response), y_wt (best Target-SFT response) and y_l (worst) per prompt.

Scores are joined to samples on (prompt_id, model, sample_index); every sample needs exactly one
score and every score its sample, all from one reward model, and scores must be finite.

Tie rules (exact float equality), chosen so every choice is deterministic:

- y_ws: the highest score across all source models' samples of the prompt; among equal top scores
  the smallest (model, sample_index) in lexicographic order wins. Prompts with such a tie are
  counted in ``tied_best``.
- y_wt: the highest-scored target sample; ties go to the smallest sample_index (``tied_best``).
- y_l: the lowest-scored target sample; ties go to the largest sample_index (``tied_worst``).
  Tie counters of the target selection count only prompts that are kept.
- A prompt with fewer than 2 target samples (``dropped_too_few``) or whose target samples all
  score the same (``dropped_all_equal``) carries no preference signal and is dropped; a prompt
  with target samples but no y_ws is dropped as ``dropped_missing_source`` (checked first).

Length-stopped samples (finish_reason "length": cut by the sampler's max_new_tokens) are left out
of the choice by default (``drop_length_stopped``; per source model in ``select_best_source``):
training appends an end-of-turn token to every chosen response, so a cut one teaches an abrupt
ending. They must still be scored (the join checks every sample). Counters:
``samples_length_stopped`` (length-stopped samples in the input), ``samples_length_stopped_dropped``
(of those, left out), and ``dropped_length_stopped``: prompts lost only because length-stopped
samples were left out (for y_ws: every sample of the prompt was; for y_wt / y_l: it had 2 or more
samples and fewer than 2 remain). ``ws_truncated``, ``wt_truncated`` and ``l_truncated`` count
chosen responses that were length-stopped (0 while dropping).

Joins and sorts run in pyarrow; the per-prompt pass is one linear loop, so millions of rows are fine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from wrpo_core.schemas import BEST_SOURCE, PROMPTS, QUADRUPLES, SAMPLES, SCORES, DataError, conform

_KEY = ["prompt_id", "model", "sample_index"]


@dataclass
class SelectionReport:
    """Counters of a selection run; `ws_share` maps source model -> share of prompts whose y_ws it wrote."""

    prompts_in: int = 0
    rows_out: int = 0
    prompts_without_samples: int = 0
    tied_best: int = 0
    tied_worst: int = 0
    dropped_all_equal: int = 0
    dropped_too_few: int = 0
    dropped_missing_source: int = 0
    dropped_length_stopped: int = 0
    samples_length_stopped: int = 0
    samples_length_stopped_dropped: int = 0
    ws_truncated: int = 0
    wt_truncated: int = 0
    l_truncated: int = 0
    ws_share: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The report as a plain JSON-ready dict."""
        return asdict(self)


def _key_text(row: dict[str, Any]) -> str:
    return f"prompt_id={row['prompt_id']!r}, model={row['model']!r}, sample_index={row['sample_index']}"


def _first(table: pa.Table, keys: list[str]) -> dict[str, Any]:
    """The smallest row of a non-empty table by `keys`, so error messages name the same row every run."""
    return table.sort_by([(k, "ascending") for k in keys]).slice(0, 1).to_pylist()[0]


def _check_unique(table: pa.Table, keys: list[str], where: str) -> None:
    """Raise DataError naming the first key that occurs more than once in `table`."""
    if table.num_rows == 0:
        return
    counts = table.group_by(keys).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts.column("count_all"), 1))
    if repeated.num_rows:
        row = _first(repeated, keys)
        what = ", ".join(f"{k}={row[k]!r}" for k in keys)
        raise DataError(f"{where}: {row['count_all']} rows for {what}; each key must occur once")


def _scored(samples: pa.Table, scores: pa.Table, *, what: str) -> pa.Table:
    """Join conformed scores onto conformed samples; returns (prompt_id, model, sample_index, score, _row).

    `_row` is the sample's row in `samples`. Raises DataError for duplicate keys, several reward models,
    a non-finite score, a sample without a score or a score without its sample.
    """
    _check_unique(samples, _KEY, f"{what} samples")
    _check_unique(scores, _KEY, f"{what} scores")
    reward_models = pc.unique(scores.column("reward_model")).to_pylist()
    if len(reward_models) > 1:
        raise DataError(
            f"{what} scores: column 'reward_model' holds several reward models {sorted(reward_models)}; "
            "scores from different reward models cannot be compared, pass one reward model's scores"
        )
    not_finite = pc.invert(pc.is_finite(scores.column("score")))
    if scores.num_rows and pc.any(not_finite).as_py():
        index = pc.index(not_finite, True).as_py()
        row = scores.slice(index, 1).to_pylist()[0]
        raise DataError(
            f"{what} scores: row {index}, column 'score' is {row['score']} for {_key_text(row)}; "
            "scores must be finite"
        )
    left = samples.select(_KEY).append_column("_row", pa.array(range(samples.num_rows), pa.int64()))
    right = scores.select([*_KEY, "score"]).append_column(
        "_score_row", pa.array(range(scores.num_rows), pa.int64())
    )
    joined = left.join(right, keys=_KEY, join_type="full outer")
    for column, problem in (
        ("_score_row", "has no score"),
        ("_row", "is scored but missing from the samples"),
    ):
        missing = pc.is_null(joined.column(column))
        if joined.num_rows and pc.any(missing).as_py():
            row = _first(joined.filter(missing), _KEY)
            count = pc.sum(missing).as_py()
            raise DataError(f"{what}: sample {_key_text(row)} {problem} ({count} such row(s) in total)")
    return joined.select([*_KEY, "score", "_row"])


def _drop_length_stopped(
    samples: pa.Table, joined: pa.Table, drop: bool | Collection[str], report: SelectionReport
) -> pa.Table:
    """`joined` without the length-stopped samples `drop` names; counts them in `report`.

    `drop`: True = every model's, False = none, a collection of model names = those models'.
    """
    stopped = _length_stopped(samples, joined.column("_row"))
    if isinstance(drop, bool):
        dropped = stopped if drop else pa.array([False] * len(stopped))
    else:
        models = pa.array(sorted(drop), pa.string())
        dropped = pc.and_(stopped, pc.is_in(joined.column("model"), value_set=models))
    report.samples_length_stopped = pc.sum(stopped).as_py() or 0
    report.samples_length_stopped_dropped = pc.sum(dropped).as_py() or 0
    return joined.filter(pc.invert(dropped))


def _length_stopped(samples: pa.Table, rows: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """For each sample at `rows`: whether the length limit cut it (finish_reason 'length')."""
    return pc.equal(samples.column("finish_reason").take(rows), "length")


def _count_length_stopped(samples: pa.Table, rows: pa.ChunkedArray | pa.Array) -> int:
    """How many of the samples at `rows` were cut by the length limit."""
    return pc.sum(_length_stopped(samples, rows)).as_py() or 0


def _groups(prompt_ids: list[str]) -> list[tuple[str, int, int]]:
    """(prompt_id, start, end) runs of equal ids in a sorted list."""
    runs = []
    start = 0
    for i in range(1, len(prompt_ids) + 1):
        if i == len(prompt_ids) or prompt_ids[i] != prompt_ids[start]:
            runs.append((prompt_ids[start], start, i))
            start = i
    return runs


def select_best_source(
    samples: pa.Table,
    scores: pa.Table,
    prompts: pa.Table,
    *,
    drop_length_stopped: bool | Collection[str] = True,
) -> tuple[pa.Table, SelectionReport]:
    """Pick y_ws, the best-scored source response of each prompt, as a BEST_SOURCE table in prompt order.

    Prompts without any source sample are left out and counted; a sample whose prompt is not in
    `prompts` is an error. `drop_length_stopped`: whose length-stopped samples cannot be y_ws
    (True = every model's, False = none, or a collection of model names); a prompt whose every
    sample was left out so is counted in `dropped_length_stopped`.
    """
    prompts = conform(prompts, PROMPTS, where="prompts")
    _check_unique(prompts, ["prompt_id"], "prompts")
    samples = conform(samples, SAMPLES, where="source samples")
    joined = _scored(samples, conform(scores, SCORES, where="source scores"), what="source")
    unknown = pc.invert(pc.is_in(joined.column("prompt_id"), value_set=prompts.column("prompt_id")))
    if joined.num_rows and pc.any(unknown).as_py():
        row = _first(joined.filter(unknown), _KEY)
        raise DataError(f"source samples: sample {_key_text(row)} has a prompt_id that is not in the prompts")
    report = SelectionReport(prompts_in=prompts.num_rows)
    sampled = set(joined.column("prompt_id").to_pylist())
    joined = _drop_length_stopped(samples, joined, drop_length_stopped, report)
    ordered = joined.sort_by(
        [
            ("prompt_id", "ascending"),
            ("score", "descending"),
            ("model", "ascending"),
            ("sample_index", "ascending"),
        ]
    )
    ids = ordered.column("prompt_id").to_pylist()
    score_list = ordered.column("score").to_pylist()
    best: dict[str, int] = {}  # prompt_id -> position in `ordered`
    for pid, start, end in _groups(ids):
        best[pid] = start
        if end - start > 1 and score_list[start] == score_list[start + 1]:
            report.tied_best += 1

    prompt_ids = prompts.column("prompt_id").to_pylist()
    keep_prompts = [i for i, pid in enumerate(prompt_ids) if pid in best]
    positions = pa.array([best[prompt_ids[i]] for i in keep_prompts], pa.int64())
    chosen = ordered.take(positions)
    sample_rows = chosen.column("_row")
    kept_prompts = prompts.take(pa.array(keep_prompts, pa.int64()))
    table = pa.table(
        {
            "prompt_id": kept_prompts.column("prompt_id"),
            "prompt": kept_prompts.column("prompt"),
            "y_ws": samples.column("text").take(sample_rows),
            "y_ws_model": chosen.column("model"),
            "y_ws_sample_index": chosen.column("sample_index"),
            "y_ws_score": chosen.column("score"),
        }
    )
    report.rows_out = table.num_rows
    report.dropped_length_stopped = sum(pid in sampled and pid not in best for pid in prompt_ids)
    report.prompts_without_samples = prompts.num_rows - table.num_rows - report.dropped_length_stopped
    report.ws_truncated = _count_length_stopped(samples, sample_rows)
    models = sorted(pc.unique(samples.column("model")).to_pylist())
    counts = dict.fromkeys(models, 0)
    for model in chosen.column("model").to_pylist():
        counts[model] += 1
    report.ws_share = {m: (c / table.num_rows if table.num_rows else 0.0) for m, c in counts.items()}
    return conform(table, BEST_SOURCE, where="best source output"), report


def select_target_pairs(
    best_source: pa.Table,
    target_samples: pa.Table,
    target_scores: pa.Table,
    *,
    drop_length_stopped: bool = True,
) -> tuple[pa.Table, SelectionReport]:
    """Build QUADRUPLES (x, y_ws, y_wt, y_l) from y_ws and scored Target-SFT samples, in best_source order.

    Reference log-prob columns are left null. Target samples must come from one model. With
    `drop_length_stopped`, length-stopped samples are neither y_wt nor y_l; a prompt left with
    fewer than 2 samples by that is counted in `dropped_length_stopped`.
    """
    best_source = conform(best_source, BEST_SOURCE, where="best source")
    _check_unique(best_source, ["prompt_id"], "best source")
    target_samples = conform(target_samples, SAMPLES, where="target samples")
    target_models = pc.unique(target_samples.column("model"))
    if len(target_models) > 1:
        raise DataError(
            f"target samples: column 'model' holds several models {sorted(target_models.to_pylist())}; "
            "pass the samples of one Target-SFT model"
        )
    joined = _scored(target_samples, conform(target_scores, SCORES, where="target scores"), what="target")
    report = SelectionReport(prompts_in=best_source.num_rows)
    sampled = Counter(joined.column("prompt_id").to_pylist())  # prompt_id -> samples, before dropping
    joined = _drop_length_stopped(target_samples, joined, drop_length_stopped, report)
    ordered = joined.sort_by(
        [("prompt_id", "ascending"), ("score", "descending"), ("sample_index", "ascending")]
    )
    ids = ordered.column("prompt_id").to_pylist()
    score_list = ordered.column("score").to_pylist()
    source_ids = best_source.column("prompt_id").to_pylist()
    source_set = set(source_ids)
    runs = {pid: (start, end) for pid, start, end in _groups(ids)}
    pairs: dict[str, tuple[int, int]] = {}  # prompt_id -> (best position, worst position) in `ordered`
    for pid in sorted(sampled):
        start, end = runs.get(pid, (0, 0))
        last = end - 1
        if pid not in source_set:
            report.dropped_missing_source += 1
        elif end - start < 2:
            if sampled[pid] >= 2:
                report.dropped_length_stopped += 1
            else:
                report.dropped_too_few += 1
        elif score_list[start] == score_list[last]:
            report.dropped_all_equal += 1
        else:
            pairs[pid] = (start, last)
            report.tied_best += int(score_list[start] == score_list[start + 1])
            report.tied_worst += int(score_list[last] == score_list[last - 1])
    report.prompts_without_samples = sum(pid not in sampled for pid in source_ids)

    keep = [i for i, pid in enumerate(source_ids) if pid in pairs]
    source = best_source.take(pa.array(keep, pa.int64()))
    wt = ordered.take(pa.array([pairs[source_ids[i]][0] for i in keep], pa.int64()))
    lo = ordered.take(pa.array([pairs[source_ids[i]][1] for i in keep], pa.int64()))
    texts = target_samples.column("text")
    nulls = pa.nulls(len(keep), pa.float64())
    table = pa.table(
        {
            "prompt_id": source.column("prompt_id"),
            "prompt": source.column("prompt"),
            "y_ws": source.column("y_ws"),
            "y_ws_model": source.column("y_ws_model"),
            "y_ws_score": source.column("y_ws_score"),
            "y_wt": texts.take(wt.column("_row")),
            "y_wt_score": wt.column("score"),
            "y_l": texts.take(lo.column("_row")),
            "y_l_score": lo.column("score"),
            "ref_logp_ws": nulls,
            "ref_logp_wt": nulls,
            "ref_logp_l": nulls,
        }
    )
    report.rows_out = table.num_rows
    report.wt_truncated = _count_length_stopped(target_samples, wt.column("_row"))
    report.l_truncated = _count_length_stopped(target_samples, lo.column("_row"))
    return conform(table, QUADRUPLES, where="quadruples output"), report
