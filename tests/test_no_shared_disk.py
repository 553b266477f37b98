"""The real path's cluster: the fusion flow on Ray nodes that share no disk with the Prefect worker.

Stands for a production Ray cluster (issue 14): a head node and two worker nodes started with
`ray start`, each worker in its own mount namespace where the driver's folders (this test's
tmp_path: the run's local cache, the prompt files) are empty tmpfs mounts, storage on the S3
server, S3 credentials only in the driver's environment (Ray workers get them by name: ray_env.py),
and the package's folder empty on the workers too (the driver ships its code: WRPO_SHIP_CODE=1).
The head has 0 CPUs, so every sampling and scoring actor and every Ray Train worker runs on a node
that cannot read the driver's disk.
"""

import os
from pathlib import Path

import pytest
from ray_nodes import RayNodes, can_hide_folders

import wrpo_core
from wrpo_core.config import FusionConfig
from wrpo_core.demo import DEFAULT_CACHE, _write_prompts
from wrpo_core.pipeline import layout_for
from wrpo_core.storage import Storage
from wrpo_core.toy.paths import demo_settings, toy_config_data, toy_prompts
from wrpo_core.toy.world import build_world
from wrpo_core.train.ray_train import FINAL_MODEL_DIR

pytestmark = pytest.mark.integration
PACKAGE = Path(wrpo_core.__file__).parent
"""The package's folder: empty on the worker nodes, which run the copy the driver ships."""


@pytest.fixture()
def isolated_nodes(tmp_path, s3_server):
    reason = can_hide_folders()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the no-shared-disk cluster test: {reason}")
        pytest.skip(reason)
    credentials = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                   "AWS_ENDPOINT_URL": s3_server.endpoint}  # fmt: skip
    nodes = RayNodes.start(
        # No credentials on the nodes: the driver's reach actors and training workers by name (ray_env.py).
        # Nor this checkout's package: the driver ships it with the job (WRPO_SHIP_CODE=1).
        hidden=[tmp_path, PACKAGE], env={}, worker_env={"WRPO_CACHE": str(tmp_path / "node-cache")},
        logs=tmp_path.parent / f"{tmp_path.name}-ray-logs",
    )  # fmt: skip
    yield nodes, credentials
    import ray

    ray.shutdown()  # the driver's connection to this cluster must not outlive it (later tests start their own)
    nodes.stop()


def test_the_flow_completes_on_nodes_that_cannot_read_the_drivers_disk(
    tmp_path, s3_prefix, isolated_nodes, monkeypatch
):
    from flows.fusion import fusion

    nodes, credentials = isolated_nodes
    for name, value in {
        **credentials,
        "WRPO_CACHE": str(tmp_path / "driver-cache"),
        "WRPO_SHIP_CODE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    settings = demo_settings(quick=True)
    world = build_world(settings["world"], DEFAULT_CACHE)  # the "hub": every node can read it
    train, held_out = toy_prompts(
        settings["world"], settings["train_prompts"], settings["eval_prompts"], seed=7
    )
    _write_prompts(tmp_path / "prompts.jsonl", train)
    _write_prompts(tmp_path / "held-out.jsonl", held_out)
    data = toy_config_data(
        sources=dict(world.sources), target=world.target, prompts=str(tmp_path / "prompts.jsonl"),
        held_out=str(tmp_path / "held-out.jsonl"), storage_url=s3_prefix, settings=settings, run_name="nodisk",
        executor="ray",
    )  # fmt: skip
    data["compute"] = {
        "executor": "ray",
        "ray_address": nodes.address,
        "num_actors": 2,
        "num_cpus_per_actor": 1,
    }
    endpoint = credentials["AWS_ENDPOINT_URL"].removeprefix("http://")
    launch = {"launcher": "ray", "ray_address": nodes.address, "num_workers": 1, "use_gpu": False,
              "resources_per_worker": {"CPU": 1},
              # pyarrow's S3 (Ray Train's checkpoints) reads the endpoint from the URL, not AWS_ENDPOINT_URL
              "storage_path": f"{s3_prefix}/ray-train?endpoint_override={endpoint}&scheme=http"}  # fmt: skip
    data["launch"] = launch
    cfg = FusionConfig.model_validate(data)
    result = fusion(cfg)

    # Every stage ran (a fresh run), on nodes that could open none of the driver's files.
    assert set(result["stages"].values()) == {"ran"}, result["stages"]
    assert {"sample-target-sft", "score-target-sft", "sft", "wrpo", "evaluate"} <= set(result["stages"])
    layout = layout_for(cfg)
    for name in ("target-sft", "wrpo"):  # saved with the sums that the nodes checked their copies by
        assert layout.storage.exists(f"{layout.model_key(name)}/SHA256SUMS")
    # Ray Train ran both jobs there and stored their final models in the object store.
    ray_train = Storage.open(f"{s3_prefix}/ray-train")
    runs = {path.rsplit("/", 1)[-1] for path in ray_train.fs.ls(ray_train.root)}
    for stage in ("sft", "wrpo"):
        run = next((r for r in runs if r.startswith(f"wrpo-{stage}-")), None)
        assert run is not None and ray_train.exists(f"{run}/{FINAL_MODEL_DIR}/config.json"), runs
    assert result["evaluation"] and set(result["evaluation"]) == {"target", "target-sft"}
