"""Clusters of several nodes on 127.0.0.1: remote access, routing, relocation."""
import numpy as np
import pytest

import adapm

pytestmark = pytest.mark.timeout(120)

D = 4


def pushes(rank, rounds, batch, num_keys, seed):
    rng = np.random.default_rng(seed + rank)
    for _ in range(rounds):
        keys = rng.integers(0, num_keys, size=batch)
        keys[: batch // 10] = keys[batch // 10: 2 * (batch // 10)]  # duplicates
        yield keys, rng.integers(-3, 4, size=(batch, D))


def push_everywhere(w, rounds, batch, seed, use_async):
    handles = []
    for keys, values in pushes(w.rank, rounds, batch, w.num_keys, seed):
        if use_async:
            handles.append(w.push_async(keys, values))
        else:
            w.push(keys, values)
    for h in handles:
        h.wait()
    w.wait_sync()
    w.barrier()
    return w.pull(np.arange(w.num_keys)), w.stats()


def expected(workers, rounds, batch, num_keys, seed):
    table = np.zeros((num_keys, D))
    for rank in range(workers):
        for keys, values in pushes(rank, rounds, batch, num_keys, seed):
            np.add.at(table, keys, values)
    return table


@pytest.mark.parametrize("use_async", [False, True])
def test_exact_sums_three_nodes_two_workers(use_async):
    num_keys, rounds, batch = 300, 40, 100
    results = adapm.run(push_everywhere, args=(rounds, batch, 5, use_async), nodes=3,
                        workers_per_node=2, num_keys=num_keys, value_length=D, mode="static")
    want = expected(6, rounds, batch, num_keys, 5)
    for table, _ in results:
        np.testing.assert_array_equal(table, want)
    for _, stats in results:
        assert stats["pushes_remote"] > 0 and stats["pulls_remote"] > 0
        assert stats["pushes_local"] + stats["pushes_remote"] == rounds * batch


def per_key_remote(w):
    keys = np.arange(w.num_keys)
    if w.rank == 0:
        w.push(keys, np.arange(int(3 * (w.num_keys // 2) + 1 * (w.num_keys - w.num_keys // 2)),
                               dtype=float))
    w.barrier()
    return w.pull(keys[::-1])


def test_per_key_lengths_across_nodes():
    lengths = np.array([1, 3] * 10)
    results = adapm.run(per_key_remote, nodes=2, num_keys=20, value_length=lengths,
                        dtype="float64")
    starts = np.cumsum(lengths) - lengths
    flat = np.arange(int(lengths.sum()), dtype=float)
    want = np.concatenate([flat[starts[k]:starts[k] + lengths[k]] for k in range(19, -1, -1)])
    for got in results:
        np.testing.assert_array_equal(got, want)


def init_check(w):
    return w.pull(np.arange(w.num_keys))


def test_init_values_do_not_depend_on_node_count():
    one = adapm.run(init_check, nodes=1, num_keys=50, value_length=3, init=("normal", 1.0, 4))
    three = adapm.run(init_check, nodes=3, num_keys=50, value_length=3, init=("normal", 1.0, 4))
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(three[0], three[2])


def mover(w, rounds, num_keys):
    """Workers push ones to every key while node by node grabs them (localize) in turn."""
    keys = np.arange(num_keys)
    ones = np.ones((num_keys, D))
    pulled = 0
    for r in range(rounds):
        if r % w.num_workers == w.rank:
            w.localize(keys[(r + 1) % 3::3])  # keys homed on another node
        w.push(keys, ones)
        pulled += int(w.pull(keys).shape[0])
    w.wait_sync()
    w.barrier()
    return w.pull(keys), w.stats(), pulled


def test_relocation_under_concurrent_pushes_loses_nothing():
    num_keys, rounds = 60, 30
    results = adapm.run(mover, args=(rounds, num_keys), nodes=3, workers_per_node=1,
                        num_keys=num_keys, value_length=D)
    total_relocations = 0
    for table, stats, pulled in results:
        np.testing.assert_array_equal(table, np.full((num_keys, D), 3 * rounds))
        assert pulled == rounds * num_keys  # every pull answered
        total_relocations += stats["relocations"]
    assert total_relocations > 0


def localize_then_local(w):
    keys = np.arange(w.node, w.num_keys, 7)  # mostly homed elsewhere
    w.localize(keys)
    before = w.stats()
    w.pull(keys)
    after = w.stats()
    w.barrier()
    return after["pulls_local"] - before["pulls_local"], after["pulls_remote"] - \
        before["pulls_remote"], len(keys)


def test_localized_keys_are_then_read_locally():
    for local, remote, n in adapm.run(localize_then_local, nodes=2, num_keys=70):
        assert (local, remote) == (n, 0)


def localize_in_static(w):
    try:
        w.localize([1])
    except ValueError as exc:
        return "refused" if "runs static" in str(exc) else str(exc)
    return "moved"


def test_static_mode_keeps_keys_at_home():
    assert adapm.run(localize_in_static, nodes=2, num_keys=4, mode="static") == ["refused"] * 2


def own_column_writer(w, rounds):
    """Each worker adds 1 to its own column of random keys while keys are relocated all
    the time; after every push it reads its column back and must see all its pushes."""
    rng = np.random.default_rng(w.rank * 7 + 1)
    mine = np.zeros(w.num_keys)
    stale = 0
    for _ in range(rounds):
        keys = rng.choice(w.num_keys, size=3, replace=False)
        if rng.random() < 0.5:
            w.localize(keys[:2])
        values = np.zeros((3, w.num_workers))
        values[:, w.rank] = 1
        w.push(keys, values)
        mine[keys] += 1
        stale += int((w.pull(keys)[:, w.rank] != mine[keys]).sum())
    w.barrier()
    return stale, mine, w.pull(np.arange(w.num_keys))


def test_read_your_own_writes_while_keys_move():
    results = adapm.run(own_column_writer, args=(200,), nodes=3, workers_per_node=2,
                        num_keys=12, value_length=6, mode="relocate_only", dtype="float64")
    expect = np.stack([mine for _, mine, _ in results], axis=1)
    for stale, _, final in results:
        assert stale == 0
        np.testing.assert_array_equal(final, expect)


def ordered_sets(w, rounds):
    """Two sets of one key in a row, both waited for: the later one must win."""
    wrong = 0
    for r in range(rounds):
        key = [(r * 5 + w.rank) % w.num_keys]
        if r % 3 == w.rank % 3:
            w.localize(key)
        first = w.set_async(key, [[2.0 * r]])
        second = w.set_async(key, [[2.0 * r + 1]])
        first.wait()
        second.wait()
        wrong += int(w.pull(key)[0, 0] != 2.0 * r + 1)
    w.barrier()
    return wrong


def test_one_workers_sets_apply_in_order_while_keys_move():
    results = adapm.run(ordered_sets, args=(150,), nodes=3, workers_per_node=1, num_keys=30,
                        value_length=1, mode="relocate_only", dtype="float64")
    assert results == [0, 0, 0]
