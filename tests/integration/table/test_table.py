"""The shared-memory table as a component of its own: no server, no network."""
import multiprocessing
import time

import numpy as np
import pytest
from held_lock import held_lock

from adapm.table.shared_table import (
    ABSENT,
    OWNED,
    SERVER_ASLEEP,
    SERVER_AWAKE,
    SERVER_POLLING,
    LockTimeout,
    SharedTable,
    normalise_lengths,
)

pytestmark = pytest.mark.timeout(60)


def kernel_pull(view, keys):
    keys = np.asarray(keys, dtype=np.uint64)
    out = np.empty(view.total_length(keys), dtype=view.dtype)
    misses = np.empty(len(keys), dtype=np.uint64)
    nmiss = view.pull(keys, out, misses)
    return out, misses[:nmiss]


def kernel_update(view, keys, values, additive=True):
    keys = np.asarray(keys, dtype=np.uint64)
    values = np.ascontiguousarray(values, dtype=view.dtype).reshape(-1)
    misses = np.empty(len(keys), dtype=np.uint64)
    return view.update(keys, values, misses, additive)


def test_header_round_trips_through_attach(make_table):
    table = make_table(num_keys=50, value_length=3, dtype="float64", workers=3)
    other = SharedTable.attach(table.name)
    try:
        v = other.view
        assert (v.num_keys, v.uniform_length, v.num_workers, v.dtype) == \
            (50, 3, 3, np.dtype("float64"))
        assert v.node == 0 and v.num_nodes == 1
    finally:
        other.close()


def test_attach_refuses_unpublished_and_missing(make_table):
    table = make_table(publish=False)
    with pytest.raises(ValueError, match="not a"):
        SharedTable.attach(table.name)
    with pytest.raises(FileNotFoundError):
        SharedTable.attach("/adapm-does-not-exist")


def test_pull_push_set_semantics(make_table):
    init = np.arange(400, dtype=np.float32)
    table = make_table(values=init)
    view = table.view
    out, misses = kernel_pull(view, [3, 7, 3])
    assert len(misses) == 0
    np.testing.assert_array_equal(out.reshape(3, 4), init.reshape(100, 4)[[3, 7, 3]])
    # duplicates add twice
    assert kernel_update(view, [5, 5, 6], np.ones((3, 4))) == 0
    out, _ = kernel_pull(view, [5, 6])
    np.testing.assert_array_equal(out.reshape(2, 4), init.reshape(100, 4)[[5, 6]] + [[2], [1]])
    # set: last one wins
    kernel_update(view, [9, 9], [[1] * 4, [2] * 4], additive=False)
    out, _ = kernel_pull(view, [9])
    np.testing.assert_array_equal(out, [2, 2, 2, 2])


def test_absent_keys_are_reported_as_misses_and_untouched(make_table):
    table = make_table()
    directory = table.view._directory_array()
    directory["state"][[10, 12]] = ABSENT
    out, misses = kernel_pull(table.view, [9, 10, 11, 12])
    assert misses.tolist() == [1, 3]
    assert kernel_update(table.view, [10, 11], np.ones(8)) == 1
    directory["state"][[10, 12]] = OWNED
    out, _ = kernel_pull(table.view, [10, 11])
    np.testing.assert_array_equal(out, [0] * 4 + [1] * 4)


def test_per_key_lengths(make_table):
    lengths = np.array([1, 3, 2, 5] * 5)
    total = int(lengths.sum())
    table = make_table(num_keys=20, value_length=lengths, values=np.arange(total, dtype=float))
    view = table.view
    assert view.uniform_length == 0
    starts = np.cumsum(lengths) - lengths
    out, _ = kernel_pull(view, [3, 0, 1])
    expect = np.concatenate([np.arange(starts[k], starts[k] + lengths[k]) for k in (3, 0, 1)])
    np.testing.assert_array_equal(out, expect)
    kernel_update(view, [1, 1], np.ones(6))
    out, _ = kernel_pull(view, [1])
    np.testing.assert_array_equal(out, np.arange(starts[1], starts[1] + 3) + 2)


def test_per_key_lengths_stay_per_key_even_when_equal():
    uniform, lengths = normalise_lengths(3, np.array([4, 4, 4]))
    assert uniform == 0 and lengths.tolist() == [4, 4, 4]  # pulls stay flat, as promised
    with pytest.raises(ValueError):
        normalise_lengths(3, np.array([4, 0, 4]))
    with pytest.raises(ValueError):
        normalise_lengths(3, np.array([4, 4]))


def test_float64_keeps_precision(make_table):
    table = make_table(dtype="float64")
    kernel_update(table.view, [1], np.full(4, 1e-12) + 1.0)
    out, _ = kernel_pull(table.view, [1])
    assert out[0] == 1.0 + 1e-12


def test_stuck_lock_times_out_instead_of_hanging(make_table):
    table = make_table()
    view = table.view
    view.lock_timeout_ns = 200_000_000
    with held_lock(view, 7):
        with pytest.raises(LockTimeout) as info:
            kernel_pull(view, [1, 7])
        assert info.value.key == 7
        with pytest.raises(LockTimeout):
            kernel_update(view, [7], np.ones(4))
    kernel_update(view, [7], np.ones(4))


def test_counters_are_per_worker(make_table):
    table = make_table(workers=3)
    table.view.counter_add(1, 2, 5)
    table.view.counter_add(1, 2, 2)
    table.view.counter_set(2, 0, 9)
    counters = table.view.counters()
    assert counters[1, 2] == 7 and counters[2, 0] == 9 and counters.sum() == 16
    with pytest.raises(IndexError):
        table.view.counter_add(3, 0, 1)


def _adder(name, seed, go, seconds, q):
    """Push ones to random hot keys for `seconds`; report how many rows it pushed."""
    table = SharedTable.attach(name)
    rng = np.random.default_rng(seed)
    pushed = 0
    go.wait()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            keys = rng.integers(0, 8, size=50)
            kernel_update(table.view, keys, np.ones((50, 512)))
            pushed += 50
    finally:
        table.close()
    q.put(("writer", pushed))


def _torn_reader(name, go, seconds, q):
    table = SharedTable.attach(name)
    torn = reads = 0
    go.wait()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            out, _ = kernel_pull(table.view, np.arange(8))
            rows = out.reshape(8, 512)
            torn += int((rows != rows[:, :1]).any(axis=1).sum())
            reads += 1
    finally:
        table.close()
    q.put(("torn", torn))


def test_processes_lose_no_update_and_read_no_torn_vector(make_table):
    """Two writers add ones to hot keys while two readers check every vector is uniform."""
    table = make_table(num_keys=8, value_length=512, workers=4)
    ctx = multiprocessing.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_adder, args=(table.name, s, go, 1.0, q)) for s in range(2)]
    procs += [ctx.Process(target=_torn_reader, args=(table.name, go, 1.0, q)) for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert [n for kind, n in results if kind == "torn"] == [0, 0]
    pushed = sum(n for kind, n in results if kind == "writer")
    out, _ = kernel_pull(table.view, np.arange(8))
    rows = out.reshape(8, 512)
    assert pushed > 0 and rows.sum() == pushed * 512
    assert (rows == rows[:, :1]).all()


# -- intent rings: a worker hands intents to its server through the segment -------------

def test_intent_ring_keeps_records_in_order_and_wraps(make_table):
    from adapm.table._table import RING_RECORD_WORDS, RING_WORDS
    view = make_table(workers=2).view
    assert view.intent_take(0) == [] and not view.intents_queued()
    rng = np.random.default_rng(0)
    sent, taken = [], []
    size = RING_WORDS // 7  # records that do not divide the ring: they must wrap
    for i in range(40):
        keys = rng.integers(0, 100, size=size - RING_RECORD_WORDS, dtype=np.uint64)
        appended, wake = view.intent_append(1, i, i + 2, keys)
        assert appended and not wake
        sent.append((i, i + 2, keys))
        if i % 3 == 2:  # the consumer falls behind, then catches up
            assert view.intents_queued()
            taken += view.intent_take(1)
    taken += view.intent_take(1)
    assert len(taken) == len(sent)
    for (start, end, keys), (t_start, t_end, t_keys) in zip(sent, taken):
        assert (start, end) == (t_start, t_end)
        np.testing.assert_array_equal(keys, t_keys)
    assert view.intent_take(0) == []  # worker 0's ring is separate


def test_a_full_ring_refuses_and_a_sleeping_server_asks_to_be_woken(make_table):
    from adapm.table._table import RING_WORDS
    view = make_table(workers=1).view
    big = np.zeros(RING_WORDS // 2, dtype=np.uint64)
    assert view.intent_append(0, 0, 1, big)[0]
    assert not view.intent_append(0, 1, 2, big)[0]           # no room until taken
    assert not view.intent_append(0, 0, 1, np.zeros(RING_WORDS, np.uint64))[0]  # never fits
    assert len(view.intent_take(0)) == 1
    view.set_server_idle(SERVER_ASLEEP)
    assert view.intent_append(0, 1, 2, big) == (True, SERVER_ASLEEP)  # fits; wake it
    view.set_server_idle(SERVER_AWAKE)
    # that record wrapped: the words it skipped and its own fill the ring until taken
    assert view.intent_append(0, 2, 3, np.arange(3, dtype=np.uint64)) == (False, SERVER_AWAKE)
    assert [start for start, _, _ in view.intent_take(0)] == [1]
    assert view.intent_append(0, 2, 3, np.arange(3, dtype=np.uint64)) == (True, SERVER_AWAKE)
    assert [start for start, _, _ in view.intent_take(0)] == [2]
    view.set_server_idle(SERVER_POLLING)  # the worker decides by how soon the intent is due
    assert view.intent_append(0, 4, 5, np.arange(2, dtype=np.uint64)) == (True, SERVER_POLLING)


def test_a_corrupt_ring_is_dropped_with_an_error(make_table):
    import mmap

    import posix_ipc

    from adapm.table._table import layout_sizes
    table = make_table(workers=1)
    view = table.view
    assert view.intent_append(0, 5, 6, np.arange(4, dtype=np.uint64))[0]
    shm = posix_ipc.SharedMemory(table.name)  # a second mapping, to break the record
    mapping = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    offset = layout_sizes(view.num_keys, view.num_workers, view.arena_capacity,
                          view.dtype.itemsize)["rings_offset"]
    ring = np.frombuffer(mapping, dtype=np.uint64, offset=offset, count=16 + 8)
    ring[16 + 2] = 10**9  # the record's key count, past the end of what was written
    with pytest.raises(ValueError, match="corrupt record length"):
        view.intent_take(0)
    assert view.intent_take(0) == []  # dropped, and the ring works again
    assert view.intent_append(0, 7, 8, np.arange(2, dtype=np.uint64))[0]
    (start, end, keys), = view.intent_take(0)
    assert (start, end, keys.tolist()) == (7, 8, [0, 1])
    del ring
    mapping.close()


def _intent_producer(name, rounds, q):
    table = SharedTable.attach(name)
    rng = np.random.default_rng(1)
    fallback = 0
    for i in range(rounds):
        keys = rng.integers(0, 1000, size=rng.integers(1, 3000), dtype=np.uint64)
        while not table.view.intent_append(0, i, i + 1, keys)[0]:
            fallback += 1
            time.sleep(0.0001)
    table.close()
    q.put(fallback)


def test_intent_ring_between_processes_loses_and_tears_nothing(make_table):
    table = make_table(workers=1)
    q = multiprocessing.get_context("spawn").Queue()
    rounds = 3000
    proc = multiprocessing.get_context("spawn").Process(
        target=_intent_producer, args=(table.name, rounds, q))
    proc.start()
    rng = np.random.default_rng(1)
    expected = [rng.integers(0, 1000, size=rng.integers(1, 3000), dtype=np.uint64)
                for _ in range(rounds)]
    taken = []
    deadline = time.monotonic() + 40
    while len(taken) < rounds and time.monotonic() < deadline:
        taken += table.view.intent_take(0)
    proc.join(10)
    assert q.get(timeout=5) >= 0
    assert len(taken) == rounds
    for i, (start, end, keys) in enumerate(taken):
        assert (start, end) == (i, i + 1)
        np.testing.assert_array_equal(keys, expected[i])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uniform_slot_allocator_gives_what_the_general_one_gives(seed):
    """A uniform table's allocator (its shorter path) against the general one: the same
    offsets for every call, the same top, the same arena-full errors, and a failed call
    takes no freed slot."""
    from adapm.table.shared_table import SlotAllocator
    uniform, general = SlotAllocator(400, uniform=4), SlotAllocator(400)
    rng = np.random.default_rng(seed)
    live, errors = [], 0
    for _ in range(400):
        if live and rng.random() < 0.45:
            idx = rng.choice(len(live), size=min(len(live), int(rng.integers(1, 8))),
                             replace=False)
            gone = np.array([live[i] for i in idx], dtype=np.uint64)
            live = [o for i, o in enumerate(live) if i not in set(idx.tolist())]
            lengths = np.full(gone.shape[0], 4, dtype=np.uint64)
            uniform.free(gone, lengths)
            general.free(gone, lengths)
            continue
        lengths = np.full(int(rng.integers(0, 12)), 4, dtype=np.uint64)
        try:
            got = uniform.allocate(lengths)
        except MemoryError:
            errors += 1
            with pytest.raises(MemoryError):
                general.allocate(lengths)
            general = SlotAllocator(400)  # the general path loses what it popped: start
            uniform = SlotAllocator(400, uniform=4)  # both anew
            live = []
            continue
        assert np.array_equal(got, general.allocate(lengths))
        assert uniform.top == general.top
        live += got.tolist()
    assert errors > 0
    # a failed call takes no freed slot
    alloc = SlotAllocator(8, uniform=4)
    first = alloc.allocate(np.full(2, 4, dtype=np.uint64))
    alloc.free(first[:1], np.full(1, 4, dtype=np.uint64))
    with pytest.raises(MemoryError):
        alloc.allocate(np.full(2, 4, dtype=np.uint64))
    assert alloc.allocate(np.full(1, 4, dtype=np.uint64))[0] == first[0]


def test_slot_allocator_reuses_freed_slots_and_never_overlaps_live_ones():
    from adapm.table.shared_table import SlotAllocator
    alloc = SlotAllocator(capacity=1000)
    rng = np.random.default_rng(0)
    live = {}  # offset -> length
    for _ in range(200):
        if live and rng.random() < 0.5:
            gone = rng.choice(list(live), size=min(len(live), rng.integers(1, 6)),
                              replace=False)
            alloc.free(np.array(gone, dtype=np.uint64),
                       np.array([live.pop(int(g)) for g in gone], dtype=np.uint64))
        else:
            lengths = rng.choice([2, 3, 5], size=rng.integers(1, 6)).astype(np.uint64)
            try:
                offsets = alloc.allocate(lengths)
            except MemoryError:
                continue
            live.update(zip(offsets.tolist(), lengths.tolist()))
        cells = np.zeros(1000, dtype=int)
        for off, length in live.items():
            cells[off:off + length] += 1
        assert cells.max() <= 1  # no two live slots share an element
    top = alloc.top
    freed = alloc.allocate(np.array([2], dtype=np.uint64))
    alloc.free(freed, np.array([2], dtype=np.uint64))
    again = alloc.allocate(np.array([2], dtype=np.uint64))
    assert again[0] == freed[0] and alloc.top <= top + 2  # a freed slot is taken first
    with pytest.raises(MemoryError, match="arena full"):
        alloc.allocate(np.full(1000, 5, dtype=np.uint64))


def test_the_type_stub_names_exactly_what_the_compiled_module_has():
    """adapm/_table.pyi documents the compiled module; it must not drift from it."""
    import ast
    from pathlib import Path

    from adapm.table import _table
    stub = ast.parse((Path(_table.__file__).parent / "_table.pyi").read_text())
    module_names, view_names = set(), set()
    for node in stub.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            module_names.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            module_names.add(node.target.id)
        if isinstance(node, ast.ClassDef) and node.name == "TableView":
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    view_names.add(item.name)
                elif isinstance(item, ast.AnnAssign):
                    view_names.add(item.target.id)
    public = {n for n in dir(_table) if not n.startswith("_") and n != "np"}
    assert module_names == public
    view_public = {n for n in dir(_table.TableView) if not n.startswith("_")}
    assert view_names - {"__init__"} == view_public


def test_a_set_overwrites_a_replica_and_its_value_at_last_sync(make_table):
    """replica_overwrite: the copy and its last-synced value both take the set value, so
    the pending delta (value - synced) is gone; owned and absent keys are left alone."""
    from adapm.table.shared_table import REPLICA
    table = make_table(num_keys=64, value_length=2, dtype="float64", values=np.zeros(128))
    view = table.view
    keys = np.array([1, 2], dtype=np.uint64)
    offsets = np.empty(2, np.uint64)
    released = np.zeros(2, np.uint8)
    view.release(keys, OWNED, offsets, released)  # make room: 1 and 2 become copies
    admitted = np.zeros(2, np.uint8)
    view.admit(keys, np.array([5.0, 5, 6, 6]), offsets, REPLICA, 0, admitted)
    synced = np.array([100, 102], dtype=np.uint64)  # "value at last sync" (unused keys)
    view._arena_array()[100:104] = [4.0, 4, 6, 6]    # key 1 has a pending delta of 1
    done = view.replica_overwrite(np.array([0, 1, 2], np.uint64),
                                  np.array([0, 100, 102], np.uint64),
                                  np.array([9.0, 9, 7, 7, 8, 8]))
    assert done == 2
    out, misses = kernel_pull(view, [0, 1, 2])
    assert out.tolist() == [0, 0, 7, 7, 8, 8] and misses.size == 0  # key 0 is owned
    assert view._arena_array()[100:104].tolist() == [7, 7, 8, 8]      # no delta left
    deltas = np.empty(4)
    view.replica_deltas(keys, synced, deltas)
    assert deltas.tolist() == [0, 0, 0, 0]



@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_replica_takes_the_owners_sum_when_its_delta_is_taken(make_table, dtype):
    """replica_deltas: delta = r - s goes out, and the copy and its value at last sync
    both become s + delta, exactly what the owner computes from s: r itself may differ
    from it by a rounding, and would then differ from the owner's value after a reply
    "current" (issue 17, point 4)."""
    from adapm.table.shared_table import REPLICA
    table = make_table(num_keys=64, value_length=2, dtype=dtype, values=np.zeros(128))
    view = table.view
    keys = np.array([1, 2], dtype=np.uint64)
    offsets = np.empty(2, np.uint64)
    view.release(keys, OWNED, offsets, np.zeros(2, np.uint8))
    replica = np.array([0.3, 0.7, 1e8, -0.1], dtype=dtype)
    view.admit(keys, replica, offsets, REPLICA, 0, np.zeros(2, np.uint8))
    synced_values = np.array([1e8, 0.2, 3.3, -0.0], dtype=dtype)  # key 1: r - s rounds
    view._arena_array()[100:104] = synced_values
    synced = np.array([100, 102], dtype=np.uint64)
    deltas = np.empty(4, dtype=dtype)
    view.replica_deltas(keys, synced, deltas)
    owners = synced_values + deltas  # the owner adds the delta to the value s it sent
    assert deltas.tobytes() == (replica - synced_values).tobytes()
    assert view._arena_array()[100:104].tobytes() == owners.tobytes()
    out, _ = kernel_pull(view, [1, 2])
    assert out.tobytes() == owners.tobytes()
    assert not np.array_equal(owners, replica)  # the case the kernel exists for
    view.replica_deltas(keys, synced, deltas)
    assert not deltas.any()  # nothing new: no delta, and a clean copy (release_clean)


def _replicas(view, keys, synced, delta):
    """Make `keys` (OWNED, values as installed) REPLICAs at their own slots, each with a
    value at last sync (in the slots `synced`) of value - delta."""
    from adapm.table.shared_table import REPLICA
    offsets = np.empty(len(keys), np.uint64)
    view.release(keys, OWNED, offsets, np.zeros(len(keys), np.uint8))
    arena = view._arena_array()
    values = np.concatenate([arena[o:o + 2] for o in offsets.tolist()])
    view.admit(keys, values, offsets, REPLICA, 0, np.zeros(len(keys), np.uint8))
    for o, s in zip(offsets.tolist(), synced.tolist()):
        arena[s:s + 2] = arena[o:o + 2] - delta


def _batch_kernels():
    """Each kernel that locks keys, on the batch [1, 7, 3] of a table of 16 keys of 2
    float64 (key k's value: 2k, 2k + 1): (prepare, call, key 1's state and value after
    it). `call` registers its outputs in `out` (per key: `keys`, flat: `values`),
    filled with sentinels, before it runs the kernel."""
    from adapm.table.shared_table import REPLICA

    def keys_out(out, dtype):
        out["keys"].append(np.full(3, 9, dtype))
        return out["keys"][-1]

    def values_out(out):
        out["values"].append(np.full(6, -1.0))
        return out["values"][-1]

    def update(view, keys, synced, out):
        view.update(keys, np.ones(6), np.empty(3, np.uint64), True)

    def release(view, keys, synced, out):
        view.release(keys, OWNED, keys_out(out, np.uint64), keys_out(out, np.uint8))

    def evict(view, keys, synced, out):
        view.evict(keys, 0, values_out(out), keys_out(out, np.uint64),
                   keys_out(out, np.uint8))

    def absent(view, keys, synced):
        view.release(keys, OWNED, np.empty(3, np.uint64), np.zeros(3, np.uint8))

    def admit(view, keys, synced, out):
        view.admit(keys, np.array([10.0, 10, 11, 11, 12, 12]), synced, OWNED, 0,
                   keys_out(out, np.uint8))

    def deltas(view, keys, synced, out):
        view.replica_deltas(keys, synced, values_out(out))

    def refresh(view, keys, synced, out):
        view.replica_refresh(keys, synced, np.array([20.0, 20, 21, 21, 22, 22]))

    def overwrite(view, keys, synced, out):
        view.replica_overwrite(keys, synced, np.array([30.0, 30, 31, 31, 32, 32]))

    def release_clean(view, keys, synced, out):
        view.release_clean(keys, synced, keys_out(out, np.uint64), keys_out(out, np.uint8))

    def replicas(delta):
        return lambda view, keys, synced: _replicas(view, keys, synced, delta)

    # key 1 after the call: (state, value, value at last sync)
    return {
        "update": (None, update, (OWNED, [3, 4], [24, 25])),
        "release": (None, release, (ABSENT, [2, 3], [24, 25])),
        "evict": (None, evict, (ABSENT, [2, 3], [24, 25])),
        "admit": (absent, admit, (OWNED, [10, 10], [10, 10])),  # its slot: synced[0]
        "replica_deltas": (replicas(1), deltas, (REPLICA, [2, 3], [2, 3])),
        "replica_refresh": (replicas(1), refresh, (REPLICA, [21, 21], [20, 20])),
        "replica_overwrite": (replicas(1), overwrite, (REPLICA, [30, 30], [30, 30])),
        "release_clean": (replicas(0), release_clean, (ABSENT, [2, 3], [2, 3])),
    }


@pytest.mark.parametrize("kernel", list(_batch_kernels()))
def test_a_lock_timeout_in_a_batch_names_its_key_and_leaves_the_rest(make_table, kernel):
    """The kernels' shared lock-and-fail loop (src/batch.pxd): when the lock of one key of
    a batch times out, the call raises LockTimeout naming that key; the keys before it
    were done, it and the keys after it are untouched (their outputs too), and no lock is
    left held."""
    prepare, call, key1_after = _batch_kernels()[kernel]
    table = make_table(num_keys=16, value_length=2, dtype="float64", values=np.arange(32.0))
    view = table.view
    view.lock_timeout_ns = 20_000_000
    keys = np.array([1, 7, 3], np.uint64)
    synced = np.array([24, 26, 28], np.uint64)  # the slots of keys 12 to 14, unused here
    if prepare is not None:
        prepare(view, keys, synced)
    with held_lock(view, 7):
        directory_before = view._directory_array().copy()
        arena_before = view._arena_array().copy()
        out = {"keys": [], "values": []}
        with pytest.raises(LockTimeout) as info:
            call(view, keys, synced, out)
        assert info.value.key == 7
        directory, arena = view._directory_array(), view._arena_array()
        entry = directory[1]
        offset = int(entry["offset"])
        assert (entry["state"], arena[offset:offset + 2].tolist(), arena[24:26].tolist()) == \
            key1_after
        assert entry["seq"] % 2 == 0  # unlocked after its work
        assert (directory[[3, 7]] == directory_before[[3, 7]]).all()  # 7 is still held: odd
        rest = [int(o) + j for o in directory_before["offset"][[3, 7]] for j in (0, 1)]
        rest += list(range(26, 30))  # keys 7 and 3's values at last sync
        np.testing.assert_array_equal(arena[rest], arena_before[rest])
        for per_key in out["keys"]:
            assert per_key[1:].tolist() == [9, 9]
        for flat in out["values"]:
            assert flat[2:].tolist() == [-1] * 4
    assert (view._directory_array()["seq"] % 2 == 0).all()


# -- serve_sync: the owner's side of a sync round in one call ---------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_serve_sync_applies_deltas_and_copies_the_values_the_answers_carry(make_table, dtype):
    from adapm.table.shared_table import SERVE_NO_VALUE, SERVE_VALUE, SERVE_VALUE_IF_CHANGED

    values = np.arange(6 * 2, dtype=dtype)
    table = make_table(num_keys=6, value_length=2, dtype=dtype, values=values)
    view = table.view
    released = np.zeros(1, dtype=np.uint8)
    view.release(np.array([5], dtype=np.uint64), OWNED, np.zeros(1, np.uint64), released)
    before = np.empty(6, dtype=np.uint32)
    view.versions_of(np.arange(6, dtype=np.uint64), before)
    # 0: keep, unchanged since seen, no delta -> no value; 1: keep, changed -> value;
    # 2: keep with a delta, otherwise unchanged -> no value; 3: request -> value;
    # 4: drop with a delta -> applied, no value; 5: not owned here (its delta skipped)
    keys = np.arange(6, dtype=np.uint64)
    has_delta = np.array([0, 0, 1, 0, 1, 1], dtype=np.uint8)
    deltas = np.array([10, 20, 30, 40, 50, 60], dtype=dtype)  # keys 2, 4, 5
    seen = before.copy()
    seen[1] += 7  # the replica saw another version
    wanted = np.array([SERVE_VALUE_IF_CHANGED] * 3 + [SERVE_VALUE, SERVE_NO_VALUE,
                      SERVE_VALUE], dtype=np.uint8)
    owned, with_value = np.empty(6, np.uint8), np.empty(6, np.uint8)
    versions = np.empty(6, np.uint32)
    out = np.empty(12, dtype=dtype)
    used = view.serve_sync(keys, deltas, has_delta, seen, wanted, owned, versions,
                           with_value, out)
    assert owned.tolist() == [1, 1, 1, 1, 1, 0]
    assert with_value.tolist() == [0, 1, 0, 1, 0, 0]
    assert used == 4 and out[:4].tolist() == [2, 3, 6, 7]       # keys 1 and 3
    assert (versions[:5] == before[:5] + has_delta[:5]).all()
    now = np.empty(12, dtype=dtype)
    view.pull(keys[:5], now[:10], np.empty(5, np.uint64))
    assert now[4:6].tolist() == [4 + 10, 5 + 20]                  # key 2's delta
    assert now[8:10].tolist() == [8 + 30, 9 + 40]                 # key 4's delta


# -- the node server's reads and owner changes through the table's API -------------------

def test_set_owners_writes_each_owner_under_the_keys_lock(make_table):
    table = make_table(num_keys=8)
    view = table.view
    owners = np.empty(8, np.uint16)
    assert table.set_owners(np.arange(8), np.arange(8) % 3) == 5  # keys 0, 3, 6 had 0
    view.owners_of(np.arange(8, dtype=np.uint64), owners)
    assert owners.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    seq_before = view._directory_array()["seq"].copy()
    assert table.set_owners([1, 2], 2) == 1
    seq = view._directory_array()["seq"]
    assert (seq[1], seq[2]) == (seq_before[1] + 2, seq_before[2])  # key 2 had owner 2
    view.lock_timeout_ns = 20_000_000
    with held_lock(view, 5):
        with pytest.raises(LockTimeout) as info:
            table.set_owners([4, 5, 6], 1)
        assert info.value.key == 5
    view.owners_of(np.arange(8, dtype=np.uint64), owners)
    assert owners[4:7].tolist() == [1, 2, 0]  # key 4 done, 5 and 6 untouched


def test_owned_keys_lengths_and_states_are_snapshots_of_the_directory(make_table):
    lengths = np.array([1, 3, 2, 5] * 5)
    table = make_table(num_keys=20, value_length=lengths)
    view = table.view
    assert view.owned_keys().tolist() == list(range(20))
    view.release(np.array([3, 11], np.uint64), OWNED, np.empty(2, np.uint64),
                 np.empty(2, np.uint8))
    assert view.owned_keys().tolist() == [k for k in range(20) if k not in (3, 11)]
    assert view.key_lengths().tolist() == lengths.tolist()
    assert table.lengths([3, 0]).tolist() == [5, 1]
    assert table.states([3, 4]).tolist() == [ABSENT, OWNED]


def test_server_slots_are_zeroed_and_read_within_the_arena_only(make_table):
    table = make_table(num_keys=16, value_length=2, values=np.arange(32.0))
    view = table.view
    assert view.read_slots([4, 10], [2, 1]).tolist() == [4, 5, 10]
    view.zero_slots(np.array([4], np.uint64), np.array([2], np.uint64))
    assert view.read_slots([3, 6], [2, 1]).tolist() == [3, 0, 6]
    for offsets, lengths in (([31], [2]), ([2**64 - 1], [2])):
        with pytest.raises(IndexError):
            view.read_slots(offsets, lengths)
        with pytest.raises(IndexError):
            view.zero_slots(offsets, lengths)
    assert view.read_slots(np.empty(0, np.uint64), np.empty(0, np.uint64)).shape == (0,)
