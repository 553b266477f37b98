"""The GPU node images (infra/sampling.Dockerfile, infra/training.Dockerfile), read statically.

No Docker engine runs here, so these check what a build would get wrong silently: each image installs
exactly its lock (--no-deps) in a layer below the source, its CUDA base is the locked torch's CUDA, its
Ubuntu's Python is the locks' Python, nvcc is there for the JIT builds, its Ray is the cluster's and
the client's, its build context holds what it copies and nothing else, and the manifests run it.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
REQ = ROOT / "requirements"
_spec = importlib.util.spec_from_file_location("lock_pins", REQ / "lock_pins.py")
lock_pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock_pins)

KINDS = ["sampling", "training"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Ubuntu release -> its python3 (what the base image's apt installs).
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12", "26.04": "3.14"}
BASE = re.compile(r"^nvidia/cuda:(?P<cuda>\d+\.\d+)\.\d+-(?P<variant>[a-z-]+)-ubuntu(?P<ubuntu>\d+\.\d+)$")


def instructions(kind: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction of an image's Dockerfile: comments dropped, `\\` lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in (INFRA / f"{kind}.Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        found.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, f"{kind}.Dockerfile ends inside a continued line"
    return found


def context_copies(kind: str) -> list[tuple[int, list[str], str]]:
    """(instruction index, sources, destination) of each COPY from the build context (not `--from=`)."""
    copies = []
    for index, (keyword, arguments) in enumerate(instructions(kind)):
        words = arguments.split()
        if keyword != "COPY" or any(w.startswith("--from=") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        copies.append((index, [p.rstrip("/") for p in paths[:-1]], paths[-1]))
    return copies


def shell_commands(kind: str) -> list[tuple[int, str]]:
    """(instruction index, command) of each `&&`-separated command of the RUN instructions."""
    return [
        (index, command.strip())
        for index, (keyword, arguments) in enumerate(instructions(kind))
        if keyword == "RUN"
        for command in arguments.split("&&")
    ]


def base(kind: str) -> re.Match[str]:
    bases = [arguments for keyword, arguments in instructions(kind) if keyword == "FROM"]
    assert len(bases) == 1, f"{kind}.Dockerfile: one FROM expected, found {bases}"
    match = BASE.match(bases[0])
    assert match, f"{kind}.Dockerfile: FROM {bases[0]} is not nvidia/cuda:X.Y.Z-VARIANT-ubuntuA.B"
    return match


def pins(kind: str) -> dict[str, str]:
    return lock_pins.read_pins(REQ / f"gpu-{kind}.txt")


def package_sources() -> set[str]:
    """What setuptools needs to build this package: pyproject, its readme and the packages it finds."""
    found = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return {"pyproject.toml", PYPROJECT["project"]["readme"]} | {p.rstrip("*") for p in found}


def lock_copy(kind: str) -> tuple[int, str]:
    """(instruction index, path in the image) of the COPY of the image's lock, its only file from requirements/."""
    copies = [(i, sources, dest) for i, sources, dest in context_copies(kind) if "requirements" in sources[0]]
    assert [sources for _, sources, _ in copies] == [[f"requirements/gpu-{kind}.txt"]], copies
    return copies[0][0], copies[0][2]


@pytest.mark.parametrize("kind", KINDS)
def test_each_image_installs_exactly_its_lock(kind):
    _, in_image = lock_copy(kind)
    installs = [c for _, c in shell_commands(kind) if re.search(r"\bpip install\b", c)]
    from_lock = [c for c in installs if re.search(rf"\s-r {re.escape(in_image)}(\s|$)", c)]
    assert len(from_lock) == 1, f"{kind}: one install of {in_image} expected, found {from_lock}"
    # --no-deps everywhere: nothing is resolved at build time, the image holds the lock's pins only.
    assert all("--no-deps" in c.split() for c in installs), installs


@pytest.mark.parametrize("kind", KINDS)
def test_the_lock_layer_comes_before_the_source(kind):
    copies = context_copies(kind)
    assert not any("." in sources for _, sources, _ in copies), f"{kind}: COPY . copies the whole context"
    lock_at, in_image = lock_copy(kind)
    source_copies = [(i, s, dest) for i, sources, dest in copies for s in sources if s in package_sources()]
    assert {s for _, s, _ in source_copies} == package_sources(), (
        f"{kind}: the package's sources not all copied"
    )
    first_source_at = min(i for i, _, _ in source_copies)
    lock_install_at = next(i for i, c in shell_commands(kind) if "pip install" in c and f"-r {in_image}" in c)
    assert lock_at < lock_install_at < first_source_at
    # The package is installed from where its sources were copied, after them.
    source_dir = next(dest for _, s, dest in source_copies if s == "pyproject.toml").rstrip("/")
    package_installs = [
        i for i, c in shell_commands(kind) if "pip install" in c and c.endswith(f" {source_dir}")
    ]
    assert package_installs and min(package_installs) > max(i for i, _, _ in source_copies)


@pytest.mark.parametrize("kind", KINDS)
def test_the_base_cuda_is_the_locked_torchs_cuda(kind):
    cuda = base(kind)["cuda"]
    locked = pins(kind)
    # cuda-toolkit is torch's own requirement (the lock says `via torch`), cudart that of its wheels.
    runtime = ".".join(locked["nvidia-cuda-runtime"].split(".")[:2])
    toolkit = ".".join(locked["cuda-toolkit"].split(".")[:2])
    assert cuda == runtime == toolkit, f"{kind}: base CUDA {cuda}, lock's cudart {runtime}, toolkit {toolkit}"


@pytest.mark.parametrize("kind", KINDS)
def test_the_base_ubuntus_python_is_the_locks_python(kind):
    locks_python = re.search(r"--python-version (\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert UBUNTU_PYTHON[base(kind)["ubuntu"]] == locks_python
    commands = [c for _, c in shell_commands(kind)]
    assert any(f"python{locks_python}-dev" in c.split() for c in commands), "headers for the JIT builds"
    assert any(re.search(rf"uv venv --python /usr/bin/python{locks_python}\b", c) for c in commands)


@pytest.mark.parametrize("kind", KINDS)
def test_the_base_has_nvcc_where_kernels_are_jit_built(kind):
    locked = pins(kind)
    # DeepSpeed builds CPUAdam / FusedAdam on first use; FlashInfer builds its kernels unless prebuilt.
    deepspeed = "deepspeed" in locked
    flashinfer = "flashinfer-python" in locked and not {"flashinfer-cubin", "flashinfer-jit-cache"} & set(
        locked
    )
    assert deepspeed == (kind == "training") and flashinfer == (kind == "sampling")
    assert base(kind)["variant"] in {"devel", "cudnn-devel"}, f"{kind}: a devel base (nvcc) is needed"


@pytest.mark.parametrize("kind", KINDS)
def test_the_images_ray_is_the_clusters_and_the_clients(kind):
    rayjob = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    cpu = lock_pins.read_pins(REQ / "constraints-cpu.txt")
    assert pins(kind)["ray"] == cpu["ray"] == rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert re.search(r"\bray\[default\]==", (REQ / f"gpu-{kind}.in").read_text()), "the dashboard, for jobs"


@pytest.mark.parametrize("kind", KINDS)
def test_the_images_run_as_a_user_with_its_caches_in_home(kind):
    users = [arguments for keyword, arguments in instructions(kind) if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}
    env: dict[str, str] = {}
    for keyword, arguments in instructions(kind):
        if keyword == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(arguments))
    home = env["HOME"]
    assert env["HF_HOME"].startswith(home + "/") and env["TORCH_EXTENSIONS_DIR"].startswith(home + "/")
    assert env["TOKENIZERS_PARALLELISM"] == "false" and int(env["OMP_NUM_THREADS"]) >= 1
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:"), "ray, wrpo and python from the venv"


def ignore_patterns(kind: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) of each line of the image's .dockerignore (Docker's rules for `*`, `?`, `**`, `!`)."""
    patterns = []
    for raw in (INFRA / f"{kind}.Dockerfile.dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        while glob:
            for token, part in (("**/", "(?:.*/)?"), ("**", ".*"), ("*", "[^/]*"), ("?", "[^/]")):
                if glob.startswith(token):
                    regex, glob = regex + part, glob[len(token) :]
                    break
            else:
                regex, glob = regex + re.escape(glob[0]), glob[1:]
        patterns.append((negated, re.compile(regex)))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves `path` out: the last pattern matching it or a parent folder wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    left_out = False
    for negated, regex in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            left_out = not negated
    return left_out


@pytest.mark.parametrize("kind", KINDS)
def test_the_build_context_is_what_the_image_copies(kind):
    patterns = ignore_patterns(kind)
    other = next(k for k in KINDS if k != kind)
    for path in [".venv/bin/python", ".venv-gpu-locks/bin/python", "runs/demo/fusion.json", ".git/HEAD",
                 "tests/test_images.py", "docs/architecture.md", "wrpo_fusion.egg-info/PKG-INFO",
                 ".pytest_cache/v/x", ".ruff_cache/x", "wrpo_core/__pycache__/cli.cpython-312.pyc",
                 f"requirements/gpu-{other}.txt"]:  # fmt: skip
        assert ignored(path, patterns), f"{kind}.Dockerfile.dockerignore lets {path} into the context"
    copied = [s for _, sources, _ in context_copies(kind) for s in sources]
    files = [
        str(f.relative_to(ROOT))
        for s in copied
        for f in ([ROOT / s] if (ROOT / s).is_file() else (ROOT / s).rglob("*"))
        if f.is_file() and "__pycache__" not in f.parts
    ]
    assert any("/toy/prebuilt/" in f for f in files), "the package data is among the copied files"
    left_out = [f for f in files if ignored(f, patterns)]
    assert not left_out, f"{kind}: the image copies {left_out[:5]} but its .dockerignore leaves them out"


def test_the_manifests_run_the_images_of_this_version():
    version = PYPROJECT["project"]["version"]
    cluster = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    assert cluster["docker"]["image"].endswith(f"/wrpo-fusion-training:{version}")
    worker_images = {
        name: node.get("docker", {}).get("worker_image", cluster["docker"]["image"])
        for name, node in cluster["available_node_types"].items()
        if name != cluster["head_node_type"]
    }
    assert sorted(image.rsplit("/", 1)[1] for image in worker_images.values()) == [
        f"wrpo-fusion-sampling:{version}",
        f"wrpo-fusion-training:{version}",
    ]
    rayjob = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    groups = [rayjob["headGroupSpec"], *rayjob["workerGroupSpecs"]]
    images = [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert images and all(image.endswith(f"/wrpo-fusion-training:{version}") for image in images)
    assert not (INFRA / "Dockerfile").exists(), "the single image is replaced by the two"
