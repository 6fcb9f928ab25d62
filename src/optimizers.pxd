# Fused sparse optimizers (adapm.optim): a key's value is [row | state], and one step
# per distinct key is taken in place under the key's lock: the step's arithmetic
# (_optimizer_step, that of torch.optim), the gradients of repeated keys summed
# (_sum_by_key) and the batch kernel (_apply_steps). Declared with their bodies, inline,
# for the reasons kernels.pxd gives.
from libc.math cimport sqrt, sqrtf
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

from arena cimport _fits, _length, _usable, real
from batch cimport Batch, _lock_next, _unlock_held
from layout cimport adapm_entry_t

cdef enum:
    _OPT_SGD = 0
    _OPT_ADAGRAD = 1
    _OPT_ROWWISE_ADAGRAD = 2
    _OPT_ADAM = 3


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


cdef inline real _root(real x) noexcept nogil:
    if real is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline void _adagrad_step(real* w, const real* g, real* s, uint64_t dim, real lr,
                               real eps) noexcept nogil:
    """Adagrad in the table's own precision, as torch.optim.Adagrad computes on its
    tensors (sum += g^2; w -= lr * g / (sqrt(sum) + eps)), in two branch-free loops that
    the compiler turns into SIMD (a root and a division per element: in double and with a
    branch they were most of a fused step's time)."""
    cdef uint64_t j
    cdef real t
    for j in range(dim):
        t = s[j] + g[j] * g[j]
        s[j] = 0 if t < 0 else t  # merged replicas' deltas may undershoot: no root of < 0
    for j in range(dim):
        w[j] = w[j] - lr * g[j] / (_root(s[j]) + eps)


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
        _adagrad_step(w, g, w + dim, dim, <real>p.lr, <real>p.eps)
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


cdef inline Py_ssize_t _sum_by_key(const uint64_t* keys, const int64_t* order, Py_ssize_t n,
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


cdef inline int64_t _apply_steps(Batch* batch, real* arena, real* summed, const OptStep* p,
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
