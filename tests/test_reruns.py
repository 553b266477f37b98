"""Reruns after a change, as users do them: the changed stages train again from scratch and their
results change; nothing stale (a checkpoint, cached reference log-probs) is handed back."""

import hashlib

import numpy as np
import pyarrow.parquet as pq

from wrpo_core import pipeline
from wrpo_core.config import WRPOJobConfig
from wrpo_core.models import load_tokenizer
from wrpo_core.reference import REFERENCE_FILE
from wrpo_core.schemas import QUADRUPLES
from wrpo_core.train.wrpo import prepare_reference


def weights_digest(layout, name: str) -> str:
    return hashlib.sha256(
        (layout.storage.local_path(f"models/{name}") / "model.safetensors").read_bytes()
    ).hexdigest()


def with_section(cfg, section: str, **changes):
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=changes)})


def test_a_changed_beta_trains_wrpo_again_and_changes_the_fused_model(fusion_config):
    layout = pipeline.layout_for(fusion_config)
    pipeline.run_pipeline(fusion_config)
    sft, fused = weights_digest(layout, "target-sft"), weights_digest(layout, "wrpo")
    changed = with_section(fusion_config, "wrpo", beta=5.0)
    pipeline.run_pipeline(changed)
    assert weights_digest(layout, "target-sft") == sft  # not rerun: its settings did not change
    assert weights_digest(layout, "wrpo") != fused
    state = layout.read_manifest("wrpo")["summary"]
    assert state["train_loss"] > 0 and layout.read_manifest("wrpo")["stage_key"] is not None


def test_a_changed_sft_learning_rate_retrains_target_sft_and_the_fused_model(fusion_config):
    layout = pipeline.layout_for(fusion_config)
    pipeline.run_pipeline(fusion_config)
    sft, fused = weights_digest(layout, "target-sft"), weights_digest(layout, "wrpo")
    pipeline.run_pipeline(with_section(fusion_config, "sft", learning_rate=3e-3))
    assert weights_digest(layout, "target-sft") != sft
    assert weights_digest(layout, "wrpo") != fused


def test_after_changed_responses_the_stored_reference_log_probs_are_those_of_the_new_data(
    fusion_config, tmp_path
):
    """The fused model's stored reference log-probs equal a fresh computation on the new quadruples."""
    layout = pipeline.layout_for(fusion_config)
    pipeline.run_pipeline(fusion_config)
    before = pq.read_table(layout.storage.local_path("models/wrpo") / REFERENCE_FILE)
    # Another sampling temperature and seed for the target: other y_wt / y_l.
    sampling = fusion_config.target.sampling.model_copy(update={"temperature": 2.0, "seed": 7})
    changed = fusion_config.model_copy(
        update={"target": fusion_config.target.model_copy(update={"sampling": sampling})}
    )
    pipeline.run_pipeline(changed)
    stored = pq.read_table(layout.storage.local_path("models/wrpo") / REFERENCE_FILE)
    quadruples = layout.read_dataset(layout.quadruples, QUADRUPLES)
    assert stored["y_wt"].to_pylist() == quadruples["y_wt"].to_pylist() != before["y_wt"].to_pylist()

    job = WRPOJobConfig(
        model=layout.model("target-sft"), data=str(tmp_path / "unused.parquet"), output_dir=str(tmp_path / "fresh"),
        training=changed.wrpo,
    )  # fmt: skip
    fresh = prepare_reference(job, quadruples, load_tokenizer(job.model))
    stored_logps = np.stack(
        [stored[c].to_numpy() for c in ("ref_logp_ws", "ref_logp_wt", "ref_logp_l")], axis=1
    )
    np.testing.assert_allclose(stored_logps, fresh, rtol=0, atol=1e-6)
