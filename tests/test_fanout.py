"""Ray fan-out: shards written once, reruns skip them, a dead actor's shard is retried, a killed run resumes."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from wrpo_core.config import ComputeConfig, ModelSpec
from wrpo_core.fanout import SamplingWorker, plan_shards, read_shards, run_shards, sample_model
from wrpo_core.prompts import prompt_id_of
from wrpo_core.schemas import SAMPLES
from wrpo_core.storage import Storage

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers cannot import this test module by name: ship its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def prompts_table(n: int) -> pa.Table:
    texts = [f"reverse: word{i}" for i in range(n)]
    return pa.table({"prompt_id": [prompt_id_of(t) for t in texts], "prompt": texts})


def spec(model_dir: str) -> ModelSpec:
    return ModelSpec(path=model_dir, name="tiny", sampling={"n": 2, "max_new_tokens": 4, "temperature": 1.0})


def keys(table: pa.Table) -> list[tuple]:
    return sorted(
        zip(
            table["prompt_id"].to_pylist(),
            table["model"].to_pylist(),
            table["sample_index"].to_pylist(),
            strict=True,
        )
    )


def test_every_row_once_and_rerun_skips(local_ray, tmp_path, tiny_model_dir):
    storage = (str(tmp_path), {})
    shards, results = sample_model(
        spec(tiny_model_dir),
        prompts_table(10),
        storage,
        "samples/tiny",
        ComputeConfig(),
        shard_size=3,
        num_actors=2,
    )
    assert [s.out_key for s in shards] == [f"samples/tiny/part-0000{i}.parquet" for i in range(4)]
    assert sorted(results) == [0, 1, 2, 3]
    table = read_shards(Storage.open(str(tmp_path)), shards, SAMPLES)
    assert len(keys(table)) == 20 == len(set(keys(table)))
    again_shards, again = sample_model(
        spec(tiny_model_dir), prompts_table(10), storage, "samples/tiny", ComputeConfig(), shard_size=3
    )
    assert again == {} and again_shards == shards


class DiesOnce(SamplingWorker):
    """Dies (the whole actor process) the first time it meets shard 1."""

    def run(self, shard):
        marker = Path(self.storage.root) / "died-once"
        if shard.index == 1 and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("x")
            os._exit(1)
        return super().run(shard)


def test_dead_actor_shard_is_retried(local_ray, tmp_path, tiny_model_dir):
    storage = Storage.open(str(tmp_path))
    shards = plan_shards(6, 2, "samples/tiny")
    actor = ray.remote(DiesOnce).options(num_cpus=1, max_restarts=0)
    results = run_shards(
        lambda: actor.remote(spec(tiny_model_dir), prompts_table(6), (str(tmp_path), {}), device="cpu"),
        storage, shards, lambda a, s: a.run.remote(s), num_actors=2,
    )  # fmt: skip
    assert (tmp_path / "died-once").exists()
    assert sorted(results) == [0, 1, 2]
    assert len(set(keys(read_shards(storage, shards, SAMPLES)))) == 12


class AlwaysDies(SamplingWorker):
    """Dies (the whole actor process) on every shard, as on a node that cannot open the model."""

    def run(self, shard):
        os._exit(1)


def test_a_shard_that_kills_every_actor_fails_naming_the_shard_and_its_file(
    local_ray, tmp_path, tiny_model_dir
):
    storage = Storage.open(str(tmp_path))
    shards = plan_shards(2, 2, "samples/tiny")
    actor = ray.remote(AlwaysDies).options(num_cpus=1, max_restarts=0)
    started = []

    def make_actor():
        started.append(1)
        return actor.remote(spec(tiny_model_dir), prompts_table(2), (str(tmp_path), {}), device="cpu")

    with pytest.raises(RuntimeError) as failure:
        run_shards(make_actor, storage, shards, lambda a, s: a.run.remote(s), num_actors=1, max_attempts=2,
                   desc="sampling tiny")  # fmt: skip
    message = str(failure.value)
    assert message.startswith(
        f"sampling tiny: shard 0 ({tmp_path}/samples/tiny/part-00000.parquet) failed on 2 "
    )
    assert "died" in message and len(started) == 2  # one fresh actor per attempt, no more
    assert not (tmp_path / "samples").exists()  # nothing was written


def test_actors_return_the_entries_of_the_files_they_wrote(local_ray, tmp_path, tiny_model_dir):
    shards, results = sample_model(
        spec(tiny_model_dir),
        prompts_table(4),
        (str(tmp_path), {}),
        "samples/tiny",
        ComputeConfig(),
        shard_size=2,
    )
    for shard in shards:
        data = (tmp_path / shard.out_key).read_bytes()
        entry = results[shard.index]["file"]
        assert entry["key"] == shard.out_key and entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["rows"] == 4


def test_killed_run_resumes_with_every_row_once(tmp_path, tiny_model_dir):
    out = tmp_path / "samples" / "tiny"
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, time, ray
        import pyarrow as pa
        os.environ["RAY_AUTH_MODE"] = "disabled"
        from wrpo_core.config import ComputeConfig, ModelSpec
        from wrpo_core.fanout import sample_model
        from wrpo_core.prompts import prompt_id_of
        texts = [f"reverse: word{{i}}" for i in range(80)]
        prompts = pa.table({{"prompt_id": [prompt_id_of(t) for t in texts], "prompt": texts}})
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        spec = ModelSpec(path={tiny_model_dir!r}, name="tiny", sampling={{"n": 2, "max_new_tokens": 24}})
        sample_model(spec, prompts, ({str(tmp_path)!r}, {{}}), "samples/tiny", ComputeConfig(), shard_size=2, num_actors=1)
    """)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    written = len(list(out.glob("part-*.parquet")))
    assert 2 <= written < 40, "the run should have been killed part-way"
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    shards = plan_shards(80, 2, "samples/tiny")
    table = read_shards(Storage.open(str(tmp_path)), shards, SAMPLES)
    assert len(keys(table)) == 160 == len(set(keys(table)))
    assert not list(out.glob(".*tmp*")), "no temporary files are left behind"
