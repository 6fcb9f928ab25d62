# The table's kernels on a batch of keys (see batch.pxd), for the arena's element types:
# the read side (_pull), the write side (_update) and the owner's side of a sync round
# (_serve_sync) and the replica's (_replica_deltas, _replica_refresh). Each returns the number of misses (keys not usable here, their indices
# written to `misses`), or for _serve_sync the elements written; a lock that timed out
# ends the batch (batch.failed) for the caller to report (_table.pyx's _check_batch).
# Each walks a local copy of the batch: stores into the arena could alias a Batch reached
# through a pointer, and a local one stays in registers.
#
# Declared with their bodies, inline (as batch.pxd and seqlock.pxd): any Cython module
# that cimports this file compiles them into itself and calls them without Python, and
# the C compiler keeps each batch loop in registers. The optimizers' kernel is in
# optimizers.pxd.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from arena cimport _fits, _length, _usable, real
from atomic cimport (
    adapm_fence_acquire, adapm_load_acquire_u32, adapm_load_relaxed_u8,
    adapm_load_relaxed_u32, adapm_load_relaxed_u64, adapm_prefetch_read,
)
from batch cimport Batch, _entry_ahead, _lock_next, _slot_ahead, _unlock_held
from layout cimport ADAPM_ABSENT, ADAPM_OWNED, ADAPM_PENDING, ADAPM_REPLICA, adapm_entry_t
from seqlock cimport Spinner, _spin, _spinner

# _serve_sync: which of a sync's keys get their value copied out.
cdef enum:
    _SERVE_NO_VALUE = 0          # dropped, or about to be relocated
    _SERVE_VALUE = 1             # always (a requested key)
    _SERVE_VALUE_IF_CHANGED = 2  # only when its version is not the one the replica saw

cdef inline int _seq_copy(adapm_entry_t* e, const real* arena, uint64_t length, uint64_t count,
                          uint64_t capacity, bint owned_only, Spinner* sp,
                          real* dst) noexcept nogil:
    """The read side's one step, as a seqlock reader: the first `count` of the `length`
    elements of the key's value copied into dst optimistically, the copy retried when a
    writer held or changed the key meanwhile. 1: copied; 0: not usable here; -1: a writer
    held it past the spinner's timeout."""
    cdef uint32_t s1
    cdef uint8_t state
    cdef uint64_t off
    while True:
        s1 = adapm_load_acquire_u32(&e.seq)
        if s1 & 1:
            if _spin(sp):
                return -1
            continue
        # Racing reads by design (a writer may change them): single atomic loads, so
        # that the compiler cannot re-read `off` after the bounds check.
        state = adapm_load_relaxed_u8(&e.state)
        off = adapm_load_relaxed_u64(&e.offset)
        if not _usable(state, owned_only) or length == 0 or length < count or \
                not _fits(off, length, capacity):
            adapm_fence_acquire()
            if adapm_load_relaxed_u32(&e.seq) != s1:
                continue
            return 0
        memcpy(dst, arena + off, count * sizeof(real))
        adapm_fence_acquire()
        if adapm_load_relaxed_u32(&e.seq) == s1:
            return 1


cdef inline int64_t _pull(Batch* batch, real* arena, real* out, uint64_t* misses, bint owned_only,
                   uint64_t uniform) noexcept nogil:
    """The read side: no lock is taken. Each value is copied optimistically and the copy
    retried when a writer held or changed the key meanwhile (a seqlock reader,
    _seq_copy)."""
    cdef Batch b = batch[0]
    b.arena = <const char*>arena  # the same slots; a constant itemsize frees a register
    b.itemsize = sizeof(real)
    cdef Py_ssize_t i
    cdef int64_t nmiss = 0
    cdef uint64_t pos = 0, length, capacity = b.capacity
    cdef adapm_entry_t* e
    cdef const void* ahead
    cdef Spinner sp
    cdef int got
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
        got = _seq_copy(e, arena, length, length, capacity, owned_only, &sp, out + pos)
        if got < 0:
            batch.failed = i
            return nmiss
        if got == 0:
            misses[nmiss] = i
            nmiss += 1
        pos += uniform if uniform != 0 else length
    return nmiss


cdef inline int64_t _update(Batch* batch, real* arena, const real* values, uint64_t* misses,
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


cdef inline uint64_t _serve_sync(Batch* batch, real* arena, const real* deltas,
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


cdef inline uint64_t _replica_refresh(Batch* batch, real* arena, const uint64_t* synced,
                                      const real* fresh) noexcept nogil:
    """The replica's side of a sync round: for each key held here as REPLICA or PENDING,
    value = owner's value (`fresh`, flat, key order) + the updates made here since the
    delta was taken (value - synced), synced = owner's value, state = REPLICA, under the
    key's lock. Other keys are left alone. `synced`: each key's "value at last sync" slot
    (element offset). Returns the number refreshed."""
    cdef Batch b = batch[0]
    cdef uint64_t j, pos = 0, length, count = 0
    cdef adapm_entry_t* e
    cdef real* v
    cdef real* sv
    while _lock_next(&b):
        e = b.entry
        length = e.length
        if e.state == ADAPM_REPLICA or e.state == ADAPM_PENDING:
            v = arena + e.offset
            sv = arena + synced[b.i]
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
    batch.failed = b.failed
    return count


cdef inline void _replica_deltas(Batch* batch, real* arena, const uint64_t* synced, real* out,
                                 const uint8_t* skip) noexcept nogil:
    """The replica's side of a sync round, taking each key's delta under its lock: for a
    REPLICA, out = value - synced (flat, key order), then synced = synced + out (the
    owner's sum, which may differ from the value by a rounding: the copy takes it, so
    that an answer "current" leaves it bit for bit equal to the owner's value). Other
    keys, and those with skip[i] set (skip may be NULL), give zeros."""
    cdef Batch b = batch[0]
    cdef uint64_t j, pos = 0, length
    cdef adapm_entry_t* e
    cdef real* v
    cdef real* sv
    cdef real d
    cdef bint rounded
    while _lock_next(&b):
        e = b.entry
        length = e.length
        rounded = False
        if e.state == ADAPM_REPLICA and (skip == NULL or not skip[b.i]):
            v = arena + e.offset
            sv = arena + synced[b.i]
            for j in range(length):
                if memcmp(v + j, sv + j, sizeof(real)) == 0:
                    out[pos + j] = 0  # unwritten: no delta (inf - inf would be NaN)
                    continue
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
    batch.failed = b.failed


cdef inline uint64_t _evict(Batch* batch, const char* arena, uint64_t itemsize,
                            uint16_t new_owner, char* out, uint64_t* offsets,
                            uint8_t* taken) noexcept nogil:
    """Take keys OWNED here out of the table for a relocation, each under its lock: its
    value copied into `out` (flat, key order, every key's length reserved), its slot
    offset recorded, state ABSENT with `new_owner` cached, taken[i] = 1. Keys not OWNED
    here are left alone (taken[i] = 0). Returns the number taken."""
    cdef Batch b = batch[0]
    cdef uint64_t pos = 0, count = 0
    cdef adapm_entry_t* e
    while _lock_next(&b):
        e = b.entry
        if e.state == ADAPM_OWNED:
            memcpy(out + pos * itemsize, arena + e.offset * itemsize, e.length * itemsize)
            offsets[b.i] = e.offset
            e.state = ADAPM_ABSENT
            e.owner = new_owner
            taken[b.i] = 1
            count += 1
            _unlock_held(&b, True)
        else:
            taken[b.i] = 0
            _unlock_held(&b, False)
        pos += e.length
    batch.failed = b.failed
    return count


cdef inline uint64_t _install_copies(Batch* batch, real* arena, const uint64_t* synced,
                                     const real* values, const uint32_t* versions,
                                     uint16_t owner) noexcept nogil:
    """Keys arriving by relocation that this node holds as copies become OWNED in place,
    each under its lock: a REPLICA's value = the arriving value + the updates made here
    since its last sync (value - synced), a PENDING one's = the arriving value (it was
    never written); owner cached as `owner`, version = the old owner's + 1 (as admit
    gives it). Keys in another state are left alone. Returns the number installed."""
    cdef Batch b = batch[0]
    cdef uint64_t j, pos = 0, length, count = 0
    cdef adapm_entry_t* e
    cdef real* v
    cdef real* sv
    while _lock_next(&b):
        e = b.entry
        length = e.length
        if e.state == ADAPM_REPLICA or e.state == ADAPM_PENDING:
            v = arena + e.offset
            if e.state == ADAPM_REPLICA:
                sv = arena + synced[b.i]
                for j in range(length):
                    v[j] = values[pos + j] + (v[j] - sv[j])
            else:
                memcpy(v, values + pos, length * sizeof(real))
            e.state = ADAPM_OWNED
            e.owner = owner
            e.version = versions[b.i] + 1
            count += 1
            _unlock_held(&b, True)
        else:
            _unlock_held(&b, False)
        pos += length
    batch.failed = b.failed
    return count
