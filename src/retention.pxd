# The learned retention of adapm.policy.manager.Retention, per key, for compiled code (the
# intent store's round plan, the data plane's answer to a request). The arrays are
# Retention's own, read and written in place; arithmetic is float32 where numpy's is on
# those arrays (a Python float with a float32 array gives float32, NEP 50), so both give
# the same decisions.
from libc.math cimport ceil, isfinite, log2
from libc.stdint cimport uint8_t, uint64_t

cdef enum:
    RETAIN_LEVELS_MAX = 16

cdef struct retention_t:
    float* last_used        # per key: seconds since Retention's base (-inf: never)
    uint8_t* let_go         # per key: let go since its last use (bool)
    uint8_t* level          # per key: index into seconds
    double seconds[16]      # Retention.SECONDS; the last is the longest, RETAIN_MAX_LEVEL
    int levels              # how many of seconds there are


cdef inline float retention_gap(const retention_t* r, uint64_t key, double now) noexcept nogil:
    """Seconds since the key's last use (`now` on Retention's base)."""
    return <float>now - r.last_used[key]


cdef inline bint retention_within(const retention_t* r, uint64_t key,
                                  double now) noexcept nogil:
    """Retention.retained for one key: used within its retention."""
    return <double>retention_gap(r, key, now) < r.seconds[r.level[key]]


cdef inline void retention_learn(retention_t* r, uint64_t key, float gap) noexcept nogil:
    """Retention._learn for one key that came back after `gap` seconds."""
    cdef double g = gap, longest = r.seconds[r.levels - 1]
    cdef double twice = <double>(<float>(2 * gap))
    cdef int level = r.level[key], cover = 0, grown, over
    if g <= longest:  # it bounced: cover twice the gap, and at least double
        while cover < r.levels and r.seconds[cover] < twice:
            cover += 1
        grown = level + 1 if level + 1 > cover else cover
        r.level[key] = grown if grown < r.levels - 1 else r.levels - 1
    elif not isfinite(g):  # never used before: no retention covers that
        r.level[key] = 0
    else:  # halve once per doubling beyond the longest
        over = <int>ceil(log2(g / longest))
        r.level[key] = level - over if level > over else 0


cdef inline void retention_requested(retention_t* r, uint64_t key, double now) noexcept nogil:
    """Retention.requested for one key."""
    cdef float gap = retention_gap(r, key, now)
    if isfinite(gap):
        retention_learn(r, key, gap)
    r.last_used[key] = <float>now
    r.let_go[key] = 0


cdef inline void retention_used(retention_t* r, uint64_t key, double now) noexcept nogil:
    """Retention.used for one key."""
    if r.let_go[key]:
        retention_learn(r, key, retention_gap(r, key, now))
    r.last_used[key] = <float>now
    r.let_go[key] = 0


cdef inline bint retention_keeps(retention_t* r, uint64_t key, double now) noexcept nogil:
    """Retention.keeps for one replica no intent names: within its retention, or let go."""
    if retention_within(r, key, now):
        return True
    r.let_go[key] = 1
    return False
