"""Pools of Ray actors that hold a model: created on first use, shared by the stages that use the same model.

A source's sampling pool lives for its stage (`fanout.sample_model`). The reward model's pool is
shared (`shared_pool`): every score stage of the run sends its shards there, so the reward model
loads once. A shared pool is released when training needs the GPUs (`release_pools`), when no
stage has used it for its `idle_s`, and at once when it is unused while a running pool's new
actors cannot find room (`make_room`, `ActorPool.short_of_room`), so idle replicas never hold
the CPUs/GPUs another stage waits for.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from wrpo_core.config import ComputeConfig, ModelSpec

logger = logging.getLogger(__name__)


def _bundles(tp: int, compute: ComputeConfig) -> list[dict[str, float]]:
    """The placement group of a tensor-parallel replica: one GPU per rank; the replica itself runs in
    the first bundle, beside rank 0, so that bundle holds its CPUs."""
    return [{"GPU": 1, "CPU": max(1.0, compute.num_cpus_per_actor)}] + [{"GPU": 1, "CPU": 1}] * (tp - 1)


def actor_options(spec: ModelSpec | None, compute: ComputeConfig) -> dict[str, Any]:
    """Ray resources of one replica: GPUs = tensor-parallel size; a new placement group when > 1 (the
    caller removes it with the replica)."""
    tp = spec.tensor_parallel_size if spec is not None else 1
    gpus = compute.num_gpus_per_actor or (float(tp) if spec is not None and spec.backend == "vllm" else 0.0)
    if tp > 1:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group(_bundles(tp, compute), strategy="STRICT_PACK")
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        # vLLM starts one worker per rank inside the group; the actor itself holds no GPU.
        return {"num_cpus": compute.num_cpus_per_actor, "num_gpus": 0, "scheduling_strategy": strategy}
    return {"num_cpus": compute.num_cpus_per_actor, "num_gpus": gpus}


def actor_needs(spec: ModelSpec | None, compute: ComputeConfig) -> dict[str, float]:
    """The Ray resources one replica takes (`actor_options`), placement-group bundles included."""
    tp = spec.tensor_parallel_size if spec is not None else 1
    if tp > 1:  # the placement group's bundles, without creating one
        bundles = _bundles(tp, compute)
        return {key: float(sum(b[key] for b in bundles)) for key in ("CPU", "GPU")}
    options = actor_options(spec, compute)
    return {"CPU": float(options["num_cpus"]), "GPU": float(options["num_gpus"])}


class ActorPool:
    """Up to `size` Ray actors of one model, created on first use and shared by every stage that uses the pool.

    Stages running at once (the flow's concurrent score stages) send shards to the same actors;
    each actor works through its calls in order. A dead actor is replaced once, whichever stage
    saw it die first (`replace`); `release` kills them all. `loads` counts actors created: each
    loads the model once, in its constructor. `on_kill(actor)` frees what came with an actor
    (e.g. its placement group) after it is killed.
    """

    def __init__(
        self,
        make_actor: Callable[[], Any],
        size: int,
        *,
        name: str = "pool",
        idle_s: float | None = None,
        needs: dict[str, float] | None = None,
        on_kill: Callable[[Any], None] | None = None,
    ):
        if size < 1:
            raise ValueError(f"{name}: an actor pool needs size >= 1, got {size}")
        self.name, self.size, self.idle_s = name, size, idle_s
        self.needs = {k: v for k, v in (needs or {}).items() if v}
        """Ray resources one actor reserves (e.g. {"CPU": 1, "GPU": 1}): what `make_room` frees for it."""
        self.session = _ray_session()
        """The Ray session its actors live in: a pool of an ended session is dropped, never reused."""
        self._make, self._on_kill = make_actor, on_kill
        self._actors: list[Any] = []
        self._started: list[Any] = []  # actors that finished a call (they hold their resources)
        self._replaced: list[tuple[Any, Any]] = []  # (dead handle, its replacement); holds both alive
        self._lock = threading.Lock()
        self.loads = 0
        self.users = 0  # stages using it now (shared pools; changed under _POOLS_LOCK)
        self.last_used = time.monotonic()

    def actors(self, wanted: int) -> list[Any]:
        """The pool's first `min(wanted, size)` actors, creating those that do not exist yet.

        Before creating any it makes room for them (`make_room`): idle shared pools are released
        when the free resources cannot hold them, so a pool never waits on replicas nobody uses.
        """
        with self._lock:
            missing = min(wanted, self.size) - len(self._actors)
        if missing > 0:
            make_room({k: v * missing for k, v in self.needs.items()})
        with self._lock:
            while len(self._actors) < min(wanted, self.size):
                self._actors.append(self._make())
                self.loads += 1
            return list(self._actors[: min(wanted, self.size)])

    def worked(self, actor: Any) -> None:
        """Notes that `actor` finished a call: it has started, with the resources it needs."""
        with self._lock:
            if not any(a is actor for a in self._started):
                self._started.append(actor)

    @property
    def live(self) -> int:
        """How many actors it holds (each reserves `needs`)."""
        with self._lock:
            return len(self._actors)

    @property
    def starting(self) -> int:
        """How many of its actors have not finished a call yet (waiting for resources, or loading)."""
        with self._lock:
            return sum(not any(s is a for s in self._started) for a in self._actors)

    def replace(self, actor: Any) -> Any:
        """A fresh actor in place of `actor` (killed if still alive); the same one for every caller."""
        with self._lock:
            for dead, fresh in self._replaced:
                if dead is actor:
                    return fresh
            self._kill(actor)
            fresh = self._make()
            self.loads += 1
            self._replaced.append((actor, fresh))
            self._actors = [fresh if a is actor else a for a in self._actors]
            return fresh

    def release(self) -> None:
        """Kills every actor of the pool (their models' memory is freed); a later use starts new ones."""
        with self._lock:
            actors, self._actors, self._started, self._replaced = self._actors, [], [], []
        for actor in actors:
            self._kill(actor)

    def _kill(self, actor: Any) -> None:
        _kill(actor)
        if self._on_kill is not None:
            self._on_kill(actor)


def _ray_session() -> str | None:
    import ray

    return ray.get_runtime_context().get_session_name() if ray.is_initialized() else None


def _kill(actor: Any) -> None:
    import ray

    if not ray.is_initialized():  # Ray already shut down (its actors with it); never start one to kill
        return
    try:
        ray.kill(actor)
    except Exception as error:  # already dead, or its node is gone: nothing left to free
        logger.debug("ray.kill of an actor failed: %s", error)


_POOLS: dict[str, ActorPool] = {}
_POOLS_LOCK = threading.Lock()
_idle_reaper: threading.Thread | None = None
RUNNING_POOLS: Counter[ActorPool] = Counter()
"""Pools that run_shards calls of this process are using now, with how many calls (changed under _POOLS_LOCK)."""


@contextlib.contextmanager
def in_use(pool: ActorPool) -> Iterator[ActorPool]:
    """Marks `pool` as in use by one run_shards call: while its actors start, the reaper makes room for them."""
    with _POOLS_LOCK:
        RUNNING_POOLS[pool] += 1
    try:
        yield pool
    finally:
        with _POOLS_LOCK:
            RUNNING_POOLS[pool] -= 1
            if RUNNING_POOLS[pool] <= 0:
                del RUNNING_POOLS[pool]


def _demand(extra: dict[str, float]) -> dict[str, float]:
    """Resources the actors of this process's pools hold or wait for, plus `extra`."""
    with _POOLS_LOCK:
        pools = {*RUNNING_POOLS, *_POOLS.values()}
    demand: Counter[str] = Counter(extra)
    for pool in pools:
        for name, amount in pool.needs.items():
            demand[name] += amount * pool.live
    return dict(demand)


def make_room(needs: dict[str, float]) -> bool:
    """Whether Ray's resources hold `needs` beside the actors this process's pools already have; if
    not, releases the shared pools nobody is using.

    Counted from the pools' own actors (what they reserve), not Ray's momentary free resources,
    which lag behind a kill. A reward-model pool idling between score stages would otherwise hold
    the CPUs/GPUs a source's sampling actors wait for, until its idle time ran out.
    """
    import ray

    if not ray.is_initialized():
        return True
    total, demand = ray.cluster_resources(), _demand(needs)
    if all(amount <= total.get(name, 0.0) + 1e-9 for name, amount in demand.items()):
        return True
    _release_unused(reason=f"actors need {demand}, Ray has { ({k: total.get(k, 0.0) for k in demand}) }")
    return False


def _release_unused(*, reason: str) -> int:
    """Releases the shared pools no stage is using (the caller's own pool is in use, so it stays)."""
    with _POOLS_LOCK:
        unused = [k for k, p in _POOLS.items() if p.users == 0]
        released = [_POOLS.pop(k) for k in unused]
    for pool in released:
        logger.info("%s: releasing its idle actors (%s)", pool.name, reason)
        pool.release()
    return len(released)


@contextlib.contextmanager
def shared_pool(
    key: str,
    make_actor: Callable[[], Any],
    size: int,
    *,
    name: str,
    idle_s: float,
    needs: dict[str, float] | None = None,
) -> Iterator[ActorPool]:
    """The run's pool under `key` (one model with one set of settings), created on first use, for one stage.

    It outlives the stage: it lives until `release_pools()` (before training, at the end of a run)
    or until no stage has used it for `idle_s` seconds (so idle replicas never hold GPUs that other
    stages wait for). While a stage holds it, it is never released as idle.
    """
    global _idle_reaper
    session = _ray_session()
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None and pool.session != session:  # Ray was restarted: its actors are gone
            del _POOLS[key]
            pool = None
        if pool is None:
            pool = _POOLS[key] = ActorPool(make_actor, size, name=name, idle_s=idle_s, needs=needs)
        pool.users += 1
        if _idle_reaper is None:
            _idle_reaper = threading.Thread(target=_release_idle_pools, name="wrpo-idle-pools", daemon=True)
            _idle_reaper.start()
    try:
        yield pool
    finally:
        with _POOLS_LOCK:
            pool.users -= 1
            pool.last_used = time.monotonic()
            # Dropped from the pools while in use (release_pools, a Ray restart): released by its last user.
            release_now = pool.users == 0 and _POOLS.get(key) is not pool
        if release_now:
            pool.release()


def _release_idle_pools(every_s: float = 1.0) -> None:
    """Releases shared pools nobody has used for their `idle_s`, and those nobody uses at all while a
    running pool has actors that have not started and the pools' actors ask for more than Ray has
    (some wait for resources the unused pools hold); a daemon thread that ends when no shared pool is left."""
    global _idle_reaper
    while True:
        time.sleep(every_s)
        with _POOLS_LOCK:
            waiting = [p for p in RUNNING_POOLS if p.needs and p.starting]
        if waiting:  # more actors than Ray holds: some wait for resources an unused pool may free
            make_room({})
        with _POOLS_LOCK:
            now = time.monotonic()
            idle = [k for k, p in _POOLS.items() if p.users == 0 and now - p.last_used >= p.idle_s]
            released = [_POOLS.pop(k) for k in idle]
            if not _POOLS and not released:
                _idle_reaper = None  # under the lock: shared_pool starts a new reaper from here on
                return
        for pool in released:
            logger.info("%s: no work for %.0f s, releasing its actors", pool.name, pool.idle_s)
            pool.release()


def release_pools() -> int:
    """Releases every shared pool (e.g. before training needs the GPUs); returns how many.

    A pool a stage is using now is released when that stage is done with it, not under it.
    """
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
        unused = [p for p in pools if p.users == 0]  # the others: by their last user (shared_pool)
    for pool in unused:
        pool.release()
    return len(pools)
