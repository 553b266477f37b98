"""The GPU stack's locks: consistent with each other, with vLLM's declared requirements, with
pyproject's floors; and our training arguments under whichever transformers a lock names.

Stands for the real path's GPU install: the first SFT/WRPO job in the vLLM-pinned environment
died with a TypeError (transformers 5.20 has no `activation_checkpointing`). CI runs this file
under both stacks (`make test` and `make test-gpu-locks`).
"""

import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
_spec = importlib.util.spec_from_file_location("lock_pins", REQ / "lock_pins.py")
lock_pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock_pins)

SAMPLING = lock_pins.read_pins(REQ / "gpu-sampling.txt")
TRAINING = lock_pins.read_pins(REQ / "gpu-training.txt")
CPU = lock_pins.read_pins(REQ / "constraints-cpu.txt")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What renders chat templates, loads weights and tokenizes: one version in both GPU stacks, so a
# prompt is the same tokens when vLLM samples it, the reward model scores it and WRPO trains on it.
SHARED = ["torch", "transformers", "tokenizers", "huggingface-hub", "safetensors", "accelerate", "ray"]
# Floors that must be a version CI runs (not an untested guess).
FLOORED = ["torch", "transformers", "huggingface-hub", "accelerate", "datasets", "deepspeed", "trl"]
# The pure-Python packages of the training lock that CI's second pass installs (Makefile GPU_LOCK_PURE).
PURE = re.search(r"^GPU_LOCK_PURE := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()


def requirements() -> dict[str, Requirement]:
    listed = list(PYPROJECT["dependencies"])
    for extra in ("s3", "vllm", "deepspeed", "dev", "orchestration"):
        listed += PYPROJECT["optional-dependencies"][extra]
    return {lock_pins.canonical(Requirement(r).name): Requirement(r) for r in listed}


def floor(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{requirement}: one `>=` floor expected"
    return floors[0]


def test_both_gpu_stacks_pin_the_same_ml_stack():
    assert SAMPLING["vllm"] == "0.33.0" and "deepspeed" in TRAINING and "vllm" not in TRAINING
    different = {name: (SAMPLING.get(name), TRAINING.get(name)) for name in SHARED}
    assert all(a == b and a is not None for a, b in different.values()), different
    assert CPU["ray"] == SAMPLING["ray"], "the Prefect worker's Ray client must match the cluster's Ray"


def test_each_lock_satisfies_the_package_and_its_extras():
    reqs = requirements()
    needed = {
        "gpu-sampling.txt": (SAMPLING, [*map(lock_pins.canonical, _deps()), "s3fs", "vllm", "ray"]),
        "gpu-training.txt": (
            TRAINING,
            [*map(lock_pins.canonical, _deps()), "s3fs", "deepspeed", "trl", "ray"],
        ),
    }
    for lock, (pins, names) in needed.items():
        for name in names:
            assert name in pins, f"{lock} has no pin for {name}, which the package needs"
            assert reqs[name].specifier.contains(pins[name], prereleases=True), (
                f"{lock}: {name}=={pins[name]} is outside pyproject's {reqs[name]}"
            )


def _deps() -> list[str]:
    return [Requirement(r).name for r in PYPROJECT["dependencies"]]


def test_floors_are_versions_ci_runs():
    reqs = requirements()
    ci_runs = {name: [CPU.get(name), TRAINING.get(name) if name in PURE else None] for name in FLOORED}
    # The second pass keeps the CPU torch; the locks' 2.14 runs on GPUs only.
    ci_runs["torch"] = [CPU["torch"]]
    for name, versions in ci_runs.items():
        tested = min(Version(v) for v in versions if v is not None)
        assert floor(reqs[name]) == tested, (
            f"pyproject's floor for {name} is {floor(reqs[name])}, CI runs {tested}"
        )
    assert floor(reqs["vllm"]) == Version(SAMPLING["vllm"])
    assert Version(TRAINING["transformers"]) < Version("5.21"), "vLLM 0.33 requires transformers<5.21"


def test_overlay_takes_the_named_pins_from_the_lock(tmp_path):
    base, lock = tmp_path / "base.txt", tmp_path / "lock.txt"
    base.write_text("# c\ntorch==2.13.0\ntransformers==5.24.0\nray==2.60.0\n")
    lock.write_text("Transformers==5.20.2    # via x\ntorch==2.14.0\ntrl==1.16.0\n")
    text = lock_pins.overlay(base, lock, ["transformers", "trl"])
    assert text.splitlines()[1:] == ["ray==2.60.0", "torch==2.13.0", "transformers==5.20.2", "trl==1.16.0"]
    with pytest.raises(SystemExit, match="no pin for 'deepspeed'"):
        lock_pins.overlay(base, lock, ["deepspeed"])
    lock.write_text("transformers>=5\n")
    with pytest.raises(ValueError, match="line 1: not a `name==version` pin"):
        lock_pins.read_pins(lock)


def test_training_arguments_take_checkpointing_under_the_installed_transformers(tmp_path):
    from wrpo_core.config import WRPOConfig
    from wrpo_core.train.common import training_arguments

    hp = WRPOConfig(max_steps=1, per_device_train_batch_size=1, gradient_checkpointing=True, bf16=False)
    args = training_arguments(hp, str(tmp_path))
    enabled = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    assert enabled is True and kwargs == {"use_reentrant": False}


@pytest.mark.integration
@pytest.mark.parametrize("lock", ["gpu-sampling.txt", "gpu-training.txt"])
def test_lock_resolves_against_the_index_and_is_closed(lock, tmp_path):
    """The package index's real metadata (vLLM's `torch==2.14.0`, `transformers<5.21`, ...) accepts
    every pin of the lock, and the lock names every package its pins need (nothing missing)."""
    uv = shutil.which("uv") or str(Path(__import__("sys").executable).parent / "uv")
    out = tmp_path / "resolved.txt"
    result = subprocess.run(
        [uv, "pip", "compile", str(REQ / lock), "--python-version", "3.12", "--python-platform",
         "x86_64-manylinux_2_39", "--no-header", "--no-annotate", "-q", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"{lock} does not resolve against the package index:\n{result.stderr}"
    assert lock_pins.read_pins(out) == lock_pins.read_pins(REQ / lock)


def test_remote_code_names_the_transformers_versions_ci_runs():
    from wrpo_core.remote_code import TESTED_TRANSFORMERS

    assert set(TESTED_TRANSFORMERS) == {
        CPU["transformers"],
        TRAINING["transformers"],
        SAMPLING["transformers"],
    }
