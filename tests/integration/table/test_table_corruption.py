"""A corrupted table segment never crashes a process (issue point 7).

Each test corrupts one header field (or one directory entry) of a small published table
by writing into the segment's bytes, then attaches it in a forked child and, if attach
accepts it, calls every worker/server operation on it. A SIGSEGV shows up as the child's
negative exit code instead of killing pytest. A test passes when attach refuses with a
ValueError that names the bad field, or when attach accepts a harmless corruption (a
uniform table's uniform_length set to 0, num_nodes raised) and every later call works.

The field offsets below are those of adapm_header_t in src/table_layout.h. They are all
before node_counters, so fields added after node_counters do not move them;
test_field_offsets_match_the_header checks them against a live table."""
import mmap
import multiprocessing
import os
import struct
import time

import numpy as np
import pytest

from adapm.table import _table
from adapm.table.shared_table import SharedTable, segment_name

pytestmark = pytest.mark.timeout(60)

# name: (byte offset in adapm_header_t, struct format). Of the fields after node_counters
# only the region offset fresh_offset is listed (test_field_offsets_match_the_header
# checks every offset here against the compiled header).
HEADER_FIELDS = {
    "magic": (0, "<Q"),
    "layout_version": (8, "<I"),
    "dtype": (12, "<I"),
    "num_keys": (16, "<Q"),
    "uniform_length": (24, "<Q"),
    "node": (32, "<I"),
    "num_nodes": (36, "<I"),
    "num_workers": (40, "<I"),
    "directory_offset": (48, "<Q"),
    "workers_offset": (56, "<Q"),
    "arena_offset": (64, "<Q"),
    "arena_capacity": (72, "<Q"),
    "total_bytes": (80, "<Q"),
    "rings_offset": (120, "<Q"),
    # after node_counters (648), cluster_token (8) and failed_reason (512): an offset too
    "fresh_offset": (1168, "<Q"),
}

NUM_KEYS = 100
LENGTH = 4
WORKERS = 2
CHILD_TIMEOUT = 30.0
U64 = 2**64


def _path(name):
    return "/dev/shm" + name


def read_field(name, field):
    offset, fmt = HEADER_FIELDS[field]
    with open(_path(name), "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def write_field(name, field, value):
    offset, fmt = HEADER_FIELDS[field]
    value %= 2 ** (8 * struct.calcsize(fmt))  # wrap like a C store of that width
    with open(_path(name), "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
        struct.pack_into(fmt, m, offset, value)


@pytest.fixture
def table_factory(make_table):
    """A table whose values are 0, 1, 2, ... in key order, so a read shows any mixup."""

    def make(value_length=LENGTH, dtype="float32", num_nodes=1, node=0, num_keys=NUM_KEYS):
        total = int(np.sum(np.broadcast_to(value_length, (num_keys,))))
        return make_table(num_keys=num_keys, value_length=value_length, dtype=dtype,
                          workers=WORKERS, values=np.arange(total, dtype=dtype), node=node,
                          num_nodes=num_nodes)

    return make


# ---------------------------------------------------------------------------
# The child: attach, then use the view as a worker and its server would.

def _exercise(view, say):
    """Every operation a worker or a node server runs on an attached view."""
    view.lock_timeout_ns = 200_000_000  # a garbage odd seq word must not stall the test
    n = int(view.num_keys)
    keys = np.arange(min(n, 4096), dtype=np.uint64)
    if n > keys.shape[0]:
        keys = np.append(keys, np.uint64(n - 1))  # the last key the header claims
    say("first_invalid_key")
    assert view.first_invalid_key(keys) == -1
    say("total_length")
    total = int(view.total_length(keys))
    say("lengths_of")
    view.lengths_of(keys, np.empty(keys.shape[0], dtype=np.uint64))
    say("pull")
    out = np.zeros(total, dtype=view.dtype)
    misses = np.empty(keys.shape[0], dtype=np.uint64)
    nmiss = view.pull(keys, out, misses)
    say("update")
    view.update(keys, np.ones(total, dtype=view.dtype), misses, True)
    say("pull after update")
    out2 = np.zeros(total, dtype=view.dtype)
    view.pull(keys, out2, misses)
    say("counters")
    view.counters()
    for w in range(view.num_workers):
        say(f"counter_add/get worker {w}")
        view.counter_add(w, 0, 1)
        view.counter_get(w, 0)
        say(f"intent_append/take worker {w}")
        view.intent_append(w, 1, 2, np.arange(3, dtype=np.uint64))
        view.intent_take(w)
    say("intents_queued")
    view.intents_queued()
    say("node counters, heartbeat, failed")
    view.node_counter_add(0, 1)
    view.node_counter_get(0)
    view.heartbeat_age()
    view.failed  # noqa: B018
    (view.node, view.num_nodes, view.cluster_id, view.total_bytes)  # noqa: B018
    say("owned_keys, key_lengths")
    view.owned_keys()
    view.key_lengths()
    say("_directory_array")
    view._directory_array().copy()
    say("_arena_array")
    view._arena_array().sum()
    return {"num_keys": n, "misses": int(nmiss), "values": out[:NUM_KEYS * LENGTH].tolist()}


def _child(name, conn):
    def say(step):
        conn.send(("step", step))

    say("attach")
    try:
        table = SharedTable.attach(name)
    except ValueError as e:
        conn.send(("refused", str(e)))
        return
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("attach raised", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("accepted", _exercise(table.view, say)))
    except BaseException as e:  # noqa: BLE001
        conn.send(("call raised", f"{type(e).__name__}: {e}"))
    finally:
        table.close()


def probe(name, target=_child):
    """Run `target(name, conn)` in a forked child. Returns (outcome, detail, steps,
    exitcode); outcome "crashed" when the child died without reporting one."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(name, send))
    proc.start()
    send.close()
    steps, outcome, detail = [], "crashed", None
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        while recv.poll(max(0.0, deadline - time.monotonic())):
            try:
                kind, what = recv.recv()
            except EOFError:
                break
            if kind == "step":
                steps.append(what)
            else:
                outcome, detail = kind, what
    finally:
        recv.close()
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
            outcome = "hung"
    return outcome, detail, steps, proc.exitcode


def _describe(outcome, detail, steps, exitcode):
    where = steps[-1] if steps else "start"
    return f"{outcome} (exit code {exitcode}) during {where!r}: {detail}"


# ---------------------------------------------------------------------------

def test_field_offsets_match_the_header(table_factory):
    """The offsets this file writes to are those of the compiled header."""
    table = table_factory(dtype="float64", num_nodes=3, node=2)
    view, name = table.view, table.name
    size = os.stat(_path(name)).st_size
    sizes = _table.layout_sizes(NUM_KEYS, WORKERS, view.arena_capacity, 8)
    expect = dict(sizes, layout_version=None, magic=None, dtype=1, num_keys=NUM_KEYS,
                  uniform_length=LENGTH, node=2, num_nodes=3, num_workers=WORKERS,
                  arena_capacity=NUM_KEYS * LENGTH)
    for field, value in expect.items():
        if value is not None:
            assert read_field(name, field) == value, field
    assert read_field(name, "total_bytes") == size == view.total_bytes
    assert read_field(name, "magic") == 0x31764D5041414441
    assert read_field(name, "layout_version") >= 2
    outcome, detail, steps, code = probe(name)
    assert outcome == "accepted", _describe(outcome, detail, steps, code)


# (field, label, corrupted value from the original value and the segment's size)
HEADER_CASES = [
    ("magic", "zero", lambda v, s: 0),
    ("magic", "one_bit", lambda v, s: v ^ 1),
    ("layout_version", "zero", lambda v, s: 0),
    ("layout_version", "older", lambda v, s: v - 1),
    ("layout_version", "newer", lambda v, s: v + 1),
    ("layout_version", "max", lambda v, s: 2**32 - 1),
    ("dtype", "flipped", lambda v, s: 1 - v),
    ("dtype", "two", lambda v, s: 2),
    ("dtype", "max", lambda v, s: 2**32 - 1),
    ("num_keys", "zero", lambda v, s: 0),
    ("num_keys", "plus_one", lambda v, s: v + 1),  # may be harmless: directory padding
    ("num_keys", "double", lambda v, s: 2 * v),
    ("num_keys", "fills_segment", lambda v, s: (s - 4096) // 24),
    ("num_keys", "past_segment", lambda v, s: s // 24 + 1),
    ("num_keys", "2^59", lambda v, s: 2**59),  # 24 * num_keys wraps around
    ("num_keys", "max", lambda v, s: U64 - 1),
    ("uniform_length", "zero", lambda v, s: 0),  # harmless: lengths read per key
    ("uniform_length", "one", lambda v, s: 1),
    ("uniform_length", "plus_one", lambda v, s: v + 1),
    ("uniform_length", "2^32", lambda v, s: 2**32),
    ("uniform_length", "2^62", lambda v, s: 2**62),  # n * length wraps around
    ("uniform_length", "max", lambda v, s: U64 - 1),
    ("node", "num_nodes", lambda v, s: 1),
    ("node", "max", lambda v, s: 2**32 - 1),
    ("num_nodes", "zero", lambda v, s: 0),
    ("num_nodes", "two", lambda v, s: 2),  # harmless: node 0 < 2
    ("num_nodes", "max", lambda v, s: 2**32 - 1),
    ("num_workers", "zero", lambda v, s: 0),
    ("num_workers", "plus_one", lambda v, s: v + 1),
    ("num_workers", "2^16", lambda v, s: 2**16),
    ("num_workers", "max", lambda v, s: 2**32 - 1),
    ("directory_offset", "zero", lambda v, s: 0),
    ("directory_offset", "misaligned", lambda v, s: v + 1),
    ("directory_offset", "one_entry_on", lambda v, s: v + 24),
    ("directory_offset", "end_of_segment", lambda v, s: s),
    ("directory_offset", "max", lambda v, s: U64 - 1),
    ("workers_offset", "zero", lambda v, s: 0),
    ("workers_offset", "misaligned", lambda v, s: v + 8),
    ("workers_offset", "overlaps_directory", lambda v, s: v - 64),
    ("workers_offset", "end_of_segment", lambda v, s: s),
    ("workers_offset", "2^63", lambda v, s: 2**63),
    ("rings_offset", "zero", lambda v, s: 0),
    ("rings_offset", "misaligned", lambda v, s: v + 8),
    ("rings_offset", "overlaps_workers", lambda v, s: v - 512),
    ("rings_offset", "end_of_segment", lambda v, s: s),
    ("rings_offset", "2^63", lambda v, s: 2**63),
    ("fresh_offset", "zero", lambda v, s: 0),
    ("fresh_offset", "misaligned", lambda v, s: v + 4),
    ("fresh_offset", "overlaps_rings", lambda v, s: v - 4096),
    ("fresh_offset", "past_segment", lambda v, s: s + 4096),
    ("fresh_offset", "max", lambda v, s: U64 - 64),
    ("arena_offset", "zero", lambda v, s: 0),
    ("arena_offset", "misaligned", lambda v, s: v + 4),
    ("arena_offset", "overlaps_rings", lambda v, s: v - 4096),
    ("arena_offset", "end_of_segment", lambda v, s: s - 8),
    ("arena_offset", "past_segment", lambda v, s: s + 4096),
    ("arena_offset", "max", lambda v, s: U64 - 64),
    ("arena_capacity", "zero", lambda v, s: 0),
    ("arena_capacity", "plus_one", lambda v, s: v + 1),
    ("arena_capacity", "double", lambda v, s: 2 * v),
    ("arena_capacity", "2^62", lambda v, s: 2**62),  # capacity * itemsize wraps around
    ("arena_capacity", "max", lambda v, s: U64 - 1),
    ("total_bytes", "zero", lambda v, s: 0),
    ("total_bytes", "minus_one", lambda v, s: v - 1),
    ("total_bytes", "plus_page", lambda v, s: v + 4096),
    ("total_bytes", "max", lambda v, s: U64 - 1),
]


@pytest.mark.parametrize("field,label,corrupt", HEADER_CASES,
                         ids=[f"{f}-{label}" for f, label, _ in HEADER_CASES])
def test_a_corrupt_header_field_is_refused_or_harmless(table_factory, field, label, corrupt):
    table = table_factory()
    size = os.stat(_path(table.name)).st_size
    original = read_field(table.name, field)
    bad = corrupt(original, size)
    write_field(table.name, field, bad)
    outcome, detail, steps, code = probe(table.name)
    said = _describe(outcome, detail, steps, code)
    if outcome == "refused":
        assert field in detail, f"the error does not name {field}: {said}"
        assert "AdaPM table" in detail, said
    else:
        assert outcome == "accepted", f"{field} = {bad}: {said}"
        assert code == 0, said
        # accepted only where harmless: the values still read back as they were
        assert detail["values"] == list(range(NUM_KEYS * LENGTH)), said


@pytest.mark.parametrize("shape", [
    dict(num_keys=0), dict(num_workers=0), dict(num_workers=2**16 + 1),
    dict(node=1, num_nodes=1), dict(num_nodes=0), dict(num_nodes=2**16),
    dict(value_length=2**32), dict(arena_capacity=2**62),
], ids=lambda shape: ",".join(f"{k}={v}" for k, v in shape.items()))
def test_create_refuses_a_shape_that_attach_would_refuse(shape):
    args = dict(num_keys=10, value_length=2, dtype="float32", num_workers=1)
    args.update(shape)
    name = segment_name(f"shape{os.getpid()}", 0)
    try:
        with pytest.raises(ValueError):
            SharedTable.create(name, **args).close()
        assert not os.path.exists(_path(name))
    finally:
        if os.path.exists(_path(name)):
            os.unlink(_path(name))


def test_a_segment_shorter_than_its_header_says_is_refused(table_factory):
    table = table_factory()
    size = os.stat(_path(table.name)).st_size
    os.truncate(_path(table.name), size - 4096)
    outcome, detail, steps, code = probe(table.name)
    assert outcome == "refused" and "total_bytes" in detail, \
        _describe(outcome, detail, steps, code)


def test_a_segment_with_only_a_header_is_refused(table_factory):
    table = table_factory()
    os.truncate(_path(table.name), 4096)
    outcome, detail, steps, code = probe(table.name)
    assert outcome == "refused", _describe(outcome, detail, steps, code)


# ---------------------------------------------------------------------------
# Corrupt directory entries: attach cannot check every key cheaply (it samples 65), so
# the kernels must not trust a key's offset and length. (entry field, label, value from
# (original, arena capacity), table's value_length: uniform or per key)

ENTRY_KEYS = 1000  # enough keys that attach's sample of entries misses BAD_KEY
BAD_KEY = 7
CAPACITY = ENTRY_KEYS * LENGTH
PER_KEY = np.full(ENTRY_KEYS, LENGTH)
ENTRY_CASES = [
    ("offset", "capacity", lambda v, c: c, LENGTH),
    ("offset", "straddles_end", lambda v, c: c - 1, LENGTH),
    ("offset", "2^63", lambda v, c: 2**63, LENGTH),
    ("offset", "per_key_2^63", lambda v, c: 2**63, PER_KEY),
    ("length", "per_key_past_arena", lambda v, c: c, PER_KEY),
    ("length", "per_key_other_slots", lambda v, c: 2 * LENGTH, PER_KEY),
    # an offset near 2**64: the kernels' bounds check must not wrap around
    ("offset", "wraps", lambda v, c: U64 - 2, LENGTH),
    # a uniform table lays buffers out by its uniform length: an entry claiming another
    # length is a miss, and every other key keeps its place in the buffer
    ("length", "uniform_past_arena", lambda v, c: c, LENGTH),
    ("length", "uniform_other_slots", lambda v, c: 2 * LENGTH, LENGTH),
]


def _entry_child(name, conn):
    """Pull and push every key; report the misses and what the good keys read."""
    conn.send(("step", "attach"))
    try:
        table = SharedTable.attach(name)
    except ValueError as e:  # attach's sample found the entry: refusing crashes nothing
        conn.send(("refused", str(e)))
        return
    view = table.view
    view.lock_timeout_ns = 200_000_000
    try:
        keys = np.arange(ENTRY_KEYS, dtype=np.uint64)
        lengths = np.empty(ENTRY_KEYS, dtype=np.uint64)
        view.lengths_of(keys, lengths)
        total = int(view.total_length(keys))
        misses = np.empty(ENTRY_KEYS, dtype=np.uint64)
        conn.send(("step", "pull"))
        out = np.zeros(total, dtype=view.dtype)
        pull_misses = misses[:view.pull(keys, out, misses)].tolist()
        conn.send(("step", "update"))
        push_misses = misses[:view.update(keys, np.ones(total, view.dtype), misses,
                                          True)].tolist()
        conn.send(("step", "pull after update"))
        after = np.zeros(total, dtype=view.dtype)
        view.pull(keys, after, misses)
        starts = np.cumsum(lengths) - lengths
        good = [k for k in range(ENTRY_KEYS) if k != BAD_KEY]
        read = {k: out[starts[k]:starts[k] + LENGTH].tolist() for k in good}
        read_after = {k: after[starts[k]:starts[k] + LENGTH].tolist() for k in good}
        conn.send(("done", (pull_misses, push_misses, read, read_after)))
    finally:
        table.close()


@pytest.mark.parametrize("field,label,corrupt,value_length", [
    c if isinstance(c, type(pytest.param())) else pytest.param(*c, id=c[1])
    for c in ENTRY_CASES])
def test_a_corrupt_directory_entry_crashes_nothing(table_factory, field, label, corrupt,
                                                   value_length):
    table = table_factory(value_length=value_length, num_keys=ENTRY_KEYS)
    entry = table.view._directory_array()[BAD_KEY:BAD_KEY + 1]
    entry[field] = corrupt(int(entry[field][0]), CAPACITY)
    outcome, detail, steps, code = probe(table.name, _entry_child)
    said = _describe(outcome, detail, steps, code)
    if outcome == "refused":
        assert f"key {BAD_KEY}" in detail, said
        return
    assert outcome == "done" and code == 0, said
    pull_misses, push_misses, read, read_after = detail
    expect = {k: list(range(k * LENGTH, (k + 1) * LENGTH)) for k in read}
    assert read == expect, "a good key read a wrong value"
    if label.endswith("other_slots"):
        return  # a slot inside the arena, over other keys' slots: wrong, but no crash
    # a slot outside the arena is never used: the key is a miss, the others are intact
    assert pull_misses == push_misses == [BAD_KEY], f"misses {pull_misses}, {push_misses}"
    assert read_after == {k: [x + 1 for x in v] for k, v in expect.items()}, \
        "a good key lost its update or got another's"
