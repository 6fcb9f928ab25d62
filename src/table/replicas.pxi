# Included by _table.pyx, after TableView: the node server's kernels on replicas, per
# element type, each key under its lock.

cdef object _deltas(TableView view, real* arena, cnp.ndarray keys, cnp.ndarray synced,
                    real* out):
    cdef Batch b = view._batch_of(keys, True)
    with nogil:
        _replica_deltas(&b, arena, <const uint64_t*>cnp.PyArray_DATA(synced), out, NULL)
    _check_batch(b)


cdef object _refresh(TableView view, real* arena, cnp.ndarray keys, cnp.ndarray synced,
                     real* fresh):
    cdef Batch b = view._batch_of(keys, True)
    cdef uint64_t count
    with nogil:
        count = _replica_refresh(&b, arena, <const uint64_t*>cnp.PyArray_DATA(synced), fresh)
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
