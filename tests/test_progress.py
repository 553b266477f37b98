"""Stage progress: shards, samples and training steps counted as they finish, and the Prefect artifact of it."""

import json
import math
import os
import threading
import time

import pyarrow as pa
import pytest
from transformers import LlamaForSequenceClassification

from wrpo_core import pipeline
from wrpo_core.config import ComputeConfig, FusionConfig, ModelSpec, RewardModelSpec
from wrpo_core.fanout import sample_model, score_model, shard_key
from wrpo_core.prompts import prompt_id_of
from wrpo_core.rewards import SequenceClassifierScorer
from wrpo_core.sampling import HFSampler
from wrpo_core.schemas import BEST_SOURCE, PROMPTS
from wrpo_core.storage import Storage
from wrpo_core.toy.skills import make_prompts
from wrpo_core.toy.tiny_models import tiny_llama_config
from wrpo_core.train.metrics import MAX_STEPS, StepProgress

PLAN_BATCH_SIZE = 32  # the prompts per batch of inline sampling in the plan (data.sample's default)


def test_step_progress_takes_the_total_from_the_job_or_from_the_row_training_starts_with():
    calls = []
    configured = StepProgress(lambda done, total: calls.append((done, total)), max_steps=5)
    for row in ({"step": 0, MAX_STEPS: 5}, {"step": 2, "loss": 1.0}, {"step": 5, "train_loss": 0.9}):
        configured(row)
    assert calls == [(0, 5), (2, 5), (5, 5)]

    calls.clear()
    by_epochs = StepProgress(lambda done, total: calls.append((done, total)), max_steps=-1)
    for row in ({"step": 3, "loss": 1.0}, {"step": 4, MAX_STEPS: 9}, {"step": 6, "loss": 1.0}):
        by_epochs(row)
    assert calls == [(4, 9), (6, 9)]  # nothing before the total is known; a resumed job starts at step 4


def test_the_hf_scorer_reports_each_batch(toy_tokenizer, tmp_path):
    config = tiny_llama_config(toy_tokenizer)
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    toy_tokenizer.save_pretrained(tmp_path)
    scorer = SequenceClassifierScorer(RewardModelSpec(path=str(tmp_path), batch_size=2), progress=False)
    calls = []
    scorer.on_progress = lambda done, total: calls.append((done, total))
    scorer.score(["a", "bb", "ccc", "dddd", "e"], ["1", "2", "3", "4", "5"])
    assert calls == [(2, 5), (4, 5), (5, 5)]


@pytest.fixture()
def config(fusion_config, tmp_path) -> FusionConfig:
    """The smoke config with 80 prompts (sampling takes several batches) and SFT given in epochs
    (its total steps is known only to the Trainer)."""
    prompts = tmp_path / "many-prompts.jsonl"
    rows = make_prompts(["reverse", "add", "upper"], 80, seed=0)
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    data = fusion_config.model_dump(mode="json")
    data["prompts"]["path"] = str(prompts)
    data["sft"] |= {"max_steps": -1, "num_train_epochs": 1}
    return FusionConfig.model_validate(data)


def test_inline_stages_report_samples_and_training_reports_steps(config):
    cfg = config
    layout = pipeline.layout_for(cfg)
    calls: dict[str, list[tuple[int, int, str]]] = {}
    current = {}
    on_progress = lambda done, total, unit: calls.setdefault(current["stage"], []).append((done, total, unit))  # noqa: E731
    for stage in pipeline.pipeline_stages(cfg, layout, on_progress=on_progress):
        current["stage"] = stage.name
        pipeline.run_pipeline_stage(cfg, layout, stage, reuse=False)
        if stage.name == "sft":
            break
    prompts = layout.read_dataset(layout.prompts, PROMPTS).num_rows
    n = cfg.sources[0].sampling.n
    # HF sampling: 0 at the start, each batch of 32 prompts (n samples each) as it ends, then the end.
    batches = [
        min(k * PLAN_BATCH_SIZE, prompts) * n for k in range(1, math.ceil(prompts / PLAN_BATCH_SIZE) + 1)
    ]
    expected = [0, *batches, prompts * n]
    assert prompts > PLAN_BATCH_SIZE  # more than one batch: the count moves during the stage
    assert calls["sample-src-a"] == [(done, prompts * n, "samples") for done in expected]
    # The toy verifier scores all at once: start and end.
    assert calls["score-src-a"] == [(0, prompts * n, "samples"), (prompts * n, prompts * n, "samples")]
    # SFT in epochs: the total is the Trainer's (one epoch of batches of 2), known from its first row.
    pairs = layout.read_dataset(layout.sft_pairs, BEST_SOURCE).num_rows
    steps = math.ceil(pairs / cfg.sft.per_device_train_batch_size)
    sft = calls["sft"]
    assert steps > 2 and {total for _, total, _ in sft} == {steps} and {unit for *_, unit in sft} == {"steps"}
    done = [d for d, _, _ in sft]
    assert done[0] == 0 and done[-1] == steps and done == sorted(done) and len(set(done)) == steps + 1
    assert "ingest" not in calls and "split" not in calls and "select-source" not in calls


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.integration
def test_shards_on_ray_are_counted_and_a_resumed_run_starts_at_its_position(
    local_ray, tmp_path, tiny_model_dir
):
    texts = [row["prompt"] for row in make_prompts(["reverse"], 6, seed=0)]
    prompts = pa.table({"prompt_id": [prompt_id_of(t) for t in texts], "prompt": texts})
    storage = (str(tmp_path), {})
    spec = ModelSpec(path=tiny_model_dir, name="tiny", sampling={"n": 2, "max_new_tokens": 4})
    sampled = []
    shards, _ = sample_model(spec, prompts, storage, "samples/tiny", ComputeConfig(), shard_size=2,
                             on_progress=lambda done, total: sampled.append((done, total)))  # fmt: skip
    assert len(shards) == 3 and sampled == [(0, 3), (1, 3), (2, 3), (3, 3)]

    # Score shard 0 was written by an earlier, interrupted attempt: the count starts at 1.
    Storage.open(str(tmp_path)).write_bytes(f"scores/tiny/{shard_key(0)}", b"written before")
    scored = []
    reward = RewardModelSpec(path="toy-verifier", kind="toy_verifier")
    _, results = score_model(reward, prompts, storage, shards, "scores/tiny", ComputeConfig(),
                             on_progress=lambda done, total: scored.append((done, total)))  # fmt: skip
    assert sorted(results) == [1, 2] and scored == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.integration
def test_the_progress_artifact_is_seen_through_the_prefect_api_while_the_stage_runs(config, monkeypatch):
    """Sampling blocks after its first batch; meanwhile the API shows the stage part-way, then at 100 %."""
    pytest.importorskip("prefect")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.fusion import progress_key, run_fusion_stage

    cfg = config.model_copy(update={"run_name": f"progress-{os.getpid()}-{time.time_ns()}"})
    key = progress_key(cfg.run_name, "sample-src-a")
    first_batch_done, release = threading.Event(), threading.Event()
    real_generate = HFSampler._generate
    batches = []

    def generate(self, *args, **kwargs):
        if batches:  # the first batch is done and reported: hold the stage here
            first_batch_done.set()
            assert release.wait(60), "the test never released the stage"
        batches.append(1)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(HFSampler, "_generate", generate)

    def progress_now() -> list[float]:
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        return [float(artifact.data) for artifact in found]

    seen: dict[str, list[float]] = {}

    def watch() -> None:
        try:
            assert first_batch_done.wait(120), "sampling never reached its second batch"
            deadline = time.monotonic() + 20
            while not (seen.get("blocked") or [0.0])[0] > 0 and time.monotonic() < deadline:
                seen["blocked"] = progress_now()
                time.sleep(0.2)
        finally:
            release.set()

    @flow(name="progress-test")
    def one_stage() -> dict:
        run_fusion_stage(cfg, "ingest")
        return run_fusion_stage(cfg, "sample-src-a")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = one_stage()
    watcher.join(timeout=30)
    layout = pipeline.layout_for(cfg)
    prompts = layout.read_dataset(layout.prompts, PROMPTS).num_rows
    assert result["outcome"] == "ran" and len(batches) == math.ceil(prompts / PLAN_BATCH_SIZE) > 1
    assert seen["blocked"] == [pytest.approx(100 * PLAN_BATCH_SIZE / prompts)]  # 32 of the prompts sampled
    assert progress_now() == [100.0]
    assert not _artifacts_of(get_client, cfg.run_name, "ingest")  # a stage that reports no progress has none


def _artifacts_of(get_client, run_name: str, stage: str) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.fusion import progress_key

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[progress_key(run_name, stage)]))
        )
