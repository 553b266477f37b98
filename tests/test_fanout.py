"""Ray fan-out: shards written once, reruns skip them, a dead actor's shard is retried, a killed run resumes."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from wrpo_core import actor_pools
from wrpo_core.config import ComputeConfig, ModelSpec, RewardModelSpec
from wrpo_core.fanout import (
    ActorPool,
    SamplingWorker,
    plan_shards,
    read_shards,
    release_pools,
    run_shards,
    sample_model,
    score_model,
)
from wrpo_core.prompts import prompt_id_of
from wrpo_core.schemas import SAMPLES, SCORES
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
    release_pools()
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
    pool = ActorPool(
        lambda: actor.remote(spec(tiny_model_dir), prompts_table(6), (str(tmp_path), {}), device="cpu"), 2
    )
    results = run_shards(pool, storage, shards, lambda a, s: a.run.remote(s))
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
        run_shards(ActorPool(make_actor, 1), storage, shards, lambda a, s: a.run.remote(s), max_attempts=2,
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


def write_samples(tmp_path, names) -> dict[str, list]:
    """Two sample shards (2 prompts x 2 samples each) per model, as its sample stage leaves them."""
    texts = [f"reverse: {word}" for word in ("abc", "dog", "sun", "tree")]
    storage, written = Storage.open(str(tmp_path)), {}
    for name in names:
        shards = plan_shards(4, 2, f"samples/{name}")
        for shard in shards:
            rows = [(prompt_id_of(texts[i]), k) for i in range(shard.start, shard.stop) for k in range(2)]
            table = pa.table({
                "prompt_id": [p for p, _ in rows], "model": [name] * 4,
                "sample_index": pa.array([k for _, k in rows], pa.int32()), "text": ["cba", "xyz"] * 2,
                "finish_reason": ["stop"] * 4, "prompt_tokens": pa.array([3] * 4, pa.int32()),
                "completion_tokens": pa.array([2] * 4, pa.int32()), "seed": pa.array(range(4), pa.int64()),
            })  # fmt: skip
            storage.write_table(shard.out_key, table, SAMPLES)
        written[name] = shards
    return written


def toy_prompts_table() -> pa.Table:
    texts = [f"reverse: {word}" for word in ("abc", "dog", "sun", "tree")]
    return pa.table({"prompt_id": [prompt_id_of(t) for t in texts], "prompt": texts})


def score(tmp_path, name, shards, tag="", replicas=1):
    compute = ComputeConfig(num_cpus_per_actor=1, num_actors=replicas)
    return score_model(RewardModelSpec(path="toy-verifier", kind="toy_verifier"), toy_prompts_table(),
                       (str(tmp_path), {}), shards, f"scores/{name}", compute, tag=tag)  # fmt: skip


def test_the_reward_model_is_loaded_once_for_every_model_scored(local_ray, tmp_path):
    """Score stages of three models run on one reward-model replica (loaded once), until released."""
    release_pools()
    sampled = write_samples(tmp_path, ["a", "b", "c"])
    actors = set()
    for name, shards in sampled.items():
        _, results = score(tmp_path, name, shards)
        assert sorted(results) == [0, 1] and sum(r["scored"] for r in results.values()) == 8
        actors |= {r["actor"] for r in results.values()}
    assert len(actors) == 1 and None not in actors  # one replica (num_actors 1) scored all three
    assert release_pools() == 1  # e.g. before training
    _, results = score(tmp_path, "a", sampled["a"], tag="again")
    assert {r["actor"] for r in results.values()}.isdisjoint(actors)  # a new replica after the release
    release_pools()


def test_concurrent_score_stages_share_the_replica(local_ray, tmp_path):
    """The flow's concurrent score stages: one replica for all, every row scored exactly once."""
    release_pools()
    sampled = write_samples(tmp_path, ["a", "b", "c"])
    with ThreadPoolExecutor(3) as threads:
        outcomes = list(threads.map(lambda item: score(tmp_path, *item), sampled.items()))
    assert len({r["actor"] for _, results in outcomes for r in results.values()}) == 1
    storage = Storage.open(str(tmp_path))
    for (shards, _), name in zip(outcomes, sampled, strict=True):
        table = read_shards(storage, shards, SCORES)
        assert table.num_rows == 8 and set(table["model"].to_pylist()) == {name}
        assert sorted(table["score"].to_pylist()) == [0.0] * 7 + [1.0]  # "cba" is right for "abc" only
    release_pools()


def test_an_idle_reward_pool_makes_room_for_sampling_actors_that_do_not_fit(
    local_ray, tmp_path, tiny_model_dir
):
    """Two idle reward replicas hold both CPUs: the sampling stage releases them instead of waiting.

    On a cluster: reward replicas idling between score stages must not hold the GPUs a source's
    sampling replicas wait for (that waited for `reward_pool_idle_s` at best).
    """
    release_pools()
    sampled = write_samples(tmp_path, ["a"])
    _, results = score(tmp_path, "a", sampled["a"], replicas=2)
    assert len({r["actor"] for r in results.values()}) == 2  # 2 x 1 CPU: this Ray's 2 CPUs (local_ray)
    _, done = sample_model(spec(tiny_model_dir), prompts_table(4), (str(tmp_path), {}), "samples/tiny",
                                ComputeConfig(), shard_size=2)  # fmt: skip
    assert sorted(done) == [0, 1] and not actor_pools._POOLS  # sampled, and the idle pool was released for it
