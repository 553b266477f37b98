"""Ray workers get the driver's settings and credentials by name (wrpo_core/ray_env.py), never from a config.

The cluster test (tests/test_no_shared_disk.py) runs nodes with no credentials of their own: its
actors and Ray Train workers reach S3 only through these forwarded variables.
"""

import pytest

import wrpo_core
from wrpo_core.config import LaunchConfig
from wrpo_core.ray_env import EXTRA_ENV, SHIP_CODE_ENV, forwarded_env, forwarded_names, runtime_env
from wrpo_core.train.ray_train import ray_worker_env


def test_only_variables_set_on_the_driver_are_forwarded(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id-1")
    monkeypatch.setenv("HF_TOKEN", "hf-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("UNRELATED_SECRET", "no")
    env = forwarded_env()
    assert env["AWS_ACCESS_KEY_ID"] == "id-1" and env["HF_TOKEN"] == "hf-1"
    assert "AWS_SESSION_TOKEN" not in env and "UNRELATED_SECRET" not in env


def test_more_names_through_wrpo_forward_env(monkeypatch):
    monkeypatch.setenv(EXTRA_ENV, "GOOGLE_APPLICATION_CREDENTIALS, MY_VAR")
    monkeypatch.setenv("MY_VAR", "x")
    assert forwarded_names()[-2:] == ("GOOGLE_APPLICATION_CREDENTIALS", "MY_VAR")
    assert forwarded_env()["MY_VAR"] == "x"
    monkeypatch.setenv(EXTRA_ENV, "OK_NAME,bad-name")
    with pytest.raises(ValueError, match=r"WRPO_FORWARD_ENV: \['bad-name'\]"):
        forwarded_env()


def test_ray_train_workers_get_the_forwarded_variables_and_the_launch_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = ray_worker_env(LaunchConfig(launcher="ray", env={"NCCL_DEBUG": "INFO"}))
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["NCCL_DEBUG"] == "INFO"


def test_the_package_is_shipped_only_when_asked(monkeypatch):
    monkeypatch.delenv(SHIP_CODE_ENV, raising=False)
    assert "py_modules" not in runtime_env()
    monkeypatch.setenv(SHIP_CODE_ENV, "1")
    assert runtime_env()["py_modules"] == [wrpo_core]
    monkeypatch.setenv(SHIP_CODE_ENV, "yes")
    with pytest.raises(ValueError, match="WRPO_SHIP_CODE: 'yes' is not 0 or 1"):
        runtime_env()


@pytest.mark.integration
def test_an_actor_sees_the_forwarded_variable(monkeypatch):
    """Through fanout.init_ray's runtime_env: the actor's process has the driver's value."""
    ray = pytest.importorskip("ray")
    from wrpo_core import fanout
    from wrpo_core.config import ComputeConfig

    monkeypatch.setenv("HF_ENDPOINT", "http://hub.internal:8080")
    assert not ray.is_initialized()
    fanout.init_ray(ComputeConfig())
    try:

        @ray.remote(num_cpus=0)
        def read(name):
            import os

            return os.environ.get(name)

        assert ray.get(read.remote("HF_ENDPOINT")) == "http://hub.internal:8080"
    finally:
        fanout.shutdown_local_ray()
