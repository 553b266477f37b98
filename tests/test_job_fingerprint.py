"""A rerun trains what it is asked to: a job resumes only from checkpoints that the same job wrote.

A job's fingerprint (training settings, processes, model and data identity) is recorded in its
output_dir; a job with another fingerprint starts afresh there, in this process, under torchrun
(decided before the ranks start) and on Ray Train (a run of its own in Ray storage).
"""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_quadruples import quadruples_table

from wrpo_core import models
from wrpo_core.config import LaunchConfig, WRPOConfig, WRPOJobConfig
from wrpo_core.reference import REFERENCE_FILE
from wrpo_core.schemas import QUADRUPLES, write_parquet
from wrpo_core.train import jobs, torchrun
from wrpo_core.train.checkpoints import FINGERPRINT_FILE, adopt_output_dir, recorded_job
from wrpo_core.train.jobs import claim_output_dir, job_fingerprint, train_in_process
from wrpo_core.train.ray_train import check_ray_checkpoint, ray_run_name


@pytest.fixture()
def quadruples(tmp_path) -> str:
    table = quadruples_table()
    url = str(tmp_path / "quadruples.parquet")
    write_parquet(table, url, QUADRUPLES)
    return url


def wrpo_job(model: str, data: str, out: Path, **overrides) -> WRPOJobConfig:
    hp = dict(
        max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_ratio=0.0, gradient_checkpointing=False, bf16=False,
        logging_steps=1, save_steps=1, save_total_limit=None, beta=0.5, max_length=64, max_prompt_length=32,
    )  # fmt: skip
    launch = overrides.pop("launch", None)
    return WRPOJobConfig(
        model=model, data=data, output_dir=str(out), training={**hp, **overrides}, launch=launch
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def trained_steps(folder: Path) -> list[int]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [row["step"] for row in state["log_history"] if "loss" in row]


def logged_steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]  # fmt: skip


# --- in this process ---------------------------------------------------------------------------


def test_a_changed_beta_trains_all_its_steps_in_the_same_output_dir(tmp_path, quadruples, tiny_model_dir):
    out = tmp_path / "wrpo"
    train_in_process("wrpo", wrpo_job(tiny_model_dir, quadruples, out, beta=0.5))
    first = weights(out)
    reference_cache = (out / REFERENCE_FILE).stat().st_mtime_ns
    assert (out / "checkpoint-2").is_dir() and trained_steps(out) == [1, 2]

    train_in_process("wrpo", wrpo_job(tiny_model_dir, quadruples, out, beta=2.0))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and trained_steps(out) == [1, 2]  # trained, not resumed at step 2
    assert logged_steps(out) == [1, 2]  # the first job's rows are gone, not kept next to the new ones
    second = weights(out)
    assert any(not torch.equal(first[name], second[name]) for name in first)
    assert (out / REFERENCE_FILE).stat().st_mtime_ns == reference_cache  # left alone (keyed by its inputs)
    assert recorded_job(out)["identity"]["training"]["beta"] == 2.0


def test_the_same_job_rerun_after_a_crash_resumes_from_its_checkpoint(
    tmp_path, quadruples, tiny_model_dir, caplog
):
    out = tmp_path / "wrpo"
    job = wrpo_job(tiny_model_dir, quadruples, out)
    train_in_process("wrpo", job)
    uninterrupted = weights(out)
    # The crash: killed after checkpoint-1 (and after logging step 2), before anything else was saved.
    shutil.rmtree(out / "checkpoint-2")
    for name in ("model.safetensors", "config.json", "trainer_state.json"):
        (out / name).unlink()

    caplog.set_level(logging.INFO, logger="wrpo_core.train.common")
    train_in_process("wrpo", job)
    assert any(f"resuming from {out / 'checkpoint-1'}" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert logged_steps(out) == [1, 2]  # step 1 kept from the first run, step 2 logged once, again
    resumed = weights(out)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)


# --- the fingerprint ---------------------------------------------------------------------------


def test_the_fingerprint_follows_what_changes_the_result(tmp_path, quadruples, tiny_model_dir):
    base = wrpo_job(tiny_model_dir, quadruples, tmp_path / "out")
    fingerprint = job_fingerprint("wrpo", base, 1)

    def with_training(**changes):
        return base.model_copy(update={"training": base.training.model_copy(update=changes)})

    same = [
        with_training(logging_steps=5, save_steps=7, save_total_limit=1, gradient_checkpointing=True),
        with_training(report_to="none"),
        base.model_copy(update={"output_dir": str(tmp_path / "elsewhere")}),
    ]
    assert {job_fingerprint("wrpo", job, 1) for job in same} == {fingerprint}
    changed = [with_training(beta=2.0), with_training(learning_rate=1e-4), with_training(max_length=60),
               with_training(seed=1), with_training(gradient_accumulation_steps=2)]  # fmt: skip
    assert len({fingerprint, *(job_fingerprint("wrpo", job, 1) for job in changed)}) == 1 + len(changed)
    assert job_fingerprint("sft", base, 1) != fingerprint
    assert job_fingerprint("wrpo", base, 2) != fingerprint  # another number of processes

    # A global batch: the same derived accumulation is the same job; another one is not.
    batch = with_training(global_batch_size=8)  # 4 per device x 2 accumulation x 1 process
    assert job_fingerprint("wrpo", batch, 1) == job_fingerprint(
        "wrpo", with_training(gradient_accumulation_steps=2), 1
    )
    assert job_fingerprint("wrpo", batch, 2) != job_fingerprint("wrpo", batch, 1)

    # The data by content: the same bytes elsewhere are the same job, other bytes are not.
    copy = tmp_path / "copy.parquet"
    shutil.copy(quadruples, copy)
    assert job_fingerprint("wrpo", base.model_copy(update={"data": str(copy)}), 1) == fingerprint
    with copy.open("ab") as handle:
        handle.write(b"\0")
    assert job_fingerprint("wrpo", base.model_copy(update={"data": str(copy)}), 1) != fingerprint

    # The model by its files: rewritten weights (a retrained Target-SFT) are another job.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    moved = base.model_copy(update={"model": str(model)})
    before = job_fingerprint("wrpo", moved, 1)
    weights_file = model / "model.safetensors"
    os.utime(weights_file, ns=(weights_file.stat().st_atime_ns, weights_file.stat().st_mtime_ns + 10**9))
    retrained = job_fingerprint("wrpo", moved, 1)
    assert retrained != before
    (model / "metrics.jsonl").write_text("{}\n")  # files a training job leaves that are not the model
    (model / FINGERPRINT_FILE).write_text("{}")
    (model / "trainer_state.json").write_text("{}")
    assert job_fingerprint("wrpo", moved, 1) == retrained


def test_a_hub_model_is_identified_by_the_commit_it_resolves_to(tmp_path, quadruples, monkeypatch):
    commit = {"value": "abc123"}

    def fake_download(repo_id: str, filename: str, revision: str | None = None) -> str:
        assert (repo_id, filename, revision) == ("org/model", "config.json", None)
        return f"/cache/models--org--model/snapshots/{commit['value']}/config.json"

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    job = wrpo_job("org/model", quadruples, tmp_path / "out")
    first = job_fingerprint("wrpo", job, 1)
    assert models.model_identity("org/model") == {"hub": "org/model", "revision": "abc123"}
    commit["value"] = "def456"  # the hub repository was updated
    assert job_fingerprint("wrpo", job, 1) != first
    with pytest.raises(FileNotFoundError, match=r"model \./missing: neither a model folder nor a hub id"):
        models.model_identity("./missing")
    with pytest.raises(FileNotFoundError, match="no such file"):
        job_fingerprint("wrpo", job.model_copy(update={"data": str(tmp_path / "none.parquet")}), 1)


# --- claiming output_dir -----------------------------------------------------------------------


def fill_with_a_finished_job(folder: Path) -> None:
    for name in ("checkpoint-3/trainer_state.json", "runs/events", "model.safetensors", "config.json",
                 "tokenizer.json", "trainer_state.json", "README.md", REFERENCE_FILE, "job-wrpo.yaml", "notes.txt"):  # fmt: skip
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")


def test_another_jobs_outputs_are_removed_and_the_rest_is_kept(tmp_path, caplog):
    folder = tmp_path / "out"
    folder.mkdir()
    fill_with_a_finished_job(folder)
    adopt_output_dir(folder, "aaaa", {"training": {"beta": 0.5}})
    assert adopt_output_dir(folder, "aaaa", {"training": {"beta": 0.5}}) == []  # the same job: untouched
    (folder / "checkpoint-3").mkdir(exist_ok=True)
    (folder / "model.safetensors").write_text("{}")

    caplog.set_level(logging.WARNING)
    removed = adopt_output_dir(folder, "bbbb", {"training": {"beta": 2.0}})
    assert removed == ["checkpoint-3", "model.safetensors"]
    assert "changed: training.beta" in caplog.text and "job aaaa" in caplog.text
    assert recorded_job(folder) == {"fingerprint": "bbbb", "identity": {"training": {"beta": 2.0}}}


def test_outputs_that_no_record_vouches_for_are_not_resumed(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    fill_with_a_finished_job(folder)
    removed = adopt_output_dir(folder, "cccc", {})
    assert set(removed) == {"checkpoint-3", "runs", "model.safetensors", "config.json", "tokenizer.json",
                            "trainer_state.json", "README.md", "metrics.jsonl"}  # fmt: skip
    kept = sorted(path.name for path in folder.iterdir())
    assert kept == sorted([REFERENCE_FILE, "job-wrpo.yaml", "notes.txt", FINGERPRINT_FILE])


def test_torchrun_jobs_are_claimed_before_any_rank_starts(tmp_path, quadruples, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    fill_with_a_finished_job(out)
    seen = []

    def fake_run(command, env, metrics_path, **kwargs):
        seen.append((recorded_job(out), sorted(p.name for p in out.iterdir())))
        return [{"step": 2, "train_runtime": 1.0}]

    monkeypatch.setattr(torchrun, "run_subprocess", fake_run)
    job = wrpo_job(tiny_model_dir, quadruples, out, launch={"launcher": "local", "nproc_per_node": 2},
                   precompute_reference=False)  # fmt: skip
    torchrun.launch_local("wrpo", job)
    record, names = seen[0]
    assert record["fingerprint"] == job_fingerprint("wrpo", job, 2)  # planned: 2 processes
    assert "checkpoint-3" not in names and "metrics.jsonl" not in names and "model.safetensors" not in names
    # each rank's own check (the first process of the machine) then finds the job's record: nothing moves
    monkeypatch.setenv("WORLD_SIZE", "2")
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    assert claim_output_dir("wrpo", job) == record["fingerprint"]
    assert (out / "checkpoint-1").is_dir()


# --- Ray Train ---------------------------------------------------------------------------------


def test_a_changed_job_gets_a_ray_run_of_its_own(tmp_path, quadruples, tiny_model_dir):
    launch = LaunchConfig(launcher="ray", num_workers=2, storage_path=str(tmp_path / "store"))
    job = wrpo_job(tiny_model_dir, quadruples, tmp_path / "out", launch=launch)
    name = ray_run_name("wrpo", job)
    assert name.startswith("wrpo-wrpo-out-") and name.endswith(job_fingerprint("wrpo", job, 2))
    quieter = job.model_copy(update={"training": job.training.model_copy(update={"logging_steps": 10})})
    assert ray_run_name("wrpo", quieter) == name
    changed = job.model_copy(update={"training": job.training.model_copy(update={"beta": 2.0})})
    assert ray_run_name("wrpo", changed) != name
    named = job.model_copy(update={"launch": launch.model_copy(update={"run_name": "fuse-1"})})
    assert ray_run_name("wrpo", named) == "fuse-1"


def test_a_ray_checkpoint_of_another_job_is_never_restored(tmp_path):
    from ray.train import Checkpoint

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(RuntimeError, match="written without a job fingerprint, not by this job"):
        check_ray_checkpoint(Checkpoint.from_directory(str(folder)), "aaaa")
    (folder / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": "bbbb", "identity": {}}))
    with pytest.raises(RuntimeError, match=r"written by job bbbb, not by this job \(aaaa\).*launch.run_name"):
        check_ray_checkpoint(Checkpoint.from_directory(str(folder)), "aaaa")
    check_ray_checkpoint(Checkpoint.from_directory(str(folder)), "bbbb")  # the same job: restored


def test_training_settings_left_out_of_the_fingerprint_exist():
    assert set(WRPOConfig.model_fields) >= jobs.RESULT_NEUTRAL_SETTINGS
