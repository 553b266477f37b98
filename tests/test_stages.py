"""The whole pipeline on tiny untrained models, in seconds: every stage runs, a rerun resumes."""

import json

import pytest

from wrpo_core import stages
from wrpo_core.config import FusionConfig
from wrpo_core.schemas import QUADRUPLES, read_parquet
from wrpo_core.toy.skills import make_prompts


@pytest.fixture()
def fusion_config(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    rows = make_prompts(["reverse", "add", "upper"], 12, seed=0)
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    sampling = {"n": 4, "max_new_tokens": 8, "temperature": 1.0}
    small = {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
             "gradient_checkpointing": False, "learning_rate": 1e-3, "bf16": False}  # fmt: skip
    return FusionConfig.model_validate(
        {
            "run_name": "smoke",
            "prompts": {"path": str(prompts)},
            "sources": [
                {"path": tiny_model_dir, "name": "src-a", "sampling": sampling},
                {"path": tiny_model_dir, "name": "src-b", "sampling": {**sampling, "seed": 1}},
            ],
            "target": {"path": tiny_model_dir, "name": "target", "sampling": sampling},
            "reward_model": {"path": "toy-verifier", "kind": "toy_verifier"},
            "sft": {**small, "max_seq_length": 64, "max_prompt_length": 32},
            "wrpo": {**small, "beta": 1.0, "max_length": 64, "max_prompt_length": 32},
            "storage": {"url": str(tmp_path / "runs")},
            "compute": {"device": "cpu"},
        }
    )


def test_pipeline_runs_every_stage_then_resumes(fusion_config, tmp_path, monkeypatch):
    summaries = stages.run_pipeline(fusion_config)
    names = [
        name
        for name, _ in stages.pipeline_stages(
            fusion_config, stages.RunLayout(str(tmp_path / "runs" / "smoke"))
        )
    ]
    assert list(summaries) == names
    assert summaries["ingest"]["prompts"] == 12
    assert summaries["split"] == {"sft": 4, "preference": 8}
    assert summaries["sample-src-a"]["samples"] == 48
    layout = stages.RunLayout(str(tmp_path / "runs" / "smoke"))
    quadruples = read_parquet(layout.quadruples, QUADRUPLES)
    assert quadruples.num_rows == summaries["select-target"]["rows_out"] > 0
    assert (tmp_path / "runs" / "smoke" / "models" / "wrpo" / "model.safetensors").exists()

    # A rerun does no work: every stage is done.
    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for stage in ("ingest", "sample", "score", "sft", "wrpo"):
        monkeypatch.setattr(stages, stage, fail)
    assert stages.run_pipeline(fusion_config) == summaries

    # A stage whose record is missing (the process died before writing it) runs again, alone.
    layout.stage_record("wrpo").unlink()
    monkeypatch.setattr(stages, "wrpo", lambda cfg, lay: {"rerun": True})
    assert stages.run_pipeline(fusion_config)["wrpo"] == {"rerun": True}
