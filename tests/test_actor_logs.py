"""A Ray actor's crash output (a C-level abort, not a Python exception) reaches the error and the Prefect run log."""

import os
import sys
import time

import pyarrow as pa
import pytest

from wrpo_core import fanout
from wrpo_core.config import ComputeConfig, ModelSpec
from wrpo_core.fanout import ActorPool, SamplingWorker, ShardError, plan_shards, run_shards
from wrpo_core.storage import Storage

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")

MARKER = "wrpo-test: the native library is about to abort"


class AbortingWorker(SamplingWorker):
    """A sampling actor whose native code aborts the process: its last words go to fd 2, then SIGABRT."""

    def run(self, shard):
        os.write(2, f"{MARKER} (pid {os.getpid()})\n".encode())
        os.abort()


@pytest.fixture()
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers cannot import this test module by name: ship its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    fanout.shutdown_local_ray()
    yield
    fanout.shutdown_local_ray()


def test_the_shard_error_carries_the_dead_actors_last_lines(local_ray, tmp_path, tiny_model_dir):
    fanout.init_ray(ComputeConfig())
    prompts = pa.table({"prompt_id": ["p0"], "prompt": ["reverse: abc"]})
    spec = ModelSpec(path=tiny_model_dir, name="tiny", sampling={"n": 1, "max_new_tokens": 2})
    actor = ray.remote(AbortingWorker).options(num_cpus=1, max_restarts=0)
    with pytest.raises(ShardError) as caught:
        run_shards(
            ActorPool(lambda: actor.remote(spec, prompts, (str(tmp_path), {}), device="cpu"), 1),
            Storage.open(str(tmp_path)), plan_shards(1, 1, "samples/tiny"), lambda a, s: a.run.remote(s),
            max_attempts=1,
        )  # fmt: skip
    message = str(caught.value)
    assert MARKER in message and "the last actor's output" in message
    assert "Fatal Python error: Aborted" in message  # the interpreter's own crash report, from its stderr


def test_an_aborting_actor_shows_in_the_prefect_run_log(local_ray, fusion_config, monkeypatch):
    pytest.importorskip("prefect")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tasks.fusion import run_fusion_stage

    monkeypatch.setattr(fanout, "SamplingWorker", AbortingWorker)
    data = fusion_config.model_dump(mode="json")
    data["compute"] |= {"executor": "ray", "num_actors": 1}
    cfg = type(fusion_config).model_validate(data)
    stage = run_fusion_stage.with_options(retries=0)

    @flow(name="actor-crash-test")
    def one_stage() -> None:
        stage(cfg, "ingest")
        stage(cfg, "sample-src-a")

    state = one_stage(return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 20
        while True:  # logs are sent in batches: wait for the failure's
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )
            text = "\n".join(log.message for log in logs)
            if MARKER in text or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert MARKER in text, text[-3000:]


def aborting_train_loop(config):
    os.write(2, f"{MARKER} (train worker {os.getpid()})\n".encode())
    os.abort()


def test_a_crashed_ray_train_worker_shows_its_last_lines_in_the_job_error(local_ray, tmp_path):
    """A Ray Train worker that dies in native code: the job's error (hence the stage's and the Prefect
    log's) carries what it wrote to its stderr, read from Ray's log files."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from wrpo_core.train.ray_train import crashed_workers_output, ray_error_text

    fanout.init_ray(ComputeConfig())
    trainer = TorchTrainer(
        aborting_train_loop,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="abort"),
    )
    with pytest.raises(Exception) as caught:
        trainer.fit()
    text = ray_error_text(caught.value) + crashed_workers_output(caught.value)
    assert MARKER in text and "Fatal Python error: Aborted" in text, text
    assert "the failed worker" in text
    assert crashed_workers_output(ValueError("a Python error names no worker")) == ""


SPOKEN = "wrpo-test: a line an actor printed"


class SpeakingWorker(SamplingWorker):
    """A sampling actor that prints a line to stdout and one to stderr, then samples as usual."""

    def run(self, shard):
        print(f"{SPOKEN} on stdout", flush=True)
        os.write(2, f"{SPOKEN} on stderr\n".encode())
        return super().run(shard)


def test_what_actors_print_reaches_the_fusion_flows_run_log(local_ray, fusion_config, monkeypatch):
    """Not only crashes: an actor's ordinary stdout and stderr lines show in the flow run's Prefect log."""
    pytest.importorskip("prefect")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.fusion import fusion

    monkeypatch.setattr(fanout, "SamplingWorker", SpeakingWorker)
    data = fusion_config.model_dump(mode="json")
    data["compute"] |= {"executor": "ray", "num_actors": 1}
    state = fusion(type(fusion_config).model_validate(data), return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 20
        while True:  # logs are sent in batches
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )
            text = "\n".join(log.message for log in logs)
            if (
                f"{SPOKEN} on stderr" in text and f"{SPOKEN} on stdout" in text
            ) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert f"{SPOKEN} on stdout" in text and f"{SPOKEN} on stderr" in text, text[-3000:]
    assert "(SpeakingWorker pid=" in text
