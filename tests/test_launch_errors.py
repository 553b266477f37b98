"""The local launcher's error reports and worker exit, on real torchrun output (2 CPU processes, gloo).

The logs below are cut from real runs of `launch_job` with torch 2.13 (some lines left out): a bad
data path, a rank killed by SIGKILL or SIGSEGV, the SIGABRT at interpreter exit that made the
2-process ZeRO-3 tests flaky, and torchrun failing to bind its rendezvous port.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from wrpo_core.train.joblog import JobLogErrors, job_error_text, last_words, parse_root_cause
from wrpo_core.train.jobs import TrainingJobError
from wrpo_core.train.torchrun import run_subprocess

LAUNCHER_TRACEBACK = """\
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "<frozen runpy>", line 88, in _run_code
  File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"""

# A worker raised (bad data path); the worker's entry point is decorated with `record`, so the
# summary carries its traceback from the error file.
BAD_DATA_PATH = (
    """\
DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully
Traceback (most recent call last):
  File "/work/main/wrpo_core/train/sft.py", line 52, in train_sft
    dataset, report = tokenize_sft(read_parquet(job.data, BEST_SOURCE), tokenizer, job.training)
  File "/work/main/.venv/lib/python3.11/site-packages/fsspec/implementations/local.py", line 398, in _open
    self.f = open(self.path, mode=self.mode)
FileNotFoundError: [Errno 2] No such file or directory: '/tmp/tmp3jetzh47/missing.parquet'
W1126 22:41:52.447000 12743 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 12748 closing signal SIGTERM
E1126 22:41:52.480000 12743 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 1 (pid: 12749) of binary: /work/main/.venv/bin/python
E1126 22:41:52.506000 12743 torch/distributed/elastic/multiprocessing/errors/error_handler.py:145] no error file defined for parent, to copy child error file (/tmp/torchelastic_rg_92c4t/7955926d9fd1__qmfn0te/attempt_0/1/error.json)
"""
    + LAUNCHER_TRACEBACK
    + """\
============================================================
wrpo_core.train.launch FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-26_22:41:51
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 12748)  (SIGTERM)
  error_file: /tmp/torchelastic_rg_92c4t/7955926d9fd1__qmfn0te/attempt_0/0/error.json
  traceback : Traceback (most recent call last):
  \n------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_22:41:51
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 12749) \n\
  error_file: /tmp/torchelastic_rg_92c4t/7955926d9fd1__qmfn0te/attempt_0/1/error.json
  traceback : Traceback (most recent call last):
    File "/work/main/wrpo_core/schemas.py", line 209, in read_parquet
      with fs.open(path, "rb") as handle:
           ^^^^^^^^^^^^^^^^^^^
    File "/work/main/.venv/lib/python3.11/site-packages/fsspec/implementations/local.py", line 398, in _open
      self.f = open(self.path, mode=self.mode)
               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  FileNotFoundError: [Errno 2] No such file or directory: '/tmp/tmp3jetzh47/missing.parquet'
  \n============================================================
"""
)

# The flaky failure (before the fix): rank 1 trained, saved and printed its summary, then died
# of SIGABRT at interpreter exit; the old report was the last line, torchrun's "=====" banner.
SIGABRT_AT_EXIT = (
    """\
{'train_runtime': '3.037', 'train_samples_per_second': '15.81', 'train_steps_per_second': '3.952', 'train_loss': '3.963', 'epoch': '6'}
Writing model shards: 100%|██████████| 1/1 [00:00<00:00, 631.10it/s]
terminate called without an active exception
{
  "train_runtime": 3.0366,
  "train_loss": 3.9629145661989846,
  "epoch": 6.0
}
W1126 22:06:23.630000 7748 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 7828 closing signal SIGTERM
E1126 22:06:23.694000 7748 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -6) local_rank: 1 (pid: 7829) of binary: /work/main/.venv/bin/python
"""
    + LAUNCHER_TRACEBACK
    + """\
======================================================
wrpo_core.cli FAILED
------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-26_22:06:23
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 7828)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 7828
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_22:06:23
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 7829)  (SIGABRT)
  error_file: <N/A>
  traceback : Signal 6 (SIGABRT) received by PID 7829
======================================================
"""
)

# A rank killed from outside (as the kernel's OOM killer would): no last words at all.
SIGKILL = (
    """\
{'loss': '4.468', 'grad_norm': '3.337', 'learning_rate': '0.001', 'epoch': '1'}
E1126 22:42:16.250000 12792 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 12798) of binary: /work/main/.venv/bin/python
"""
    + LAUNCHER_TRACEBACK
    + """\
=======================================================
wrpo_core.train.launch FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-26_22:42:16
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 12797)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 12797
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_22:42:16
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 12798)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 12798
=======================================================
"""
)

# A segfault in a worker: `record` enabled Python's fault handler, which printed the stacks.
SIGSEGV = (
    """\
Fatal Python error: Segmentation fault

Thread 0x00007fe94f7fe6c0 (most recent call first):
  <no Python frame>

Current thread 0x00007fe9918b8b80 (most recent call first):
  File "/work/main/.venv/lib/python3.11/site-packages/transformers/trainer.py", line 1576 in train
  File "/work/main/wrpo_core/train/common.py", line 206 in run_training
  File "/work/main/wrpo_core/train/launch.py", line 541 in run_torchrun_worker

Extension modules: yaml._yaml, numpy._core._multiarray_umath, torch._C (total: 89)
W1126 22:43:34.467000 13386 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 13391 closing signal SIGTERM
E1126 22:43:34.532000 13386 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -11) local_rank: 1 (pid: 13392) of binary: /work/main/.venv/bin/python
"""
    + LAUNCHER_TRACEBACK
    + """\
=======================================================
wrpo_core.train.launch FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-26_22:43:34
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 13391)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 13391
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_22:43:34
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -11 (pid: 13392)  (SIGSEGV)
  error_file: <N/A>
  traceback : Signal 11 (SIGSEGV) received by PID 13392
=======================================================
"""
)

# torchrun itself could not bind the rendezvous port (another process took it): no summary.
PORT_IN_USE = """\
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/elastic/agent/server/api.py", line 528, in _rendezvous
    rdzv_info = spec.rdzv_handler.next_rendezvous()
                ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/elastic/rendezvous/static_tcp_rendezvous.py", line 67, in next_rendezvous
    self._store = TCPStore(  # type: ignore[call-arg]
                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address. port: 54263, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use
"""


def lines(log: str) -> list[str]:
    return log.splitlines()


def test_a_recorded_exception_names_the_rank_and_its_exit_code():
    assert job_error_text(lines(BAD_DATA_PATH)) == (
        "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/tmp3jetzh47/missing.parquet'"
        " (rank 1, exit code 1)"
    )
    failure = parse_root_cause(lines(BAD_DATA_PATH.split("Root Cause (first observed failure):")[1]))
    assert (failure.rank, failure.local_rank, failure.exitcode, failure.signal) == (1, 1, 1, None)
    assert failure.error_file.endswith("attempt_0/1/error.json")
    assert failure.traceback[0] == "Traceback (most recent call last):"
    assert failure.exception.startswith("FileNotFoundError: [Errno 2]")


def test_a_rank_that_died_of_sigabrt_at_exit_is_named_with_its_last_words():
    text = job_error_text(lines(SIGABRT_AT_EXIT))
    assert text == (
        "rank 1 killed by SIGABRT, exit code -6; "
        "last error in the log: terminate called without an active exception"
    )
    assert "=====" not in text


def test_a_killed_rank_is_named_with_its_signal():
    assert job_error_text(lines(SIGKILL)) == "rank 1 killed by SIGKILL, exit code -9"
    assert job_error_text(lines(SIGSEGV)) == (
        "rank 1 killed by SIGSEGV, exit code -11; last error in the log: Fatal Python error: Segmentation fault"
    )


def test_without_a_summary_the_first_error_line_is_the_answer():
    assert job_error_text(lines(PORT_IN_USE)) == (
        "torch.distributed.DistNetworkError: The server socket has failed to listen on any local"
        " network address. port: 54263, useIpv6: false, code: -98, name: EADDRINUSE, message: address"
        " already in use"
    )
    assert job_error_text(["[rank1]: ValueError: bad beta", "[rank0]: KeyError: 'x'"]) == (
        "ValueError: bad beta"
    )
    assert job_error_text(["all good"]) is None


def test_errors_are_gathered_line_by_line_as_the_log_streams():
    log = lines(SIGABRT_AT_EXIT)
    errors = JobLogErrors()
    for line in log[:-1]:
        errors.add(line)
    assert errors.root_cause.exitcode == -6  # known before the summary's closing banner
    errors.add(log[-1])
    assert errors.fatal == "terminate called without an active exception"
    assert errors.exception is None
    assert errors.root_cause.signal == "SIGABRT"


def test_the_last_words_of_a_log_are_never_a_banner():
    assert last_words(["Loss 1.0", "=" * 60, "-" * 20, ""]) == "Loss 1.0"
    assert last_words([]) == "no output"


def test_training_job_error_carries_the_failing_rank(tmp_path):
    script = f"import sys; print({SIGKILL!r}, end=''); sys.exit(1)"
    with pytest.raises(TrainingJobError) as failure:
        run_subprocess([sys.executable, "-c", script], {}, tmp_path / "metrics.jsonl")
    error = failure.value
    assert error.error == "rank 1 killed by SIGKILL, exit code -9" and error.returncode == 1
    assert (error.failure.rank, error.failure.exitcode, error.failure.signal) == (1, -9, "SIGKILL")
    assert str(error) == "training job failed (exit code 1): rank 1 killed by SIGKILL, exit code -9"


def test_exit_without_teardown_runs_atexit_flushes_and_keeps_the_exit_code():
    script = textwrap.dedent(
        """
        import atexit, sys
        from wrpo_core.train.worker import exit_without_teardown
        atexit.register(lambda: print("atexit ran"))
        sys.stdout.write("buffered, no newline")
        exit_without_teardown(3)
        print("not reached")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newlineatexit ran\n"


GLOO_COLLECTIVES_THEN_EXIT = """\
import sys

import torch
import torch.distributed as dist

from wrpo_core.train.worker import exit_without_teardown

dist.init_process_group("gloo")
groups = [dist.new_group([0, 1]) for _ in range(6)]
for _ in range(3):
    for group in groups:
        dist.all_gather_into_tensor(torch.empty(200), torch.ones(100), group=group)
if sys.argv[1] == "teardown":
    exit_without_teardown(0)
"""


@pytest.mark.integration
def test_gloo_workers_that_exit_without_teardown_never_abort(tmp_path):
    """The cause of the flaky 2-process jobs, and its fix, on a plain gloo job.

    Exiting through the interpreter's shutdown right after collectives on several groups aborts
    a worker about every other run here ("terminate called without an active exception"); the
    workers' exit (`exit_without_teardown`) never does.
    """
    script = tmp_path / "collectives.py"
    script.write_text(GLOO_COLLECTIVES_THEN_EXIT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", str(script), "teardown"]  # fmt: skip
    for _ in range(3):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, job_error_text(done.stdout.splitlines() + done.stderr.splitlines())
