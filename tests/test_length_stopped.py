"""Samples cut by the length limit (finish_reason "length") are left out of y_ws / y_wt / y_l by default,
counted per source, and a prompt (or a run) that loses every candidate that way is a counted outcome."""

from __future__ import annotations

import pyarrow as pa
import pytest

from wrpo_core import pipeline
from wrpo_core.config import ModelSpec, SamplingConfig
from wrpo_core.pipeline import data
from wrpo_core.pipeline.runner import StageError
from wrpo_core.sampling.common import SampleRows, SamplingReport
from wrpo_core.schemas import SAMPLES
from wrpo_core.selection import select_best_source, select_target_pairs


def _tables(rows: list[tuple[str, str, int, float, str]]) -> tuple[pa.Table, pa.Table]:
    """(samples, scores) from rows of (prompt_id, model, sample_index, score, finish_reason)."""
    samples = pa.table(
        {
            "prompt_id": [r[0] for r in rows],
            "model": [r[1] for r in rows],
            "sample_index": pa.array([r[2] for r in rows], pa.int32()),
            "text": [f"{r[0]}/{r[1]}/{r[2]}" for r in rows],
            "finish_reason": [r[4] for r in rows],
            "prompt_tokens": pa.array([1] * len(rows), pa.int32()),
            "completion_tokens": pa.array([1] * len(rows), pa.int32()),
            "seed": [0] * len(rows),
        },
        schema=SAMPLES,
    )
    scores = pa.table(
        {
            "prompt_id": [r[0] for r in rows],
            "model": [r[1] for r in rows],
            "sample_index": pa.array([r[2] for r in rows], pa.int32()),
            "reward_model": ["rm"] * len(rows),
            "score": [r[3] for r in rows],
        }
    )
    return samples, scores


def _prompts(*ids: str) -> pa.Table:
    return pa.table({"prompt_id": list(ids), "prompt": [f"x-{i}" for i in ids]})


SOURCE_ROWS = [
    # p1: the best-scored sample was cut; the best finished one is a/1.
    ("p1", "a", 0, 9.0, "length"),
    ("p1", "a", 1, 5.0, "stop"),
    ("p1", "b", 0, 4.0, "stop"),
    # p2: every sample was cut.
    ("p2", "a", 0, 3.0, "length"),
    ("p2", "b", 0, 2.0, "length"),
    # p3: only b's cut sample is better than a's finished one.
    ("p3", "a", 0, 1.0, "stop"),
    ("p3", "b", 0, 7.0, "length"),
]


def test_the_defaults_follow_the_authors_pipeline():
    sampling = SamplingConfig()
    assert sampling.max_new_tokens == 4096
    assert sampling.drop_length_stopped is True


def test_length_stopped_source_samples_are_never_y_ws():
    samples, scores = _tables(SOURCE_ROWS)
    best, report = select_best_source(samples, scores, _prompts("p1", "p2", "p3", "p4"))
    assert best.column("prompt_id").to_pylist() == ["p1", "p3"]
    assert best.column("y_ws").to_pylist() == ["p1/a/1", "p3/a/0"]
    assert (report.samples_length_stopped, report.samples_length_stopped_dropped) == (4, 4)
    assert report.dropped_length_stopped == 1  # p2: a counted outcome, not an error
    assert report.prompts_without_samples == 1  # p4 has no sample at all
    assert (
        report.rows_out + report.dropped_length_stopped + report.prompts_without_samples == report.prompts_in
    )
    assert report.ws_truncated == 0
    assert report.ws_share == {"a": 1.0, "b": 0.0}


def test_drop_length_stopped_is_per_source_model():
    samples, scores = _tables(SOURCE_ROWS)
    best, report = select_best_source(samples, scores, _prompts("p1", "p2", "p3"), drop_length_stopped={"a"})
    # b's cut samples stay candidates: b/0 wins p2 and p3; a's cut p1/a/0 does not win p1.
    assert best.column("y_ws").to_pylist() == ["p1/a/1", "p2/b/0", "p3/b/0"]
    assert (report.samples_length_stopped, report.samples_length_stopped_dropped) == (4, 2)
    assert report.dropped_length_stopped == 0 and report.ws_truncated == 2


def test_keeping_length_stopped_samples_restores_the_old_choice():
    samples, scores = _tables(SOURCE_ROWS)
    best, report = select_best_source(samples, scores, _prompts("p1", "p2", "p3"), drop_length_stopped=False)
    assert best.column("y_ws").to_pylist() == ["p1/a/0", "p2/a/0", "p3/b/0"]
    assert report.samples_length_stopped == 4 and report.samples_length_stopped_dropped == 0
    assert report.ws_truncated == 3


TARGET_ROWS = [
    # t1: best (9) and worst (-5) were cut; the finished ones give y_wt=2, y_l=0.
    ("t1", "t", 0, 9.0, "length"),
    ("t1", "t", 1, 2.0, "stop"),
    ("t1", "t", 2, 1.0, "stop"),
    ("t1", "t", 3, 0.0, "stop"),
    ("t1", "t", 4, -5.0, "length"),
    # t2: every sample was cut.
    ("t2", "t", 0, 1.0, "length"),
    ("t2", "t", 1, 2.0, "length"),
    # t3: one finished sample left: no pair.
    ("t3", "t", 0, 1.0, "length"),
    ("t3", "t", 1, 2.0, "stop"),
    # t4: a single sample from the start: too few, whatever its finish.
    ("t4", "t", 0, 1.0, "stop"),
]


def _best_source(*ids: str) -> pa.Table:
    samples, scores = _tables([(i, "src", 0, 10.0, "stop") for i in ids])
    return select_best_source(samples, scores, _prompts(*ids))[0]


def test_length_stopped_target_samples_are_neither_y_wt_nor_y_l():
    samples, scores = _tables(TARGET_ROWS)
    quads, report = select_target_pairs(_best_source("t1", "t2", "t3", "t4"), samples, scores)
    assert quads.column("prompt_id").to_pylist() == ["t1"]
    assert (quads["y_wt"][0].as_py(), quads["y_l"][0].as_py()) == ("t1/t/1", "t1/t/3")
    assert report.dropped_length_stopped == 2  # t2 (all cut) and t3 (one left)
    assert report.dropped_too_few == 1  # t4
    assert (report.samples_length_stopped, report.samples_length_stopped_dropped) == (5, 5)
    assert (report.wt_truncated, report.l_truncated) == (0, 0)


def test_target_pairs_may_keep_length_stopped_samples():
    samples, scores = _tables(TARGET_ROWS)
    quads, report = select_target_pairs(
        _best_source("t1", "t2", "t3", "t4"), samples, scores, drop_length_stopped=False
    )
    assert quads.column("prompt_id").to_pylist() == ["t1", "t2", "t3"]
    assert (quads["y_wt"][0].as_py(), quads["y_l"][0].as_py()) == ("t1/t/0", "t1/t/4")
    assert report.dropped_length_stopped == 0 and report.samples_length_stopped_dropped == 0
    assert (report.wt_truncated, report.l_truncated) == (2, 3)  # t1 both, t2 both, t3 its y_l


def test_per_model_statistics_count_length_stopped_samples():
    samples, scores = _tables(SOURCE_ROWS)
    rows = data.per_model_statistics(samples, scores, {"a": 1.0}, drop_length_stopped={"a"})
    assert [(r["model"], r["samples"], r["length_stopped"], r["length_stopped_dropped"]) for r in rows] == [
        ("a", 4, 2, 2),
        ("b", 3, 2, 0),
    ]


# --- through the pipeline's stages ------------------------------------------------------------


class ScriptedSampler:
    """Stands in for a model: `cut(model, prompt_index, sample_index)` says which samples hit the limit."""

    def __init__(self, spec: ModelSpec, cut):
        self.spec, self.cut = spec, cut

    def sample(self, prompt_ids, prompts):
        report = SamplingReport(prompts=len(prompt_ids))
        rows = SampleRows(self.spec.name, report)
        for i, pid in enumerate(prompt_ids):
            for k in range(self.spec.sampling.n):
                finished = not self.cut(self.spec.name, i, k)
                rows.add(pid, k, f"answer {k}", finished=finished, prompt_tokens=3,
                         completion_tokens=2 + k, seed=k)  # fmt: skip
        return rows.table(), report


def dropping(cfg, **keep: bool):
    """`cfg` with drop_length_stopped set explicitly on every source and the target (True unless named)."""

    def spec(model):
        drop = keep.get(model.name.replace("-", "_"), True)
        return model.model_copy(
            update={"sampling": model.sampling.model_copy(update={"drop_length_stopped": drop})}
        )

    return cfg.model_copy(update={"sources": [spec(s) for s in cfg.sources], "target": spec(cfg.target)})


def run_until(cfg, last: str, cut, monkeypatch) -> dict:
    monkeypatch.setattr(data, "load_sampler", lambda spec, **kwargs: ScriptedSampler(spec, cut))
    layout = pipeline.layout_for(cfg)
    summaries = {}
    for stage in pipeline.pipeline_stages(cfg, layout):
        summaries[stage.name] = pipeline.run_pipeline_stage(cfg, layout, stage, reuse=False)[1]
        if stage.name == last:
            return summaries
    raise AssertionError(f"no stage {last}")


def test_select_source_counts_length_stopped_samples_per_source(fusion_config, monkeypatch):
    # src-a: every sample cut; src-b: sample 0 cut; prompt 0: every sample of both cut.
    def cut(model, prompt, sample):
        return model == "src-a" or sample == 0 or prompt == 0

    summaries = run_until(dropping(fusion_config), "select-source", cut, monkeypatch)
    summary = summaries["select-source"]
    per_model = {row["model"]: row for row in summary["per_model"]}
    assert (per_model["src-a"]["length_stopped"], per_model["src-a"]["length_stopped_dropped"]) == (48, 48)
    assert (per_model["src-b"]["length_stopped"], per_model["src-b"]["length_stopped_dropped"]) == (15, 15)
    assert per_model["src-a"]["ws_share"] == 0.0
    assert summary["samples_length_stopped"] == summary["samples_length_stopped_dropped"] == 63
    assert summary["dropped_length_stopped"] == 1 and summary["rows_out"] == 11
    assert summaries["sample-src-a"]["finished_by_length"] == 48


def test_a_source_may_keep_its_length_stopped_samples(fusion_config, monkeypatch):
    cfg = dropping(fusion_config, src_a=False)
    summary = run_until(cfg, "select-source", lambda model, prompt, sample: model == "src-a", monkeypatch)[
        "select-source"
    ]
    per_model = {row["model"]: row for row in summary["per_model"]}
    assert (per_model["src-a"]["length_stopped"], per_model["src-a"]["length_stopped_dropped"]) == (48, 0)
    assert summary["rows_out"] == 12 and summary["dropped_length_stopped"] == 0


def test_a_run_whose_every_sample_was_cut_fails_saying_why(fusion_config, monkeypatch):
    with pytest.raises(StageError) as info:
        run_until(dropping(fusion_config), "select-source", lambda model, prompt, sample: True, monkeypatch)
    message = str(info.value)
    assert "select-source" in message and "12 of 12 prompt(s)" in message
    for hint in ("max_new_tokens", "drop_length_stopped", "finish_reason 'length'"):
        assert hint in message


def test_target_sft_samples_all_cut_fail_select_target_saying_why(fusion_config, monkeypatch):
    with pytest.raises(StageError) as info:
        run_until(
            dropping(fusion_config), "select-target", lambda model, p, k: model == "target-sft", monkeypatch
        )
    message = str(info.value)
    assert "select-target" in message and "8 of 8 prompt(s)" in message and "target-sft" in message
