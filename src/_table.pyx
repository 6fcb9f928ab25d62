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

The source is split by concept: the kernels in kernels.pxd and optimizers.pxd (cimportable
by other Cython modules), TableView's method groups and the replica kernels in
src/table/*.pxi, included here.
"""

cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.stat cimport fstat, struct_stat

# Declarations (as pyzmq keeps them): the segment's layout (layout.pxd), atomics
# (atomic.pxd), the per-key seqlock (seqlock.pxd), a value slot's checks (arena.pxd), the
# kernels' shared lock-and-fail loop (batch.pxd), and the kernels themselves (kernels.pxd,
# optimizers.pxd), which other Cython modules may cimport too. This file and the .pxi
# files it includes (src/table/) hold the Python-facing logic.
from arena cimport _fits, real
from atomic cimport (
    adapm_fence_acquire, adapm_fence_release, adapm_fence_seq_cst, adapm_load_acquire_u32,
    adapm_load_acquire_u64, adapm_load_relaxed_u64, adapm_monotonic_ns,
    adapm_store_release_u32, adapm_store_release_u64, adapm_store_relaxed_u64,
)
from batch cimport Batch, _batch, _lock_next, _unlock_held
from kernels cimport (
    _SERVE_NO_VALUE, _SERVE_VALUE, _SERVE_VALUE_IF_CHANGED, _evict, _pull, _replica_deltas,
    _replica_refresh, _serve_sync, _update,
)
from layout cimport (
    ADAPM_REASON_BYTES,
    adapm_header_t, adapm_entry_t, ADAPM_MAGIC, ADAPM_LAYOUT_VERSION, ADAPM_HEADER_BYTES,
    ADAPM_WORKER_BLOCK_SLOTS, ADAPM_NODE_COUNTER_SLOTS, ADAPM_ABSENT, ADAPM_OWNED,
    ADAPM_REPLICA, ADAPM_PENDING, ADAPM_RING_CONTROL_WORDS, ADAPM_RING_HEAD, ADAPM_RING_TAIL,
    ADAPM_RING_WORDS, ADAPM_RING_WRAP,
)
from bags cimport BAG_MAX, BAG_MEAN, _bag_grads_by_key, _bag_mean, _bag_pool
from radix cimport RADIX, _radix_order
from optimizers cimport (
    OptStep, _OPT_ADAGRAD, _OPT_ADAM, _OPT_ROWWISE_ADAGRAD, _OPT_SGD, _apply_steps,
    _state_length, _sum_by_key,
)

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
RING_RECORD_WORDS = RECORD_WORDS

cdef enum:
    _KEEP_OWNER = 0xFFFF
KEEP_OWNER = _KEEP_OWNER  # admit(): leave the location cache unchanged
SERVE_NO_VALUE = _SERVE_NO_VALUE  # serve_sync(): see kernels.pxd
SERVE_VALUE = _SERVE_VALUE
SERVE_VALUE_IF_CHANGED = _SERVE_VALUE_IF_CHANGED
OPTIMIZER_KINDS = (_OPT_SGD, _OPT_ADAGRAD, _OPT_ROWWISE_ADAGRAD, _OPT_ADAM)

include "table/layout.pxi"
include "table/rings.pxi"


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

    def kernel_handle(self):
        """The raw addresses the node server's compiled data plane (adapm.node.data.plane)
        runs this module's kernels (kernels.pxd) on: a dict of directory, arena,
        arena_capacity, itemsize, dtype (0 float32, 1 float64), uniform_length, num_keys,
        lock_timeout_ns, fresh (the per-key rounds of stamp_fresh). Valid while this view
        is open: the plane keeps the view."""
        self._check_open()
        return {"directory": <uintptr_t>self.directory, "arena": <uintptr_t>self.arena,
                "arena_capacity": self.arena_capacity, "itemsize": self.itemsize,
                "dtype": self.header.dtype, "uniform_length": self.uniform_length,
                "num_keys": self.num_keys, "lock_timeout_ns": self.lock_timeout_ns,
                "fresh": <uintptr_t>self.fresh}

    # -- raw views, for adapm.table alone ----------------------------------------

    def _directory_array(self):
        """Structured numpy view of the whole directory (no copy), outside the seqlocks:
        for adapm.table's creator before publish(), and for tests that inspect memory.
        Everything else goes through the kernels."""
        self._check_open()
        cdef uint8_t[::1] raw = <uint8_t[:self.num_keys * sizeof(adapm_entry_t)]> <uint8_t*>self.directory
        return np.asarray(raw).view(ENTRY_DTYPE)

    def states_array(self):
        """Every key's state byte (ABSENT 0 .. PENDING), a read-only strided view of the
        directory (no copy): each read is a racy snapshot, as states_of gives, for
        decisions that the node server alone can change (its round plan)."""
        states = self._directory_array()["state"]
        states.flags.writeable = False
        return states

    def _arena_array(self):
        """Flat numpy view of the value arena (no copy); see _directory_array."""
        self._check_open()
        cdef uint64_t nbytes = self.arena_capacity * self.dtype.itemsize
        if nbytes == 0:
            return np.empty(0, dtype=self.dtype)
        cdef uint8_t[::1] raw = <uint8_t[:nbytes]> <uint8_t*>self.arena
        return np.asarray(raw).view(self.dtype)

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
        cdef const uint64_t* k = &keys[0] if n else NULL
        cdef bint fits
        cdef uint64_t server = 0
        if RECORD_WORDS + n > ADAPM_RING_WORDS:
            return False, 0
        with nogil:
            fits = _ring_append(self._ring(worker), start, end, k, n)
            if fits:
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
        return _ring_take(self._ring(worker), worker)

    def intents_queued(self):
        """Whether any worker's ring holds an intent the server has not taken."""
        self._check_open()
        cdef uint32_t w
        for w in range(self.num_workers):
            if _ring_queued(self._ring(w)):
                return True
        return False

    def set_server_idle(self, uint64_t state):
        """The server says it is awake (0), sleeps (1: a worker appending an intent wakes
        it) or polls briefly (2: a worker wakes it for an intent due soon). Before it
        blocks, it looks at intents_queued() after this."""
        self._check_open()
        adapm_store_relaxed_u64(&self.header.server_idle, state)
        adapm_fence_seq_cst()

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

    # -- fused optimizers (adapm.optim) -------------------------------------------

    def apply_optimizer(self, cnp.ndarray keys, cnp.ndarray order, cnp.ndarray grads,
                        cnp.ndarray params, cnp.ndarray distinct, cnp.ndarray summed,
                        cnp.ndarray misses, bint owned_only=False):
        """One optimizer step per distinct key (adapm.optim): `keys` (uint64, any order,
        repeats allowed, each < num_keys), `order` (int64, a stable argsort of keys, or
        None: sorted here by a radix sort, as apply_bag_gradients does), `grads` (len(keys) x
        dim, the table's dtype), `params` (float64: kind, dim, lr, eps, weight_decay,
        beta1, beta2, step_size). The distinct keys go to `distinct` (uint64, len(keys)),
        their summed gradients to `summed` (len(keys) x dim); each key usable here
        (owned, or a replica unless `owned_only`) takes its step in place under its lock.
        Returns (number of distinct keys, number of misses); the misses' indices into
        `distinct` are written to `misses`, their summed gradients left in `summed`."""
        self._check_open()
        cdef OptStep step = self._opt_step(params)
        cdef Py_ssize_t n = keys.shape[0], u
        if order is None:
            order = self._key_order(keys)
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

    cdef OptStep _opt_step(self, cnp.ndarray params) except *:
        """An APPLY's params (float64: kind, dim, lr, eps, weight_decay, beta1, beta2,
        step_size) as the kernels take them, checked against this table."""
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
        return step

    # -- embedding bags (bags.pxd: FBGEMM's TBE on this table) -----------------------

    cdef _check_bags(self, cnp.ndarray keys, cnp.ndarray bags, cnp.ndarray scale,
                     Py_ssize_t nbags, uint64_t dim):
        """The arrays of a bag kernel, checked: what the kernels index must be in range."""
        if self.header.dtype != 0 or self.uniform_length == 0:
            raise ValueError("embedding-bag kernels need a float32 table of uniform "
                             "value_length")
        if not 1 <= dim <= self.uniform_length:
            raise ValueError(f"rows of {dim} do not fit values of {self.uniform_length}")
        cdef Py_ssize_t n = keys.shape[0], i
        if keys.dtype != np.uint64 or bags.dtype != np.int64 or bags.shape[0] != n or \
                not keys.flags.c_contiguous or not bags.flags.c_contiguous:
            raise ValueError("keys (uint64) and bags (int64): contiguous, one per entry")
        if scale is not None and (scale.dtype != np.float32 or scale.shape[0] != n or
                                  not scale.flags.c_contiguous):
            raise ValueError("scale: contiguous float32, one per entry")
        cdef const uint64_t* k = <const uint64_t*>cnp.PyArray_DATA(keys)
        cdef const int64_t* bg = <const int64_t*>cnp.PyArray_DATA(bags)
        for i in range(n):
            if k[i] >= self.num_keys:
                raise IndexError(f"key {k[i]} of {self.num_keys}")
            if not 0 <= bg[i] < nbags:
                raise IndexError(f"bag {bg[i]} of {nbags}")

    def bag_pool(self, cnp.ndarray keys, cnp.ndarray bags, cnp.ndarray scale, int mode,
                 cnp.ndarray out, cnp.ndarray argmax, cnp.ndarray misses):
        """Pooled lookup straight from the table (bags.pxd's _bag_pool): the entries
        (keys, uint64; bags, int64: each entry's bag; scale, float32 or None) pooled into
        `out` (float32, bags x dim, C order; written whole) by `mode` (0 sum, 1 mean, 2
        max; argmax, int64 like out, gets each element's winning entry for max, -1 for an
        empty bag). Returns the number of misses (entries whose key is not usable here,
        their indices written to `misses`, uint64, one per entry; left out of `out`)."""
        self._check_open()
        if out.ndim != 2 or out.dtype != np.float32 or not out.flags.c_contiguous or \
                argmax.dtype != np.int64 or argmax.size != out.size or \
                not argmax.flags.c_contiguous or misses.dtype != np.uint64 or \
                misses.shape[0] < keys.shape[0] or mode not in (0, 1, 2):
            raise ValueError("bag_pool's out (float32 bags x dim), argmax (int64, its "
                             "size), misses (uint64, an entry each) and mode (0, 1, 2)")
        cdef Py_ssize_t nbags = out.shape[0]
        cdef uint64_t dim = out.shape[1]
        self._check_bags(keys, bags, scale, nbags, dim)
        cdef cnp.ndarray counts = np.zeros(nbags, dtype=np.uint32)
        cdef cnp.ndarray row = np.empty(dim, dtype=np.float32)
        out[...] = 0
        argmax[...] = -1
        cdef Batch b = self._batch_of(keys, True)
        cdef const float* sp = NULL if scale is None else \
            <const float*>cnp.PyArray_DATA(scale)
        cdef int64_t r
        with nogil:
            r = _bag_pool(&b, <const float*>self.arena,
                          <const int64_t*>cnp.PyArray_DATA(bags), sp, mode, dim,
                          self.uniform_length, <float*>cnp.PyArray_DATA(out),
                          <int64_t*>cnp.PyArray_DATA(argmax),
                          <uint32_t*>cnp.PyArray_DATA(counts),
                          <float*>cnp.PyArray_DATA(row), <uint64_t*>cnp.PyArray_DATA(misses))
            if mode == BAG_MEAN:
                _bag_mean(<float*>cnp.PyArray_DATA(out),
                          <const uint32_t*>cnp.PyArray_DATA(counts), nbags, dim)
        _check_batch(b)
        return r

    cdef cnp.ndarray _key_order(self, cnp.ndarray keys):
        """A stable argsort of keys (uint64, each < num_keys) by radix.pxd's radix sort:
        O(keys) per 11 bits of the key range, where a comparison sort is O(keys log keys)."""
        cdef Py_ssize_t n = keys.shape[0]
        cdef cnp.ndarray order = np.empty(n, dtype=np.int64)
        cdef cnp.ndarray spare = np.empty(n, dtype=np.int64)
        cdef cnp.ndarray counts = np.empty(RADIX + 1, dtype=np.intp)
        with nogil:
            _radix_order(<const uint64_t*>cnp.PyArray_DATA(keys), n, self.num_keys,
                         <int64_t*>cnp.PyArray_DATA(order), <int64_t*>cnp.PyArray_DATA(spare),
                         <Py_ssize_t*>cnp.PyArray_DATA(counts))
        return order

    def apply_bag_gradients(self, cnp.ndarray keys, cnp.ndarray order, cnp.ndarray bags,
                            cnp.ndarray scale, int mode, cnp.ndarray grad,
                            cnp.ndarray argmax, cnp.ndarray params, cnp.ndarray distinct,
                            cnp.ndarray summed, cnp.ndarray misses):
        """The backward of bag_pool fused with the optimizer (adapm.optim): the pooled
        gradient `grad` (float32, bags x dim) scattered to one summed gradient per
        distinct key (bags.pxd's _bag_grads_by_key; `order`, int64: a stable argsort of
        keys, or None: sorted here, radix.pxd's _radix_order; scale: float32 per entry or None, 1 / the bag's count for mode mean; argmax:
        bag_pool's, for mode max), then one step per distinct key usable here, in place
        under its lock (optimizers.pxd's _apply_steps). As apply_optimizer: returns
        (distinct keys, misses); `distinct` (uint64, an entry each), `summed` (float32,
        entries x dim) and `misses` (indices into distinct) as it fills them."""
        self._check_open()
        cdef OptStep step = self._opt_step(params)
        cdef Py_ssize_t n = keys.shape[0], i, u
        if grad.ndim != 2 or grad.dtype != np.float32 or not grad.flags.c_contiguous or \
                <uint64_t>grad.shape[1] != step.dim or mode not in (0, 1, 2) or \
                (mode == BAG_MAX and (argmax.dtype != np.int64 or argmax.size != grad.size
                                      or not argmax.flags.c_contiguous)) or \
                (order is not None and (order.dtype != np.int64 or order.shape[0] != n)) or \
                distinct.dtype != np.uint64 or distinct.shape[0] < n or \
                summed.dtype != np.float32 or summed.size < n * step.dim or \
                not summed.flags.c_contiguous or misses.dtype != np.uint64 or \
                misses.shape[0] < n:
            raise ValueError("apply_bag_gradients' arrays: grad (float32 bags x dim), "
                             "argmax, order, distinct, summed, misses")
        self._check_bags(keys, bags, scale, grad.shape[0], step.dim)
        cdef cnp.ndarray seen
        cdef uint8_t* sn
        cdef const int64_t* o
        if order is None:  # sorted here, by a radix sort: O(entries) a pass
            order = self._key_order(keys)
            o = <const int64_t*>cnp.PyArray_DATA(order)
        else:
            o = <const int64_t*>cnp.PyArray_DATA(order)
            seen = np.zeros(n, dtype=np.uint8)
            sn = <uint8_t*>cnp.PyArray_DATA(seen)
            for i in range(n):  # a permutation: the kernel reads entry order[i] for each i
                if not 0 <= o[i] < n or sn[o[i]]:
                    raise ValueError("order must be a permutation of the entries")
                sn[o[i]] = 1
        cdef const float* sp = NULL if scale is None else \
            <const float*>cnp.PyArray_DATA(scale)
        cdef const int64_t* ap = NULL if mode != BAG_MAX else \
            <const int64_t*>cnp.PyArray_DATA(argmax)
        cdef uint64_t* d = <uint64_t*>cnp.PyArray_DATA(distinct)
        cdef Batch b
        cdef int64_t nmiss
        with nogil:
            u = _bag_grads_by_key(<const uint64_t*>cnp.PyArray_DATA(keys), o, n,
                                  <const int64_t*>cnp.PyArray_DATA(bags), sp, mode,
                                  <const float*>cnp.PyArray_DATA(grad), ap, step.dim, d,
                                  <float*>cnp.PyArray_DATA(summed))
            b = _batch(self.directory, d, u, self.lock_timeout_ns, self.arena,
                       self.itemsize, self.arena_capacity)
            nmiss = _apply_steps(&b, <float*>self.arena, <float*>cnp.PyArray_DATA(summed),
                                 &step, <uint64_t*>cnp.PyArray_DATA(misses), False,
                                 self.uniform_length)
        _check_batch(b)
        return u, nmiss

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
        cdef uint64_t count
        with nogil:
            count = _evict(&b, self.arena, self.itemsize, new_owner,
                           <char*>cnp.PyArray_DATA(values),
                           <uint64_t*>cnp.PyArray_DATA(offsets),
                           <uint8_t*>cnp.PyArray_DATA(taken))
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


include "table/replicas.pxi"
