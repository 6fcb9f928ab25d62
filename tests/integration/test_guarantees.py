"""DESIGN.md §7 guarantees 1-3 under adversarial interleavings: a node server stalled
(SIGSTOP) right after it acknowledged, workers that alone write their keys while every
node replicates and relocates them, and `set` on replicated keys in every mode."""
import os
import signal
import time

import numpy as np
import pytest

import adapm
from adapm.common.config import MODES, RELOCATING_MODES
from adapm.common.process import sibling_named
from adapm.table.shared_table import REPLICA

pytestmark = pytest.mark.timeout(150)

FOREVER = 10**9  # an intent window that never ends within a test


def server_pid(node):
    """The pid of this cluster's node server `node` (a sibling of the calling worker)."""
    return sibling_named(f"adapm-node{node}")


def wait_for(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.002)


def states(w, keys):
    out = np.empty(len(keys), dtype=np.uint8)
    w._view.states_of(np.asarray(keys, dtype=np.uint64), out)
    return out


# -- guarantee 1: acknowledged means applied at the owner -----------------------------

TRIALS = 3
KEYS_PER_TRIAL = 4


def stalled_replica_holder(w):
    """3 nodes x 1 worker. Keys homed on node 2 are relocated to node 1 and replicated
    on node 2; node 0 (whose location cache still names node 2, the home) pushes them,
    then stops node 2's server the moment the push is acknowledged and tells node 1
    through a flag key. Node 1, the owner, must hold the push: an acknowledgement from
    node 2's replica would leave it in node 2's unflushed delta."""
    flag = 1  # home node 1, nobody intends it: always owned by node 1
    wrong = []
    for trial in range(TRIALS):
        keys = np.array([2 + 3 * (trial * KEYS_PER_TRIAL + i) for i in range(KEYS_PER_TRIAL)],
                        dtype=np.uint64)  # homed on node 2
        if w.node == 1:
            w.intent(keys, 0, FOREVER)  # the owner uses them too: node 2 gets replicas
            w.localize(keys)
        w.barrier()
        if w.node == 2:
            w.intent(keys, 0, FOREVER)
            wait_for(lambda k=keys: (states(w, k) == REPLICA).all(), what="replicas")
        w.barrier()
        if w.node == 0:
            w.push_async(keys, np.ones((len(keys), 1))).wait()
            node2 = server_pid(2)
            os.kill(node2, signal.SIGSTOP)
            try:
                w.push_async([flag], [[1.0]]).wait()
                wait_for(lambda t=trial: w.pull([flag])[0, 0] >= 2 * t + 2, what="checked")
            finally:
                os.kill(node2, signal.SIGCONT)
        if w.node == 1:
            wait_for(lambda t=trial: w.pull([flag])[0, 0] >= 2 * t + 1, what="pushed")
            got = w.pull(keys)[:, 0]
            wrong += [(trial, int(k)) for k, v in zip(keys, got) if v != 1.0]
            w.push([flag], [[1.0]])
            w.wait_sync()
        w.barrier()
    w.wait_sync()
    w.barrier()
    return wrong, w.pull(np.arange(w.num_keys))


def test_an_acknowledged_push_is_at_the_owner_even_if_a_replica_holder_stalls():
    results = adapm.run(stalled_replica_holder, nodes=3, workers_per_node=1, num_keys=60,
                        value_length=1, dtype="float64")
    want = np.zeros((60, 1))
    want[[2 + 3 * i for i in range(TRIALS * KEYS_PER_TRIAL)]] = 1.0
    want[1] = 2.0 * TRIALS
    assert results[1][0] == [], "acknowledged pushes missing at the owner"
    for _, table in results:
        np.testing.assert_array_equal(table, want)


# -- guarantee 2: read your own writes, in every mode ---------------------------------

def own_key_writer(w, steps, seed):
    """Every worker alone writes keys rank, rank + W, ...; every worker also intends and
    reads everybody's keys, so they are replicated and relocated all the time. After each
    push, the writer's own keys must read exactly what it pushed."""
    rng = np.random.default_rng(seed * 100 + w.rank)
    mine = np.arange(w.rank, w.num_keys, w.num_workers, dtype=np.uint64)
    pushed = np.zeros(mine.shape[0])
    stale = 0
    ahead = 4
    plan = [rng.choice(w.num_keys, size=6, replace=False) for _ in range(steps + ahead)]
    for clock in range(ahead):
        w.intent(plan[clock], clock)
    for clock in range(steps):
        w.intent(plan[clock + ahead], clock + ahead)
        w.pull(plan[clock])
        idx = rng.choice(mine.shape[0], size=3, replace=False)
        delta = rng.integers(1, 4, size=3).astype(np.float64)
        if clock % 4 == 0:
            w.push_async(mine[idx], delta[:, None]).wait()
        else:
            w.push(mine[idx], delta[:, None])
        pushed[idx] += delta
        if clock % 7 == 3 and w.mode in RELOCATING_MODES:
            w.localize(plan[clock][:2])
        stale += int((w.pull(mine)[:, 0] != pushed).sum())
        w.advance_clock()
    w.wait_sync()
    w.barrier()
    return stale, mine, pushed, w.pull(np.arange(w.num_keys))[:, 0]


@pytest.mark.parametrize("mode,seed", [("adaptive", 1), ("adaptive", 2), ("adaptive", 3),
                                       ("replicate_only", 1), ("relocate_only", 1),
                                       ("replicate_all", 1), ("static", 1)])
def test_read_your_own_writes_while_keys_are_replicated_and_moved(mode, seed):
    results = adapm.run(own_key_writer, args=(150, seed), nodes=3, workers_per_node=2,
                        num_keys=48, value_length=1, dtype="float64", mode=mode)
    want = np.zeros(48)
    for _, mine, pushed, _ in results:
        want[mine.astype(np.intp)] = pushed
    assert [stale for stale, *_ in results] == [0] * 6
    for *_, table in results:
        np.testing.assert_array_equal(table, want)


# -- guarantee 3: set overwrites ------------------------------------------------------

def replicate_everything_everywhere(w):
    """Every worker intends every key for good: replicas on every node that can."""
    keys = np.arange(w.num_keys, dtype=np.uint64)
    w.intent(keys, 0, FOREVER)
    for _ in range(3):
        w.wait_sync()
        time.sleep(0.02)
    w.barrier()
    return keys


def set_semantics(w):
    keys = replicate_everything_everywhere(w)
    held = int((states(w, keys) == REPLICA).sum())
    results = {}
    # every worker sets 0 where every key was initialised to 10
    w.set(keys, np.zeros((len(keys), 1)))
    w.wait_sync()
    w.barrier()
    results["all set 0"] = w.pull(keys)[:, 0].copy()
    w.barrier()  # everybody has read before the next phase writes
    # concurrent sets of the same value from every node
    w.set(keys, np.full((len(keys), 1), 7.0))
    w.wait_sync()
    w.barrier()
    results["all set 7"] = w.pull(keys)[:, 0].copy()
    w.barrier()  # everybody has read before the next phase writes
    # a set followed by pushes of every worker
    if w.rank == 0:
        w.set(keys, np.full((len(keys), 1), 5.0))
    w.wait_sync()
    w.barrier()
    w.push(keys, np.ones((len(keys), 1)))
    w.wait_sync()
    w.barrier()
    results["set 5 then pushes"] = w.pull(keys)[:, 0].copy()
    w.barrier()  # everybody has read before the next phase writes
    # one worker's pushes and sets of its own keys, applied in its order
    mine = keys[w.rank::w.num_workers]
    ones = np.ones((len(mine), 1))
    w.push(mine, ones)
    w.set(mine, 3 * ones)
    w.push(mine, 2 * ones)
    results["own: push, set 3, push 2"] = w.pull(mine)[:, 0].copy()
    w.set(mine, 4 * ones)
    results["own: set 4"] = w.pull(mine)[:, 0].copy()
    w.wait_sync()
    w.barrier()
    results["final"] = w.pull(keys)[:, 0].copy()
    return held, results


@pytest.mark.parametrize("mode", MODES)
def test_set_overwrites_in_every_mode(mode):
    results = adapm.run(set_semantics, nodes=3, workers_per_node=2, num_keys=30,
                        value_length=1, dtype="float64", mode=mode, init=("uniform", 10, 10, 0))
    workers = 6
    for _, got in results:
        np.testing.assert_array_equal(got["all set 0"], 0.0)
        np.testing.assert_array_equal(got["all set 7"], 7.0)
        np.testing.assert_array_equal(got["set 5 then pushes"], 5.0 + workers)
        np.testing.assert_array_equal(got["own: push, set 3, push 2"], 5.0)
        np.testing.assert_array_equal(got["own: set 4"], 4.0)
        np.testing.assert_array_equal(got["final"], 4.0)
    if mode in ("replicate_all", "replicate_only", "adaptive"):
        assert sum(held for held, _ in results) > 0  # the sets met replicas
