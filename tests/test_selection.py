"""Tests for wrpo_core.selection: y_ws across sources, (y_wt, y_l) from Target-SFT, tie rules, checks."""

from __future__ import annotations

import math
import re

import pyarrow as pa
import pytest

from wrpo_core.schemas import BEST_SOURCE, QUADRUPLES, DataError
from wrpo_core.selection import SelectionReport, select_best_source, select_target_pairs


def _prompts(*ids: str) -> pa.Table:
    return pa.table({"prompt_id": list(ids), "prompt": [f"x-{i}" for i in ids]})


def _tables(rows: list[tuple[str, str, int, float]], *, finish: str = "stop", rm: str = "rm"):
    """(samples, scores) from rows of (prompt_id, model, sample_index, score); text is 'pid/model/idx'."""
    samples = pa.table(
        {
            "prompt_id": [r[0] for r in rows],
            "model": [r[1] for r in rows],
            "sample_index": pa.array([r[2] for r in rows], pa.int32()),
            "text": [f"{r[0]}/{r[1]}/{r[2]}" for r in rows],
            "finish_reason": [finish] * len(rows),
            "prompt_tokens": pa.array([1] * len(rows), pa.int32()),
            "completion_tokens": pa.array([1] * len(rows), pa.int32()),
            "seed": [0] * len(rows),
        }
    )
    scores = pa.table(
        {
            "prompt_id": [r[0] for r in rows],
            "model": [r[1] for r in rows],
            "sample_index": pa.array([r[2] for r in rows], pa.int32()),
            "reward_model": [rm] * len(rows),
            "score": [r[3] for r in rows],
        }
    )
    return samples, scores


def test_best_source_picks_max_across_models_in_prompt_order():
    samples, scores = _tables(
        [
            ("p1", "a", 0, 0.1),
            ("p1", "b", 0, 0.9),
            ("p1", "b", 1, 0.5),
            ("p2", "a", 0, 2.0),
            ("p2", "a", 1, -1.0),
            ("p2", "b", 0, 1.0),
        ]
    )
    # reverse the sample rows so the output order cannot come from the sample order
    samples = samples.take(pa.array(range(samples.num_rows - 1, -1, -1)))
    best, report = select_best_source(samples, scores, _prompts("p2", "p1", "p3"))
    assert best.schema.equals(BEST_SOURCE)
    assert best.to_pylist() == [
        {
            "prompt_id": "p2",
            "prompt": "x-p2",
            "y_ws": "p2/a/0",
            "y_ws_model": "a",
            "y_ws_sample_index": 0,
            "y_ws_score": 2.0,
        },
        {
            "prompt_id": "p1",
            "prompt": "x-p1",
            "y_ws": "p1/b/0",
            "y_ws_model": "b",
            "y_ws_sample_index": 0,
            "y_ws_score": 0.9,
        },
    ]
    assert report.prompts_without_samples == 1
    assert report.rows_out == 2 and report.prompts_in == 3
    assert report.ws_share == {"a": 0.5, "b": 0.5}
    assert report.tied_best == 0


def test_best_source_tie_takes_smallest_model_then_sample_index():
    samples, scores = _tables(
        [("p1", "zeta", 0, 1.0), ("p1", "alpha", 3, 1.0), ("p1", "alpha", 1, 1.0), ("p1", "beta", 0, 0.0)]
    )
    best, report = select_best_source(samples, scores, _prompts("p1"))
    assert best.column("y_ws").to_pylist() == ["p1/alpha/1"]
    assert report.tied_best == 1
    assert report.ws_share == {"alpha": 1.0, "beta": 0.0, "zeta": 0.0}


def test_best_source_counts_truncated_winners():
    # Only when length-stopped samples are kept as candidates (they are dropped by default).
    samples, scores = _tables([("p1", "a", 0, 1.0)], finish="length")
    _, report = select_best_source(samples, scores, _prompts("p1"), drop_length_stopped=False)
    assert report.ws_truncated == 1
    _, report = select_best_source(samples, scores, _prompts("p1"))
    assert (report.ws_truncated, report.rows_out, report.dropped_length_stopped) == (0, 0, 1)


def test_sample_without_score_is_named():
    samples, scores = _tables([("p1", "a", 0, 1.0), ("p1", "a", 1, 2.0)])
    with pytest.raises(DataError, match=re.escape("prompt_id='p1', model='a', sample_index=1 has no score")):
        select_best_source(samples, scores.slice(0, 1), _prompts("p1"))


def test_score_without_sample_is_named():
    samples, scores = _tables([("p1", "a", 0, 1.0), ("p1", "b", 4, 2.0)])
    with pytest.raises(
        DataError,
        match=re.escape("prompt_id='p1', model='b', sample_index=4 is scored but missing from the samples"),
    ):
        select_best_source(samples.slice(0, 1), scores, _prompts("p1"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_score_is_named_with_value(bad):
    samples, scores = _tables([("p1", "a", 0, 1.0), ("p1", "a", 1, bad)])
    with pytest.raises(DataError) as info:
        select_best_source(samples, scores, _prompts("p1"))
    message = str(info.value)
    assert "source scores: row 1, column 'score'" in message
    assert "prompt_id='p1', model='a', sample_index=1" in message
    assert str(bad) in message


def test_duplicate_sample_key_is_named():
    samples, scores = _tables([("p1", "a", 0, 1.0), ("p1", "a", 0, 2.0)])
    with pytest.raises(
        DataError, match=re.escape("source samples: 2 rows for prompt_id='p1', model='a', sample_index=0")
    ):
        select_best_source(samples, scores, _prompts("p1"))


def test_several_reward_models_are_refused():
    samples, scores = _tables([("p1", "a", 0, 1.0), ("p1", "a", 1, 2.0)])
    scores = scores.set_column(3, "reward_model", pa.array(["rm1", "rm2"]))
    with pytest.raises(
        DataError, match=re.escape("source scores: column 'reward_model' holds several reward models")
    ):
        select_best_source(samples, scores, _prompts("p1"))


def test_sample_for_unknown_prompt_is_named():
    samples, scores = _tables([("p9", "a", 0, 1.0)])
    with pytest.raises(
        DataError, match=re.escape("prompt_id='p9', model='a', sample_index=0 has a prompt_id that is not")
    ):
        select_best_source(samples, scores, _prompts("p1"))


def test_bad_schema_names_table():
    samples, scores = _tables([("p1", "a", 0, 1.0)])
    with pytest.raises(DataError, match=re.escape("source scores: missing required column(s) ['score']")):
        select_best_source(samples, scores.drop_columns(["score"]), _prompts("p1"))


def _best_source(*ids: str) -> pa.Table:
    samples, scores = _tables([(i, "src", 0, 10.0) for i in ids])
    best, _ = select_best_source(samples, scores, _prompts(*ids))
    return best


def test_target_pairs_best_and_worst_with_ties_and_drops():
    target_samples, target_scores = _tables(
        [
            # p1: clear best 3, worst tie between idx 0 and 2 -> largest index 2
            ("p1", "t", 0, 0.0),
            ("p1", "t", 1, 3.0),
            ("p1", "t", 2, 0.0),
            # p2: best tie between idx 1 and 4 -> smallest index 1, worst idx 0
            ("p2", "t", 4, 5.0),
            ("p2", "t", 1, 5.0),
            ("p2", "t", 0, -2.0),
            # p3: all equal -> dropped
            ("p3", "t", 0, 1.0),
            ("p3", "t", 1, 1.0),
            # p4: single sample -> dropped
            ("p4", "t", 0, 1.0),
            # p5: no y_ws -> dropped
            ("p5", "t", 0, 1.0),
            ("p5", "t", 1, 2.0),
        ]
    )
    quads, report = select_target_pairs(
        _best_source("p2", "p1", "p3", "p4", "p6"), target_samples, target_scores
    )
    assert quads.schema.equals(QUADRUPLES)
    rows = quads.to_pylist()
    assert [r["prompt_id"] for r in rows] == ["p2", "p1"]
    assert (rows[0]["y_wt"], rows[0]["y_wt_score"], rows[0]["y_l"], rows[0]["y_l_score"]) == (
        "p2/t/1",
        5.0,
        "p2/t/0",
        -2.0,
    )
    assert (rows[1]["y_wt"], rows[1]["y_l"]) == ("p1/t/1", "p1/t/2")
    assert rows[1]["y_ws"] == "p1/src/0" and rows[1]["y_ws_model"] == "src" and rows[1]["y_ws_score"] == 10.0
    assert rows[1]["prompt"] == "x-p1"
    assert all(r[c] is None for r in rows for c in ("ref_logp_ws", "ref_logp_wt", "ref_logp_l"))
    assert (
        report.as_dict()
        == SelectionReport(
            prompts_in=5,
            rows_out=2,
            prompts_without_samples=1,
            tied_best=1,
            tied_worst=1,
            dropped_all_equal=1,
            dropped_too_few=1,
            dropped_missing_source=1,
        ).as_dict()
    )


def test_target_pairs_refuse_several_target_models():
    samples, scores = _tables([("p1", "t1", 0, 1.0), ("p1", "t2", 0, 2.0)])
    with pytest.raises(
        DataError, match=re.escape("target samples: column 'model' holds several models ['t1', 't2']")
    ):
        select_target_pairs(_best_source("p1"), samples, scores)


def test_target_pairs_check_scores_like_sources():
    samples, scores = _tables([("p1", "t", 0, 1.0), ("p1", "t", 1, math.nan)])
    with pytest.raises(DataError, match=re.escape("target scores: row 1, column 'score' is nan")):
        select_target_pairs(_best_source("p1"), samples, scores)


def test_target_pairs_empty_input_gives_empty_table():
    samples, scores = _tables([])
    quads, report = select_target_pairs(_best_source("p1"), samples, scores)
    assert quads.num_rows == 0 and quads.schema.equals(QUADRUPLES)
    assert report.prompts_without_samples == 1


def test_selection_on_many_rows_matches_brute_force():
    n_prompts, models, per_model = 5_000, 5, 5
    rows = [
        (f"p{p}", f"m{m}", s, float((p * 31 + m * 7 + s * 13) % 97))
        for p in range(n_prompts)
        for m in range(models)
        for s in range(per_model)
    ]
    samples, scores = _tables(rows)
    best, report = select_best_source(samples, scores, _prompts(*(f"p{p}" for p in range(n_prompts))))
    assert best.num_rows == n_prompts
    assert abs(sum(report.ws_share.values()) - 1.0) < 1e-9
    for p in (0, n_prompts - 1):
        expected = min((r for r in rows if r[0] == f"p{p}"), key=lambda r: (-r[3], r[1], r[2]))
        got = best.slice(p, 1).to_pylist()[0]
        assert (got["y_ws_model"], got["y_ws_sample_index"], got["y_ws_score"]) == expected[1:]
