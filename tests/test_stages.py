"""The whole pipeline on tiny untrained models, in seconds: every stage runs, a rerun resumes,
a crashed stage is redone without reading its leftovers, and the same holds on a real S3 server."""

import json
import re
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from s3server import S3Server

from wrpo_core import pipeline
from wrpo_core.config import FusionConfig
from wrpo_core.pipeline import data, publishing, training
from wrpo_core.schemas import BEST_SOURCE, PROMPTS, QUADRUPLES, SAMPLES
from wrpo_core.storage import ManifestError, RunLayout, StorageError
from wrpo_core.train.metrics import METRICS_FILE, append_metrics_row, follow_metrics, trim_metrics


def s3_config(cfg: FusionConfig, prefix: str, options: dict) -> FusionConfig:
    return cfg.model_copy(
        update={"storage": cfg.storage.model_copy(update={"url": prefix, "storage_options": options})}
    )


def assert_quadruples_once(layout: RunLayout, summaries: dict) -> pa.Table:
    """The final data: one quadruple per kept preference prompt, each exactly once."""
    quadruples = layout.read_dataset(layout.quadruples, QUADRUPLES)
    assert quadruples.num_rows == summaries["select-target"]["rows_out"] > 0
    assert pc.count_distinct(quadruples["prompt_id"]).as_py() == quadruples.num_rows
    return quadruples


def test_pipeline_runs_every_stage_then_resumes(fusion_config, tmp_path, monkeypatch):
    summaries = pipeline.run_pipeline(fusion_config)
    layout = pipeline.layout_for(fusion_config)
    assert layout.root == str(tmp_path / "runs" / "smoke")
    names = [stage.name for stage in pipeline.pipeline_stages(fusion_config, layout)]
    assert list(summaries) == names
    assert summaries["ingest"]["prompts"] == 12
    assert summaries["split"] == {"sft": 4, "preference": 8}
    assert summaries["sample-src-a"]["samples"] == 48
    per_model = {row["model"]: row for row in summaries["select-source"]["per_model"]}
    assert sorted(per_model) == ["src-a", "src-b"]
    assert per_model["src-a"]["samples"] == 48
    assert per_model["src-a"]["completion_tokens"] == summaries["sample-src-a"]["completion_tokens"]
    assert per_model["src-a"]["mean_reward"] == pytest.approx(summaries["score-src-a"]["mean_reward"])
    assert sum(row["ws_share"] for row in per_model.values()) == pytest.approx(1.0)
    assert_quadruples_once(layout, summaries)
    run = tmp_path / "runs" / "smoke"
    assert (run / "models" / "wrpo" / "model.safetensors").exists()
    assert sorted(p.name for p in (run / "manifests").iterdir()) == sorted(f"{n}.json" for n in names)

    # Each manifest lists exactly the files its stage wrote, with rows, schema and versions.
    sample_manifest = layout.read_manifest("sample-src-a")
    dataset = sample_manifest["datasets"]["samples/src-a"]
    assert dataset["schema"] == "SAMPLES" and dataset["rows"] == 48
    assert [f["key"] for f in dataset["files"]] == ["samples/src-a/part-00000.parquet"]
    assert sample_manifest["inputs"].keys() == {"prompts/all"}
    assert sample_manifest["config_hash"] == pipeline.config_hash(fusion_config)
    assert sample_manifest["code_version"]["version"]
    wrpo_files = {f["key"] for f in layout.read_manifest("wrpo")["models"]["models/wrpo"]["files"]}
    assert {"models/wrpo/model.safetensors", "models/wrpo/README.md"} <= wrpo_files
    assert not any("checkpoint-" in key for key in wrpo_files)

    # Lineage: the fused model's card names sources, reward model, data counts, config and metrics.
    card = (run / "models" / "wrpo" / "README.md").read_text()
    for expected in ("src-a", "src-b", "toy-verifier", "| samples of src-a | 48 |",
                     f"| quadruples (x, y_ws, y_wt, y_l) | {summaries['select-target']['rows_out']} |",
                     "train_loss", "alpha_schedule: linear", "## Configuration"):  # fmt: skip
        assert expected in card, expected

    # A rerun does no work: every stage is done.
    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for module, stage in (
        (data, "ingest"),
        (data, "sample"),
        (data, "score"),
        (training, "sft"),
        (training, "wrpo"),
    ):
        monkeypatch.setattr(module, stage, fail)
    assert pipeline.run_pipeline(fusion_config) == summaries

    # A stage whose manifest is missing (the process died before writing it) runs again, alone.
    (run / "manifests" / "wrpo.json").unlink()
    monkeypatch.setattr(training, "wrpo", lambda cfg, lay, **hooks: {"rerun": True})
    monkeypatch.setattr(publishing, "register", lambda cfg, lay: {"registered": "the stub model"})
    assert pipeline.run_pipeline(fusion_config)["wrpo"] == {"rerun": True}


def test_stage_killed_before_its_manifest_is_redone_and_its_leftovers_never_read(
    fusion_config, tmp_path, monkeypatch
):
    layout = pipeline.layout_for(fusion_config)
    real_commit = RunLayout.commit

    def die_before_manifest(self, stage, summary, **kwargs):
        if stage == "select-source":
            raise KeyboardInterrupt("killed between the data files and the manifest")
        return real_commit(self, stage, summary, **kwargs)

    monkeypatch.setattr(RunLayout, "commit", die_before_manifest)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(fusion_config)
    monkeypatch.setattr(RunLayout, "commit", real_commit)
    folder = tmp_path / "runs" / "smoke" / "selection" / "best_source"
    assert (folder / "part-00000.parquet").exists() and not layout.is_done("select-source")
    # Nothing downstream can read the unfinished stage's data.
    with pytest.raises(ManifestError, match="selection/best_source"):
        layout.read_dataset(layout.best_source, BEST_SOURCE)

    # Leftovers of the crashed attempt: a poisoned extra partition and a torn file.
    poison = layout.read_dataset(layout.prompts, PROMPTS).slice(0, 1)
    poison_row = pa.table({"prompt_id": poison["prompt_id"], "prompt": poison["prompt"], "y_ws": ["POISON"],
                           "y_ws_model": ["poison"], "y_ws_sample_index": pa.array([0], pa.int32()),
                           "y_ws_score": [99.0]})  # fmt: skip
    layout.storage.write_table("selection/best_source/part-00007.parquet", poison_row, BEST_SOURCE)
    (folder / "part-00003.parquet").write_bytes(b"PAR1 torn")

    ran = []
    real_select = data.select_source
    monkeypatch.setattr(data, "select_source", lambda cfg, lay: ran.append(1) or real_select(cfg, lay))
    summaries = pipeline.run_pipeline(fusion_config)
    assert ran == [1]  # the stage was redone ...
    best = layout.read_dataset(layout.best_source, BEST_SOURCE)
    assert "POISON" not in best["y_ws"].to_pylist() and best.num_rows == 12  # ... from its own files only
    quadruples = assert_quadruples_once(layout, summaries)
    assert "POISON" not in quadruples["y_ws"].to_pylist()
    assert sorted(p.name for p in folder.iterdir()) == ["part-00000.parquet"]  # leftovers removed


def test_run_name_cannot_leave_the_storage_root(fusion_config):
    for bad in ("../elsewhere", "a/../../b", "/etc", "s3://other-bucket/x"):
        with pytest.raises(StorageError, match="not allowed"):
            pipeline.layout_for(fusion_config.model_copy(update={"run_name": bad}))


@pytest.mark.integration
def test_pipeline_end_to_end_on_s3(fusion_config, s3_server, s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("WRPO_CACHE", str(tmp_path / "cache"))
    cfg = s3_config(fusion_config, s3_prefix, s3_server.storage_options())
    summaries = pipeline.run_pipeline(cfg)
    layout = pipeline.layout_for(cfg)
    assert layout.root == f"{s3_prefix}/smoke"
    assert_quadruples_once(layout, summaries)
    assert not (tmp_path / "runs").exists()  # nothing went to the local default
    files = layout.storage.list_files("models/wrpo")
    assert {"models/wrpo/model.safetensors", "models/wrpo/README.md"} <= set(files)
    card = layout.storage.read_bytes("models/wrpo/README.md").decode()
    manifests = "".join(layout.storage.read_bytes(k).decode() for k in layout.storage.list_files("manifests"))
    for text in (card, manifests):
        assert s3_server.secret_key not in text
    assert "secret: '***'" in card and s3_server.endpoint in card

    # Another machine (a fresh cache) resumes from storage alone, downloading Target-SFT only when needed.
    other = pipeline.layout_for(cfg, cache_dir=tmp_path / "other-cache")
    other.storage.delete([other.manifest_key("wrpo")])
    resumed = pipeline.run_pipeline(cfg, layout=other)
    assert [k for k in resumed if resumed[k] != summaries[k]] == [
        "wrpo",
        "register",
    ]  # the new model, registered
    assert (tmp_path / "other-cache" / "models" / "target-sft" / "model.safetensors").exists()


@pytest.mark.integration
def test_s3_server_killed_during_a_stage_then_rerun_completes_with_every_row_once(
    fusion_config, tmp_path, monkeypatch
):
    server = S3Server(tmp_path / "seaweedfs").start()
    try:
        monkeypatch.setenv("WRPO_CACHE", str(tmp_path / "cache"))
        options = server.storage_options(max_attempts=1)  # no retries against the dead server: fail at once
        cfg = s3_config(fusion_config, f"s3://{server.bucket}/crash", options)
        layout = pipeline.layout_for(cfg, max_rows_per_file=8)  # 48 samples -> 6 partitions
        written = []
        real_write_table = type(layout.storage).write_table

        def write_then_crash(storage, key, table, schema):
            entry = real_write_table(storage, key, table, schema)
            if key.startswith("samples/src-a/"):
                written.append(key)
                if len(written) == 2:
                    server.kill()  # the S3 server dies in the middle of the stage's writes
            return entry

        monkeypatch.setattr(type(layout.storage), "write_table", write_then_crash)
        with pytest.raises(pipeline.StageError, match=r"stage sample-src-a \(model src-a\) failed") as error:
            pipeline.run_pipeline(cfg, layout=layout)
        assert isinstance(error.value.__cause__, StorageError) and not error.value.permanent
        message = str(error.value.__cause__)
        assert re.search(r"^cannot write s3://wrpo/crash/smoke/samples/src-a/part-0000\d\.parquet: ", message)
        assert "cannot reach" in message and server.secret_key not in message

        server.start()  # restart on the same data folder
        assert layout.is_done("ingest") and not layout.is_done("sample-src-a")
        summaries = pipeline.run_pipeline(cfg, layout=layout)
        samples = layout.read_dataset(layout.samples("src-a"), SAMPLES)
        keys = pc.binary_join_element_wise(
            samples["prompt_id"], pc.cast(samples["sample_index"], pa.string()), "/"
        )
        assert samples.num_rows == 48 == pc.count_distinct(keys).as_py()
        assert len(layout.storage.list_files("samples/src-a")) == 6
        assert_quadruples_once(layout, summaries)
    finally:
        server.kill()  # a throwaway server: no need for a graceful stop


@pytest.mark.integration
def test_pipeline_fanned_out_on_ray_matches_inline_and_adds_one_source_incrementally(fusion_config, tmp_path):
    """The same run on Ray actors (shards) gives the same samples as inline; a new source samples alone."""
    ray = pytest.importorskip("ray")
    inline = pipeline.run_pipeline(fusion_config.model_copy(update={"run_name": "inline"}))
    # The reward pool idles while src-b samples (long enough here, whatever the machine's load), and
    # 2 reward + 2 sampling replicas of half a CPU fit this 2-CPU Ray together (else it makes room).
    compute = fusion_config.compute.model_copy(
        update={"executor": "ray", "shard_size": 5, "num_actors": 2, "reward_pool_idle_s": 3600,
                "num_cpus_per_actor": 0.5}
    )  # fmt: skip
    on_ray_cfg = fusion_config.model_copy(update={"run_name": "ray", "compute": compute})
    try:
        on_ray = pipeline.run_pipeline(on_ray_cfg, reuse=False)  # sample on Ray, not copy the inline run's
        layout = pipeline.layout_for(on_ray_cfg)
        inline_layout = pipeline.layout_for(fusion_config.model_copy(update={"run_name": "inline"}))
        assert on_ray["sample-src-a"]["shards"] == 3  # 12 prompts in shards of 5
        for model in ("src-a", "src-b"):
            a = inline_layout.read_dataset(inline_layout.samples(model), SAMPLES).sort_by("seed")
            b = layout.read_dataset(layout.samples(model), SAMPLES).sort_by("seed")
            assert (
                a["text"].to_pylist() == b["text"].to_pylist()
            )  # per-sample seeds: batching does not matter
        assert on_ray["select-target"]["rows_out"] == inline["select-target"]["rows_out"]
        # One reward-model pool for every source's score stage (loaded once, 2 replicas), released
        # before SFT: Target-SFT's samples are scored by new replicas.
        scorers = on_ray["score-src-a"]["actors"]
        assert len(scorers) == 2 and on_ray["score-src-b"]["actors"] == scorers
        assert set(on_ray["score-target-sft"]["actors"]).isdisjoint(scorers)

        # Register a third source: only it is sampled and scored; stored samples are reused.
        sources = [*on_ray_cfg.sources, on_ray_cfg.sources[0].model_copy(update={"name": "src-c"})]
        again = pipeline.run_pipeline(on_ray_cfg.model_copy(update={"sources": sources}), reuse=False)
        assert again["sample-src-c"]["shards_run_now"] == 3
        assert again["sample-src-a"] == on_ray["sample-src-a"]  # not rerun

        # Fewer samples of src-a: its shards (tagged with their settings) and its scores are redone.
        fewer = sources[0].model_copy(update={"sampling": sources[0].sampling.model_copy(update={"n": 2})})
        third = pipeline.run_pipeline(
            on_ray_cfg.model_copy(update={"sources": [fewer, *sources[1:]]}), reuse=False
        )
        assert third["sample-src-a"]["shards_run_now"] == 3 and third["sample-src-a"]["samples"] == 24
        assert third["score-src-a"]["scored"] == 24
        assert len(layout.storage.list_files("samples/src-a")) == 3  # the old shards were removed
    finally:
        ray.shutdown()


def test_one_stage_is_built_by_name_as_the_plan_builds_it(fusion_config):
    layout = pipeline.layout_for(fusion_config)
    for stage in pipeline.pipeline_stages(fusion_config, layout):
        one = pipeline.pipeline_stage(fusion_config, layout, stage.name)
        assert (one.name, one.key, one.after, one.model, one.reusable) == (
            stage.name, stage.key, stage.after, stage.model, stage.reusable,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"no stage 'wrpoo'.*'select-target', 'wrpo', 'register'"):
        pipeline.pipeline_stage(fusion_config, layout, "wrpoo")


def test_in_process_training_streams_every_step_to_the_hooks(fusion_config):
    """What the flow's task logs for in-process training: each logged step of SFT, then of WRPO."""
    layout = pipeline.layout_for(fusion_config)
    rows = []
    for stage in pipeline.pipeline_stages(fusion_config, layout, on_metrics=rows.append):
        pipeline.run_pipeline_stage(fusion_config, layout, stage, reuse=False)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 1, 2]


def test_followed_metrics_of_a_rerun_arrive_although_the_old_file_was_longer(tmp_path):
    """A job that runs again (no checkpoint to resume from) logs its steps anew into a trimmed file."""
    old = "".join(json.dumps({"step": step, "loss": 1.0, "note": "x" * 200}) + "\n" for step in (1, 2, 3))
    (tmp_path / METRICS_FILE).write_text(old)
    rows = []
    with follow_metrics(tmp_path, rows.append, every_s=0.05):
        time.sleep(0.2)  # the tail has read the file before the job starts
        trim_metrics(tmp_path / METRICS_FILE, 0)  # as the job does first (run_training: nothing to resume)
        for step in (1, 2):
            append_metrics_row(tmp_path / METRICS_FILE, step, {"loss": 0.5})
    assert [(row["step"], row["loss"]) for row in rows] == [(1, 0.5), (2, 0.5)]
