"""The fusion flow in this process on Prefect's temporary local API: retries and failure messages."""

import os

import pytest

pytest.importorskip("prefect")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import flows.fusion
from tasks.fusion import run_fusion_stage
from wrpo_core.pipeline import data

pytestmark = pytest.mark.integration


@pytest.fixture()
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(
        flows.fusion, "run_fusion_stage", run_fusion_stage.with_options(retry_delay_seconds=0)
    )


def test_a_transient_failure_is_retried_and_the_run_completes(fusion_config, monkeypatch, no_retry_delay):
    calls = []
    real_split = data.split

    def flaky_split(cfg, layout):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("storage endpoint dropped the connection")
        return real_split(cfg, layout)

    monkeypatch.setattr(data, "split", flaky_split)
    result = flows.fusion.fusion(fusion_config)
    assert len(calls) == 2 and result["stages"]["split"] == "ran"
    assert result["model"].endswith("smoke/models/wrpo")


def test_a_permanent_failure_is_not_retried_and_names_stage_and_model(
    fusion_config, monkeypatch, no_retry_delay
):
    calls = []

    def broken_sample(spec, *args, **kwargs):
        calls.append(spec.name)
        raise FileNotFoundError(f"{spec.path}/config.json: no such model")

    monkeypatch.setattr(data, "sample", broken_sample)
    state = flows.fusion.fusion(fusion_config, return_state=True)
    assert state.is_failed()
    assert calls == ["src-a"]  # not retried, and nothing after it ran
    message = state.message + str(state.result(raise_on_failure=False))
    assert "stage sample-src-a (model src-a) failed (permanent)" in message


def test_secrets_in_storage_options_are_refused_before_anything_runs(fusion_config):
    data = fusion_config.model_dump(mode="json")
    data["storage"]["storage_options"] = {"secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:1"}
    with pytest.raises(ValueError, match=r"holds credentials \(storage\.storage_options\.secret\)"):
        flows.fusion.check_no_secrets(type(fusion_config).model_validate(data))
    data["storage"]["storage_options"] = {"endpoint_url": "http://127.0.0.1:1"}
    data["launch"] = {"launcher": "local", "env": {"HF_TOKEN": "hf_abcdefgh"}}  # a token for the training job
    with pytest.raises(ValueError, match=r"holds credentials \(launch\.env\.HF_TOKEN\)"):
        flows.fusion.check_no_secrets(type(fusion_config).model_validate(data))


def test_an_event_from_another_registry_does_nothing(fusion_config, tmp_path):
    result = flows.fusion.fusion(
        fusion_config, use_source_registry=True, triggered_by_registry=str(tmp_path / "other")
    )
    assert result["run"] is None and "is not" in result["skipped"]
    assert not (tmp_path / "runs").exists()  # no run folder was created


def test_the_embedded_default_runs_through_the_flow_on_local_ray(tmp_path, monkeypatch):
    """`make demo`'s path (flows.demo) with --quick: per-source stages concurrently on Ray actors."""
    import json

    import flows.demo

    out = tmp_path / "demo"
    assert flows.demo.main(["--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == ["Target", "Target-SFT", "Target-SFT-DPO", "Target-SFT-WRPO"]
    stages_run = report["stages"]
    assert stages_run["sample-src-reverse"]["shards"] >= 1  # sampled by Ray actors, in shards
    assert set(stages_run["evaluate"]["win_rates"]) == {"target", "target-sft"}
    assert (out / "toy" / "evaluation" / "alpaca_eval" / "wrpo.json").exists()
