# A stable LSD radix argsort of keys (uint64, each below a known bound): O(keys) per
# RADIX_BITS of the bound, where a comparison sort is O(keys log keys). The embedding-bag
# backward and the fused optimizer group a batch's entries by key with it (_table.pyx),
# and distinct_keys (_keyset.pyx) takes a batch's distinct keys with it.
# Declarations and inline bodies only (as kernels.pxd).
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset


cdef enum:
    RADIX_BITS = 11
    RADIX = 1 << RADIX_BITS


cdef inline void _radix_order(const uint64_t* keys, Py_ssize_t n, uint64_t num_keys,
                              int64_t* order, int64_t* spare, Py_ssize_t* counts
                              ) noexcept nogil:
    """A stable argsort of keys (each < num_keys) into `order`: least significant digit
    first, RADIX_BITS a pass, as many passes as num_keys needs (two for a table of up to
    four million keys). `spare`: n more int64; `counts`: RADIX + 1. What TBE's backward
    does to group an embedding's indices by row, in O(n) per pass instead of a comparison
    sort."""
    cdef Py_ssize_t i, total
    cdef int shift = 0
    cdef uint64_t digit
    cdef int64_t* src = order
    cdef int64_t* dst = spare
    cdef int64_t* swap
    for i in range(n):
        order[i] = i
    while shift == 0 or (shift < 64 and (num_keys - 1) >> shift):
        memset(counts, 0, (RADIX + 1) * sizeof(Py_ssize_t))
        for i in range(n):
            counts[((keys[src[i]] >> shift) & (RADIX - 1)) + 1] += 1
        total = 0
        for i in range(RADIX + 1):
            total += counts[i]
            counts[i] = total
        for i in range(n):
            digit = (keys[src[i]] >> shift) & (RADIX - 1)
            dst[counts[digit]] = src[i]
            counts[digit] += 1
        swap = src
        src = dst
        dst = swap
        shift += RADIX_BITS
    if src != order:
        memcpy(order, src, n * sizeof(int64_t))
