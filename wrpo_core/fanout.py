"""Fan-out of sampling and scoring over Ray actors, in deterministic, resumable shards.

One actor per model replica holds its model for its whole life (a GPU per tensor-parallel
rank; a placement group when more than one). Actors come in pools (`ActorPool`): a source's
sampling pool samples every shard of that source and is released when its stage ends; the
reward model's pool is shared by every score stage of the run (the reward model is loaded once,
not once per source) and is released before training (which needs the GPUs), when it has had
no work for `compute.reward_pool_idle_s`, and at the end of the run. Work units are (model, prompt shard). The
prompts go to the actors once through Ray's object store; each actor writes its Parquet
shard (samples or scores, the large data) straight to storage, so it never passes through
the driver; it returns the file's manifest entry (rows, bytes, sha256), so the driver lists the
shard without reading it back. Shard keys are deterministic (`part-00003.parquet`), a
rerun skips shards already written (writes are atomic), and a shard whose actor dies is
retried, a bounded number of times, on a fresh actor. The same code runs on a local Ray (this
machine's CPUs) and on an existing cluster (`address`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from wrpo_core.actor_pools import (
    ActorPool,
    actor_needs,
    actor_options,
    in_use,
    release_pools,
    shared_pool,
)
from wrpo_core.config import ComputeConfig, ModelSpec, RewardModelSpec
from wrpo_core.failures import is_permanent
from wrpo_core.ray_env import runtime_env
from wrpo_core.ray_logs import actor_output_tail
from wrpo_core.rewards import load_scorer, score_samples
from wrpo_core.sampling import load_sampler
from wrpo_core.schemas import SAMPLES, SCORES
from wrpo_core.storage import Storage, StorageAccess
from wrpo_core.storage.provenance import digest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One work unit: rows [start, stop) of the prompts, written to storage key `out_key`."""

    index: int
    start: int
    stop: int
    out_key: str


def shard_key(index: int, tag: str = "") -> str:
    """A shard's file name; `tag` (a digest of what produced it) keeps a changed run from reusing it."""
    return f"part-{tag + '-' if tag else ''}{index:05d}.parquet"


def plan_shards(num_rows: int, shard_size: int, out_prefix: str, tag: str = "") -> list[Shard]:
    """Deterministic shards of `shard_size` rows over `num_rows` prompts, keyed under `out_prefix`."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [
        Shard(i, start, min(start + shard_size, num_rows), f"{out_prefix.rstrip('/')}/{shard_key(i, tag)}")
        for i, start in enumerate(range(0, num_rows, shard_size))
    ]


def read_shards(storage: Storage, shards: list[Shard], schema: pa.Schema) -> pa.Table:
    """All shards of a finished fan-out, in shard order."""
    return pa.concat_tables([storage.read_table(s.out_key, schema) for s in shards])


# --- workers (plain classes; Ray wraps them as actors) ------------------------------------------


def _torch_threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def _load(load: Callable[[], Any]) -> tuple[Any, Exception | None]:
    """A model loaded in an actor's constructor, or the error that stopped it, raised by the first call.

    Ray reports a constructor's exception as a dead actor with the error's type lost, so a bad config
    (a remote-code model that cannot import, a wrong path) looked like a node failure and was retried
    as "possibly transient"; raised from a method, it reaches the driver with its type.
    """
    try:
        return load(), None
    except Exception as error:
        return None, error


def _actor_id() -> str | None:
    """The Ray actor this runs in (which replica did a shard), or None outside an actor.

    Without Ray running there is none: asking Ray's runtime context then would start a local Ray."""
    import ray

    return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None


class SamplingWorker:
    """Holds one model (HF or vLLM) and samples prompt shards into SAMPLES shard files."""

    def __init__(
        self,
        spec: ModelSpec,
        prompts: pa.Table,
        storage: StorageAccess | tuple[str, dict[str, Any]],
        *,
        device: str,
        num_cpus: float = 1.0,
        batch_size: int = 32,
    ):
        _torch_threads(num_cpus)
        self.spec = spec
        self.prompts = prompts
        self.storage = StorageAccess(*storage).open()
        self.sampler, self.load_error = _load(
            lambda: load_sampler(spec, device=device, batch_size=batch_size, progress=False)
        )

    def run(self, shard: Shard) -> dict[str, Any]:
        if self.load_error is not None:
            raise self.load_error
        rows = self.prompts.slice(shard.start, shard.stop - shard.start)
        table, report = self.sampler.sample(rows["prompt_id"].to_pylist(), rows["prompt"].to_pylist())
        file = self.storage.write_table(shard.out_key, table, SAMPLES)
        return {"shard": shard.index, "file": file, "samples": report.samples, "completion_tokens": report.completion_tokens,
                "seconds": report.seconds, "prompts_truncated": report.prompts_truncated,
                "prompts_skipped_empty": report.prompts_skipped_empty, "actor": _actor_id()}  # fmt: skip


class ScoringWorker:
    """Holds one reward model and scores sample shards into SCORES shard files, for any stage of the run.

    The prompts come with each call (an object-store reference, turned into a lookup once per
    prompts table), so one replica serves every model's samples: the reward model is loaded once.
    """

    def __init__(
        self,
        spec: RewardModelSpec,
        storage: StorageAccess | tuple[str, dict[str, Any]],
        *,
        num_cpus: float = 1.0,
    ):
        _torch_threads(num_cpus)
        self.storage = StorageAccess(*storage).open()
        self._prompts: dict[str, dict[str, str]] = {}  # the last few prompt tables, by object ref
        self.scorer, self.load_error = _load(lambda: load_scorer(spec, progress=False))

    def _prompt_by_id(self, prompts: list[Any]) -> dict[str, str]:
        import ray

        (ref,) = prompts  # wrapped in a list, so Ray passes the reference, not the table
        if ref.hex() not in self._prompts:  # a few stages may interleave their shards here
            table = ray.get(ref)
            lookup = dict(zip(table["prompt_id"].to_pylist(), table["prompt"].to_pylist(), strict=True))
            self._prompts = {**dict(list(self._prompts.items())[-3:]), ref.hex(): lookup}
        return self._prompts[ref.hex()]

    def run(self, shard: Shard, samples_key: str, prompts: list[Any]) -> dict[str, Any]:
        if self.load_error is not None:
            raise self.load_error
        samples = self.storage.read_table(samples_key, SAMPLES)
        scores = score_samples(samples, self._prompt_by_id(prompts), self.scorer)
        file = self.storage.write_table(shard.out_key, scores, SCORES)
        return {
            "shard": shard.index,
            "file": file,
            "scored": scores.num_rows,
            "score_sum": float(sum(scores["score"].to_pylist())),
            "actor": _actor_id(),
        }


# --- the driver ----------------------------------------------------------------------------------


_RAY_INIT = threading.Lock()
_started_local_ray = False
_reaper: subprocess.Popen | None = None

_REAPER = r"""
import os, select, sys, psutil
session, tracked = sys.argv[1], {}
def scan():
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and session in " ".join(proc.info["cmdline"] or ()):
            try:
                for member in [proc, *proc.children(recursive=True)]:
                    tracked.setdefault(member.pid, member)
            except psutil.Error:
                pass
while True:
    scan()
    if select.select([sys.stdin], [], [], 1.0)[0] and not os.read(sys.stdin.fileno(), 1):
        break
scan()
for proc in tracked.values():
    try:
        if proc.is_running():
            proc.kill()
    except psutil.Error:
        pass
"""
"""The reaper of a local Ray: tracks the session's processes (raylet, GCS, agents and every worker
they start) each second, and once its stdin closes (the driver ended, however) kills them all."""


def _start_reaper(session: str) -> subprocess.Popen:
    """Starts the reaper of local Ray session `session`; it holds the read end of a pipe to this process.

    It runs in a session of its own, so a kill of the driver's process group leaves it to clean up.
    """
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, session], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def init_ray(compute: ComputeConfig) -> None:
    """Connects to `compute.ray_address`, or starts a local Ray sized to this machine (thread-safe).

    Actors' stdout and stderr are printed by this process (`log_to_driver`), so they reach `ray job
    logs` when it is a Ray job; a dead actor's last lines also go into the error (`actor_output_tail`).
    A local Ray never outlives this process: a reaper process (see `_REAPER`) kills every process of
    its session once this one ends, also by SIGKILL (Ray's own clean-up misses some: agents, and
    sometimes an actor).
    """
    import ray

    global _started_local_ray, _reaper
    with _RAY_INIT:  # stages of several models may start at once (the flow's task threads)
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        env = runtime_env()  # credentials and settings by name, and the package when shipped (ray_env.py)
        if compute.ray_address:
            ray.init(address=compute.ray_address, ignore_reinit_error=True, log_to_driver=True,
                     runtime_env=env)  # fmt: skip
        else:
            # "local": never join a cluster that `ray start` left on this machine (its reaper would end it).
            ray.init(address="local", include_dashboard=False, ignore_reinit_error=True, log_to_driver=True,
                     runtime_env=env)  # fmt: skip
            _started_local_ray = True
            _reaper = _start_reaper(ray.get_runtime_context().get_session_name())


def shutdown_local_ray() -> None:
    """Releases the run's shared actor pools (on a cluster too), then stops the local Ray that `init_ray`
    started (a cluster connection is left alone) and its reaper."""
    global _started_local_ray, _reaper
    release_pools()
    with _RAY_INIT:
        if _started_local_ray:
            import ray

            ray.shutdown()
            _started_local_ray = False
        if _reaper is not None:
            _reaper.stdin.close()  # the reaper kills what shutdown left, then exits
            _reaper.wait()
            _reaper = None


class ShardError(RuntimeError):
    """A shard that could not be written, naming it and its file; `permanent`: a retry cannot help."""

    def __init__(self, message: str, *, permanent: bool):
        super().__init__(message)
        self.permanent = permanent

    def __reduce__(self):
        return (_shard_error, (str(self), self.permanent))


def _shard_error(message: str, permanent: bool) -> ShardError:
    return ShardError(message, permanent=permanent)


def run_shards(
    pool: ActorPool,
    storage: Storage,
    shards: list[Shard],
    call: Callable[[Any, Shard], Any],
    *,
    max_attempts: int = 3,
    desc: str = "shards",
    on_done: Callable[[Shard, dict], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[int, dict]:
    """Runs every shard not yet written on the pool's actors; retries a dead actor's shard on its replacement.

    `call(actor, shard)` returns the ObjectRef of the shard's work; one shard at a time per actor
    from this call (other stages sharing the pool may queue theirs on the same actors). A shard
    whose actor dies, or whose work raises an error a retry may fix, is retried on a fresh actor,
    up to `max_attempts` tries; a permanent error (bad data or config, `failures.is_permanent`)
    fails at once. Either way a ShardError names the shard and its file and says whether it is
    permanent. `on_progress(done, total)` is called with the shards written: once at the start
    (those an earlier attempt wrote count as done) and after each shard that finishes.
    """
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from tqdm.auto import tqdm

    pending = [s for s in shards if not storage.exists(s.out_key)]
    skipped = len(shards) - len(pending)
    if skipped:
        logger.info("%s: %d of %d shards already written, skipped", desc, skipped, len(shards))
    if on_progress is not None:
        on_progress(skipped, len(shards))
    results: dict[int, dict] = {}
    attempts: dict[int, int] = {}
    with in_use(pool):  # while its actors start, the idle reaper makes room for them
        idle = pool.actors(len(pending)) if pending else []
        running: dict[Any, tuple[Any, Shard]] = {}
        bar = tqdm(total=len(pending), desc=desc, unit="shard")
        start = time.perf_counter()
        while pending or running:
            while pending and idle:
                shard, actor = pending.pop(0), idle.pop()
                attempts[shard.index] = attempts.get(shard.index, 0) + 1
                running[call(actor, shard)] = (actor, shard)
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, shard = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except (RayActorError, ActorDiedError, ActorUnavailableError) as error:
                output = actor_output_tail(getattr(error, "actor_id", None))
                if attempts[shard.index] >= max_attempts:
                    bar.close()
                    raise ShardError(
                        f"{desc}: shard {shard.index} ({storage.display(shard.out_key)}) failed on "
                        f"{max_attempts} actors in a row (each died or became unreachable): {error}\n"
                        f"the last actor's output: {output}",
                        permanent=False,
                    ) from error
                logger.warning("%s: actor died on shard %d (attempt %d); retrying on a new actor. Its output: %s",
                               desc, shard.index, attempts[shard.index], output)  # fmt: skip
                pending.insert(0, shard)
                idle.append(pool.replace(actor))
                continue
            except Exception as error:
                cause = getattr(error, "cause", None) or error
                if not is_permanent(cause) and attempts[shard.index] < max_attempts:
                    logger.warning("%s: shard %d failed (attempt %d), retrying on a new actor: %s",
                                   desc, shard.index, attempts[shard.index], cause)  # fmt: skip
                    pending.insert(0, shard)
                    idle.append(pool.replace(actor))
                    continue
                bar.close()
                raise ShardError(
                    f"{desc}: shard {shard.index} ({storage.display(shard.out_key)}) failed: "
                    f"{type(cause).__name__}: {cause}",
                    permanent=is_permanent(cause),
                ) from error
            pool.worked(actor)
            results[shard.index] = result
            if on_done is not None:
                on_done(shard, result)
            if on_progress is not None:
                on_progress(skipped + len(results), len(shards))
            idle.append(actor)
            bar.update(1)
            bar.set_postfix(shards_per_min=f"{60 * bar.n / max(time.perf_counter() - start, 1e-9):.1f}")
        bar.close()
    return results


def sample_model(
    spec: ModelSpec,
    prompts: pa.Table,
    storage: StorageAccess | tuple[str, dict[str, Any]],
    out_prefix: str,
    compute: ComputeConfig,
    *,
    shard_size: int = 256,
    num_actors: int = 1,
    device: str = "cpu",
    batch_size: int = 32,
    tag: str = "",
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Shard], dict[int, dict]]:
    """Samples every prompt shard of one model on Ray actors into `out_prefix/part-[TAG-]NNNNN.parquet`.

    `storage` is how to open the run's storage (`Storage.access()`, or a (URL, options) pair as
    given in the config): each actor opens it itself, resolving credentials from its own
    environment when the options hold none. Each result holds the written shard's `file` entry. Shards already
    written under the same `tag` are kept (a rerun after a crash); give a new tag when the model,
    its sampling settings or the prompts change. `on_progress(done, total)` counts shards (`run_shards`).
    """
    import ray

    init_ray(compute)
    shards = plan_shards(prompts.num_rows, shard_size, out_prefix, tag)
    prompts_ref = ray.put(prompts)
    actor_class = ray.remote(SamplingWorker)
    groups: list[tuple[Any, Any]] = []  # (replica, its placement group) of tensor-parallel replicas

    def make_actor():
        options = actor_options(spec, compute)  # a placement group of its own per tensor-parallel replica
        actor = actor_class.options(**options).remote(spec, prompts_ref, storage, device=device,
                                                      num_cpus=compute.num_cpus_per_actor, batch_size=batch_size)  # fmt: skip
        if "scheduling_strategy" in options:
            groups.append((actor, options["scheduling_strategy"].placement_group))
        return actor

    def free_group(actor: Any) -> None:
        from ray.util.placement_group import remove_placement_group

        for held, group in [g for g in groups if g[0] is actor]:
            groups.remove((held, group))
            remove_placement_group(group)  # its GPUs go back to Ray for the next source or training

    # The source's own pool: it samples every shard, then its replicas (and their GPUs) are freed.
    pool = ActorPool(make_actor, num_actors, name=f"sampling {spec.name}", needs=actor_needs(spec, compute),
                     on_kill=free_group)  # fmt: skip
    try:
        results = run_shards(pool, StorageAccess(*storage).open(), shards, lambda actor, shard: actor.run.remote(shard),
                             desc=f"sampling {spec.name}", on_progress=on_progress)  # fmt: skip
    finally:
        pool.release()
    return shards, results


@contextlib.contextmanager
def reward_pool(
    spec: RewardModelSpec, storage: StorageAccess | tuple[str, dict[str, Any]], compute: ComputeConfig
) -> Iterator[ActorPool]:
    """The run's shared pool of reward-model replicas (`compute.num_actors`), for one score stage."""
    import ray

    init_ray(compute)
    settings = [spec.model_dump(mode="json"), list(StorageAccess(*storage)), compute.model_dump(mode="json")]
    key = "score:" + digest(settings)
    actor_class = ray.remote(ScoringWorker).options(**actor_options(None, compute))

    def make_actor():
        return actor_class.remote(spec, storage, num_cpus=compute.num_cpus_per_actor)

    with shared_pool(key, make_actor, compute.num_actors, name=f"reward model {spec.path}",
                     idle_s=compute.reward_pool_idle_s, needs=actor_needs(None, compute)) as pool:  # fmt: skip
        yield pool


def score_model(
    spec: RewardModelSpec,
    prompts: pa.Table,
    storage: StorageAccess | tuple[str, dict[str, Any]],
    sample_shards: list[Shard],
    out_prefix: str,
    compute: ComputeConfig,
    *,
    tag: str = "",
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Shard], dict[int, dict]]:
    """Scores every sample shard of one model on the run's reward-model pool, shard for shard.

    Score stages of several models share the pool (`reward_pool`): the reward model stays loaded
    between them. `tag`, `on_progress`: see sample_model.
    """
    import ray

    shards = [
        Shard(s.index, s.start, s.stop, f"{out_prefix.rstrip('/')}/{shard_key(s.index, tag)}")
        for s in sample_shards
    ]
    samples_key = {s.index: s.out_key for s in sample_shards}
    with reward_pool(spec, storage, compute) as pool:
        prompts_ref = [ray.put(prompts)]
        results = run_shards(
            pool,
            StorageAccess(*storage).open(),
            shards,
            lambda actor, shard: actor.run.remote(shard, samples_key[shard.index], prompts_ref),
            desc=f"scoring with {spec.path}",
            on_progress=on_progress,
        )
    return shards, results
