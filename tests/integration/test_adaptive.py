"""The adaptive manager at work: multi-node, multi-worker, seeded workloads."""
import time

import numpy as np
import pytest

import adapm
from adapm.common.config import MODES

pytestmark = pytest.mark.timeout(120)

D = 2
HOT = 20


def batches(rank, steps, num_keys, seed):
    """Per clock: some hot keys every worker touches, and keys of the worker's own."""
    rng = np.random.default_rng(seed + rank)
    for _ in range(steps):
        hot = rng.choice(HOT, size=3, replace=False)
        own = rng.integers(HOT, num_keys, size=8)
        yield np.concatenate([hot, own]), rng.integers(-2, 3, size=(11, D))


def training(w, steps, seed, ahead):
    plan = list(batches(w.rank, steps, w.num_keys, seed))
    for clock in range(min(ahead, steps)):
        w.intent(plan[clock][0], clock)
    for clock, (keys, values) in enumerate(plan):
        if clock + ahead < steps:
            w.intent(plan[clock + ahead][0], clock + ahead)
        w.pull(keys)
        w.push(keys, values)
        w.advance_clock()
        if clock % 10 == 0:
            time.sleep(0.002)  # let a few sync rounds pass
    w.wait_sync()
    w.barrier()
    return w.pull(np.arange(w.num_keys)), w.stats()


def expected(workers, steps, num_keys, seed):
    table = np.zeros((num_keys, D))
    for rank in range(workers):
        for keys, values in batches(rank, steps, num_keys, seed):
            np.add.at(table, keys, values)
    return table


@pytest.mark.parametrize("mode", MODES)
def test_no_lost_update_in_every_mode(mode):
    steps, num_keys = 120, 200
    results = adapm.run(training, args=(steps, 3, 3), nodes=2, workers_per_node=2,
                        num_keys=num_keys, value_length=D, mode=mode)
    want = expected(4, steps, num_keys, 3)
    for table, _ in results:
        np.testing.assert_array_equal(table, want)
    node = [results[0][1]["node"], results[2][1]["node"]]
    relocations = sum(n["relocations"] for n in node)
    replicas = sum(n["replicas_made"] for n in node)
    if mode == "adaptive":
        assert relocations > 0 and replicas > 0  # both actions happened
    if mode in ("static", "replicate_only", "replicate_all"):
        assert relocations == 0
    if mode in ("static", "relocate_only"):
        assert replicas == 0


def locality(w, steps, ahead):
    """Each worker cycles through its own key range; intents `ahead` clocks ahead."""
    block = w.num_keys // w.num_workers
    own = np.arange(w.rank * block, (w.rank + 1) * block)  # homed on every node alike
    rng = np.random.default_rng(w.rank)
    plan = [rng.choice(own, size=16, replace=False) for _ in range(steps)]
    for clock in range(ahead):
        w.intent(plan[clock], clock)
    warm = None
    for clock in range(steps):
        if clock + ahead < steps:
            w.intent(plan[clock + ahead], clock + ahead)
        if clock == steps // 4:
            warm = w.stats()
        w.pull(plan[clock])
        w.push(plan[clock], np.ones((16, D)))
        w.advance_clock()
        time.sleep(0.003)
    end = w.stats()
    w.wait_sync()
    w.barrier()
    local = (end["pulls_local"] + end["pushes_local"]) - (warm["pulls_local"] +
                                                          warm["pushes_local"])
    remote = (end["pulls_remote"] + end["pushes_remote"]) - (warm["pulls_remote"] +
                                                             warm["pushes_remote"])
    return local / (local + remote), end


def test_adaptive_makes_accesses_local_static_does_not():
    adaptive = adapm.run(locality, args=(120, 4), nodes=2, workers_per_node=2, num_keys=400,
                         value_length=D, mode="adaptive")
    static = adapm.run(locality, args=(120, 4), nodes=2, workers_per_node=2, num_keys=400,
                       value_length=D, mode="static")
    assert min(share for share, _ in adaptive) >= 0.95
    assert max(share for share, _ in static) <= 0.6  # about 1/N with 2 nodes


def owner_check(w, mode):
    """Node 1's worker alone intends keys homed on node 0."""
    keys = np.arange(0, 40, 2)  # homed on node 0
    if w.node == 1:
        w.intent(keys, 0, 10_000)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            before = w.stats()["pulls_local"]
            w.pull(keys)
            if w.stats()["pulls_local"] - before == keys.shape[0]:
                break
            time.sleep(0.01)
    w.barrier()
    return w.stats()["node"]


def test_relocate_only_moves_a_key_to_the_one_node_that_intends_it():
    nodes = adapm.run(owner_check, args=("relocate_only",), nodes=2, num_keys=40,
                      mode="relocate_only")
    assert nodes[1]["relocations"] == 20 and nodes[1]["replicas_made"] == 0


def test_replicate_only_never_moves_a_key():
    nodes = adapm.run(owner_check, args=("replicate_only",), nodes=2, num_keys=40,
                      mode="replicate_only")
    assert nodes[0]["relocations"] == nodes[1]["relocations"] == 0
    assert nodes[0]["replicas_made"] == 20  # made by the owner, node 0, for node 1


def converge(w):
    """Both nodes intend the same keys for good, so they are replicated; node 0 pushes,
    node 1 must see the push within a few sync rounds, without any barrier."""
    keys = np.arange(10)
    w.intent(keys, 0, 1_000_000)
    w.barrier()
    time.sleep(0.3)  # replicas in place
    seen_after = None
    if w.node == 0:
        w.push(keys, np.full((10, D), 5.0))
        w.barrier()
    else:
        w.barrier()
        start = time.monotonic()
        while time.monotonic() - start < 5:
            if (w.pull(keys) == 5.0).all():
                seen_after = time.monotonic() - start
                break
            time.sleep(0.001)
    stats = w.stats()
    w.barrier()
    return seen_after, stats


def test_replicas_converge_within_a_few_rounds():
    (_, s0), (seen_after, s1) = adapm.run(converge, nodes=2, num_keys=10, value_length=D)
    assert s0["node"]["replicas_made"] + s1["node"]["replicas_made"] > 0
    assert seen_after is not None and seen_after < 1.0


def own_writes(w, steps):
    rng = np.random.default_rng(w.rank)
    mine = np.zeros(w.num_keys)
    stale = 0
    for clock in range(steps):
        keys = rng.choice(w.num_keys, size=4, replace=False)
        w.intent(keys, clock, clock + 3)
        values = np.zeros((4, w.num_workers))
        values[:, w.rank] = 1
        w.push(keys, values)
        mine[keys] += 1
        stale += int((w.pull(keys)[:, w.rank] != mine[keys]).sum())
        w.advance_clock()
    w.barrier()
    return stale


def test_read_your_own_writes_with_replicas_and_relocations():
    assert adapm.run(own_writes, args=(150,), nodes=2, workers_per_node=2, num_keys=16,
                     value_length=4, dtype="float64") == [0, 0, 0, 0]


def timing(w):
    """A far-future intent does not act early; one whose window passed does nothing."""
    far = np.array([1, 3, 5])     # homed on node 1
    passed = np.array([7, 9, 11])
    if w.node == 0:
        for _ in range(5):
            w.advance_clock()
        w.intent(far, 1000, 1001)
        w.intent(passed, 2, 3)
        time.sleep(0.3)  # many sync rounds
        before = w.stats()
        w.pull(np.concatenate([far, passed]))
        after = w.stats()
        result = after["pulls_remote"] - before["pulls_remote"], after["node"]
    else:
        result = None
    w.barrier()
    return result


def test_far_future_and_passed_intents_do_not_act():
    (remote, node), _ = adapm.run(timing, nodes=2, num_keys=20)
    assert remote == 6
    assert node["relocations"] == 0 and node["replicas_made"] == 0


KEYS_MOVED = 400


def relocation_under_replica_pushes(w, rounds):
    """Both nodes intend the same keys (so both hold them, one as owner, one as a
    replica) and push to them all the time, while one worker of each node keeps pulling
    a part of them over to its node: a relocation arrives at a node whose workers are
    writing to their replica of those very keys."""
    keys = np.arange(KEYS_MOVED)
    rng = np.random.default_rng(w.rank)
    ones = np.ones((KEYS_MOVED, D))
    for step in range(rounds):
        w.intent(keys, w.clock, w.clock + 3)
        if w.local_rank == 0 and step % 2 == 1:
            w.localize(rng.choice(keys, size=KEYS_MOVED // 2, replace=False))
        else:
            for _ in range(5):
                w.push(keys, ones)
        w.advance_clock()
    w.wait_sync()
    w.barrier()
    return w.pull(keys), w.stats()


def test_no_update_is_lost_when_a_key_arrives_where_a_replica_is_being_written():
    rounds = 200
    results = adapm.run(relocation_under_replica_pushes, args=(rounds,), nodes=2,
                        workers_per_node=2, num_keys=KEYS_MOVED, value_length=D,
                        mode="adaptive")
    pushes = 5 * (2 * rounds + 2 * (rounds // 2))  # local rank 1 every step, 0 every other
    for table, _ in results:
        np.testing.assert_array_equal(table, np.full((KEYS_MOVED, D), float(pushes)))
    node = results[0][1]["node"]
    assert node["relocations"] > 0 and node["replicas_made"] > 0
