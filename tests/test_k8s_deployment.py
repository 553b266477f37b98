"""The Kubernetes side, read statically: the `wrpo-kubernetes` deployment, its work pool's base job template,
the flow image it runs, and the `ray up` cluster's instance profiles and registry login.

Prefect's own code checks what a server and a worker would: the template is a valid base job template (every
placeholder declared), the deployment's job variables pass the server's validation, and Prefect's worker
renders them into the Job manifest (GPUs, image, the credentials Secret). With prefect-kubernetes installed
(the worker's package, not a project dependency), its job configuration renders and validates the manifest too.
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.schema_tools import ValidationError, is_valid_schema, validate
from prefect.workers.base import BaseJobConfiguration
from pydantic import ConfigDict
from test_images import (
    UBUNTU_PYTHON,
    context_copies,
    ignore_patterns,
    ignored,
    instructions,
    package_sources,
    shell_commands,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ROOT / "deployments"
TEMPLATE = json.loads((DEPLOYMENTS / "k8s-base-job-template.json").read_text())
SPEC = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CLUSTER = yaml.safe_load((ROOT / "infra" / "ray" / "cluster.yaml").read_text())
CONSTRAINTS = "requirements/constraints-cpu.txt"


def kubernetes_deployment() -> dict[str, Any]:
    (found,) = [d for d in SPEC["deployments"] if d["work_pool"]["name"] == "wrpo-kubernetes"]
    return found


def job_variables() -> dict[str, Any]:
    return kubernetes_deployment()["work_pool"]["job_variables"]


class _RenderedJob(BaseJobConfiguration):
    """Prefect's base job configuration keeping the Kubernetes fields (job_manifest, namespace, ...)."""

    model_config = ConfigDict(extra="allow")


def rendered_manifest(values: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest Prefect's worker renders from the template, its defaults and `values`."""
    # No block or variable placeholders in the template, so the client is never called.
    job = asyncio.run(_RenderedJob.from_template_and_values(TEMPLATE, values, client=object()))
    return job.model_extra["job_manifest"]


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]


# --- prefect.yaml ---------------------------------------------------------------------------------


def test_prefect_yaml_holds_the_process_and_the_kubernetes_deployments():
    pools = {(d["entrypoint"], d["name"]): d["work_pool"]["name"] for d in SPEC["deployments"]}
    assert pools == {
        ("flows/fusion.py:fusion", "default"): "wrpo-process",
        ("flows/fusion.py:fusion", "refusion"): "wrpo-process",
        ("flows/discover.py:discover", "default"): "wrpo-process",
        ("flows/fusion.py:fusion", "kubernetes"): "wrpo-kubernetes",
    }
    deploy = (DEPLOYMENTS / "deploy.sh").read_text()
    # deploy.sh deploys --all, so it creates both pools, the Kubernetes one from the template file.
    assert "deploy --all" in deploy and "work-pool create wrpo-process --type process" in deploy
    assert re.search(
        r"work-pool create wrpo-kubernetes --type kubernetes\s*\\?\s*--base-job-template "
        r"deployments/k8s-base-job-template\.json",
        deploy,
    )


def test_the_kubernetes_deployment_runs_the_flow_image_from_its_source_folder():
    deployment = kubernetes_deployment()
    assert job_variables()["image"].endswith(f"/wrpo-fusion-flow:{VERSION}")
    assert TEMPLATE["variables"]["properties"]["image"]["default"] == job_variables()["image"]
    (step,) = deployment["pull"]
    folder = step["prefect.deployments.steps.set_working_directory"]["directory"]
    workdirs = [arguments for keyword, arguments in instructions("flow") if keyword == "WORKDIR"]
    assert workdirs[-1] == folder, "the pull step runs the flow from the image's source folder"
    entry_file = deployment["entrypoint"].split(":")[0]
    copied = {dest.rstrip("/") for _, _, dest in context_copies("flow")}
    assert f"{folder}/{entry_file.split('/')[0]}" in copied, f"{entry_file} is not copied to {folder}"
    # The toy world runs in the pod, its results in S3: the pod's own disk goes with it.
    assert deployment["parameters"]["config"]["storage"]["url"].startswith("s3://")


# --- the base job template ------------------------------------------------------------------------


def test_the_template_is_a_base_job_template_prefect_accepts():
    validate_base_job_template(TEMPLATE)  # the server's check: every placeholder is a declared variable
    variables = TEMPLATE["variables"]
    is_valid_schema(variables, preprocess=False)
    defaults = {name: p["default"] for name, p in variables["properties"].items() if "default" in p}
    validate(defaults, variables, raise_on_error=True, preprocess=True, ignore_required=True)
    # The Kubernetes worker's required shape (prefect_kubernetes.worker._get_base_job_manifest).
    manifest = TEMPLATE["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    spec = pod_spec(manifest)
    assert (spec["restartPolicy"], spec["parallelism"], spec["completions"]) == ("Never", 1, 1)
    assert spec["containers"][0]["name"] == "prefect-job"


def test_every_job_variable_is_declared_and_valid_for_the_server():
    properties = TEMPLATE["variables"]["properties"]
    # The schema allows undeclared keys, which Prefect would accept and then silently not render.
    undeclared = set(job_variables()) - set(properties)
    assert not undeclared, f"job variables not in the template's variables: {sorted(undeclared)}"
    # The arguments the server validates a deployment's job variables with.
    settings = dict(raise_on_error=True, preprocess=True, ignore_required=True, allow_none_with_default=True)
    validate(job_variables(), TEMPLATE["variables"], **settings)
    for bad in ({"gpu_count": -1}, {"gpu_count": "two"}, {"image_pull_policy": "Sometimes"}):
        with pytest.raises(ValidationError):
            validate({**job_variables(), **bad}, TEMPLATE["variables"], **settings)


def test_the_gpu_count_variable_requests_nvidia_gpus():
    container = pod_spec(TEMPLATE["job_configuration"]["job_manifest"])["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    deployed = rendered_manifest(job_variables())
    resources = pod_spec(deployed)["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == job_variables()["gpu_count"] == 0
    assert resources["requests"]["memory"] == job_variables()["memory_request"]
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    on_gpus = pod_spec(rendered_manifest({**job_variables(), "gpu_count": 8, "tolerations": [toleration]}))
    assert on_gpus["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert on_gpus["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert on_gpus["tolerations"] == [toleration]
    # The template's own default, for a deployment that does not set it: no GPUs.
    defaults_only = pod_spec(rendered_manifest({}))["containers"][0]["resources"]
    assert defaults_only["limits"]["nvidia.com/gpu"] == 0


def test_the_rendered_job_takes_its_image_namespace_and_credentials_secret_from_the_variables():
    manifest = rendered_manifest(job_variables())
    container = pod_spec(manifest)["containers"][0]
    assert container["image"] == job_variables()["image"]
    assert manifest["metadata"]["namespace"] == job_variables()["namespace"]
    assert pod_spec(manifest)["serviceAccountName"] == job_variables()["service_account_name"]
    assert manifest["spec"]["ttlSecondsAfterFinished"] == job_variables()["finished_job_ttl"]
    assert container["envFrom"] == [{"secretRef": {"name": job_variables()["credentials_secret"]}}]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job_variables()["credentials_secret"])


CREDENTIAL_KEY = re.compile(r"(?i)secret|token(?!izer)|password|passwd|access_key|key_id|api_key|credential")
PLACEHOLDER = re.compile(r"\{\{ *\w+ *\}\}")
CREDENTIAL_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|pnu_[A-Za-z0-9]{30,}")


def credential_values(node: Any, path: str = "") -> list[str]:
    """Paths of string values held under credential-like keys (names of Secrets excepted)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            # A Secret's name, or a template placeholder, is not a credential.
            names_a_secret = key in {"credentials_secret", "secretRef"} or PLACEHOLDER.fullmatch(str(value))
            if CREDENTIAL_KEY.search(str(key)) and not names_a_secret and isinstance(value, str) and value:
                found.append(where)
            found += credential_values(value, where)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += credential_values(value, f"{path}[{index}]")
    return found


def test_no_credential_values_in_prefect_yaml_or_the_template():
    assert credential_values(SPEC) == []
    assert credential_values(TEMPLATE) == []
    assert credential_values(
        {"env": {"AWS_SECRET_ACCESS_KEY": "x", "HF_TOKEN": "y", "TOKENIZERS_PARALLELISM": "z"}}
    ) == [
        "env.AWS_SECRET_ACCESS_KEY",
        "env.HF_TOKEN",
    ]
    for path in (DEPLOYMENTS / "prefect.yaml", DEPLOYMENTS / "k8s-base-job-template.json"):
        assert not CREDENTIAL_VALUE.search(path.read_text()), f"{path.name} holds a key or token"


def test_the_template_renders_into_a_job_prefect_kubernetes_accepts():
    worker = pytest.importorskip("prefect_kubernetes.worker")
    from prefect.client.schemas.objects import FlowRun

    config = asyncio.run(
        worker.KubernetesWorkerJobConfiguration.from_template_and_values(
            TEMPLATE, job_variables(), client=object()
        )
    )  # its validator checks the manifest's required shape
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="k8s-check", flow_id=uuid.uuid4()))
    container = pod_spec(config.job_manifest)["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "wrpo_core" and "PREFECT__FLOW_RUN_ID" in env
    assert container["envFrom"] == [{"secretRef": {"name": "wrpo-s3"}}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 0


# --- the flow image -------------------------------------------------------------------------------


def test_the_flow_image_is_the_clusters_python():
    (base,) = [arguments for keyword, arguments in instructions("flow") if keyword == "FROM"]
    image, _, release = base.partition(":")
    locks_python = re.search(r"--python-version (\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert image == "ubuntu" and UBUNTU_PYTHON[release] == locks_python == "3.12"
    commands = [c for _, c in shell_commands("flow")]
    assert any(re.search(rf"uv venv --python /usr/bin/python{locks_python}\b", c) for c in commands)


def test_the_flow_images_constraints_layer_comes_before_the_source():
    copies = context_copies("flow")
    assert not any("." in sources for _, sources, _ in copies), "COPY . copies the whole context"
    (constraints_at, in_image) = next((i, dest) for i, sources, dest in copies if sources == [CONSTRAINTS])
    installs = [(i, c) for i, c in shell_commands("flow") if re.search(r"\bpip install\b", c)]
    torch_at = next(
        i for i, c in installs if "torch==" in c and in_image in c
    )  # torch's version: the constraints'
    deps_at = next(
        i for i, c in installs if f"-c {in_image}" in c and "--extra orchestration --extra s3" in c
    )
    source_copies = [(i, s, dest) for i, sources, dest in copies for s in sources if s in package_sources()]
    assert {s for _, s, _ in source_copies} == package_sources()
    # pyproject.toml alone (its dependency lists) may come before; the package's code comes after.
    code_at = min(i for i, s, _ in source_copies if s != "pyproject.toml")
    assert constraints_at < torch_at <= deps_at < code_at
    source_dir = next(dest for _, s, dest in source_copies if s == "README.md").rstrip("/")
    package_installs = [(i, c) for i, c in installs if c.split()[-1] == source_dir]
    assert package_installs and all("--no-deps" in c.split() for _, c in package_installs)
    assert min(i for i, _ in package_installs) > max(i for i, _, _ in source_copies)


def test_the_flow_images_build_context_is_what_it_copies():
    patterns = ignore_patterns("flow")
    for path in [".venv/bin/python", "runs/demo/fusion.json", ".git/HEAD", "tests/test_images.py",
                 "requirements/gpu-training.txt", "requirements/gpu-sampling.txt", "docs/architecture.md",
                 "wrpo_core/__pycache__/cli.cpython-312.pyc"]:  # fmt: skip
        assert ignored(path, patterns), f"flow.Dockerfile.dockerignore lets {path} into the context"
    copied = [s for _, sources, _ in context_copies("flow") for s in sources]
    files = [
        str(f.relative_to(ROOT))
        for s in copied
        for f in ([ROOT / s] if (ROOT / s).is_file() else (ROOT / s).rglob("*"))
        if f.is_file() and "__pycache__" not in f.parts
    ]
    assert CONSTRAINTS in files and "flows/fusion.py" in files
    left_out = [f for f in files if ignored(f, patterns)]
    assert not left_out, f"the flow image copies {left_out[:5]} but its .dockerignore leaves them out"


# --- the `ray up` cluster -------------------------------------------------------------------------


def node_types() -> dict[str, dict[str, Any]]:
    return CLUSTER["available_node_types"]


def test_every_ray_node_has_an_instance_profile():
    arn = re.compile(r"arn:aws:iam::[^:]+:instance-profile/[\w+=,.@/-]+")
    profiles = {
        name: node["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        for name, node in node_types().items()
    }
    assert all(arn.fullmatch(p) for p in profiles.values()), profiles
    workers = [name for name in node_types() if name != CLUSTER["head_node_type"]]
    assert len(workers) == 2 and all(profiles[w].endswith("/wrpo-ray-worker") for w in workers)
    # An explicit head profile replaces Ray's default, so it needs PassRole for the workers' role.
    text = (ROOT / "infra" / "ray" / "cluster.yaml").read_text()
    assert "iam:PassRole" in text and "s3:ListBucket" in text and "s3:PutObject" in text


def test_every_ray_node_logs_into_the_registry_of_its_image():
    region = CLUSTER["provider"]["region"]
    for name, node in node_types().items():
        image = node.get("docker", {}).get("worker_image") or CLUSTER["docker"]["image"]
        registry = image.split("/")[0]
        commands = node.get("initialization_commands", CLUSTER.get("initialization_commands", []))
        logins = [
            c for c in commands if re.search(rf"docker login\b.*--password-stdin {re.escape(registry)}$", c)
        ]
        assert logins, f"{name}: no docker login to {registry} before pulling {image}"
        assert f"aws ecr get-login-password --region {region} |" in logins[0]


def test_the_ray_nodes_use_an_ami_whose_driver_runs_cuda_13():
    # Ray's `latest_dlami` is the Ubuntu 18.04 Deep Learning AMI V71: its driver predates CUDA 13.0.
    amis = {node["node_config"]["ImageId"] for node in node_types().values()}
    assert "latest_dlami" not in amis and amis == {"DLAMI_ID"}
    assert "base-oss-nvidia-driver-gpu-ubuntu-24.04" in (ROOT / "infra" / "ray" / "cluster.yaml").read_text()


def test_rays_own_config_loader_accepts_the_cluster():
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(json.loads(json.dumps(CLUSTER)))
    validate_config(prepared)
    assert prepared["initialization_commands"] == CLUSTER["initialization_commands"]
