"""DeepSpeed ZeRO-3 jobs and their launchers: torchrun on 2 CPU processes (gloo), Ray Train, resume.

The integration tests start real process groups; the first one JIT-builds DeepSpeed's CPU
communication op (~90 s) into TORCH_EXTENSIONS_DIR, cached across runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import load_file
from toy_quadruples import WORDS, quadruples_table
from transformers import AutoModelForCausalLM

from wrpo_core.cli import main
from wrpo_core.config import ConfigError, LaunchConfig, SFTJobConfig, WRPOJobConfig, parse_config
from wrpo_core.schemas import BEST_SOURCE, QUADRUPLES, write_parquet
from wrpo_core.train.checkpoints import last_complete_checkpoint
from wrpo_core.train.common import check_deepspeed_config
from wrpo_core.train.joblog import job_error_text
from wrpo_core.train.jobs import LAUNCHED_ENV, TrainingJobError
from wrpo_core.train.launch import launch_job
from wrpo_core.train.metrics import MetricsTail, trim_metrics
from wrpo_core.train.ray_train import node_checkpoint, ray_error_text, ray_trainer, ray_worker_env
from wrpo_core.train.torchrun import LocalJob, prepare_local, torchrun_command
from wrpo_core.train.wrpo import train_wrpo

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = str(ROOT / "infra" / "deepspeed" / "zero3.json")
ZERO3_OFFLOAD = str(ROOT / "infra" / "deepspeed" / "zero3_offload.json")


@pytest.fixture(autouse=True)
def _torch_extensions(monkeypatch):
    """DeepSpeed's JIT-built ops in one cached folder (launched processes inherit the environment)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/wrpo-fusion/torch_extensions"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """SFT pairs and WRPO quadruples over the same eight toy prompts."""
    folder = tmp_path_factory.mktemp("data")
    prompts = [f"reverse: {w}" for w in WORDS]
    n = len(WORDS)
    write_parquet(
        pa.table(
            {
                "prompt_id": [f"p{i}" for i in range(n)],
                "prompt": prompts,
                "y_ws": [w[::-1] for w in WORDS],
                "y_ws_model": ["src"] * n,
                "y_ws_sample_index": pa.array([0] * n, pa.int32()),
                "y_ws_score": [1.0] * n,
            }
        ),
        str(folder / "sft.parquet"),
        BEST_SOURCE,
    )
    write_parquet(
        quadruples_table(prompts=prompts),
        str(folder / "quadruples.parquet"),
        QUADRUPLES,
    )
    return folder


def training(**overrides) -> dict:
    """Small, fast, deterministic hyper-parameters (fp32 on CPU, constant learning rate)."""
    base = dict(
        max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_ratio=0.0, gradient_checkpointing=False, bf16=False,
        logging_steps=1, save_steps=100, save_total_limit=None,
    )  # fmt: skip
    return {**base, **overrides}


def sft_job(model: str, data_dir: Path, out: Path, *, launch: dict | None = None, **hp) -> SFTJobConfig:
    return SFTJobConfig(
        model=model,
        data=str(data_dir / "sft.parquet"),
        output_dir=str(out),
        training={**training(**hp), "max_seq_length": 64, "max_prompt_length": 32},
        launch=launch,
    )


def wrpo_job(model: str, data_dir: Path, out: Path, *, launch: dict | None = None, **hp) -> WRPOJobConfig:
    return WRPOJobConfig(
        model=model,
        data=str(data_dir / "quadruples.parquet"),
        output_dir=str(out),
        training={**training(**hp), "beta": 0.5, "max_length": 64, "max_prompt_length": 32},
        launch=launch,
    )


def metrics_rows(output_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(output_dir, "metrics.jsonl").read_text().splitlines()]


def losses(rows: list[dict]) -> list[float]:
    return [row["loss"] for row in rows if "loss" in row]


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: str | Path, b: str | Path, atol: float = 1e-5) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], atol=atol, rtol=0, msg=name)


TWO_PROCESSES = {"launcher": "local", "nproc_per_node": 2}


# --- unit tests -------------------------------------------------------------------------------


def test_torchrun_command_single_machine_and_multi_node():
    one = torchrun_command("wrpo", "job.yaml", LaunchConfig(nproc_per_node=2, master_port=29555))
    assert one[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
        "--master_port=29555", "-m", "wrpo_core.train.worker", "train", "wrpo", "--config", "job.yaml",
    ]  # fmt: skip
    # No port set: torchrun's store binds port 0 itself, so no other process can take it first.
    free = torchrun_command("sft", "job.yaml", LaunchConfig(nproc_per_node=2), run_id="r0")
    assert free[3:8] == [
        "--nproc_per_node=2", "--nnodes=1", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", "--rdzv_id=r0",
    ]  # fmt: skip
    many = torchrun_command("sft", "s3://b/job.yaml", LaunchConfig(nnodes=4, master_addr="head"), run_id="r1")
    assert "--rdzv_endpoint=head:29500" in many and "--rdzv_id=r1" in many and "--nnodes=4" in many
    assert not any(arg.startswith("--master_port") for arg in many + free)


def test_prepare_local_writes_the_job_and_marks_the_processes(tmp_path, data_dir):
    job = sft_job("m", data_dir, tmp_path / "out", launch={**TWO_PROCESSES, "env": {"NCCL_DEBUG": "WARN"}})
    command, env = prepare_local("sft", job)
    written = yaml.safe_load(Path(command[-1]).read_text())
    assert SFTJobConfig.model_validate(written) == job
    assert env[LAUNCHED_ENV] == "1" and env["NCCL_DEBUG"] == "WARN" and env["PYTHONUNBUFFERED"] == "1"


def test_launch_section_is_validated_naming_the_field():
    with pytest.raises(ConfigError, match=r"job: launch.launcher: Input should be 'local' or 'ray'"):
        parse_config({"model": "m", "data": "d", "output_dir": "o", "launch": {"launcher": "slurm"}},
                     WRPOJobConfig, where="job")  # fmt: skip
    with pytest.raises(ConfigError, match=r"launch\.nproc_per_node"):
        parse_config({"model": "m", "data": "d", "output_dir": "o", "launch": {"nproc_per_node": 0}},
                     SFTJobConfig, where="job")  # fmt: skip


def test_job_error_text_is_the_workers_error_not_torchruns():
    log = [
        "W1126 19:50:25 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 12 closing signal",
        "[rank1]: Traceback (most recent call last):",
        '[rank1]:   File "wrpo_core/train/wrpo.py", line 3, in load_quadruples',
        "[rank1]: FileNotFoundError: [Errno 2] No such file or directory: '/x/q.parquet'",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    ]
    assert job_error_text(log) == "FileNotFoundError: [Errno 2] No such file or directory: '/x/q.parquet'"
    assert job_error_text(["loading", "error: job.yaml: training.beta: must be > 0"]) == (
        "job.yaml: training.beta: must be > 0"
    )
    assert job_error_text(["all good", "{'loss': 1.0}"]) is None


def test_ray_error_text_names_the_lowest_failed_rank():
    error = RuntimeError("Training failed")
    error.worker_failures = {1: KeyError("b"), 0: FileNotFoundError("no /x")}
    assert ray_error_text(error) == "FileNotFoundError: no /x"
    assert ray_error_text(RuntimeError("controller\nlost the actor")) == "lost the actor"


def test_metrics_tail_streams_only_new_complete_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n")
    tail = MetricsTail(path)  # rows of an earlier run are not streamed again
    with path.open("a") as handle:
        handle.write(json.dumps({"step": 2}) + "\n" + '{"step": ')
    assert tail.read_new() == [{"step": 2}]
    with path.open("a") as handle:
        handle.write("3}\n")
    assert tail.read_new() == [{"step": 3}]
    assert tail.read_new() == []


def test_last_complete_checkpoint_skips_a_partly_written_one(tmp_path):
    zero = [
        "global_step{}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "global_step{}/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    rng = ["rng_state_0.pth", "rng_state_1.pth"]
    checkpoints = {
        2: ["trainer_state.json", "latest", *rng, *zero],  # complete
        4: ["trainer_state.json", "latest", "rng_state_0.pth", *zero],  # rank 1's RNG state missing
        6: ["trainer_state.json", "latest", "rng_state_0.pth", "rng_state_1.pth:torn", *zero],  # cut short
        8: ["latest", *rng, *zero],  # no trainer_state.json
        10: ["trainer_state.json:torn", "latest", *rng, *zero],
        12: ["trainer_state.json", *rng, *zero],  # no `latest`
        14: ["model.safetensors"],
    }  # fmt: skip
    for step, files in checkpoints.items():
        for entry in files:
            name, _, torn = entry.format(step).partition(":")
            path = tmp_path / f"checkpoint-{step}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if name.startswith("rng_state"):
                torch.save({"python": 1}, path)
            else:
                path.write_text("{}")
            if torn:
                path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-16").mkdir()
    (tmp_path / "checkpoint-16" / "trainer_state.json").write_text("{}")  # a plain Trainer checkpoint
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-16")
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_trim_metrics_drops_repeated_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo'
    )
    trim_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"step": 1}\n{"st\n{"step": 2}')
    trim_metrics(path, 5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_deepspeed_configs_save_hf_weights_and_a_bad_one_is_refused(tmp_path):
    for path in (ZERO3, ZERO3_OFFLOAD):
        config = check_deepspeed_config(path)
        assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"] == "auto"
    offload = check_deepspeed_config(ZERO3_OFFLOAD)["zero_optimization"]
    assert offload["offload_param"]["device"] == offload["offload_optimizer"]["device"] == "cpu"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        check_deepspeed_config(str(bad))


def test_ray_trainer_is_configured_from_the_launch_section(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    launch = {"launcher": "ray", "num_workers": 4, "resources_per_worker": {"CPU": 8, "GPU": 1},
              "storage_path": str(tmp_path / "store"), "run_name": "fuse-1", "max_failures": 2,
              "env": {"NCCL_DEBUG": "INFO"}}  # fmt: skip
    job = wrpo_job("m", data_dir, tmp_path / "out", launch=launch, save_total_limit=2)
    trainer = ray_trainer("wrpo", job, use_gpu=True)
    assert trainer.scaling_config.num_workers == 4 and trainer.scaling_config.use_gpu
    assert trainer.scaling_config.resources_per_worker == {"CPU": 8, "GPU": 1}
    run = trainer.run_config
    assert (run.name, run.storage_path, run.failure_config.max_failures) == (
        "fuse-1",
        str(tmp_path / "store"),
        2,
    )
    assert run.checkpoint_config.num_to_keep == 3  # two checkpoints and the final model
    env = run.worker_runtime_env["env_vars"]
    assert env == ray_worker_env(job.launch) and env["OMP_NUM_THREADS"] == "3" and env[LAUNCHED_ENV] == "1"
    assert env["NCCL_DEBUG"] == "INFO"


def test_other_machines_upload_their_shards_but_not_model_files(tmp_path):
    folder = tmp_path / "checkpoint-4"
    for name in ("model.safetensors", "config.json", "trainer_state.json", "rng_state_9.pth",
                 "global_step4/zero_pp_rank_9_mp_rank_00_model_states.pt"):  # fmt: skip
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    assert node_checkpoint(folder, 0, str(tmp_path / "scratch")) == folder
    other = node_checkpoint(folder, 8, str(tmp_path / "scratch"))
    uploaded = sorted(str(p.relative_to(other)) for p in other.rglob("*") if p.is_file())
    assert uploaded == ["config.json", "global_step4/zero_pp_rank_9_mp_rank_00_model_states.pt",
                        "rng_state_9.pth", "trainer_state.json"]  # fmt: skip
    assert (folder / "model.safetensors").exists()  # the local checkpoint is untouched


def test_each_machine_keeps_its_checkpoints_unless_output_dir_is_shared(tmp_path, data_dir):
    job = sft_job("m", data_dir, tmp_path / "out", launch=TWO_PROCESSES)
    assert prepare_local("sft", job)[1]["WRPO_SAVE_ON_EACH_NODE"] == "1"
    shared = LaunchConfig(launcher="ray", shared_output_dir=True)
    assert ray_worker_env(shared)["WRPO_SAVE_ON_EACH_NODE"] == "0"


def test_cluster_manifests_match_rays_schema_and_version():
    ray = pytest.importorskip("ray")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((ROOT / "infra" / "ray" / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    rayjob = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob" and rayjob["spec"]["entrypoint"].startswith("wrpo train ")
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    # The images' Ray (from the GPU locks) equals the cluster's: tests/test_images.py.


# --- integration: real process groups ---------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted_sft(tmp_path_factory, data_dir, tiny_model_dir) -> SFTJobConfig:
    """A 12-step SFT job under ZeRO-3 on 2 CPU processes, run once without interruption."""
    out = tmp_path_factory.mktemp("sft-uninterrupted")
    job = sft_job(
        tiny_model_dir, data_dir, out, launch=TWO_PROCESSES, deepspeed=ZERO3, max_steps=12, save_steps=2
    )
    launch_job("sft", job)
    return job


@pytest.mark.integration
def test_zero3_on_two_processes_matches_the_plain_trainer(tmp_path, data_dir, tiny_model_dir):
    plain = wrpo_job(tiny_model_dir, data_dir, tmp_path / "plain", per_device_train_batch_size=4)
    train_wrpo(plain)
    plain_losses = losses(metrics_rows(plain.output_dir))

    zero3 = wrpo_job(tiny_model_dir, data_dir, tmp_path / "zero3", launch=TWO_PROCESSES, deepspeed=ZERO3)
    streamed: list[str] = []
    result = launch_job("wrpo", zero3, on_log=streamed.append)

    assert len(plain_losses) == 3 and plain_losses[-1] < plain_losses[0]
    assert losses(result.metrics) == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    assert result.summary["train_loss"] == pytest.approx(sum(plain_losses) / 3, rel=1e-5)
    assert any("WRPO data" in line for line in streamed)  # the job's log reached the callback
    # ZeRO-3 shards gathered into one Hugging Face model, equal to the plain trainer's
    assert_same_weights(result.model_uri, plain.output_dir)
    assert AutoModelForCausalLM.from_pretrained(result.model_uri) is not None


@pytest.mark.integration
def test_a_killed_zero3_job_resumes_to_the_same_weights(
    tmp_path, data_dir, tiny_model_dir, uninterrupted_sft
):
    job = uninterrupted_sft.model_copy(update={"output_dir": str(tmp_path / "killed")})
    command, env = prepare_local("sft", job)
    started = LocalJob.start(command, env, tmp_path / "killed" / "metrics.jsonl")
    deadline = time.monotonic() + 300
    while last_complete_checkpoint(job.output_dir) is None and started.process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.05)
    running = started.process.poll() is None
    started.kill(signal.SIGKILL)  # the whole torchrun process group, workers included
    returncode, _, _, tail = started.watch()
    assert running and returncode == -signal.SIGKILL, "\n".join(tail)
    newest = last_complete_checkpoint(job.output_dir)
    time.sleep(1.0)
    assert last_complete_checkpoint(job.output_dir) == newest  # no worker survived to save another
    killed_at = int(newest.rsplit("-", 1)[1])
    assert killed_at < 12 and not (tmp_path / "killed" / "model.safetensors").exists()

    try:
        result = launch_job("sft", job)
    except TrainingJobError as error:
        pytest.fail(f"{error}\n" + "\n".join(error.log_tail))

    resumed_steps = [row["step"] for row in result.metrics if "loss" in row]
    assert resumed_steps == list(range(killed_at + 1, 13))  # only the steps after the checkpoint
    logged = [row["step"] for row in metrics_rows(job.output_dir)]
    assert [s for s in logged if s] == sorted(s for s in logged if s)  # no repeated steps on disk
    assert_same_weights(job.output_dir, uninterrupted_sft.output_dir)


@pytest.mark.integration
def test_the_launcher_raises_the_jobs_own_error(tmp_path, data_dir, tiny_model_dir, capsys):
    job = sft_job(tiny_model_dir, data_dir, tmp_path / "bad", launch=TWO_PROCESSES, deepspeed=ZERO3)
    job = job.model_copy(update={"data": str(tmp_path / "missing.parquet")})
    lines: list[str] = []
    with pytest.raises(TrainingJobError) as failure:
        launch_job("sft", job, on_log=lines.append)
    assert "missing.parquet" in failure.value.error and failure.value.returncode != 0
    assert "ChildFailedError" not in failure.value.error and "=====" not in failure.value.error
    # torchrun's root cause: the rank, its exit code, and the traceback it recorded
    assert failure.value.failure.exitcode == 1 and failure.value.failure.error_file
    assert failure.value.error.endswith(f"(rank {failure.value.failure.rank}, exit code 1)")
    assert any("missing.parquet" in line for line in lines)

    # The same through the CLI: `wrpo train` picks the launcher from the config and exits 1.
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    assert main(["train", "sft", "--config", str(config)]) == 1
    assert "missing.parquet" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.integration
def test_ray_job_retried_after_its_workers_die_resumes_from_storage(
    tmp_path, data_dir, uninterrupted_sft, monkeypatch
):
    ray = pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # the controller registers reports sooner
    storage = tmp_path / "ray-storage"
    launch = {"launcher": "ray", "num_workers": 2, "storage_path": str(storage), "run_name": "sft-retry",
              "max_failures": 1}  # fmt: skip
    job = uninterrupted_sft.model_copy(
        update={"output_dir": str(tmp_path / "worker-out"), "launch": LaunchConfig(**launch)}
    )
    snapshot = storage / "sft-retry" / "checkpoint_manager_snapshot.json"
    killed: list[int] = []
    lines: list[str] = []

    def kill_workers_once(_=None) -> None:
        """Once Ray has registered a checkpoint: kill both workers and lose their local files."""
        if killed or not snapshot.exists() or "checkpoint-" not in snapshot.read_text():
            return
        for process in psutil.Process().children(recursive=True):
            if "RayTrainWorker" in " ".join(process.cmdline()):
                process.kill()
                killed.append(process.pid)
        shutil.rmtree(job.output_dir, ignore_errors=True)

    def on_log(line: str) -> None:
        lines.append(line)
        kill_workers_once()

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        result = launch_job("sft", job, on_log=on_log, on_metrics=kill_workers_once)
    finally:
        ray.shutdown()

    assert len(killed) == 2
    restored = [line for line in lines if "from Ray storage" in line]
    assert restored, "the retried workers did not restore a checkpoint"
    restored_step = int(restored[0].split("restored checkpoint-")[1].split()[0])
    steps = [row["step"] for row in result.metrics if "loss" in row]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert restored_step >= 2 and steps[restart] == restored_step + 1  # resumed, not restarted
    assert steps[restart:] == list(range(restored_step + 1, 13))
    assert result.model_uri == str(storage / "sft-retry" / "model")
    assert_same_weights(result.model_uri, uninterrupted_sft.output_dir)
