# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The node's intent store in compiled code (DESIGN.md §6, §9): the same store as
adapm.policy.intents.IntentStore, which is its reference (tests/unit/policy/
test_compiled_intents.py runs both side by side), with no Python object per intent.

Per worker, the intents sorted by start (an array of records) and their keys (one buffer,
compacted as intents leave); per key, how many unexpired intents name it, kept current as
intents come and go (no deferred counting)."""

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy, memmove, memset

from retention cimport (
    RETAIN_LEVELS_MAX,
    retention_keeps,
    retention_requested,
    retention_t,
    retention_used,
)

import numpy as np

cnp.import_array()

cdef int64_t NO_START = 1 << 62   # next_start() when nothing waits (IntentStore's)


cdef struct Record:
    int64_t start
    int64_t end
    uint64_t offset     # of its keys in the worker's key buffer
    uint64_t n          # its number of keys
    uint8_t acted
    uint8_t expired


cdef struct Queue:      # one worker's intents
    Record* records     # sorted by start (stable: arrival order among equal starts)
    size_t size, capacity
    size_t next_due     # first record not acted on (records before it are acted/expired)
    size_t flagged      # expired records still listed
    int64_t min_end     # the earliest end of an unexpired record (NO_START: none)
    uint64_t* keys      # every listed record's keys, at its offset
    size_t key_end, key_capacity, key_dead


cdef bint _reserve(void** buf, size_t* capacity, size_t wanted, size_t item) noexcept nogil:
    cdef size_t grown
    cdef void* p
    if wanted <= capacity[0]:
        return True
    grown = capacity[0] * 2 if capacity[0] * 2 > wanted else wanted
    if grown < 16:
        grown = 16
    p = realloc(buf[0], grown * item)
    if p == NULL:
        return False
    buf[0] = p
    capacity[0] = grown
    return True


cdef class CompiledIntentStore:
    cdef Queue* queues
    cdef size_t num_workers
    cdef uint64_t num_keys
    cdef int32_t* counts
    cdef object _count            # the numpy array counts points into
    cdef Py_ssize_t _live

    def __cinit__(self, size_t num_workers, uint64_t num_keys):
        cdef size_t w
        self.queues = <Queue*>malloc(max(num_workers, 1) * sizeof(Queue))
        if self.queues == NULL:
            raise MemoryError()
        memset(self.queues, 0, max(num_workers, 1) * sizeof(Queue))
        for w in range(num_workers):
            self.queues[w].min_end = NO_START
        self.num_workers = num_workers
        self.num_keys = num_keys
        self._count = np.zeros(num_keys, dtype=np.int32)
        self.counts = <int32_t*>cnp.PyArray_DATA(self._count)
        self._live = 0

    def __dealloc__(self):
        cdef size_t w
        if self.queues != NULL:
            for w in range(self.num_workers):
                free(self.queues[w].records)
                free(self.queues[w].keys)
            free(self.queues)

    # -- adding and expiring -----------------------------------------------------------

    def add(self, Py_ssize_t worker, keys, int64_t start, int64_t end):
        """Worker `worker` will access `keys` in clocks [start, end)."""
        if not 0 <= worker < <Py_ssize_t>self.num_workers:
            raise ValueError(f"intent from unknown worker {worker}")
        if end <= start:
            raise ValueError(f"intent window [{start}, {end}) is empty")
        cdef cnp.ndarray k = np.ascontiguousarray(keys, dtype=np.uint64)
        cdef const uint64_t* kp = <const uint64_t*>cnp.PyArray_DATA(k)
        cdef size_t n = k.shape[0], i, position
        for i in range(n):
            if kp[i] >= self.num_keys:
                raise ValueError(f"key {kp[i]} out of range [0, {self.num_keys})")
        cdef Queue* q = &self.queues[worker]
        cdef Record* r
        if not _reserve(<void**>&q.keys, &q.key_capacity, q.key_end + n, 8) or \
                not _reserve(<void**>&q.records, &q.capacity, q.size + 1, sizeof(Record)):
            raise MemoryError()
        memcpy(q.keys + q.key_end, kp, n * 8)
        position = q.size
        if q.size and q.records[q.size - 1].start > start:  # late: after equal starts
            position = _bisect_right(q.records, q.size, start)
            memmove(q.records + position + 1, q.records + position,
                    (q.size - position) * sizeof(Record))
        r = &q.records[position]
        r.start, r.end, r.offset, r.n, r.acted, r.expired = start, end, q.key_end, n, 0, 0
        q.size += 1
        q.key_end += n
        if position < q.next_due:
            q.next_due = position
        if end < q.min_end:
            q.min_end = end
        for i in range(n):
            self.counts[kp[i]] += 1
        self._live += 1

    def expire(self, clocks):
        """Forget intents whose window ended before each worker's current clock."""
        cdef cnp.ndarray c = np.ascontiguousarray(clocks, dtype=np.int64)
        if c.shape[0] < <Py_ssize_t>self.num_workers:
            raise ValueError("a clock per worker")
        cdef const int64_t* cp = <const int64_t*>cnp.PyArray_DATA(c)
        cdef size_t w
        with nogil:
            for w in range(self.num_workers):
                self._expire_queue(&self.queues[w], cp[w])

    cdef void _expire_queue(self, Queue* q, int64_t clock) noexcept nogil:
        cdef size_t i, j, front = 0
        cdef Record* r
        if clock < q.min_end:  # nothing ends yet: the usual call, a round's, costs nothing
            return
        q.min_end = NO_START
        for i in range(q.size):
            r = &q.records[i]
            if r.expired:
                continue
            if r.end <= clock:
                r.expired = 1
                for j in range(r.n):
                    self.counts[q.keys[r.offset + j]] -= 1
                q.flagged += 1
                self._live -= 1
            elif r.end < q.min_end:
                q.min_end = r.end
        if not q.flagged:
            return
        while front < q.size and q.records[front].expired:
            q.key_dead += q.records[front].n
            front += 1
        if front:
            memmove(q.records, q.records + front, (q.size - front) * sizeof(Record))
            q.size -= front
            q.flagged -= front
            q.next_due = q.next_due - front if q.next_due > front else 0
        if q.flagged * 2 > q.size:
            self._drop_flagged(q)
        if q.key_dead * 2 > q.key_end and q.key_end > 1024:
            _compact_keys(q)

    cdef void _drop_flagged(self, Queue* q) noexcept nogil:
        """Unlist every expired record; next_due: the first kept one not acted on."""
        cdef size_t i, kept = 0
        for i in range(q.size):
            if q.records[i].expired:
                q.key_dead += q.records[i].n
            else:
                q.records[kept] = q.records[i]
                kept += 1
        q.size = kept
        q.flagged = 0
        q.next_due = kept
        for i in range(kept):
            if not q.records[i].acted:
                q.next_due = i
                break

    # -- reading -----------------------------------------------------------------------

    def due_keys(self, Py_ssize_t worker, int64_t horizon):
        """This worker's intents not acted on yet whose window starts before `horizon`,
        marked acted on: (keys of them all, concatenated; each one's start; each one's
        number of keys)."""
        if not 0 <= worker < <Py_ssize_t>self.num_workers:
            raise IndexError(f"no worker {worker}")
        cdef Queue* q = &self.queues[worker]
        cdef size_t i, first = q.next_due, total = 0, count = 0, at = 0
        cdef size_t last = _due_end(q, horizon, &total, &count)
        cdef Record* r
        cdef cnp.ndarray keys = np.empty(total, dtype=np.uint64)
        cdef cnp.ndarray starts = np.empty(count, dtype=np.int64)
        cdef cnp.ndarray lengths = np.empty(count, dtype=np.int64)
        cdef uint64_t* kp = <uint64_t*>cnp.PyArray_DATA(keys)
        cdef int64_t* sp = <int64_t*>cnp.PyArray_DATA(starts)
        cdef int64_t* lp = <int64_t*>cnp.PyArray_DATA(lengths)
        count = 0
        for i in range(first, last):
            r = &q.records[i]
            if not r.acted and not r.expired:
                r.acted = 1
                memcpy(kp + at, q.keys + r.offset, r.n * 8)
                at += r.n
                sp[count] = r.start
                lp[count] = r.n
                count += 1
        q.next_due = last
        return keys, starts, lengths

    def plan_round(self, clocks, horizons, states, replicas, retention, double now,
                   bint acts, bint keep_all):
        """Manager.plan's round in one call, the same plan: every worker's intents that
        start before its horizon are acted on (marked); their keys whose `states` byte is
        0 (not held) are requested. `clocks`, `horizons`: int64 per worker; `states`: a
        uint8 per key (any stride; the table's state bytes); `replicas`: the replicas a
        round syncs (uint64); `retention`: None or Retention's (last_used, let_go, level,
        SECONDS), learned from in place at `now` (seconds on its base); `acts`: the mode
        acts on intents; `keep_all`: replicate_all (every replica kept).
        Returns (requests sorted and distinct, keep, drop, late, due keys, retained)."""
        cdef cnp.ndarray c = np.ascontiguousarray(clocks, dtype=np.int64)
        cdef cnp.ndarray h = np.ascontiguousarray(horizons, dtype=np.int64)
        cdef cnp.ndarray reps = np.ascontiguousarray(replicas, dtype=np.uint64)
        if c.shape[0] < <Py_ssize_t>self.num_workers or h.shape[0] < c.shape[0]:
            raise ValueError("a clock and a horizon per worker")
        if states.dtype.itemsize != 1 or states.ndim != 1 or \
                states.shape[0] != <Py_ssize_t>self.num_keys:
            raise ValueError("a state byte per key")
        cdef retention_t ret
        cdef retention_t* rp = _retention_of(retention, self.num_keys, &ret)
        cdef const uint8_t* st = <const uint8_t*><uintptr_t>states.ctypes.data
        cdef Py_ssize_t stride = states.strides[0], n = reps.shape[0], i
        cdef const uint64_t* rk = <const uint64_t*>cnp.PyArray_DATA(reps)
        for i in range(n):
            if rk[i] >= self.num_keys:
                raise IndexError(f"replica key {rk[i]} of {self.num_keys}")
        cdef _Due due
        cdef uint64_t* rq
        memset(&due, 0, sizeof(_Due))
        try:
            if acts and not self._take_due(&due, <const int64_t*>cnp.PyArray_DATA(c),
                                           <const int64_t*>cnp.PyArray_DATA(h), st, stride):
                raise MemoryError()
            requests = np.empty(due.nrequests, dtype=np.uint64)
            rq = <uint64_t*>cnp.PyArray_DATA(requests)
            due.nrequests = _sorted_distinct(due.requests, due.nrequests, rq)
            if rp != NULL:
                with nogil:  # requested first: requested keys are among the due ones
                    for i in range(<Py_ssize_t>due.nrequests):
                        retention_requested(rp, rq[i], now)
                    for i in range(<Py_ssize_t>due.nkeys):
                        retention_used(rp, due.keys[i], now)
            keep = np.empty(n, dtype=np.uint64)
            drop = np.empty(n, dtype=np.uint64)
            kept, retained = self._split_replicas(
                rk, n, rp, now, keep_all, <uint64_t*>cnp.PyArray_DATA(keep),
                <uint64_t*>cnp.PyArray_DATA(drop))
            return (requests[:due.nrequests], keep[:kept], drop[:n - kept], due.late,
                    due.nkeys, retained)
        finally:
            free(due.keys)
            free(due.requests)

    cdef bint _take_due(self, _Due* due, const int64_t* clocks, const int64_t* horizons,
                        const uint8_t* states, Py_ssize_t stride) noexcept nogil:
        """Every worker's due intents marked acted on, their keys into due.keys, the
        unheld ones into due.requests (late: of an intent started by the worker's clock);
        False: out of memory (nothing is marked then)."""
        cdef size_t w, i, j, last, total = 0, count = 0
        cdef Queue* q
        cdef Record* r
        cdef uint64_t key
        for w in range(self.num_workers):
            _due_end(&self.queues[w], horizons[w], &total, &count)
        due.keys = <uint64_t*>malloc((total if total else 1) * 8)
        due.requests = <uint64_t*>malloc((total if total else 1) * 8)
        if due.keys == NULL or due.requests == NULL:
            return False
        for w in range(self.num_workers):
            q = &self.queues[w]
            last = _due_end(q, horizons[w], &total, &count)
            for i in range(q.next_due, last):
                r = &q.records[i]
                if r.acted or r.expired:
                    continue
                r.acted = 1
                for j in range(r.n):
                    key = q.keys[r.offset + j]
                    due.keys[due.nkeys] = key
                    due.nkeys += 1
                    if states[<Py_ssize_t>key * stride] == 0:
                        due.requests[due.nrequests] = key
                        due.nrequests += 1
                        if r.start <= clocks[w]:
                            due.late += 1
            q.next_due = last
        return True

    cdef tuple _split_replicas(self, const uint64_t* replicas, Py_ssize_t n,
                               retention_t* rp, double now, bint keep_all,
                               uint64_t* keep, uint64_t* drop):
        """Replicas some intent names are kept (and used, with a retention); the others
        are kept while within their retention, else dropped. (kept, retained)."""
        cdef Py_ssize_t i, kept = 0, dropped = 0, retained = 0
        cdef uint64_t key
        with nogil:
            for i in range(n):
                key = replicas[i]
                if keep_all or self.counts[key] > 0:
                    if rp != NULL and not keep_all:
                        retention_used(rp, key, now)
                    keep[kept] = key
                    kept += 1
                elif rp != NULL and retention_keeps(rp, key, now):
                    keep[kept] = key
                    kept += 1
                    retained += 1
                else:
                    drop[dropped] = key
                    dropped += 1
        return kept, retained

    def next_start(self, Py_ssize_t worker):
        """Start of this worker's first intent not acted on yet (a huge number if none)."""
        if not 0 <= worker < <Py_ssize_t>self.num_workers:
            raise IndexError(f"no worker {worker}")
        cdef Queue* q = &self.queues[worker]
        cdef size_t i = q.next_due
        while i < q.size and (q.records[i].acted or q.records[i].expired):
            i += 1
        return q.records[i].start if i < q.size else NO_START

    def any_due(self, clocks, windows):
        """Whether some worker w has an intent not acted on yet that starts before
        clocks[w] + windows[w] (its action window); clocks and windows: int64 per worker
        (any integer arrays are converted)."""
        cdef const int64_t[:] c = np.asarray(clocks, dtype=np.int64)
        cdef const int64_t[:] win = np.asarray(windows, dtype=np.int64)
        if c.shape[0] < <Py_ssize_t>self.num_workers or win.shape[0] < c.shape[0]:
            raise ValueError("a clock and a window per worker")
        cdef size_t w, i
        cdef Queue* q
        for w in range(self.num_workers):
            q = &self.queues[w]
            i = q.next_due
            while i < q.size and (q.records[i].acted or q.records[i].expired):
                i += 1
            if i < q.size and q.records[i].start < c[w] + win[w]:
                return True
        return False

    @property
    def count(self):
        """Per key: how many unexpired intents name it (int32; do not write)."""
        return self._count

    def intended(self, keys):
        """Mask: keys named by any intent not yet expired."""
        cdef cnp.ndarray k = np.ascontiguousarray(keys, dtype=np.uint64)
        cdef const uint64_t* kp = <const uint64_t*>cnp.PyArray_DATA(k)
        cdef cnp.ndarray out = np.empty(k.shape[0], dtype=bool)
        cdef uint8_t* op = <uint8_t*>cnp.PyArray_DATA(out)
        cdef Py_ssize_t i
        for i in range(k.shape[0]):
            if kp[i] >= self.num_keys:
                raise IndexError(f"key {kp[i]} of {self.num_keys}")
            op[i] = self.counts[kp[i]] > 0
        return out

    def __len__(self):
        """Intents not expired."""
        return self._live

    @property
    def nbytes(self):
        """The memory it holds: the per-key counts, and every worker's records and keys."""
        cdef size_t w, total = self._count.nbytes + self.num_workers * sizeof(Queue)
        for w in range(self.num_workers):
            total += self.queues[w].capacity * sizeof(Record) + self.queues[w].key_capacity * 8
        return total


cdef struct _Due:           # a round's due intents' keys (plan_round)
    uint64_t* keys
    size_t nkeys
    uint64_t* requests        # those not held (repeats until sorted and made distinct)
    size_t nrequests
    size_t late


cdef size_t _due_end(Queue* q, int64_t horizon, size_t* total, size_t* count) noexcept nogil:
    """The end of the queue's records from next_due that start before `horizon`; adds
    the keys and the number of those not acted on nor expired to total and count."""
    cdef size_t last = q.next_due
    cdef Record* r
    while last < q.size and q.records[last].start < horizon:
        r = &q.records[last]
        if not r.acted and not r.expired:
            total[0] += r.n
            count[0] += 1
        last += 1
    return last


cdef int _by_key(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t*>a)[0], y = (<const uint64_t*>b)[0]
    return (x > y) - (x < y)


cdef size_t _sorted_distinct(uint64_t* keys, size_t n, uint64_t* out) noexcept nogil:
    """`keys` sorted in place, their distinct values into `out`; how many."""
    cdef size_t i, m = 0
    qsort(keys, n, 8, _by_key)
    for i in range(n):
        if m == 0 or keys[i] != out[m - 1]:
            out[m] = keys[i]
            m += 1
    return m


cdef retention_t* _retention_of(retention, uint64_t num_keys, retention_t* r) except? NULL:
    """`r` filled from Retention's (last_used, let_go, level, SECONDS), checked; NULL for
    None (no retention)."""
    if retention is None:
        return NULL
    last_used, let_go, level, seconds = retention
    for a, size in ((last_used, 4), (let_go, 1), (level, 1)):
        if not a.flags.c_contiguous or a.shape[0] != <Py_ssize_t>num_keys or \
                a.dtype.itemsize != size or not a.flags.writeable:
            raise ValueError("retention: a writable contiguous array of a value per key")
    if not 0 < len(seconds) <= RETAIN_LEVELS_MAX:
        raise ValueError("retention: its levels' seconds")
    r.last_used = <float*><uintptr_t>last_used.ctypes.data
    r.let_go = <uint8_t*><uintptr_t>let_go.ctypes.data
    r.level = <uint8_t*><uintptr_t>level.ctypes.data
    r.levels = len(seconds)
    for i in range(r.levels):
        r.seconds[i] = seconds[i]
    return r


cdef size_t _bisect_right(const Record* records, size_t size, int64_t start) noexcept nogil:
    cdef size_t lo = 0, hi = size, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if start < records[mid].start:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef struct _Placed:
    uint64_t offset
    size_t index


cdef int _by_offset(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const _Placed*>a).offset, y = (<const _Placed*>b).offset
    return (x > y) - (x < y)


cdef void _compact_keys(Queue* q) noexcept nogil:
    """Move the listed records' keys to the front of the buffer, in buffer order (records
    are sorted by start, not by offset), so that a move never overwrites keys that are
    still to be moved."""
    cdef size_t i, end = 0
    cdef Record* r
    cdef _Placed* order = <_Placed*>malloc((q.size if q.size else 1) * sizeof(_Placed))
    if order == NULL:
        return  # compacted another time
    for i in range(q.size):
        order[i].offset = q.records[i].offset
        order[i].index = i
    qsort(order, q.size, sizeof(_Placed), _by_offset)
    for i in range(q.size):
        r = &q.records[order[i].index]
        memmove(q.keys + end, q.keys + r.offset, r.n * 8)
        r.offset = end
        end += r.n
    free(order)
    q.key_end = end
    q.key_dead = 0
