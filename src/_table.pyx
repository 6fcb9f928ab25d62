# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The node's shared-memory parameter table: mapping, layout and the batched hot path.

This module knows the byte layout of the segment (src/table_layout.h) and nothing of
the network, the manager or the cluster. Creating and unlinking the POSIX segment is
done by adapm.table; here we only map a file descriptor and work on the memory.

Concurrency (see docs/table.md): every key has a 32-bit sequence word. Writers take it
with a CAS from even to odd and release it with +2; readers copy optimistically and
retry when the word was odd or changed (a seqlock). A state or slot change by the node
server goes through the same lock, so a reader never sees a value from a stale slot.
A spin that lasts longer than the lock timeout (a writer died holding the key) makes
the call fail instead of hanging.
"""

cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.math cimport sqrt
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.stat cimport fstat, struct_stat

# Declarations (as pyzmq keeps them): the segment's layout (layout.pxd), atomics
# (atomic.pxd), the per-key seqlock (seqlock.pxd), a value slot's checks (arena.pxd) and
# the kernels' shared lock-and-fail loop (batch.pxd). This file holds the logic.
from arena cimport _fits, _length, _usable, real
from atomic cimport (
    adapm_fence_acquire, adapm_fence_release, adapm_fence_seq_cst, adapm_load_acquire_u32,
    adapm_load_acquire_u64, adapm_load_relaxed_u8, adapm_load_relaxed_u32,
    adapm_load_relaxed_u64, adapm_monotonic_ns, adapm_prefetch_read, adapm_store_release_u32,
    adapm_store_release_u64, adapm_store_relaxed_u64,
)
from batch cimport Batch, _batch, _entry_ahead, _lock_next, _slot_ahead, _unlock_held
from layout cimport (
    ADAPM_REASON_BYTES,
    adapm_header_t, adapm_entry_t, ADAPM_MAGIC, ADAPM_LAYOUT_VERSION, ADAPM_HEADER_BYTES,
    ADAPM_WORKER_BLOCK_SLOTS, ADAPM_NODE_COUNTER_SLOTS, ADAPM_ABSENT, ADAPM_OWNED,
    ADAPM_REPLICA, ADAPM_PENDING, ADAPM_RING_CONTROL_WORDS, ADAPM_RING_HEAD, ADAPM_RING_TAIL,
    ADAPM_RING_WORDS, ADAPM_RING_WRAP,
)
from seqlock cimport Spinner, _spin, _spinner

import numpy as np

cnp.import_array()

ABSENT = ADAPM_ABSENT
OWNED = ADAPM_OWNED
REPLICA = ADAPM_REPLICA
PENDING = ADAPM_PENDING
HEADER_BYTES = ADAPM_HEADER_BYTES
ENTRY_BYTES = sizeof(adapm_entry_t)
WORKER_BLOCK_SLOTS = ADAPM_WORKER_BLOCK_SLOTS
NODE_COUNTER_SLOTS = ADAPM_NODE_COUNTER_SLOTS
RING_WORDS = ADAPM_RING_WORDS
cdef enum:
    RECORD_WORDS = 3  # an intent in a ring: start, end, number of keys; then the keys
RING_RECORD_WORDS = RECORD_WORDS

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# numpy view of one directory entry; must match adapm_entry_t.
ENTRY_DTYPE = np.dtype([
    ("seq", "<u4"), ("state", "u1"), ("flags", "u1"), ("owner", "<u2"),
    ("version", "<u4"), ("length", "<u4"), ("offset", "<u8"),
])
assert ENTRY_DTYPE.itemsize == sizeof(adapm_entry_t)

cdef enum:
    _KEEP_OWNER = 0xFFFF
KEEP_OWNER = _KEEP_OWNER  # admit(): leave the location cache unchanged
# serve_sync(): which of a sync's keys get their value copied out.
cdef enum:
    _SERVE_NO_VALUE = 0          # dropped, or about to be relocated
    _SERVE_VALUE = 1             # always (a requested key)
    _SERVE_VALUE_IF_CHANGED = 2  # only when its version is not the one the replica saw
SERVE_NO_VALUE = _SERVE_NO_VALUE
SERVE_VALUE = _SERVE_VALUE
SERVE_VALUE_IF_CHANGED = _SERVE_VALUE_IF_CHANGED

# The header must hold every field of adapm_header_t, also those added at its end.
if sizeof(adapm_header_t) > ADAPM_HEADER_BYTES:
    raise ImportError(f"adapm_header_t is {sizeof(adapm_header_t)} bytes, more than "
                      f"ADAPM_HEADER_BYTES = {ADAPM_HEADER_BYTES}")

# Bounds of a table's shape: create() refuses to make a table outside them and attach()
# refuses a header outside them (a corrupt one).
MAX_WORKERS = 1 << 16       # worker blocks (and 512 KB intent rings) per node
MAX_NODES = 0xFFFF          # a key's cached owner is a uint16, 0xFFFF means KEEP_OWNER
MAX_VALUE_LENGTH = 2**32 - 1  # a directory entry's length is a uint32
_MAX_TABLE_BYTES = 2**62    # far beyond any machine; keeps every offset sum in uint64


def _align64(x):
    return (x + 63) & ~63


def layout_sizes(num_keys, num_workers, arena_capacity, itemsize):
    """Byte offsets of the regions and the total size of a segment. Computed with Python
    integers, so a nonsensical shape (a corrupt header) cannot wrap around; one whose
    segment could not exist (over 2**62 bytes) raises ValueError."""
    num_keys, num_workers = int(num_keys), int(num_workers)
    arena_capacity, itemsize = int(arena_capacity), int(itemsize)
    if min(num_keys, num_workers, arena_capacity, itemsize) < 0:
        raise ValueError("a table's sizes cannot be negative")
    directory = ADAPM_HEADER_BYTES
    workers = _align64(directory + num_keys * sizeof(adapm_entry_t))
    rings = _align64(workers + num_workers * ADAPM_WORKER_BLOCK_SLOTS * 8)
    fresh = _align64(
        rings + num_workers * (ADAPM_RING_CONTROL_WORDS + ADAPM_RING_WORDS) * 8)
    arena = _align64(fresh + num_keys * 4)
    total = arena + arena_capacity * itemsize
    if total > _MAX_TABLE_BYTES:
        raise ValueError(f"a table of {num_keys} keys, {num_workers} workers and "
                         f"{arena_capacity} arena elements would take {total} bytes")
    return {
        "directory_offset": directory,
        "workers_offset": workers,
        "rings_offset": rings,
        "fresh_offset": fresh,
        "arena_offset": arena,
        "total_bytes": total,
    }


def _dtype_name(code):
    return str(DTYPES[code]) if code < len(DTYPES) else "?"


cdef object _header_problem(const adapm_header_t* h, uint64_t size):
    """Why a published header cannot describe a table in a segment of `size` bytes (a
    message naming the first bad field), or None. O(1): besides the header it reads at
    most 65 directory entries. Every value is copied into a Python int first, so no
    check can wrap around, and nothing outside the header is read before the offsets
    and sizes that locate it are known to be right."""
    cdef const adapm_entry_t* directory
    bad = "corrupt AdaPM table header: "
    if h.layout_version != ADAPM_LAYOUT_VERSION:
        return (f"AdaPM table layout_version = {h.layout_version}, expected "
                f"{ADAPM_LAYOUT_VERSION} (a table made by another version of adapm, or a "
                "corrupt header)")
    code = h.dtype
    if code >= len(DTYPES):
        return f"{bad}dtype = {code}, expected 0 (float32) or 1 (float64)"
    itemsize = DTYPES[code].itemsize
    num_nodes, node = h.num_nodes, h.node
    if not 1 <= num_nodes <= MAX_NODES:
        return f"{bad}num_nodes = {num_nodes}, expected 1 to {MAX_NODES}"
    if node >= num_nodes:
        return f"{bad}node = {node}, expected less than num_nodes = {num_nodes}"
    total = h.total_bytes
    if total != size:
        return f"{bad}total_bytes = {total}, expected the segment's size, {size} bytes"
    num_keys = h.num_keys
    most_keys = (size - ADAPM_HEADER_BYTES) // sizeof(adapm_entry_t)
    if not 1 <= num_keys <= most_keys:
        return (f"{bad}num_keys = {num_keys}, expected 1 to {most_keys} (the directory "
                f"must fit in the segment of {size} bytes)")
    num_workers = h.num_workers
    if not 1 <= num_workers <= MAX_WORKERS:
        return f"{bad}num_workers = {num_workers}, expected 1 to {MAX_WORKERS}"
    capacity = h.arena_capacity
    if capacity > size // itemsize:
        return (f"{bad}arena_capacity = {capacity}, expected at most {size // itemsize} "
                f"elements of dtype = {code} ({_dtype_name(code)}) in a segment of {size} "
                "bytes")
    # Every region where the creator put it: no offset misaligned, overlapping or past
    # the end. (Each bound above keeps these sums far below 2**64.)
    want = layout_sizes(num_keys, num_workers, capacity, itemsize)
    if h.directory_offset != want["directory_offset"]:
        return (f"{bad}directory_offset = {h.directory_offset}, expected "
                f"{want['directory_offset']}")
    if h.workers_offset != want["workers_offset"]:
        return (f"{bad}workers_offset = {h.workers_offset}, expected "
                f"{want['workers_offset']} after a directory of num_keys = {num_keys} "
                "entries")
    if h.rings_offset != want["rings_offset"]:
        return (f"{bad}rings_offset = {h.rings_offset}, expected {want['rings_offset']} "
                f"after num_workers = {num_workers} worker blocks")
    if h.fresh_offset != want["fresh_offset"]:
        return (f"{bad}fresh_offset = {h.fresh_offset}, expected {want['fresh_offset']} "
                f"after num_workers = {num_workers} intent rings")
    if h.arena_offset != want["arena_offset"]:
        return (f"{bad}arena_offset = {h.arena_offset}, expected {want['arena_offset']} "
                f"after num_keys = {num_keys} fresh rounds")
    if want["total_bytes"] != total:
        return (f"{bad}arena_capacity = {capacity} elements of dtype = {code} "
                f"({_dtype_name(code)}) end the table at byte {want['total_bytes']}, "
                f"expected total_bytes = {total}")
    # A uniform length sizes every pull's buffer while the kernels copy each entry's
    # length, and every key has a length of at least 1: check a sample of entries (all
    # of them up to 64 keys, and always the last, which a too large num_keys misses).
    uniform = h.uniform_length
    if uniform > MAX_VALUE_LENGTH:
        return f"{bad}uniform_length = {uniform}, expected at most {MAX_VALUE_LENGTH}"
    directory = <const adapm_entry_t*>(<const char*>h + ADAPM_HEADER_BYTES)
    for key in list(range(0, num_keys, max(1, num_keys // 64))) + [num_keys - 1]:
        length = directory[<uint64_t>key].length
        if length == 0 or (uniform and length != uniform):
            return (f"{bad}uniform_length = {uniform} and num_keys = {num_keys}, but key "
                    f"{key} has length {length} in the directory")
    return None


class LockTimeout(Exception):
    """A key's lock was held longer than the timeout: its writer is presumed dead."""

    def __init__(self, key):
        super().__init__(key)
        self.key = key


cdef int _check_batch(Batch b) except -1:
    """The kernels' one error path: a key whose lock timed out fails the call, naming the
    key (see batch.pxd: the keys before it were done, it and those after it untouched)."""
    if b.failed >= 0:
        raise LockTimeout(int(b.keys[b.failed]))
    return 0


# ---------------------------------------------------------------------------
# The hot path's kernels: each returns the number of misses (keys not usable here, their
# indices written to `misses`); a lock that timed out ends the batch (batch.failed), for
# the caller's _check_batch. Both walk a local copy of the batch: stores into the arena
# could alias a Batch reached through a pointer, and a local one stays in registers.

cdef int64_t _pull(Batch* batch, real* arena, real* out, uint64_t* misses, bint owned_only,
                   uint64_t uniform) noexcept nogil:
    """The read side: no lock is taken. Each value is copied optimistically and the copy
    retried when a writer held or changed the key meanwhile (a seqlock reader)."""
    cdef Batch b = batch[0]
    b.arena = <const char*>arena  # the same slots; a constant itemsize frees a register
    b.itemsize = sizeof(real)
    cdef Py_ssize_t i
    cdef int64_t nmiss = 0
    cdef uint64_t pos = 0, off, length, capacity = b.capacity
    cdef uint32_t s1, s2
    cdef uint8_t state
    cdef adapm_entry_t* e
    cdef const void* ahead
    cdef Spinner sp
    for i in range(b.n):
        ahead = _entry_ahead(&b, i)
        if ahead != NULL:
            adapm_prefetch_read(ahead)
        ahead = _slot_ahead(&b, i)
        if ahead != NULL:
            adapm_prefetch_read(ahead)
        e = &b.directory[b.keys[i]]
        length = _length(e, uniform)  # fixed at creation
        sp = _spinner(b.timeout_ns)
        while True:
            s1 = adapm_load_acquire_u32(&e.seq)
            if s1 & 1:
                if _spin(&sp):
                    batch.failed = i
                    return nmiss
                continue
            # Racing reads by design (a writer may change them): single atomic loads, so
            # that the compiler cannot re-read `off` after the bounds check.
            state = adapm_load_relaxed_u8(&e.state)
            off = adapm_load_relaxed_u64(&e.offset)
            if not _usable(state, owned_only) or length == 0 or \
                    not _fits(off, length, capacity):
                adapm_fence_acquire()
                if adapm_load_relaxed_u32(&e.seq) != s1:
                    continue
                misses[nmiss] = i
                nmiss += 1
                break
            memcpy(out + pos, arena + off, length * sizeof(real))
            adapm_fence_acquire()
            s2 = adapm_load_relaxed_u32(&e.seq)
            if s1 == s2:
                break
        pos += uniform if uniform != 0 else length
    return nmiss


cdef int64_t _update(Batch* batch, real* arena, const real* values, uint64_t* misses,
                     bint additive, bint owned_only, uint64_t uniform) noexcept nogil:
    """The write side: each usable key's value is added to or overwritten under its lock."""
    cdef Batch b = batch[0]
    b.arena = <const char*>arena  # as in _pull
    b.itemsize = sizeof(real)
    cdef uint64_t j, pos = 0, length, capacity = b.capacity
    cdef int64_t nmiss = 0
    cdef adapm_entry_t* e
    cdef real* dst
    while _lock_next(&b):
        e = b.entry
        length = _length(e, uniform)
        if _usable(e.state, owned_only) and length != 0 and _fits(e.offset, length, capacity):
            dst = arena + e.offset
            if additive:
                for j in range(length):
                    dst[j] += values[pos + j]
            else:
                memcpy(dst, values + pos, length * sizeof(real))
            e.version += 1
            _unlock_held(&b, True)
        else:
            _unlock_held(&b, False)
            misses[nmiss] = b.i
            nmiss += 1
        pos += uniform if uniform != 0 else length
    batch.failed = b.failed
    return nmiss


cdef uint64_t _serve_sync(Batch* batch, real* arena, const real* deltas,
                          const uint8_t* has_delta, const uint32_t* seen,
                          const uint8_t* wanted, uint8_t* owned, uint32_t* versions,
                          uint8_t* with_value, real* out, uint64_t uniform) noexcept nogil:
    """The owner's side of a sync round, each key under its lock: its delta (if any) is
    added, its version read, and its value copied out when `wanted` says so, all in one
    critical section, so that the version sent describes exactly the value sent. Keys
    not owned here are left alone (owned[i] = 0). Returns the elements written to out."""
    cdef Batch b = batch[0]
    b.arena = <const char*>arena  # as in _pull
    b.itemsize = sizeof(real)
    cdef uint64_t j, dpos = 0, opos = 0, length, capacity = b.capacity
    cdef uint32_t version
    cdef uint8_t want
    cdef bint changed
    cdef adapm_entry_t* e
    cdef real* value
    while _lock_next(&b):
        e = b.entry
        length = _length(e, uniform)
        changed = False
        if e.state == ADAPM_OWNED and length != 0 and _fits(e.offset, length, capacity):
            owned[b.i] = 1
            value = arena + e.offset
            if has_delta[b.i]:
                for j in range(length):
                    value[j] += deltas[dpos + j]
                e.version += 1
                changed = True
            version = e.version
            versions[b.i] = version
            want = wanted[b.i]
            if want == _SERVE_VALUE or (want == _SERVE_VALUE_IF_CHANGED and
                                       version != <uint32_t>(seen[b.i] + has_delta[b.i])):
                memcpy(out + opos, value, length * sizeof(real))
                opos += length
                with_value[b.i] = 1
            else:
                with_value[b.i] = 0
        else:
            owned[b.i] = 0
            with_value[b.i] = 0
        _unlock_held(&b, changed)
        if has_delta[b.i]:
            dpos += e.length
    batch.failed = b.failed
    return opos


# ---------------------------------------------------------------------------
# Fused sparse optimizers (adapm.optim): a key's value is [row | state], and one step
# per distinct key is taken in place under the key's lock.

cdef enum:
    _OPT_SGD = 0
    _OPT_ADAGRAD = 1
    _OPT_ROWWISE_ADAGRAD = 2
    _OPT_ADAM = 3
OPTIMIZER_KINDS = (_OPT_SGD, _OPT_ADAGRAD, _OPT_ROWWISE_ADAGRAD, _OPT_ADAM)


cdef struct OptStep:
    int kind
    uint64_t dim
    double lr, eps, weight_decay, beta1, beta2, step_size


cdef inline uint64_t _state_length(int kind, uint64_t dim) noexcept nogil:
    if kind == _OPT_SGD:
        return 0
    if kind == _OPT_ROWWISE_ADAGRAD:
        return 1
    if kind == _OPT_ADAM:
        return 2 * dim
    return dim


cdef inline void _optimizer_step(real* w, real* g, const OptStep* p) noexcept nogil:
    """One step on the value w = [row | state] with the summed gradient g (changed: the
    weight decay is added to it), in the arithmetic of torch.optim."""
    cdef uint64_t j, dim = p.dim
    cdef real* s
    cdef real* m
    cdef real* v
    cdef double mean, denom
    if p.weight_decay != 0.0:
        for j in range(dim):
            g[j] = g[j] + <real>(p.weight_decay * w[j])
    if p.kind == _OPT_SGD:
        for j in range(dim):
            w[j] = w[j] - <real>(p.lr * g[j])
    elif p.kind == _OPT_ADAGRAD:
        s = w + dim
        for j in range(dim):
            s[j] = s[j] + g[j] * g[j]
            if s[j] < 0:  # merged replicas' deltas may undershoot: never take a root of < 0
                s[j] = 0
            w[j] = w[j] - <real>(p.lr * g[j] / (sqrt(s[j]) + p.eps))
    elif p.kind == _OPT_ROWWISE_ADAGRAD:
        mean = 0.0
        for j in range(dim):
            mean += <double>g[j] * g[j]
        w[dim] = w[dim] + <real>(mean / dim)
        if w[dim] < 0:
            w[dim] = 0
        denom = sqrt(w[dim]) + p.eps
        for j in range(dim):
            w[j] = w[j] - <real>(p.lr * g[j] / denom)
    else:
        m = w + dim
        v = w + 2 * dim
        for j in range(dim):
            m[j] = m[j] + <real>((1.0 - p.beta1) * (g[j] - m[j]))
            v[j] = v[j] + <real>((1.0 - p.beta2) * (g[j] * g[j] - v[j]))
            if v[j] < 0:  # replicas' decays merged as deltas can take v below zero
                v[j] = 0
            w[j] = w[j] - <real>(p.step_size * m[j] / (sqrt(v[j]) + p.eps))


cdef Py_ssize_t _sum_by_key(const uint64_t* keys, const int64_t* order, Py_ssize_t n,
                            const real* grads, uint64_t dim, uint64_t* distinct,
                            real* summed) noexcept nogil:
    """Walk the keys in sorted `order`: each distinct key once into `distinct`, its
    gradients added up into `summed` (rows of dim). Returns the number of distinct keys."""
    cdef Py_ssize_t i, u = 0
    cdef uint64_t j, key
    cdef const real* g
    cdef real* row
    for i in range(n):
        key = keys[order[i]]
        g = grads + <uint64_t>order[i] * dim
        if u == 0 or distinct[u - 1] != key:
            distinct[u] = key
            memcpy(summed + <uint64_t>u * dim, g, dim * sizeof(real))
            u += 1
        else:
            row = summed + <uint64_t>(u - 1) * dim
            for j in range(dim):
                row[j] = row[j] + g[j]
    return u


cdef int64_t _apply_steps(Batch* batch, real* arena, real* summed, const OptStep* p,
                          uint64_t* misses, bint owned_only, uint64_t uniform) noexcept nogil:
    """One step for each key of the batch (distinct) that is usable here; the others are
    misses (indices into the batch), their summed gradient left as it was."""
    cdef Batch b = batch[0]
    b.arena = <const char*>arena  # as in _pull
    b.itemsize = sizeof(real)
    cdef uint64_t length, capacity = b.capacity
    cdef uint64_t needed = p.dim + _state_length(p.kind, p.dim)
    cdef int64_t nmiss = 0
    cdef adapm_entry_t* e
    while _lock_next(&b):
        e = b.entry
        length = _length(e, uniform)
        if _usable(e.state, owned_only) and length == needed and \
                _fits(e.offset, length, capacity):
            _optimizer_step(arena + e.offset, summed + <uint64_t>b.i * p.dim, p)
            e.version += 1
            _unlock_held(&b, True)
        else:
            _unlock_held(&b, False)
            misses[nmiss] = b.i
            nmiss += 1
    batch.failed = b.failed
    return nmiss


cdef class TableView:
    """A mapping of one node's table segment, shared by the server and its workers."""

    cdef char* base
    cdef uint64_t size
    cdef adapm_header_t* header
    cdef adapm_entry_t* directory
    cdef uint64_t* workers
    cdef uint64_t* rings
    cdef uint32_t* fresh
    cdef char* arena
    cdef uint64_t itemsize  # bytes per arena element
    cdef readonly object dtype
    cdef readonly uint64_t num_keys
    cdef readonly uint64_t uniform_length
    cdef readonly uint32_t num_workers
    cdef readonly uint64_t arena_capacity
    cdef public uint64_t lock_timeout_ns

    def __cinit__(self):
        self.base = NULL
        self.lock_timeout_ns = 10_000_000_000

    # -- mapping -----------------------------------------------------------------

    cdef _map(self, int fd, uint64_t size):
        cdef void* p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError("mmap of the parameter table failed")
        self.base = <char*>p
        self.size = size
        self.header = <adapm_header_t*>p

    cdef _bind_regions(self):
        cdef adapm_header_t* h = self.header
        self.directory = <adapm_entry_t*>(self.base + h.directory_offset)
        self.workers = <uint64_t*>(self.base + h.workers_offset)
        self.rings = <uint64_t*>(self.base + h.rings_offset)
        self.fresh = <uint32_t*>(self.base + h.fresh_offset)
        self.arena = self.base + h.arena_offset
        self.dtype = DTYPES[h.dtype]
        self.itemsize = self.dtype.itemsize
        self.num_keys = h.num_keys
        self.uniform_length = h.uniform_length
        self.num_workers = h.num_workers
        self.arena_capacity = h.arena_capacity

    @staticmethod
    def create(int fd, uint64_t num_keys, uint64_t uniform_length, dtype,
               uint32_t node, uint32_t num_nodes, uint32_t num_workers,
               uint64_t arena_capacity, bytes cluster_id):
        """Map a freshly sized segment and write its header. The directory is left zeroed
        (every key ABSENT); adapm.table's creator fills it before publish()."""
        dtype = np.dtype(dtype)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be float32 or float64, not {dtype}")
        # The bounds attach() checks: never make a table that cannot be attached.
        if num_keys < 1:
            raise ValueError("a table needs at least one key")
        if not 1 <= num_workers <= MAX_WORKERS:
            raise ValueError(f"num_workers = {num_workers}, expected 1 to {MAX_WORKERS}")
        if not 1 <= num_nodes <= MAX_NODES or node >= num_nodes:
            raise ValueError(f"node {node} of num_nodes = {num_nodes}: expected "
                             f"node < num_nodes <= {MAX_NODES}")
        if uniform_length > MAX_VALUE_LENGTH:
            raise ValueError(f"uniform_length = {uniform_length}, expected at most "
                             f"{MAX_VALUE_LENGTH}")
        sizes = layout_sizes(num_keys, num_workers, arena_capacity, dtype.itemsize)
        cdef TableView view = TableView()
        view._map(fd, sizes["total_bytes"])
        cdef adapm_header_t* h = view.header
        h.layout_version = ADAPM_LAYOUT_VERSION
        h.dtype = DTYPES.index(dtype)
        h.num_keys = num_keys
        h.uniform_length = uniform_length
        h.node = node
        h.num_nodes = num_nodes
        h.num_workers = num_workers
        h.directory_offset = sizes["directory_offset"]
        h.workers_offset = sizes["workers_offset"]
        h.rings_offset = sizes["rings_offset"]
        h.fresh_offset = sizes["fresh_offset"]
        h.arena_offset = sizes["arena_offset"]
        h.arena_capacity = arena_capacity
        h.total_bytes = sizes["total_bytes"]
        cid = cluster_id[:16].ljust(16, b"\0")
        for i in range(16):
            h.cluster_id[i] = cid[i]
        h.heartbeat_ns = adapm_monotonic_ns()
        view._bind_regions()
        return view

    def publish(self):
        """Make the segment attachable: the magic is written last, with release order."""
        adapm_fence_release()
        adapm_store_relaxed_u64(&self.header.magic, ADAPM_MAGIC)

    @staticmethod
    def attach(int fd):
        """Map an existing segment and check its header."""
        cdef struct_stat st
        if fstat(fd, &st) != 0:
            raise OSError("fstat of the parameter table failed")
        if <uint64_t>st.st_size < ADAPM_HEADER_BYTES:
            raise ValueError("shared-memory segment too small to be an AdaPM table")
        cdef TableView view = TableView()
        view._map(fd, st.st_size)
        cdef adapm_header_t* h = view.header
        cdef uint64_t magic = adapm_load_relaxed_u64(&h.magic)
        if magic != ADAPM_MAGIC:
            view.close()
            raise ValueError(f"shared-memory segment is not a (published) AdaPM table: "
                             f"magic = {magic:#x}, expected {ADAPM_MAGIC:#x}")
        adapm_fence_acquire()
        # Nothing past the header is touched before every offset and size checks out:
        # a corrupt header raises here instead of crashing a later call (docs/table.md).
        problem = _header_problem(h, st.st_size)
        if problem is not None:
            view.close()
            raise ValueError(problem)
        view._bind_regions()
        return view

    def close(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    def __dealloc__(self):
        self.close()

    @property
    def closed(self):
        return self.base == NULL

    cdef inline _check_open(self):
        if self.base == NULL:
            raise ValueError("table is closed")

    cdef inline Batch _batch_of(self, cnp.ndarray keys, bint prefetch_values):
        """A kernel's walk over `keys` (contiguous uint64, validated by the caller; see
        batch.pxd). prefetch_values: the kernel touches the keys' current value slots."""
        return _batch(self.directory, <const uint64_t*>cnp.PyArray_DATA(keys),
                      keys.shape[0], self.lock_timeout_ns,
                      self.arena if prefetch_values else NULL, self.itemsize,
                      self.arena_capacity)

    # -- header ------------------------------------------------------------------

    @property
    def node(self):
        self._check_open()
        return self.header.node

    @property
    def num_nodes(self):
        self._check_open()
        return self.header.num_nodes

    @property
    def cluster_id(self):
        self._check_open()
        return bytes(self.header.cluster_id[:16]).rstrip(b"\0")

    @property
    def total_bytes(self):
        self._check_open()
        return self.header.total_bytes

    def heartbeat(self):
        """Server: note that it is alive (workers read the age)."""
        self._check_open()
        adapm_store_relaxed_u64(&self.header.heartbeat_ns, adapm_monotonic_ns())

    def heartbeat_age(self):
        """Seconds since the server's last heartbeat."""
        self._check_open()
        cdef uint64_t now = adapm_monotonic_ns()
        cdef uint64_t beat = adapm_load_relaxed_u64(&self.header.heartbeat_ns)
        return (now - beat) / 1e9 if now > beat else 0.0

    def mark_failed(self, uint32_t code=1, uint32_t detail=0, reason=""):
        """Tell every process of the node that the cluster failed (first failure wins),
        and why (`reason`: text naming the node, worker and keys involved)."""
        self._check_open()
        cdef bytes text = reason.encode("utf-8", "replace")[:ADAPM_REASON_BYTES - 1]
        cdef Py_ssize_t i
        if adapm_load_acquire_u32(&self.header.failed) == 0:
            self.header.failed_detail = detail
            for i in range(len(text)):
                self.header.failed_reason[i] = text[i]
            self.header.failed_reason[len(text)] = 0
            adapm_store_release_u32(&self.header.failed, code)

    @property
    def failed_reason(self):
        """The text mark_failed was given ('' when none; read after `failed`)."""
        self._check_open()
        if adapm_load_acquire_u32(&self.header.failed) == 0:
            return ""
        cdef bytes raw = bytes((<char*>self.header.failed_reason)[:ADAPM_REASON_BYTES])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def cluster_token(self):
        """The cluster's message token (0 until the cluster has formed)."""
        self._check_open()
        return adapm_load_acquire_u64(&self.header.cluster_token)

    def set_cluster_token(self, uint64_t token):
        self._check_open()
        adapm_store_release_u64(&self.header.cluster_token, token)

    @property
    def failed_detail(self):
        self._check_open()
        return self.header.failed_detail

    @property
    def failed(self):
        self._check_open()
        return adapm_load_acquire_u32(&self.header.failed)

    # -- counters ----------------------------------------------------------------

    def counter_add(self, uint32_t worker, uint32_t slot, uint64_t amount):
        """Add to one of a worker's counters. Each block has a single writer (its
        worker), so a relaxed load and store suffice and no lock is taken."""
        if self.base == NULL or worker >= self.num_workers or slot >= ADAPM_WORKER_BLOCK_SLOTS:
            raise IndexError("no such worker counter")
        cdef uint64_t* c = self.workers + worker * ADAPM_WORKER_BLOCK_SLOTS + slot
        adapm_store_relaxed_u64(c, adapm_load_relaxed_u64(c) + amount)

    def counter_set(self, uint32_t worker, uint32_t slot, uint64_t value):
        if self.base == NULL or worker >= self.num_workers or slot >= ADAPM_WORKER_BLOCK_SLOTS:
            raise IndexError("no such worker counter")
        adapm_store_relaxed_u64(self.workers + worker * ADAPM_WORKER_BLOCK_SLOTS + slot, value)

    def counter_get(self, uint32_t worker, uint32_t slot):
        if self.base == NULL or worker >= self.num_workers or slot >= ADAPM_WORKER_BLOCK_SLOTS:
            raise IndexError("no such worker counter")
        return adapm_load_relaxed_u64(self.workers + worker * ADAPM_WORKER_BLOCK_SLOTS + slot)

    # -- intent rings: a worker hands intents to its node server without a message ------

    cdef inline uint64_t* _ring(self, uint32_t worker) noexcept nogil:
        return self.rings + <uint64_t>worker * (ADAPM_RING_CONTROL_WORDS + ADAPM_RING_WORDS)

    def intent_append(self, uint32_t worker, int64_t start, int64_t end,
                      const uint64_t[::1] keys):
        """Append one intent to `worker`'s ring; only that worker may call this (one
        producer). Returns (appended, server): appended is False when the record does
        not fit now (the caller sends it as a message instead); server is what the server
        said it does (set_server_idle): 0 awake, 1 asleep (wake it with a message), 2 in
        a short poll (wake it for an intent that is due soon)."""
        self._check_open()
        if worker >= self.num_workers:
            raise IndexError(f"no worker {worker} on this node")
        cdef uint64_t n = keys.shape[0]
        cdef uint64_t need = RECORD_WORDS + n
        cdef uint64_t* ring = self._ring(worker)
        cdef uint64_t* data = ring + ADAPM_RING_CONTROL_WORDS
        cdef uint64_t head, tail, pos, skip, at
        cdef bint fits = False
        cdef uint64_t server = 0
        if need > ADAPM_RING_WORDS:
            return False, 0
        with nogil:
            head = adapm_load_relaxed_u64(ring + ADAPM_RING_HEAD)
            tail = adapm_load_acquire_u64(ring + ADAPM_RING_TAIL)  # the server is done
            pos = head % ADAPM_RING_WORDS                         # with what it freed
            skip = ADAPM_RING_WORDS - pos if pos + need > ADAPM_RING_WORDS else 0
            if head + skip + need - tail <= ADAPM_RING_WORDS:
                fits = True
                if skip:  # records never wrap: the rest of the ring is skipped
                    data[pos] = ADAPM_RING_WRAP
                at = (head + skip) % ADAPM_RING_WORDS
                data[at] = <uint64_t>start
                data[at + 1] = <uint64_t>end
                data[at + 2] = n
                if n:
                    memcpy(data + at + RECORD_WORDS, &keys[0], n * 8)
                adapm_store_release_u64(ring + ADAPM_RING_HEAD, head + skip + need)
                # Pairs with set_server_idle: either the server sees this record before
                # it sleeps, or this load sees that it sleeps.
                adapm_fence_seq_cst()
                server = adapm_load_relaxed_u64(&self.header.server_idle)
        return fits, server

    def intent_take(self, uint32_t worker):
        """Every intent queued in `worker`'s ring, oldest first, as (start, end, keys);
        only the node server may call this (one consumer). A record that cannot be valid
        (a corrupted ring) drops everything queued and raises ValueError."""
        self._check_open()
        if worker >= self.num_workers:
            raise IndexError(f"no worker {worker} on this node")
        cdef uint64_t* ring = self._ring(worker)
        cdef uint64_t* data = ring + ADAPM_RING_CONTROL_WORDS
        cdef uint64_t tail = adapm_load_relaxed_u64(ring + ADAPM_RING_TAIL)
        cdef uint64_t head = adapm_load_acquire_u64(ring + ADAPM_RING_HEAD)
        cdef uint64_t pos, n
        cdef cnp.ndarray keys
        out = []
        if head - tail > ADAPM_RING_WORDS:
            return self._ring_corrupt(ring, head, worker, "head and tail")
        while tail < head:
            pos = tail % ADAPM_RING_WORDS
            if data[pos] == ADAPM_RING_WRAP:
                tail += ADAPM_RING_WORDS - pos
                continue
            if pos + RECORD_WORDS > ADAPM_RING_WORDS:
                return self._ring_corrupt(ring, head, worker, "record header")
            n = data[pos + 2]
            if n > ADAPM_RING_WORDS - pos - RECORD_WORDS or \
                    tail + RECORD_WORDS + n > head:
                return self._ring_corrupt(ring, head, worker, "record length")
            keys = np.empty(n, dtype=np.uint64)
            if n:
                memcpy(cnp.PyArray_DATA(keys), data + pos + RECORD_WORDS, n * 8)
            out.append((<int64_t>data[pos], <int64_t>data[pos + 1], keys))
            tail += RECORD_WORDS + n
        if tail != head:
            return self._ring_corrupt(ring, head, worker, "wrap marker")
        adapm_store_release_u64(ring + ADAPM_RING_TAIL, tail)
        return out

    cdef _ring_corrupt(self, uint64_t* ring, uint64_t head, uint32_t worker, what):
        adapm_store_release_u64(ring + ADAPM_RING_TAIL, head)
        raise ValueError(f"intent ring of worker {worker}: corrupt {what}; queued intents "
                         "dropped")

    def intents_queued(self):
        """Whether any worker's ring holds an intent the server has not taken."""
        self._check_open()
        cdef uint32_t w
        cdef uint64_t* ring
        for w in range(self.num_workers):
            ring = self._ring(w)
            if adapm_load_acquire_u64(ring + ADAPM_RING_HEAD) != \
                    adapm_load_relaxed_u64(ring + ADAPM_RING_TAIL):
                return True
        return False

    def set_server_idle(self, uint64_t state):
        """The server says it is awake (0), sleeps (1: a worker appending an intent wakes
        it) or polls briefly (2: a worker wakes it for an intent due soon). Before it
        blocks, it looks at intents_queued() after this."""
        self._check_open()
        adapm_store_relaxed_u64(&self.header.server_idle, state)
        adapm_fence_seq_cst()

    def counters(self):
        """A copy of every worker's counters, shape (num_workers, WORKER_BLOCK_SLOTS)."""
        self._check_open()
        out = np.empty((self.num_workers, ADAPM_WORKER_BLOCK_SLOTS), dtype=np.uint64)
        cdef uint64_t[:, ::1] o = out
        cdef uint32_t w, s
        for w in range(self.num_workers):
            for s in range(ADAPM_WORKER_BLOCK_SLOTS):
                o[w, s] = adapm_load_relaxed_u64(self.workers + w * ADAPM_WORKER_BLOCK_SLOTS + s)
        return out

    def node_counter_add(self, uint32_t slot, uint64_t amount):
        """Node-level counters; written by the node server only."""
        if self.base == NULL or slot >= ADAPM_NODE_COUNTER_SLOTS:
            raise IndexError("no such node counter")
        cdef uint64_t* c = &self.header.node_counters[slot]
        adapm_store_relaxed_u64(c, adapm_load_relaxed_u64(c) + amount)

    def node_counter_set(self, uint32_t slot, uint64_t value):
        """A node-level figure that is a value, not a count (the node server only)."""
        if self.base == NULL or slot >= ADAPM_NODE_COUNTER_SLOTS:
            raise IndexError("no such node counter")
        adapm_store_relaxed_u64(&self.header.node_counters[slot], value)

    def node_counter_get(self, uint32_t slot):
        if self.base == NULL or slot >= ADAPM_NODE_COUNTER_SLOTS:
            raise IndexError("no such node counter")
        return adapm_load_relaxed_u64(&self.header.node_counters[slot])

    # -- raw views, for adapm.table alone ----------------------------------------

    def _directory_array(self):
        """Structured numpy view of the whole directory (no copy), outside the seqlocks:
        for adapm.table's creator before publish(), and for tests that inspect memory.
        Everything else goes through the kernels."""
        self._check_open()
        cdef uint8_t[::1] raw = <uint8_t[:self.num_keys * sizeof(adapm_entry_t)]> <uint8_t*>self.directory
        return np.asarray(raw).view(ENTRY_DTYPE)

    def _arena_array(self):
        """Flat numpy view of the value arena (no copy); see _directory_array."""
        self._check_open()
        cdef uint64_t nbytes = self.arena_capacity * self.dtype.itemsize
        if nbytes == 0:
            return np.empty(0, dtype=self.dtype)
        cdef uint8_t[::1] raw = <uint8_t[:nbytes]> <uint8_t*>self.arena
        return np.asarray(raw).view(self.dtype)

    # -- batched hot path ----------------------------------------------------------

    def first_invalid_key(self, cnp.ndarray keys):
        """Index of the first key >= num_keys, or -1. `keys`: contiguous uint64."""
        self._check_open()
        cdef const uint64_t* k = <const uint64_t*>cnp.PyArray_DATA(keys)
        cdef Py_ssize_t i, n = keys.shape[0]
        cdef uint64_t limit = self.num_keys
        cdef Py_ssize_t bad = -1
        with nogil:
            for i in range(n):
                if k[i] >= limit:
                    bad = i
                    break
        return bad

    def lengths_of(self, cnp.ndarray keys, cnp.ndarray out):
        """Fill `out` (uint64) with each key's value length; returns their sum."""
        self._check_open()
        cdef const uint64_t* k = <const uint64_t*>cnp.PyArray_DATA(keys)
        cdef uint64_t* o = <uint64_t*>cnp.PyArray_DATA(out)
        cdef Py_ssize_t i, n = keys.shape[0]
        cdef uint64_t total = 0
        cdef uint64_t uniform = self.uniform_length
        with nogil:
            for i in range(n):  # a uniform table's buffers are laid out by its uniform length
                o[i] = uniform if uniform != 0 else self.directory[k[i]].length
                total += o[i]
        return total

    def total_length(self, cnp.ndarray keys):
        """Sum of the keys' value lengths (elements)."""
        self._check_open()
        if self.uniform_length:
            return <uint64_t>keys.shape[0] * self.uniform_length
        cdef const uint64_t* k = <const uint64_t*>cnp.PyArray_DATA(keys)
        cdef Py_ssize_t i, n = keys.shape[0]
        cdef uint64_t total = 0
        with nogil:
            for i in range(n):
                total += self.directory[k[i]].length
        return total

    def pull(self, cnp.ndarray keys, cnp.ndarray out, cnp.ndarray misses,
             bint owned_only=False):
        """Copy the values of usable keys into `out` (flat, key order). Returns the number
        of misses, whose indices into `keys` are written to `misses` (uint64, len(keys)).
        Arguments must be contiguous, validated arrays of the right dtypes. `owned_only`:
        replicas count as misses (a node server serving another node)."""
        self._check_open()
        cdef Batch b = self._batch_of(keys, True)
        cdef uint64_t* m = <uint64_t*>cnp.PyArray_DATA(misses)
        cdef int64_t r
        if self.header.dtype == 0:
            with nogil:
                r = _pull(&b, <float*>self.arena, <float*>cnp.PyArray_DATA(out), m,
                          owned_only, self.uniform_length)
        else:
            with nogil:
                r = _pull(&b, <double*>self.arena, <double*>cnp.PyArray_DATA(out), m,
                          owned_only, self.uniform_length)
        _check_batch(b)
        return r

    def update(self, cnp.ndarray keys, cnp.ndarray values, cnp.ndarray misses, bint additive,
               bint owned_only=False):
        """Add (`additive`) or write `values` (flat, key order) to the usable keys. Returns
        the number of misses, as `pull`. `owned_only`: replicas count as misses (a set
        goes to the owner; a node server serving another node)."""
        self._check_open()
        cdef Batch b = self._batch_of(keys, True)
        cdef uint64_t* m = <uint64_t*>cnp.PyArray_DATA(misses)
        cdef int64_t r
        if self.header.dtype == 0:
            with nogil:
                r = _update(&b, <float*>self.arena, <const float*>cnp.PyArray_DATA(values),
                            m, additive, owned_only, self.uniform_length)
        else:
            with nogil:
                r = _update(&b, <double*>self.arena, <const double*>cnp.PyArray_DATA(values),
                            m, additive, owned_only, self.uniform_length)
        _check_batch(b)
        return r

    # -- node server's live operations (under the keys' locks) ----------------------

    def owners_of(self, cnp.ndarray keys, cnp.ndarray out):
        """Fill `out` (uint16) with each key's cached owner (the location cache)."""
        self._check_open()
        cdef const uint64_t* k = <const uint64_t*>cnp.PyArray_DATA(keys)
        cdef uint16_t* o = <uint16_t*>cnp.PyArray_DATA(out)
        cdef Py_ssize_t i, n = keys.shape[0]
        with nogil:
            for i in range(n):
                o[i] = self.directory[k[i]].owner

    def set_owners(self, cnp.ndarray keys, cnp.ndarray owners):
        """Write each key's cached owner (`owners`: uint16, one per key) under the key's
        lock, as every change of an entry is made. Returns the number changed."""
        self._check_open()
        cdef Batch b = self._batch_of(keys, False)
        cdef const uint16_t* o = <const uint16_t*>cnp.PyArray_DATA(owners)
        cdef uint64_t count = 0
        cdef bint changed
        with nogil:
            while _lock_next(&b):
                changed = b.entry.owner != o[b.i]
                if changed:
                    b.entry.owner = o[b.i]
                    count += 1
                _unlock_held(&b, changed)
        _check_batch(b)
        return count

    def owned_keys(self):
        """The keys OWNED here, ascending (uint64): a snapshot of the states, which only
        the node server changes (a checkpoint's part is written while the node holds
        still)."""
        self._check_open()
        cdef uint64_t key, n = 0, num_keys = self.num_keys
        with nogil:
            for key in range(num_keys):
                n += self.directory[key].state == ADAPM_OWNED
        out = np.empty(n, dtype=np.uint64)
        cdef uint64_t* o = <uint64_t*>cnp.PyArray_DATA(out)
        cdef uint64_t i = 0
        with nogil:
            for key in range(num_keys):
                if i < n and self.directory[key].state == ADAPM_OWNED:
                    o[i] = key
                    i += 1
        return out[:i]

    def key_lengths(self):
        """Every key's value length, in key order (a new uint64 array)."""
        self._check_open()
        out = np.empty(self.num_keys, dtype=np.uint64)
        cdef uint64_t* o = <uint64_t*>cnp.PyArray_DATA(out)
        cdef uint64_t key
        with nogil:
            for key in range(self.num_keys):
                o[key] = self.directory[key].length
        return out

    # Slots that no key's entry points to: the node server's own (a replica's value at
    # last sync) or just released. No worker reaches them, so no lock guards them.

    def zero_slots(self, offsets, lengths):
        """Write zeros into the slots [offsets[i], offsets[i] + lengths[i])."""
        self._check_open()
        cdef const uint64_t[::1] offs = self._slots(offsets, lengths)
        cdef const uint64_t[::1] lens = np.ascontiguousarray(lengths, dtype=np.uint64)
        cdef Py_ssize_t i
        cdef uint64_t itemsize = self.itemsize
        with nogil:
            for i in range(offs.shape[0]):
                memset(self.arena + offs[i] * itemsize, 0, lens[i] * itemsize)

    def read_slots(self, offsets, lengths):
        """The values in the slots [offsets[i], offsets[i] + lengths[i]), flat, in order
        (a new array of the table's dtype)."""
        self._check_open()
        cdef const uint64_t[::1] offs = self._slots(offsets, lengths)
        cdef const uint64_t[::1] lens = np.ascontiguousarray(lengths, dtype=np.uint64)
        out = np.empty(int(np.sum(lens, dtype=np.uint64)), dtype=self.dtype)
        cdef char* o = <char*>cnp.PyArray_DATA(out)
        cdef Py_ssize_t i
        cdef uint64_t pos = 0, itemsize = self.itemsize
        with nogil:
            for i in range(offs.shape[0]):
                memcpy(o + pos * itemsize, self.arena + offs[i] * itemsize,
                       lens[i] * itemsize)
                pos += lens[i]
        return out

    cdef const uint64_t[::1] _slots(self, offsets, lengths):
        """`offsets` as a uint64 array, once every slot is known to lie in the arena."""
        offs = np.ascontiguousarray(offsets, dtype=np.uint64)
        lens = np.ascontiguousarray(lengths, dtype=np.uint64)
        if offs.shape != lens.shape or offs.ndim != 1:
            raise ValueError("offsets and lengths must be 1-D arrays of one shape")
        cdef const uint64_t[::1] o = offs
        cdef const uint64_t[::1] n = lens
        cdef Py_ssize_t i
        for i in range(o.shape[0]):
            if not _fits(o[i], n[i], self.arena_capacity):
                raise IndexError(f"slot [{o[i]}, {o[i]} + {n[i]}) outside the arena of "
                                 f"{self.arena_capacity} elements")
        return o

    def evict(self, cnp.ndarray keys, uint16_t new_owner, cnp.ndarray values,
              cnp.ndarray offsets, cnp.ndarray taken):
        """Take keys OWNED here out of the table for a relocation: copy each value into
        `values` (flat, key order, every key's length reserved), record its slot offset,
        mark it ABSENT with `new_owner` cached, and set taken[i]. Keys not OWNED here are
        left alone (taken[i] = 0). Returns the number taken."""
        self._check_open()
        cdef Batch b = self._batch_of(keys, True)
        cdef uint64_t* offs = <uint64_t*>cnp.PyArray_DATA(offsets)
        cdef uint8_t* t = <uint8_t*>cnp.PyArray_DATA(taken)
        cdef char* out = <char*>cnp.PyArray_DATA(values)
        cdef uint64_t pos = 0, itemsize = self.itemsize, count = 0
        cdef adapm_entry_t* e
        with nogil:
            while _lock_next(&b):
                e = b.entry
                if e.state == ADAPM_OWNED:
                    memcpy(out + pos * itemsize, self.arena + e.offset * itemsize,
                           e.length * itemsize)
                    offs[b.i] = e.offset
                    e.state = ADAPM_ABSENT
                    e.owner = new_owner
                    t[b.i] = 1
                    count += 1
                    _unlock_held(&b, True)
                else:
                    t[b.i] = 0
                    _unlock_held(&b, False)
                pos += e.length
        _check_batch(b)
        return count

    def admit(self, cnp.ndarray keys, cnp.ndarray values, cnp.ndarray offsets,
              uint8_t state, uint16_t owner, cnp.ndarray admitted, cnp.ndarray versions=None):
        """Install values (flat, key order) for keys that are ABSENT here, in the given
        slots, with `state` and cached `owner` (KEEP_OWNER: leave the location cache as
        it is); admitted[i] says which were. Keys already held are left alone (their slot
        offsets stay unused). `versions` (uint32): the keys' versions at their previous
        owner (a relocation); each key's version here becomes that + 1, so versions grow
        across owners and a replica's last seen version never matches by accident."""
        self._check_open()
        cdef const uint32_t* ver = NULL
        if versions is not None:
            ver = <const uint32_t*>cnp.PyArray_DATA(versions)
        # The slots written are the new ones in `offsets`: none to prefetch.
        cdef Batch b = self._batch_of(keys, False)
        cdef const uint64_t* offs = <const uint64_t*>cnp.PyArray_DATA(offsets)
        cdef uint8_t* a = <uint8_t*>cnp.PyArray_DATA(admitted)
        cdef const char* src = <const char*>cnp.PyArray_DATA(values)
        cdef uint64_t pos = 0, itemsize = self.itemsize, count = 0
        cdef adapm_entry_t* e
        with nogil:
            while _lock_next(&b):
                e = b.entry
                if e.state == ADAPM_ABSENT and offs[b.i] + e.length <= self.arena_capacity:
                    memcpy(self.arena + offs[b.i] * itemsize, src + pos * itemsize,
                           e.length * itemsize)
                    e.offset = offs[b.i]
                    e.state = state
                    if owner != _KEEP_OWNER:
                        e.owner = owner
                    if ver != NULL:
                        e.version = ver[b.i] + 1
                    else:
                        e.version += 1
                    a[b.i] = 1
                    count += 1
                    _unlock_held(&b, True)
                else:
                    a[b.i] = 0
                    _unlock_held(&b, False)
                pos += e.length
        _check_batch(b)
        return count

    # -- replicas (node server only) -----------------------------------------------

    def apply_optimizer(self, cnp.ndarray keys, cnp.ndarray order, cnp.ndarray grads,
                        cnp.ndarray params, cnp.ndarray distinct, cnp.ndarray summed,
                        cnp.ndarray misses, bint owned_only=False):
        """One optimizer step per distinct key (adapm.optim): `keys` (uint64, any order,
        repeats allowed), `order` (int64, a stable argsort of keys), `grads` (len(keys) x
        dim, the table's dtype), `params` (float64: kind, dim, lr, eps, weight_decay,
        beta1, beta2, step_size). The distinct keys go to `distinct` (uint64, len(keys)),
        their summed gradients to `summed` (len(keys) x dim); each key usable here
        (owned, or a replica unless `owned_only`) takes its step in place under its lock.
        Returns (number of distinct keys, number of misses); the misses' indices into
        `distinct` are written to `misses`, their summed gradients left in `summed`."""
        self._check_open()
        if params.shape[0] != 8 or not np.isfinite(params).all():
            raise ValueError(f"optimizer params must be 8 finite numbers, got {list(params)}")
        params = np.ascontiguousarray(params, dtype=np.float64)
        if not (params[0] in OPTIMIZER_KINDS and 1 <= params[1] <= self.uniform_length):
            raise ValueError(f"optimizer params {list(params)} do not fit a table of "
                             f"uniform value length {self.uniform_length}")
        cdef const double* pr = <const double*>cnp.PyArray_DATA(params)
        cdef OptStep step
        step.kind = <int>pr[0]
        step.dim = <uint64_t>pr[1]
        step.lr, step.eps, step.weight_decay = pr[2], pr[3], pr[4]
        step.beta1, step.beta2, step.step_size = pr[5], pr[6], pr[7]
        if pr[0] not in OPTIMIZER_KINDS or pr[1] < 1 or pr[1] != <double>step.dim or \
                step.dim + _state_length(step.kind, step.dim) != self.uniform_length:
            raise ValueError(f"optimizer params {list(params)} do not fit a table of "
                             f"uniform value length {self.uniform_length}")
        cdef Py_ssize_t n = keys.shape[0], u
        cdef const uint64_t* k = <const uint64_t*>cnp.PyArray_DATA(keys)
        cdef const int64_t* o = <const int64_t*>cnp.PyArray_DATA(order)
        cdef uint64_t* d = <uint64_t*>cnp.PyArray_DATA(distinct)
        cdef uint64_t* m = <uint64_t*>cnp.PyArray_DATA(misses)
        cdef Batch b
        cdef int64_t nmiss
        if self.header.dtype == 0:
            with nogil:
                u = _sum_by_key(k, o, n, <const float*>cnp.PyArray_DATA(grads), step.dim, d,
                                <float*>cnp.PyArray_DATA(summed))
                b = _batch(self.directory, d, u, self.lock_timeout_ns, self.arena,
                           self.itemsize, self.arena_capacity)
                nmiss = _apply_steps(&b, <float*>self.arena,
                                     <float*>cnp.PyArray_DATA(summed), &step, m, owned_only,
                                     self.uniform_length)
        else:
            with nogil:
                u = _sum_by_key(k, o, n, <const double*>cnp.PyArray_DATA(grads), step.dim,
                                d, <double*>cnp.PyArray_DATA(summed))
                b = _batch(self.directory, d, u, self.lock_timeout_ns, self.arena,
                           self.itemsize, self.arena_capacity)
                nmiss = _apply_steps(&b, <double*>self.arena,
                                     <double*>cnp.PyArray_DATA(summed), &step, m, owned_only,
                                     self.uniform_length)
        _check_batch(b)
        return u, nmiss

    def serve_sync(self, cnp.ndarray keys, cnp.ndarray deltas, cnp.ndarray has_delta,
                   cnp.ndarray seen, cnp.ndarray wanted, cnp.ndarray owned,
                   cnp.ndarray versions, cnp.ndarray with_value, cnp.ndarray out):
        """Owner side of a sync round, one call for a message's keys: for each key owned
        here, add its delta (`has_delta` uint8; `deltas` flat, of those keys only, in key
        order), read its version into `versions` (uint32) and copy its value into `out`
        (flat, key order) when `wanted` (uint8) is SERVE_VALUE, or SERVE_VALUE_IF_CHANGED
        and the version is not `seen` (uint32) + its delta; with_value[i] says which
        were. owned[i] = 0 for keys not owned here (left alone). Returns the elements
        written to `out`."""
        self._check_open()
        cdef Batch b = self._batch_of(keys, True)
        cdef const uint8_t* hd = <const uint8_t*>cnp.PyArray_DATA(has_delta)
        cdef const uint32_t* sn = <const uint32_t*>cnp.PyArray_DATA(seen)
        cdef const uint8_t* wt = <const uint8_t*>cnp.PyArray_DATA(wanted)
        cdef uint8_t* ow = <uint8_t*>cnp.PyArray_DATA(owned)
        cdef uint32_t* vs = <uint32_t*>cnp.PyArray_DATA(versions)
        cdef uint8_t* wv = <uint8_t*>cnp.PyArray_DATA(with_value)
        cdef uint64_t r
        if self.header.dtype == 0:
            with nogil:
                r = _serve_sync(&b, <float*>self.arena,
                                <const float*>cnp.PyArray_DATA(deltas), hd, sn, wt, ow, vs,
                                wv, <float*>cnp.PyArray_DATA(out), self.uniform_length)
        else:
            with nogil:
                r = _serve_sync(&b, <double*>self.arena,
                                <const double*>cnp.PyArray_DATA(deltas), hd, sn, wt, ow, vs,
                                wv, <double*>cnp.PyArray_DATA(out), self.uniform_length)
        _check_batch(b)
        return r

    def replica_deltas(self, cnp.ndarray keys, cnp.ndarray synced, cnp.ndarray out):
        """For each replica key: out = value - synced, then synced = value = synced +
        out (the owner's sum, which may differ from the value by a rounding), under the
        key's lock (so no update slips between the two). `synced`: element offsets of the
        keys' "value at last sync" slots. Keys that are not REPLICA give zeros."""
        self._check_open()
        if self.header.dtype == 0:
            _deltas(self, <float*>self.arena, keys, synced, <float*>cnp.PyArray_DATA(out))
        else:
            _deltas(self, <double*>self.arena, keys, synced, <double*>cnp.PyArray_DATA(out))

    def replica_refresh(self, cnp.ndarray keys, cnp.ndarray synced, cnp.ndarray owner_values):
        """For each key that is REPLICA or PENDING here: value = owner_value + (value -
        synced) (keeping local updates made since the last delta was taken), synced =
        owner_value, state = REPLICA. Returns the number refreshed."""
        self._check_open()
        if self.header.dtype == 0:
            return _refresh(self, <float*>self.arena, keys, synced,
                            <float*>cnp.PyArray_DATA(owner_values))
        return _refresh(self, <double*>self.arena, keys, synced,
                        <double*>cnp.PyArray_DATA(owner_values))

    def replica_overwrite(self, cnp.ndarray keys, cnp.ndarray synced, cnp.ndarray values):
        """A local worker's set of keys held here as REPLICA or PENDING: value = synced =
        the set value, under the key's lock, so the pending delta (updates made here
        before the set) is discarded, not sent on top of the set. Other keys are left
        alone. The set itself goes to the owner. Returns the count."""
        self._check_open()
        if self.header.dtype == 0:
            return _overwrite(self, <float*>self.arena, keys, synced,
                              <const float*>cnp.PyArray_DATA(values))
        return _overwrite(self, <double*>self.arena, keys, synced,
                          <const double*>cnp.PyArray_DATA(values))

    def release(self, cnp.ndarray keys, uint8_t expected, cnp.ndarray offsets,
                cnp.ndarray released):
        """Keys in state `expected` become ABSENT (their slot offsets are written to
        `offsets`, released[i] = 1); others are left alone. Returns the count."""
        self._check_open()
        cdef Batch b = self._batch_of(keys, False)
        cdef uint64_t* offs = <uint64_t*>cnp.PyArray_DATA(offsets)
        cdef uint8_t* r = <uint8_t*>cnp.PyArray_DATA(released)
        cdef uint64_t count = 0
        cdef adapm_entry_t* e
        with nogil:
            while _lock_next(&b):
                e = b.entry
                if e.state == expected:
                    offs[b.i] = e.offset
                    e.state = ADAPM_ABSENT
                    r[b.i] = 1
                    count += 1
                    _unlock_held(&b, True)
                else:
                    r[b.i] = 0
                    _unlock_held(&b, False)
        _check_batch(b)
        return count

    def release_clean(self, cnp.ndarray keys, cnp.ndarray synced, cnp.ndarray offsets,
                      cnp.ndarray released):
        """Replica keys whose value equals their value at last sync (no update since the
        last delta was taken) become ABSENT: offsets written, released[i] = 1. Replicas
        with newer updates stay, so that their delta goes out with the next round."""
        self._check_open()
        if self.header.dtype == 0:
            return _release_clean(self, <float*>self.arena, keys, synced, offsets, released)
        return _release_clean(self, <double*>self.arena, keys, synced, offsets, released)

    def versions_of(self, cnp.ndarray keys, cnp.ndarray out):
        """Fill `out` (uint32) with each key's update count here (read before the values
        it describes, so that a value is never older than the version sent with it)."""
        self._check_open()
        cdef const uint64_t* k = <const uint64_t*>cnp.PyArray_DATA(keys)
        cdef uint32_t* o = <uint32_t*>cnp.PyArray_DATA(out)
        cdef Py_ssize_t i, n = keys.shape[0]
        with nogil:
            for i in range(n):
                o[i] = adapm_load_acquire_u32(&self.directory[k[i]].version)

    def fresh_rounds(self, cnp.ndarray keys, cnp.ndarray out):
        """Fill `out` (uint32) with the sync round whose answer last brought each key's
        replica here up to date (0: none). A worker that got an update acknowledged by
        the owner before round r started reads a replica stamped r or later as showing it."""
        self._check_open()
        cdef const uint64_t* k = <const uint64_t*>cnp.PyArray_DATA(keys)
        cdef uint32_t* o = <uint32_t*>cnp.PyArray_DATA(out)
        cdef Py_ssize_t i, n = keys.shape[0]
        with nogil:
            for i in range(n):
                o[i] = adapm_load_acquire_u32(&self.fresh[k[i]])

    def stamp_fresh(self, cnp.ndarray keys, uint32_t round_id):
        """Server: the replicas of `keys` are up to date as of sync round `round_id`
        (stamped after their values were written, with release order)."""
        self._check_open()
        cdef const uint64_t* k = <const uint64_t*>cnp.PyArray_DATA(keys)
        cdef Py_ssize_t i, n = keys.shape[0]
        with nogil:
            for i in range(n):
                adapm_store_release_u32(&self.fresh[k[i]], round_id)

    def states_of(self, cnp.ndarray keys, cnp.ndarray out):
        """Fill `out` (uint8) with each key's state (a racy snapshot, for decisions that
        the server alone can change)."""
        self._check_open()
        cdef const uint64_t* k = <const uint64_t*>cnp.PyArray_DATA(keys)
        cdef uint8_t* o = <uint8_t*>cnp.PyArray_DATA(out)
        cdef Py_ssize_t i, n = keys.shape[0]
        with nogil:
            for i in range(n):
                o[i] = self.directory[k[i]].state


# The node server's kernels on replicas, per element type (under the keys' locks).

cdef object _deltas(TableView view, real* arena, cnp.ndarray keys, cnp.ndarray synced,
                    real* out):
    cdef Batch b = view._batch_of(keys, True)
    cdef const uint64_t* so = <const uint64_t*>cnp.PyArray_DATA(synced)
    cdef uint64_t j, pos = 0, length
    cdef adapm_entry_t* e
    cdef real* v
    cdef real* sv
    cdef real d
    cdef bint rounded
    with nogil:
        while _lock_next(&b):
            e = b.entry
            length = e.length
            rounded = False
            if e.state == ADAPM_REPLICA:
                v = arena + e.offset
                sv = arena + so[b.i]
                for j in range(length):
                    if memcmp(v + j, sv + j, sizeof(real)) == 0:
                        out[pos + j] = 0  # unwritten: no delta (inf - inf would be NaN)
                        continue
                    # The owner will hold s + (r - s), which in floating point need not
                    # be r: the copy takes exactly the owner's sum, so that an answer
                    # "current" leaves it bit for bit equal to the owner's value.
                    d = v[j] - sv[j]
                    out[pos + j] = d
                    sv[j] = sv[j] + d
                    if memcmp(v + j, sv + j, sizeof(real)) != 0:  # bitwise (-0.0, NaN)
                        v[j] = sv[j]
                        rounded = True
            else:
                memset(out + pos, 0, length * sizeof(real))
            _unlock_held(&b, rounded)  # optimistic readers retry if a value was rounded
            pos += length
    _check_batch(b)


cdef object _refresh(TableView view, real* arena, cnp.ndarray keys, cnp.ndarray synced,
                     real* fresh):
    cdef Batch b = view._batch_of(keys, True)
    cdef const uint64_t* so = <const uint64_t*>cnp.PyArray_DATA(synced)
    cdef uint64_t j, pos = 0, length, count = 0
    cdef adapm_entry_t* e
    cdef real* v
    cdef real* sv
    with nogil:
        while _lock_next(&b):
            e = b.entry
            length = e.length
            if e.state == ADAPM_REPLICA or e.state == ADAPM_PENDING:
                v = arena + e.offset
                sv = arena + so[b.i]
                for j in range(length):
                    if memcmp(v + j, sv + j, sizeof(real)) == 0:
                        v[j] = fresh[pos + j]  # unwritten since: exactly the owner's
                    else:
                        v[j] = fresh[pos + j] + (v[j] - sv[j])
                    sv[j] = fresh[pos + j]
                e.state = ADAPM_REPLICA
                count += 1
                _unlock_held(&b, True)
            else:
                _unlock_held(&b, False)
            pos += length
    _check_batch(b)
    return count


cdef object _overwrite(TableView view, real* arena, cnp.ndarray keys, cnp.ndarray synced,
                       const real* values):
    cdef Batch b = view._batch_of(keys, True)
    cdef const uint64_t* so = <const uint64_t*>cnp.PyArray_DATA(synced)
    cdef uint64_t pos = 0, length, count = 0
    cdef adapm_entry_t* e
    cdef bint copy
    with nogil:
        while _lock_next(&b):
            e = b.entry
            length = e.length
            copy = (e.state == ADAPM_REPLICA or e.state == ADAPM_PENDING) and \
                _fits(e.offset, length, view.arena_capacity) and \
                _fits(so[b.i], length, view.arena_capacity)
            if copy:
                memcpy(arena + e.offset, values + pos, length * sizeof(real))
                memcpy(arena + so[b.i], values + pos, length * sizeof(real))
                e.version += 1
                count += 1
            _unlock_held(&b, copy)
            pos += length
    _check_batch(b)
    return count


cdef object _release_clean(TableView view, real* arena, cnp.ndarray keys, cnp.ndarray synced,
                           cnp.ndarray offsets, cnp.ndarray released):
    cdef Batch b = view._batch_of(keys, True)
    cdef const uint64_t* so = <const uint64_t*>cnp.PyArray_DATA(synced)
    cdef uint64_t* offs = <uint64_t*>cnp.PyArray_DATA(offsets)
    cdef uint8_t* r = <uint8_t*>cnp.PyArray_DATA(released)
    cdef uint64_t j, length, count = 0
    cdef adapm_entry_t* e
    cdef real* v
    cdef real* sv
    cdef bint clean
    with nogil:
        while _lock_next(&b):
            e = b.entry
            length = e.length
            r[b.i] = 0
            if e.state == ADAPM_REPLICA:
                v = arena + e.offset
                sv = arena + so[b.i]
                # bitwise: a NaN that nobody wrote since is clean, and -0.0 is no 0.0
                clean = memcmp(v, sv, length * sizeof(real)) == 0
                if clean:
                    offs[b.i] = e.offset
                    e.state = ADAPM_ABSENT
                    r[b.i] = 1
                    count += 1
            _unlock_held(&b, r[b.i] == 1)
    _check_batch(b)
    return count
