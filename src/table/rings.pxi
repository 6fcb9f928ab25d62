# Included by _table.pyx: a worker's intent ring, which hands intents to its node server
# without a message. One producer (the worker: _ring_append) and one consumer (its node
# server: _ring_take). `ring` points at the ring's control words (head, written by the
# worker; tail, written by the server), followed by ADAPM_RING_WORDS words of records:
# start, end, number of keys, then the keys. A record never wraps: one that does not fit
# before the end of the ring starts at word 0, after a wrap marker.

cdef enum:
    RECORD_WORDS = 3  # an intent in a ring: start, end, number of keys; then the keys


cdef bint _ring_append(uint64_t* ring, int64_t start, int64_t end, const uint64_t* keys,
                       uint64_t n) noexcept nogil:
    """Append one record (RECORD_WORDS + n must fit the ring); False when the ring has
    no room for it now."""
    cdef uint64_t* data = ring + ADAPM_RING_CONTROL_WORDS
    cdef uint64_t need = RECORD_WORDS + n
    cdef uint64_t head = adapm_load_relaxed_u64(ring + ADAPM_RING_HEAD)
    cdef uint64_t tail = adapm_load_acquire_u64(ring + ADAPM_RING_TAIL)  # the server is
    cdef uint64_t pos = head % ADAPM_RING_WORDS                         # done with what
    cdef uint64_t skip = ADAPM_RING_WORDS - pos if pos + need > ADAPM_RING_WORDS else 0
    cdef uint64_t at                                                    # it freed
    if head + skip + need - tail > ADAPM_RING_WORDS:
        return False
    if skip:  # records never wrap: the rest of the ring is skipped
        data[pos] = ADAPM_RING_WRAP
    at = (head + skip) % ADAPM_RING_WORDS
    data[at] = <uint64_t>start
    data[at + 1] = <uint64_t>end
    data[at + 2] = n
    if n:
        memcpy(data + at + RECORD_WORDS, keys, n * 8)
    adapm_store_release_u64(ring + ADAPM_RING_HEAD, head + skip + need)
    return True


cdef list _ring_take(uint64_t* ring, uint32_t worker):
    """Every record queued, oldest first, as (start, end, keys); a record that cannot be
    valid (a corrupted ring) drops everything queued and raises ValueError."""
    cdef uint64_t* data = ring + ADAPM_RING_CONTROL_WORDS
    cdef uint64_t tail = adapm_load_relaxed_u64(ring + ADAPM_RING_TAIL)
    cdef uint64_t head = adapm_load_acquire_u64(ring + ADAPM_RING_HEAD)
    cdef uint64_t pos, n
    cdef cnp.ndarray keys
    out = []
    if head - tail > ADAPM_RING_WORDS:
        _ring_corrupt(ring, head, worker, "head and tail")
    while tail < head:
        pos = tail % ADAPM_RING_WORDS
        if data[pos] == ADAPM_RING_WRAP:
            tail += ADAPM_RING_WORDS - pos
            continue
        if pos + RECORD_WORDS > ADAPM_RING_WORDS:
            _ring_corrupt(ring, head, worker, "record header")
        n = data[pos + 2]
        if n > ADAPM_RING_WORDS - pos - RECORD_WORDS or tail + RECORD_WORDS + n > head:
            _ring_corrupt(ring, head, worker, "record length")
        keys = np.empty(n, dtype=np.uint64)
        if n:
            memcpy(cnp.PyArray_DATA(keys), data + pos + RECORD_WORDS, n * 8)
        out.append((<int64_t>data[pos], <int64_t>data[pos + 1], keys))
        tail += RECORD_WORDS + n
    if tail != head:
        _ring_corrupt(ring, head, worker, "wrap marker")
    adapm_store_release_u64(ring + ADAPM_RING_TAIL, tail)
    return out


cdef _ring_corrupt(uint64_t* ring, uint64_t head, uint32_t worker, what):
    adapm_store_release_u64(ring + ADAPM_RING_TAIL, head)
    raise ValueError(f"intent ring of worker {worker}: corrupt {what}; queued intents "
                     "dropped")


cdef inline bint _ring_queued(uint64_t* ring) noexcept nogil:
    """Whether the ring holds a record the server has not taken."""
    return adapm_load_acquire_u64(ring + ADAPM_RING_HEAD) != \
        adapm_load_relaxed_u64(ring + ADAPM_RING_TAIL)
