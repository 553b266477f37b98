"""Shared actor pools (actor_pools.ActorPool, shared_pool): one replacement per dead actor, idle pools released.

No Ray actors here: the pools hold stand-in handles, so this checks the bookkeeping alone.
"""

import time

import pytest

from wrpo_core import actor_pools


class Handle:
    """A stand-in actor handle (no Ray is started here: `actor_pools._kill` leaves it alone)."""

    made = 0

    def __init__(self):
        Handle.made += 1
        self.number = Handle.made


def test_actors_are_created_once_up_to_the_pool_size():
    pool = actor_pools.ActorPool(Handle, 2)
    first = pool.actors(5)
    assert len(first) == 2 and pool.loads == 2
    assert pool.actors(1) == first[:1] and pool.actors(2) == first and pool.loads == 2


def test_a_dead_actor_is_replaced_once_whoever_sees_it_die():
    pool = actor_pools.ActorPool(Handle, 2)
    dead, alive = pool.actors(2)
    fresh = pool.replace(dead)
    assert pool.replace(dead) is fresh  # a second stage that saw the same death gets the same replacement
    assert pool.actors(2) == [fresh, alive] and pool.loads == 3


def test_release_empties_the_pool_and_a_later_use_starts_new_actors():
    pool = actor_pools.ActorPool(Handle, 1)
    (old,) = pool.actors(1)
    pool.release()
    (new,) = pool.actors(1)
    assert new is not old and pool.loads == 2


def test_a_pool_needs_at_least_one_actor():
    with pytest.raises(ValueError, match="size >= 1"):
        actor_pools.ActorPool(Handle, 0, name="reward model rm")


def test_stages_share_one_pool_by_key_until_released():
    actor_pools.release_pools()
    with actor_pools.shared_pool("k", Handle, 1, name="rm", idle_s=60) as first:
        first.actors(1)
    with actor_pools.shared_pool("k", Handle, 1, name="rm", idle_s=60) as second:
        assert second is first and second.actors(1) and first.loads == 1
    assert actor_pools.release_pools() == 1
    with actor_pools.shared_pool("k", Handle, 1, name="rm", idle_s=60) as third:
        assert third is not first
    actor_pools.release_pools()


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_an_idle_pool_is_released_but_never_while_a_stage_holds_it():
    actor_pools.release_pools()
    with actor_pools.shared_pool("idle", Handle, 1, name="rm", idle_s=0.0) as pool:
        pool.actors(1)
        time.sleep(2.5)  # the reaper looks every second: it must leave a pool in use alone
        assert "idle" in actor_pools._POOLS and pool.actors(1)
    assert wait_until(lambda: "idle" not in actor_pools._POOLS)  # released once nobody uses it
    assert pool.actors(1) and pool.loads == 2  # its actor was dropped: using it again made a new one


def test_while_a_running_pools_actor_finds_no_room_unused_shared_pools_are_released(monkeypatch):
    """The reaper makes room for a running pool's actors that have not started; a pool in use stays."""
    actor_pools.release_pools()
    checked = []

    def full(needs):  # as make_room when the pools' actors ask for more than Ray has
        checked.append(needs)
        actor_pools._release_unused(reason="test: Ray is full")
        return False

    monkeypatch.setattr(actor_pools, "make_room", full)
    with actor_pools.shared_pool("busy", Handle, 1, name="in use", idle_s=3600) as busy:
        busy.actors(1)
        waiting = actor_pools.ActorPool(Handle, 1, name="sampling src", needs={"CPU": 1.0})
        with actor_pools.in_use(waiting):
            (actor,) = waiting.actors(1)  # not started yet: no call has finished
            with actor_pools.shared_pool("idle", Handle, 1, name="idle", idle_s=3600) as idle:
                idle.actors(1)
            assert wait_until(lambda: "idle" not in actor_pools._POOLS)  # released for it, long before 3600 s
            assert "busy" in actor_pools._POOLS  # a pool a stage is using is never taken away
            waiting.worked(actor)
            assert waiting.starting == 0
            seen = len(checked)
            time.sleep(1.5)
            assert len(checked) == seen  # started: the reaper no longer makes room for it
    actor_pools.release_pools()


def test_release_pools_leaves_a_pool_in_use_until_its_stage_is_done():
    actor_pools.release_pools()
    with actor_pools.shared_pool("rm", Handle, 1, name="rm", idle_s=3600) as pool:
        pool.actors(1)
        assert actor_pools.release_pools() == 1 and "rm" not in actor_pools._POOLS
        assert pool.actors(1) and pool.loads == 1  # still working for the stage that holds it
    assert pool.starting == 0 and pool.actors(1) and pool.loads == 2  # released when the stage let go


def test_make_room_without_ray_has_nothing_to_free():
    assert actor_pools.make_room({"CPU": 64.0}) is True


def test_no_ray_is_started_to_release_actors():
    import ray

    pool = actor_pools.ActorPool(Handle, 1)
    pool.actors(1)
    pool.release()
    assert not ray.is_initialized()
