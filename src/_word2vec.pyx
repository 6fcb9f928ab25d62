# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The word2vec app's compiled step (adapm.apps.word2vec_model.SkipGramStep drives it), as
gensim's word2vec_inner is gensim's: skip-gram with negative sampling, word2vec's own
update, pair after pair, on the rows of one minibatch. It knows nothing of the table: the
caller pulls the batch's distinct rows (held here or not), this module trains them in
place, and the caller pushes what changed.

KeyIndex numbers a batch's keys (distinct keys in order of first appearance, and each
key's number) in O(keys) with a mark per key of the table, so that a batch of 70,000 keys
costs no sort. train_pairs is word2vec.c's and gensim's fast_sentence_sg_neg for every pair
of the batch in turn, with an exact sigmoid (no table of exp, so no skipped update for a
score beyond +-6) and the pair's loss added up."""

cimport numpy as cnp
from libc.math cimport expf, fabsf, log1pf, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memset

import numpy as np

cnp.import_array()


cdef class KeyIndex:
    """Numbers of keys in [0, num_keys) per batch: index(keys) gives (distinct, inverse),
    distinct[inverse] == keys, distinct in order of first appearance. One mark (int32)
    per key of the table, reset after every batch, and room for every key as distinct
    (kept between batches: a fresh array of a batch's size costs its page faults)."""

    cdef cnp.ndarray mark
    cdef cnp.ndarray distinct
    cdef readonly uint64_t num_keys

    def __cinit__(self, uint64_t num_keys):
        if num_keys == 0 or num_keys > 2 ** 31 - 1:
            raise ValueError(f"KeyIndex needs 1 <= num_keys < 2**31, got {num_keys}")
        self.num_keys = num_keys
        self.mark = np.full(num_keys, -1, dtype=np.int32)
        self.distinct = np.empty(num_keys, dtype=np.uint64)

    def index(self, keys):
        """(distinct uint64, inverse int64) of `keys` (a 1-D array of integers, each in
        [0, num_keys)); ValueError naming the first key out of range, nothing kept. One
        thread at a time: the GIL is held throughout, as the marks are shared."""
        given = np.asarray(keys)
        if given.ndim != 1 or given.dtype.kind not in "iu":
            raise ValueError(f"keys must be a 1-D array of integers, got shape "
                             f"{given.shape} of {given.dtype}")
        if given.dtype.kind == "i" and given.shape[0] and given.min() < 0:
            bad = int(np.flatnonzero(given < 0)[0])
            raise ValueError(f"key {given[bad]} at position {bad} is not in [0, "
                             f"{self.num_keys})")
        if given.dtype == np.int64:  # none negative: the same bits as uint64, no copy
            given = np.ascontiguousarray(given).view(np.uint64)
        cdef cnp.ndarray k = np.ascontiguousarray(given, dtype=np.uint64)
        cdef Py_ssize_t n = k.shape[0]
        cdef cnp.ndarray inverse = np.empty(n, dtype=np.int64)
        cdef cnp.ndarray distinct = self.distinct
        cdef Py_ssize_t u = 0
        cdef Py_ssize_t bad_at = _first_out_of_range(<const uint64_t*>cnp.PyArray_DATA(k), n,
                                                     self.num_keys)
        if bad_at >= 0:
            raise ValueError(f"key {k[bad_at]} at position {bad_at} is not in [0, "
                             f"{self.num_keys})")
        u = _number(<const uint64_t*>cnp.PyArray_DATA(k), n,
                    <int32_t*>cnp.PyArray_DATA(self.mark), <int64_t*>cnp.PyArray_DATA(inverse),
                    <uint64_t*>cnp.PyArray_DATA(distinct))
        return distinct[:u].copy(), inverse


cdef Py_ssize_t _first_out_of_range(const uint64_t* keys, Py_ssize_t n,
                                    uint64_t num_keys) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if keys[i] >= num_keys:
            return i
    return -1


cdef Py_ssize_t _number(const uint64_t* keys, Py_ssize_t n, int32_t* mark, int64_t* inverse,
                        uint64_t* distinct) noexcept nogil:
    """Each key's number (its position in distinct, given on first sight); the marks of
    the distinct keys set back to -1 at the end. Returns the number of distinct keys."""
    cdef Py_ssize_t i, u = 0
    cdef uint64_t key
    for i in range(n):
        key = keys[i]
        if mark[key] < 0:
            mark[key] = <int32_t>u
            distinct[u] = key
            u += 1
        inverse[i] = mark[key]
    for i in range(u):
        mark[distinct[i]] = -1
    return u


cdef inline float _dot(const float* a, const float* b, Py_ssize_t dim) noexcept nogil:
    """a . b with eight partial sums: a single sum is a chain of dependent additions that
    the compiler may not reorder (floating point), eight independent ones fill SIMD lanes
    and pipelines (BLAS's sdot does the same; the sum differs from the sequential one
    only by rounding)."""
    cdef float s[8]
    cdef Py_ssize_t j, i, blocks = dim - dim % 8
    for i in range(8):
        s[i] = 0
    for j in range(0, blocks, 8):
        for i in range(8):
            s[i] = s[i] + a[j + i] * b[j + i]
    for j in range(blocks, dim):
        s[0] = s[0] + a[j] * b[j]
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))


cdef inline float _score_step(float f, bint positive, double* loss) noexcept nogil:
    """h = label - sigmoid(f) of a score f (the step direction's size, before the rate),
    and its loss log(1 + e^(-f)) (label 1) or log(1 + e^f) (label 0) added to `loss`,
    from one exp."""
    cdef float e = expf(-fabsf(f))       # in (0, 1]: no overflow either way
    cdef float s = 1.0 / (1.0 + e) if f >= 0 else e / (1.0 + e)   # sigmoid(f)
    if positive:
        loss[0] += log1pf(e) + (-f if f < 0 else 0)
        return 1.0 - s
    loss[0] += log1pf(e) + (f if f > 0 else 0)
    return -s


cdef inline float _rate(float* acc, double a, double eps, double squares,
                        Py_ssize_t dim) noexcept nogil:
    """Row-wise AdaGrad's rate for a row whose step's squared norm is `squares` (before
    the rate): its accumulator grows by the mean square, the rate is a / (sqrt(acc) +
    eps), as adapm.optim.RowWiseAdagrad's. acc NULL: plain SGD, the rate is a."""
    if acc == NULL:
        return <float>a
    acc[0] = acc[0] + <float>(squares / dim)
    if acc[0] < 0:  # merged replicas' deltas may undershoot, as in optimizers.pxd
        acc[0] = 0
    return <float>(a / (sqrt(acc[0]) + eps))


cdef double _train(float* rows, Py_ssize_t dim, Py_ssize_t stride, bint adagrad, double eps,
                   const int64_t* centres, const int64_t* contexts,
                   const int64_t* negatives, Py_ssize_t pairs, Py_ssize_t k, double alpha,
                   double alpha_end, float* neu1e) noexcept nogil:
    """Pair p: input row centres[p], output rows contexts[p] (label 1) and its k
    negatives (label 0; a negative that is the pair's context is skipped, as word2vec
    skips it). Per target: h = label - sigmoid(score); the input's change collects
    h * target, the target moves by h * rate * input; then the input moves by its rate
    times its change. The rate: alpha falling linearly to `alpha_end` over the pairs
    (word2vec's SGD), or with `adagrad` that over each row's sqrt(accumulator) (row-wise
    AdaGrad, the accumulator at column dim of a row of `stride` elements)."""
    cdef Py_ssize_t p, d, j
    cdef float* l1
    cdef float* t
    cdef int64_t target
    cdef double loss = 0, a, input_squares
    cdef float h, c
    cdef double step = (alpha_end - alpha) / pairs if pairs else 0
    for p in range(pairs):
        a = alpha + step * p
        l1 = rows + centres[p] * stride
        input_squares = _dot(l1, l1, dim) if adagrad else 0
        memset(neu1e, 0, dim * sizeof(float))
        for d in range(k + 1):
            if d == 0:
                target = contexts[p]
            else:
                target = negatives[p * k + d - 1]
                if target == contexts[p]:
                    continue
            t = rows + target * stride
            h = _score_step(_dot(l1, t, dim), d == 0, &loss)
            c = h * _rate(t + dim if adagrad else NULL, a, eps, h * h * input_squares, dim)
            for j in range(dim):
                neu1e[j] = neu1e[j] + h * t[j]
            for j in range(dim):
                t[j] = t[j] + c * l1[j]
        c = _rate(l1 + dim if adagrad else NULL, a, eps,
                  _dot(neu1e, neu1e, dim) if adagrad else 0, dim)
        for j in range(dim):
            l1[j] = l1[j] + c * neu1e[j]
    return loss


def train_pairs(float[:, ::1] rows not None, cnp.ndarray inverse not None, pairs, negatives,
                double alpha, double alpha_end, bint adagrad=False, double eps=1e-8):
    """Train a batch's pairs on `rows` (float32, distinct keys x their values: the
    batch's rows, changed in place): `inverse` (int64) holds row numbers, the pairs'
    centres (input rows), then their contexts (output rows), then `negatives` output rows
    per pair, pair by pair. The rate falls linearly from alpha to alpha_end over the
    batch (word2vec's SGD; rows are the vectors); with `adagrad`, row-wise AdaGrad (each
    row's last element is its accumulator; the rate of a row is the rate over
    sqrt(accumulator) + eps). Returns the batch's loss, summed over pairs: -log s(u_o .
    v_c) - sum log s(-u_n . v_c) (s the sigmoid; a skipped negative adds nothing)."""
    if inverse.ndim != 1 or inverse.dtype != np.int64 or not inverse.flags.c_contiguous:
        raise ValueError("inverse must be a contiguous 1-D int64 array")
    pairs, negatives = int(pairs), int(negatives)  # Python ints: the product cannot wrap
    if pairs < 0 or negatives < 0 or inverse.shape[0] != pairs * (2 + negatives):
        raise ValueError(f"{pairs} pairs with {negatives} negatives each need "
                         f"{max(pairs, 0) * (2 + max(negatives, 0))} row numbers, got "
                         f"{inverse.shape[0]}")
    if not (alpha >= 0 and alpha_end >= 0 and alpha < float("inf") and
            alpha_end < float("inf") and eps > 0 and eps < float("inf")):
        raise ValueError(f"learning rates must be finite and >= 0 and eps finite and > 0, "
                         f"got {alpha}, {alpha_end}, eps {eps}")
    cdef Py_ssize_t n = inverse.shape[0], stride = rows.shape[1]
    cdef Py_ssize_t npairs = pairs, k = negatives   # fit: their product is n's
    cdef Py_ssize_t dim = stride - 1 if adagrad else stride
    if adagrad and stride < 2:
        raise ValueError("row-wise AdaGrad needs rows of a vector and an accumulator")
    cdef const int64_t* idx = <const int64_t*>cnp.PyArray_DATA(inverse)
    cdef Py_ssize_t bad = _first_outside(idx, n, rows.shape[0])
    if bad >= 0:
        raise ValueError(f"row number {inverse[bad]} at position {bad} is not in [0, "
                         f"{rows.shape[0]})")
    bad = _shared_row(idx, npairs, n, rows.shape[0])
    if bad >= 0:  # an input row that is also an output would move under its own step
        raise ValueError(f"row {inverse[bad]} is both a centre (input) and an output row")
    if npairs == 0 or dim == 0:
        return 0.0
    cdef cnp.ndarray neu1e = np.empty(dim, dtype=np.float32)
    cdef double loss
    with nogil:
        loss = _train(&rows[0, 0], dim, stride, adagrad, eps, idx, idx + npairs,
                      idx + 2 * npairs, npairs, k, alpha, alpha_end,
                      <float*>cnp.PyArray_DATA(neu1e))
    return loss


cdef Py_ssize_t _shared_row(const int64_t* idx, Py_ssize_t pairs, Py_ssize_t n,
                            Py_ssize_t rows):
    """The position of the first output row number (after the `pairs` centres) that is
    also a centre's, or -1 (all numbers already checked to be in [0, rows))."""
    cdef cnp.ndarray centre = np.zeros(rows, dtype=np.uint8)
    cdef uint8_t* c = <uint8_t*>cnp.PyArray_DATA(centre)
    cdef Py_ssize_t i
    for i in range(pairs):
        c[idx[i]] = 1
    for i in range(pairs, n):
        if c[idx[i]]:
            return i
    return -1


cdef Py_ssize_t _first_outside(const int64_t* idx, Py_ssize_t n, Py_ssize_t rows) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if idx[i] < 0 or idx[i] >= rows:
            return i
    return -1
