"""Re-fusion without Prefect: stage settings keys, reuse of another run's samples, the source
registry, the `toy-world:` paths, and the evaluation and register pipeline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wrpo_core import pipeline, registry
from wrpo_core.config import FusionConfig, ModelSpec
from wrpo_core.pipeline import data
from wrpo_core.schemas import SAMPLES
from wrpo_core.toy.paths import parse_toy_path, resolve_path, toy_fusion_parameters


def with_sources(cfg: FusionConfig, sources: list[ModelSpec]) -> FusionConfig:
    return cfg.model_copy(update={"sources": sources})


def test_an_added_source_reruns_selection_with_it_and_a_changed_source_resamples(fusion_config):
    first = pipeline.run_pipeline(fusion_config)
    layout = pipeline.layout_for(fusion_config)
    sampled_at = layout.read_manifest("sample-src-a")["completed_at"]
    extra = fusion_config.sources[0].model_copy(update={"name": "src-c"})
    again = pipeline.run_pipeline(with_sources(fusion_config, [*fusion_config.sources, extra]))
    # The new source is sampled and y_ws is selected again over all three sources...
    assert sorted(row["model"] for row in again["select-source"]["per_model"]) == ["src-a", "src-b", "src-c"]
    assert again["sample-src-a"] == first["sample-src-a"]  # ...while the old ones are not resampled
    assert layout.read_manifest("sample-src-a")["completed_at"] == sampled_at

    # Other sampling settings for src-a: its samples (and everything downstream) are redone.
    sampling = fusion_config.sources[0].sampling.model_copy(update={"n": 2})
    changed = fusion_config.sources[0].model_copy(update={"sampling": sampling})
    third = pipeline.run_pipeline(with_sources(fusion_config, [changed, fusion_config.sources[1]]))
    assert third["sample-src-a"]["samples"] == 24 and first["sample-src-a"]["samples"] == 48
    assert third["score-src-a"]["scored"] == 24  # its scores followed
    assert third["sample-src-b"] == first["sample-src-b"]
    assert third["register"]["config_hash"] != first["register"]["config_hash"]  # the new model is registered

    # WRPO retrained with the same settings (its manifest lost): the new model is registered again.
    registered = layout.read_manifest("register")["inputs"]["models/wrpo"]
    (layout.storage.local_path("manifests") / "wrpo.json").unlink()
    pipeline.run_pipeline(with_sources(fusion_config, [changed, fusion_config.sources[1]]))
    assert layout.read_manifest("register")["inputs"]["models/wrpo"] != registered


def test_manifests_from_before_settings_keys_count_as_current_only_for_the_same_config(fusion_config):
    first = pipeline.run_pipeline(fusion_config)
    layout = pipeline.layout_for(fusion_config)
    for path in layout.storage.local_path("manifests").glob("*.json"):  # as written by an older version
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "stage_key"}))
    assert pipeline.run_pipeline(fusion_config) == first  # nothing ran again
    changed = fusion_config.model_copy(update={"wrpo": fusion_config.wrpo.model_copy(update={"beta": 0.5})})
    again = pipeline.run_pipeline(changed)
    assert again["wrpo"] != first["wrpo"] and layout.read_manifest("ingest")["stage_key"]


def test_a_new_run_reuses_the_samples_another_run_stored(fusion_config, monkeypatch):
    pipeline.run_pipeline(fusion_config)
    sampled = []
    real_sample = data.sample
    monkeypatch.setattr(
        data, "sample", lambda spec, *a, **k: sampled.append(spec.name) or real_sample(spec, *a, **k)
    )
    extra = fusion_config.sources[0].model_copy(update={"name": "src-c"})
    refusion = registry.with_registered_sources(fusion_config, [extra])
    assert refusion.run_name.startswith("smoke-sources-") and len(refusion.sources) == 3

    summaries = pipeline.run_pipeline(refusion)
    assert sampled == ["src-c", pipeline.TARGET_SFT]  # the old sources' samples were copied, not sampled
    new, old = pipeline.layout_for(refusion), pipeline.layout_for(fusion_config)
    assert new.read_manifest("sample-src-a")["reused_from"] == old.storage.display()
    same = [new.read_dataset(new.samples("src-a"), SAMPLES), old.read_dataset(old.samples("src-a"), SAMPLES)]
    assert same[0].equals(same[1])
    assert summaries["select-source"]["per_model"][2]["model"] == "src-c"
    # The same registered sources resume the same run: nothing runs again.
    monkeypatch.setattr(data, "sample", lambda *a, **k: pytest.fail("sampled again"))
    assert (
        pipeline.run_pipeline(registry.with_registered_sources(fusion_config, [extra]))["register"]["run"]
        == (summaries["register"]["run"])
    )


def test_the_source_registry_adds_lists_removes_and_names_errors(tmp_path, tiny_model_dir):
    storage = registry.open_registry(str(tmp_path / "store"))
    assert registry.read_sources(storage)["version"] == 0
    spec = ModelSpec(path=tiny_model_dir, name="gemma")
    assert registry.add_source(storage, spec)["version"] == 1
    with pytest.raises(registry.RegistryError, match="'gemma' is already registered"):
        registry.add_source(storage, spec)
    assert (
        registry.add_source(storage, spec.model_copy(update={"revision": "v2"}), replace=True)["version"] == 2
    )
    assert [s.revision for s in registry.registered_sources(storage)] == ["v2"]
    with pytest.raises(registry.RegistryError, match="'qwen' is not registered"):
        registry.remove_source(storage, "qwen")
    document = registry.remove_source(storage, "gemma")
    assert document["sources"] == [] and [h["action"] for h in document["history"]] == [
        "add",
        "replace",
        "remove",
    ]
    (tmp_path / "store" / "registry" / "sources.json").write_text('{"sources": [{"path": 1}]}')
    with pytest.raises(registry.RegistryError, match=r"registry/sources\.json: not a valid source registry"):
        registry.read_sources(storage)


def test_wrpo_sources_cli_round_trip(tmp_path, tiny_model_dir):
    def wrpo(*args):
        done = subprocess.run([sys.executable, "-m", "wrpo_core.cli", "sources", *args, "--storage", str(tmp_path)],
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # fmt: skip
        return done.returncode, done.stdout, done.stderr

    code, out, _ = wrpo("add", "extra", tiny_model_dir, "--n", "3")
    assert code == 0, out
    result = json.loads(out)
    assert result["sources"] == ["extra"] and result["event"].startswith(
        "not sent: PREFECT_API_URL is not set"
    )
    code, out, _ = wrpo("list")
    assert json.loads(out)["sources"][0]["sampling"]["n"] == 3
    code, _, err = wrpo("add", "extra", tiny_model_dir)
    assert code == 2 and "already registered" in err
    code, out, _ = wrpo("remove", "extra", "--event", "never")
    assert code == 0 and json.loads(out)["event"] == "not sent (--event never)"


def test_toy_world_paths_parse_resolve_and_make_a_valid_config(tmp_path):
    assert parse_toy_path("toy-world:smallest/target") == ("smallest", "target")
    with pytest.raises(ValueError, match="preset one of"):
        parse_toy_path("toy-world:huge/target")
    with pytest.raises(ValueError, match="unknown item 'nope'"):
        parse_toy_path("toy-world:smallest/nope")
    assert resolve_path("org/model") == "org/model"

    def rows(path):
        with open(resolve_path(path, tmp_path)) as handle:
            return [json.loads(line) for line in handle]

    train, held_out = rows("toy-world:smallest/prompts"), rows("toy-world:smallest/held-out")
    assert len(train) == 24 and len(held_out) == 24
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    cfg = FusionConfig.model_validate(toy_fusion_parameters("smallest"))
    assert [s.path for s in cfg.sources] == [f"toy-world:smallest/{s.name}" for s in cfg.sources]
    assert cfg.evaluation.prompts.path == "toy-world:smallest/held-out"


def test_toy_prompt_files_follow_the_preset_counts(tmp_path, monkeypatch):
    """A preset whose prompt counts changed (e.g. the demo's run setting) never gets the old cached file."""
    import wrpo_core.toy.paths as paths

    def count(path):
        with open(resolve_path(path, tmp_path)) as handle:
            return sum(1 for _ in handle)

    from wrpo_core.locations import location_fingerprint

    assert count("toy-world:smallest/prompts") == 24
    before = location_fingerprint("toy-world:smallest/prompts")
    model_before = location_fingerprint("toy-world:smallest/target")
    original = paths._presets
    monkeypatch.setattr(
        paths,
        "_presets",
        lambda: {k: {**v, "train_prompts": 30} if k == "smallest" else v for k, v in original().items()},
    )
    assert count("toy-world:smallest/prompts") == 30
    # ... and the ingest stage, keyed on this fingerprint, reruns instead of keeping the old prompts
    assert location_fingerprint("toy-world:smallest/prompts") != before
    assert location_fingerprint("toy-world:smallest/target") == model_before  # the world itself is the same


def test_the_deployment_default_is_the_demo_run():
    """deployments/prefect.yaml's default config is the demo's run, field for field (it is written out by hand)."""
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml").read_text())
    shipped = FusionConfig.model_validate(spec["definitions"]["toy_config"]).model_dump(mode="json")
    assert shipped == FusionConfig.model_validate(toy_fusion_parameters("demo")).model_dump(mode="json")


def test_evaluation_judges_the_fused_model_and_exports_alpaca_eval(fusion_config, tmp_path):
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["reverse: abc", "reverse: xyz", "upper: hi"])
    )
    data = fusion_config.model_dump(mode="json")
    cfg = FusionConfig.model_validate(
        {**data, "evaluation": {"prompts": {"path": str(held_out)}, "max_new_tokens": 4}}
    )
    summaries = pipeline.run_pipeline(cfg)
    evaluation = summaries["evaluate"]
    assert evaluation["prompts"] == 3 and sorted(evaluation["win_rates"]) == ["target", "target-sft"]
    for rates in evaluation["win_rates"].values():
        assert rates["wins"] + rates["ties"] + rates["losses"] == 3
        assert rates["win_rate"] == pytest.approx((rates["wins"] + 0.5 * rates["ties"]) / 3)
    assert "accuracy" in evaluation["models"]["wrpo"]  # the toy verifier judges: exact accuracy too
    export = json.loads(
        (tmp_path / "runs" / "smoke" / "evaluation" / "alpaca_eval" / "wrpo.json").read_text()
    )
    assert [r["instruction"] for r in export] == ["reverse: abc", "reverse: xyz", "upper: hi"]
    assert {r["generator"] for r in export} == {"smoke/wrpo"}
    fused = registry.fused_models(registry.open_registry(cfg.storage.url))
    assert fused[-1]["run"] == summaries["register"]["run"] and fused[-1]["evaluation"]["prompts"] == 3


@pytest.mark.integration
def test_training_stages_launched_as_torchrun_jobs_stream_logs_and_metrics(fusion_config):
    """With `launch:` the SFT and WRPO stages run as torchrun jobs; their lines and steps reach the hooks."""
    cfg = FusionConfig.model_validate(
        {**fusion_config.model_dump(mode="json"), "launch": {"launcher": "local"}}
    )
    layout = pipeline.layout_for(cfg)
    lines, rows = [], []
    plan = pipeline.pipeline_stages(cfg, layout, on_log=lines.append, on_metrics=rows.append)
    summaries = {s.name: pipeline.run_pipeline_stage(cfg, layout, s, reuse=False)[1] for s in plan}
    assert summaries["sft"]["model"].endswith("models/target-sft") and "train_loss" in summaries["wrpo"]
    assert any("train_runtime" in line for line in lines)  # the job's own output
    assert {row["step"] for row in rows if "loss" in row} >= {1, 2}  # per-step metrics of both jobs
    assert (layout.storage.local_path("models/wrpo") / "model.safetensors").exists()
