# The kernels' shared loop. A batch is a kernel's keys (indices into the directory,
# checked by the caller), walked in order, each key's work done under its seqlock. A lock
# that times out (its writer is presumed dead) ends the walk with that key's index in
# `failed`: the keys before it were done, it and those after it left untouched, and no
# lock is left held. _table.pyx's _check_batch is the one error path: it raises
# LockTimeout naming the key. Every kernel that locks keys reads
#
#     cdef Batch b = view._batch_of(keys, prefetch_values)
#     with nogil:
#         while _lock_next(&b):
#             ...  # the kernel's work on b.entry, the directory entry of keys[b.i]
#             _unlock_held(&b, changed)  # changed: it changed the entry or its value
#     _check_batch(b)
#
# Each pass through the body must end in _unlock_held (and not leave the loop before).
# Everything here is inline, so the C compiler keeps the walk in registers and the loop
# costs what a hand-written one does. (The unlock is the body's, not the next
# _lock_next's: deferring it costs the hot loops a few per cent.) Declarations and inline
# bodies only.
from libc.stdint cimport uint32_t, uint64_t

from atomic cimport adapm_prefetch_write
from layout cimport adapm_entry_t
from seqlock cimport _lock, _unlock

cdef enum:
    # How far ahead a walk prefetches directory entries and value slots.
    PREFETCH_ENTRY = 8
    PREFETCH_VALUE = 4


cdef struct Batch:
    # The batch.
    adapm_entry_t* directory
    const uint64_t* keys
    Py_ssize_t n
    uint64_t timeout_ns     # how long to wait for one key's lock
    const char* arena       # value slots to prefetch (NULL: none)
    uint64_t itemsize       # bytes per arena element
    uint64_t capacity       # arena elements
    # The walk.
    Py_ssize_t i            # index into keys of the key locked last (-1: none yet)
    adapm_entry_t* entry    # its directory entry (locked until _unlock_held)
    uint32_t seq            # its sequence word before the lock
    Py_ssize_t failed       # index into keys of the key whose lock timed out, or -1


cdef inline Batch _batch(adapm_entry_t* directory, const uint64_t* keys, Py_ssize_t n,
                         uint64_t timeout_ns, const char* arena, uint64_t itemsize,
                         uint64_t capacity) noexcept nogil:
    cdef Batch b
    b.directory = directory
    b.keys = keys
    b.n = n
    b.timeout_ns = timeout_ns
    b.arena = arena
    b.itemsize = itemsize
    b.capacity = capacity
    b.i = -1
    b.entry = NULL
    b.seq = 0
    b.failed = -1
    return b


# What to prefetch, PREFETCH_ENTRY and PREFETCH_VALUE keys after keys[i] (NULL: nothing).
# They return addresses rather than prefetch them: GCC deletes a __builtin_prefetch that
# sits in a branch of an inline helper doing nothing else, so the prefetch itself must be
# issued in the loop (as _lock_next and _table.pyx's _pull do).

cdef inline const adapm_entry_t* _entry_ahead(const Batch* b, Py_ssize_t i) noexcept nogil:
    if i + PREFETCH_ENTRY < b.n:
        return &b.directory[b.keys[i + PREFETCH_ENTRY]]
    return NULL


cdef inline const char* _slot_ahead(const Batch* b, Py_ssize_t i) noexcept nogil:
    cdef const adapm_entry_t* ahead
    if b.arena != NULL and i + PREFETCH_VALUE < b.n:
        ahead = &b.directory[b.keys[i + PREFETCH_VALUE]]
        if ahead.offset < b.capacity:
            return b.arena + ahead.offset * b.itemsize
    return NULL


cdef inline bint _lock_next(Batch* b) noexcept nogil:
    """Lock the batch's next key. True: b.i and b.entry name it, and the work on it ends
    in _unlock_held. False: the batch is done, or the key's lock timed out (b.failed =
    its index)."""
    cdef Py_ssize_t i = b.i + 1
    cdef adapm_entry_t* e
    cdef const void* ahead
    if i >= b.n:
        return False
    ahead = _entry_ahead(b, i)
    if ahead != NULL:
        adapm_prefetch_write(ahead)
    ahead = _slot_ahead(b, i)
    if ahead != NULL:
        adapm_prefetch_write(ahead)
    e = &b.directory[b.keys[i]]
    if _lock(e, &b.seq, b.timeout_ns) != 0:
        b.failed = i
        return False
    b.i = i
    b.entry = e
    return True


cdef inline void _unlock_held(Batch* b, bint changed) noexcept nogil:
    """Unlock the key _lock_next locked; `changed`: the work changed its entry or value
    (optimistic readers retry), else its sequence word is restored (they need not)."""
    _unlock(b.entry, b.seq, changed)
