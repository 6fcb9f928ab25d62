# The embedding-bag kernels (FBGEMM's table-batched embedding, TBE, on the shared table):
# a pooled lookup straight from the rows this node holds, and the backward that scatters
# the pooled gradient into one summed gradient per distinct row, ready for the fused
# optimizer's step (optimizers.pxd's _apply_steps) in the same call. No per-entry row is
# ever materialised. Entries are (key, bag) pairs with a float32 scale each (a per-sample
# weight; 1 otherwise); padding entries never reach these kernels. Rows are the first
# `dim` elements of a key's value ([row | optimizer state]); tables of float32 only.
# Declarations and inline bodies only (as kernels.pxd).
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from arena cimport _length
from atomic cimport adapm_prefetch_read
from batch cimport Batch, _entry_ahead, _slot_ahead
from kernels cimport _seq_copy
from layout cimport adapm_entry_t
from seqlock cimport Spinner, _spinner

cdef enum:
    BAG_SUM = 0
    BAG_MEAN = 1
    BAG_MAX = 2


cdef inline void _add_scaled(float* acc, const float* x, const float* scale, Py_ssize_t at,
                             uint64_t dim) noexcept nogil:
    """acc += scale[at] * x, or acc += x when scale is NULL (no multiply by one): an
    entry's row into its bag (forward), or its bag's gradient into its row's (backward)."""
    cdef uint64_t j
    cdef float s
    if scale == NULL:
        for j in range(dim):
            acc[j] = acc[j] + x[j]
    else:
        s = scale[at]
        for j in range(dim):
            acc[j] = acc[j] + s * x[j]


cdef inline int64_t _bag_pool(Batch* batch, const float* arena, const int64_t* bags,
                              const float* scale, int mode, uint64_t dim, uint64_t uniform,
                              float* out, int64_t* argmax, uint32_t* counts, float* row,
                              uint64_t* misses) noexcept nogil:
    """Pool the batch's entries (keys; bags[i] the bag of entry i, entries of a bag in
    input order) into `out` (bags x dim, zeroed by the caller): sum (rows times `scale`,
    NULL: 1), mean (the sum over the bag's entries divided by their count, at the end),
    max (per element, the first entry with the greatest value wins, as torch's; argmax:
    bags x dim, -1 filled by the caller, gets that entry's index). counts (per bag,
    zeroed) counts the entries pooled. Entries whose key is not usable here are misses
    (indices into the batch), and are left out. Rows are read as _pull reads them
    (kernels.pxd's _seq_copy). A lock that times out ends the walk (batch.failed)."""
    cdef Batch b = batch[0]
    cdef Py_ssize_t i
    cdef uint64_t j
    cdef int64_t nmiss = 0, bag
    cdef int got
    cdef float* o
    cdef int64_t* a
    cdef const void* ahead
    cdef adapm_entry_t* e
    cdef Spinner sp
    for i in range(b.n):
        ahead = _entry_ahead(&b, i)
        if ahead != NULL:
            adapm_prefetch_read(ahead)
        ahead = _slot_ahead(&b, i)
        if ahead != NULL:
            adapm_prefetch_read(ahead)
        e = &b.directory[b.keys[i]]
        sp = _spinner(b.timeout_ns)
        got = _seq_copy(e, arena, _length(e, uniform), dim, b.capacity, False, &sp, row)
        if got < 0:
            batch.failed = i
            return nmiss
        if got == 0:
            misses[nmiss] = i
            nmiss += 1
            continue
        bag = bags[i]
        o = out + <uint64_t>bag * dim
        if mode == BAG_MAX:
            a = argmax + <uint64_t>bag * dim
            for j in range(dim):
                if a[j] < 0 or row[j] > o[j]:
                    o[j] = row[j]
                    a[j] = i
        else:
            _add_scaled(o, row, scale, i, dim)
        counts[bag] += 1
    return nmiss


cdef inline void _bag_mean(float* out, const uint32_t* counts, Py_ssize_t nbags,
                           uint64_t dim) noexcept nogil:
    """Mode mean: each bag's sum divided by its entries (an empty bag stays zero)."""
    cdef Py_ssize_t bag
    cdef uint64_t j
    cdef float* o
    for bag in range(nbags):
        if counts[bag] > 1:
            o = out + <uint64_t>bag * dim
            for j in range(dim):
                o[j] = o[j] / <float>counts[bag]


cdef inline Py_ssize_t _bag_grads_by_key(const uint64_t* keys, const int64_t* order,
                                         Py_ssize_t n, const int64_t* bags,
                                         const float* scale, int mode, const float* grad,
                                         const int64_t* argmax, uint64_t dim,
                                         uint64_t* distinct, float* summed) noexcept nogil:
    """The backward of _bag_pool, one gradient per distinct key: walk the entries in
    sorted `order` (a stable argsort of keys); each distinct key once into `distinct`, its
    gradient into `summed` (rows of dim): the sum over its entries of scale[i] times the
    gradient of the entry's bag (`grad`: bags x dim; scale NULL: 1; for mode mean the
    caller gives 1 / the bag's count), or for mode max the bag's gradient of each element
    the entry won (argmax). Returns the number of distinct keys."""
    cdef Py_ssize_t i, e, u = 0
    cdef uint64_t j, key
    cdef const float* g
    cdef const int64_t* a
    cdef float* acc = summed
    for i in range(n):
        e = order[i]
        key = keys[e]
        if u == 0 or distinct[u - 1] != key:
            distinct[u] = key
            acc = summed + <uint64_t>u * dim
            memset(acc, 0, dim * sizeof(float))
            u += 1
        g = grad + <uint64_t>bags[e] * dim
        if mode == BAG_MAX:
            a = argmax + <uint64_t>bags[e] * dim
            for j in range(dim):
                if a[j] == e:
                    acc[j] = acc[j] + g[j]
        else:
            _add_scaled(acc, g, scale, e, dim)
    return u
