# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""A set of keys in compiled code: the same set as adapm.table.keyset.KeySet, which is its
reference (tests/unit/table/test_compiled_keyset.py runs both side by side), without a
sort per batch: membership is one bit per key (of a byte shared by up to eight sets,
KeyFlags), the members are also listed in an array, and only the keys of a batch are
touched. Results are sorted and distinct, as the reference's are."""

cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport free, qsort

from keyset cimport keyset_discard, keyset_reserve, keyset_t
from radix cimport RADIX, _radix_order

import numpy as np

cnp.import_array()


cdef int _by_key(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t*>a)[0], y = (<const uint64_t*>b)[0]
    return (x > y) - (x < y)


cdef class CompiledKeySet:
    cdef object _flags_array      # uint8 per key, maybe shared with other sets
    cdef keyset_t s               # the set (keyset.pxd)

    def __cinit__(self, uint64_t num_keys, flags=None, int bit=0):
        if not 0 <= bit < 8:
            raise ValueError(f"bit {bit} of a byte")
        if flags is None:
            flags = np.zeros(num_keys, dtype=np.uint8)
        if flags.dtype != np.uint8 or flags.shape[0] != num_keys or \
                not flags.flags.c_contiguous:
            raise ValueError("flags must be a contiguous uint8 array of num_keys")
        self._flags_array = flags
        self.s.flags = <uint8_t*>cnp.PyArray_DATA(flags)
        self.s.bit = <uint8_t>(1 << bit)
        self.s.num_keys = num_keys
        self.s.listed = NULL
        self.s.length = self.s.capacity = self.s.size = 0
        self.s.compact = True

    def __dealloc__(self):
        free(self.s.listed)

    def __len__(self):
        return self.s.size

    def __bool__(self):
        return self.s.size > 0

    cdef cnp.ndarray _checked(self, keys):
        cdef cnp.ndarray k = np.ascontiguousarray(keys, dtype=np.uint64)
        cdef const uint64_t* kp = <const uint64_t*>cnp.PyArray_DATA(k)
        cdef Py_ssize_t i
        for i in range(k.shape[0]):
            if kp[i] >= self.s.num_keys:
                raise IndexError(f"key {kp[i]} of {self.s.num_keys}")
        return k

    def contains(self, keys):
        """Mask: which of `keys` are members."""
        cdef cnp.ndarray k = self._checked(keys)
        cdef const uint64_t* kp = <const uint64_t*>cnp.PyArray_DATA(k)
        cdef cnp.ndarray out = np.empty(k.shape[0], dtype=bool)
        cdef uint8_t* op = <uint8_t*>cnp.PyArray_DATA(out)
        cdef Py_ssize_t i
        for i in range(k.shape[0]):
            op[i] = (self.s.flags[kp[i]] & self.s.bit) != 0
        return out

    def add(self, keys):
        """Add `keys` (any order, repeats allowed); returns those that were not members,
        sorted."""
        cdef cnp.ndarray k = self._checked(keys)
        cdef const uint64_t* kp = <const uint64_t*>cnp.PyArray_DATA(k)
        cdef Py_ssize_t i, n = k.shape[0], m = 0
        cdef cnp.ndarray new = np.empty(n, dtype=np.uint64)
        cdef uint64_t* np_ = <uint64_t*>cnp.PyArray_DATA(new)
        self._reserve(self.s.length + n)  # before any bit is set: nothing half done
        for i in range(n):
            if not self.s.flags[kp[i]] & self.s.bit:
                self.s.flags[kp[i]] |= self.s.bit
                np_[m] = kp[i]
                m += 1
        if m == 0:
            return new[:0]
        qsort(np_, m, 8, _by_key)
        if self.s.length and self.s.listed[self.s.length - 1] >= np_[0]:
            self.s.compact = False
        for i in range(m):
            self.s.listed[self.s.length + i] = np_[i]
        self.s.length += m
        self.s.size += m
        return new[:m]

    def discard(self, keys):
        """Remove those of `keys` that are members; returns them, sorted."""
        cdef cnp.ndarray k = self._checked(keys)
        cdef const uint64_t* kp = <const uint64_t*>cnp.PyArray_DATA(k)
        cdef Py_ssize_t i, n = k.shape[0], m = 0
        cdef cnp.ndarray gone = np.empty(n, dtype=np.uint64)
        cdef uint64_t* gp = <uint64_t*>cnp.PyArray_DATA(gone)
        for i in range(n):
            if keyset_discard(&self.s, kp[i]):
                gp[m] = kp[i]
                m += 1
        if m:
            qsort(gp, m, 8, _by_key)
        return gone[:m]

    def keys(self):
        """The members, sorted (a copy)."""
        cdef size_t i, kept = 0
        cdef uint64_t key
        if not self.s.compact:
            for i in range(self.s.length):  # members only, each once (a key removed and
                key = self.s.listed[i]       # added again may be listed twice)
                if self.s.flags[key] & self.s.bit:
                    self.s.listed[kept] = key
                    kept += 1
            qsort(self.s.listed, kept, 8, _by_key)
            self.s.length = 0
            for i in range(kept):
                if self.s.length == 0 or self.s.listed[self.s.length - 1] != self.s.listed[i]:
                    self.s.listed[self.s.length] = self.s.listed[i]
                    self.s.length += 1
            self.s.compact = True
        cdef cnp.ndarray out = np.empty(self.s.length, dtype=np.uint64)
        cdef uint64_t* op = <uint64_t*>cnp.PyArray_DATA(out)
        for i in range(self.s.length):
            op[i] = self.s.listed[i]
        return out

    def take(self):
        """The members, sorted; the set is empty afterwards."""
        members = self.keys()
        self.clear()
        return members

    def clear(self):
        cdef size_t i
        cdef uint8_t clear = ~self.s.bit
        for i in range(self.s.length):
            self.s.flags[self.s.listed[i]] &= clear
        self.s.length = self.s.size = 0
        self.s.compact = True

    def handle(self):
        """The address of the set's state (keyset.pxd's keyset_t), for compiled code
        that changes it without Python (the node's data plane); valid while this object
        lives."""
        return <uintptr_t>&self.s

    @property
    def nbytes(self):
        """The memory of its own: the list of members (the flags are KeyFlags')."""
        return self.s.capacity * 8

    cdef void _reserve(self, size_t wanted) except *:
        if not keyset_reserve(&self.s, wanted):
            raise MemoryError()


# -- sorted key arrays ---------------------------------------------------------------------
# Set algebra on arrays of keys that are sorted and distinct (what the key sets return), in
# one merge pass: numpy's union1d / intersect1d / setdiff1d (their reference, tests/unit/
# table/test_keyset.py) concatenate and sort again, which a sync round paid several times.

cdef cnp.ndarray _sorted_keys(keys):
    return np.ascontiguousarray(keys, dtype=np.uint64)


def union_sorted(a, b):
    """The keys in either (both sorted and distinct): sorted, distinct."""
    cdef cnp.ndarray x = _sorted_keys(a), y = _sorted_keys(b)
    cdef const uint64_t* xp = <const uint64_t*>cnp.PyArray_DATA(x)
    cdef const uint64_t* yp = <const uint64_t*>cnp.PyArray_DATA(y)
    cdef Py_ssize_t i = 0, j = 0, m = 0, nx = x.shape[0], ny = y.shape[0]
    cdef cnp.ndarray out = np.empty(nx + ny, dtype=np.uint64)
    cdef uint64_t* op = <uint64_t*>cnp.PyArray_DATA(out)
    with nogil:
        while i < nx and j < ny:
            if xp[i] < yp[j]:
                op[m] = xp[i]
                i += 1
            elif yp[j] < xp[i]:
                op[m] = yp[j]
                j += 1
            else:
                op[m] = xp[i]
                i += 1
                j += 1
            m += 1
        while i < nx:
            op[m] = xp[i]
            i += 1
            m += 1
        while j < ny:
            op[m] = yp[j]
            j += 1
            m += 1
    return out[:m]


def intersect_sorted(a, b):
    """The keys in both (both sorted and distinct): sorted."""
    return _merge_select(a, b, True)


def difference_sorted(a, b):
    """The keys of `a` not in `b` (both sorted and distinct): sorted."""
    return _merge_select(a, b, False)


cdef cnp.ndarray _merge_select(a, b, bint in_b):
    """The keys of `a` that are (in_b) or are not in `b`."""
    cdef cnp.ndarray x = _sorted_keys(a), y = _sorted_keys(b)
    cdef const uint64_t* xp = <const uint64_t*>cnp.PyArray_DATA(x)
    cdef const uint64_t* yp = <const uint64_t*>cnp.PyArray_DATA(y)
    cdef Py_ssize_t i, j = 0, m = 0, nx = x.shape[0], ny = y.shape[0]
    cdef cnp.ndarray out = np.empty(nx, dtype=np.uint64)
    cdef uint64_t* op = <uint64_t*>cnp.PyArray_DATA(out)
    cdef bint found
    with nogil:
        for i in range(nx):
            while j < ny and yp[j] < xp[i]:
                j += 1
            found = j < ny and yp[j] == xp[i]
            if found == in_b:
                op[m] = xp[i]
                m += 1
    return out[:m]


def distinct_keys(keys, uint64_t bound, bint inverse=False):
    """np.unique of a batch's keys (integers in [0, bound)), sorted, in O(keys) per 11
    bits of the bound (radix.pxd's sort) where np.unique sorts by comparison: the keys
    as uint64, with `inverse` also each key's index into them (int64, as np.unique's
    return_inverse). ValueError naming the first key outside [0, bound), if any."""
    cdef cnp.ndarray k = np.ascontiguousarray(keys).reshape(-1)
    if k.dtype.kind not in "iu":
        raise ValueError(f"keys must be integers, got dtype {k.dtype}")
    if k.dtype.kind == "i" and k.shape[0] and k.min() < 0:
        bad = int(np.flatnonzero(k < 0)[0])
        raise ValueError(f"key {k[bad]} at position {bad} is not in [0, {bound})")
    k = k.astype(np.uint64, copy=False)  # compared as uint64: no float on the way
    if k.shape[0] and k.max() >= np.uint64(bound):
        bad = int(np.flatnonzero(k >= np.uint64(bound))[0])
        raise ValueError(f"key {k[bad]} at position {bad} is not in [0, {bound})")
    cdef Py_ssize_t n = k.shape[0], i, u = 0
    cdef cnp.ndarray order = np.empty(n, dtype=np.int64)
    cdef cnp.ndarray spare = np.empty(n, dtype=np.int64)
    cdef cnp.ndarray counts = np.empty(RADIX + 1, dtype=np.intp)
    cdef cnp.ndarray out = np.empty(n, dtype=np.uint64)
    cdef cnp.ndarray where = np.empty(n if inverse else 0, dtype=np.int64)
    cdef const uint64_t* kp = <const uint64_t*>cnp.PyArray_DATA(k)
    cdef const int64_t* op = <const int64_t*>cnp.PyArray_DATA(order)
    cdef uint64_t* up = <uint64_t*>cnp.PyArray_DATA(out)
    cdef int64_t* wp = <int64_t*>cnp.PyArray_DATA(where)
    with nogil:
        _radix_order(kp, n, bound if bound else 1, <int64_t*>op,
                     <int64_t*>cnp.PyArray_DATA(spare), <Py_ssize_t*>cnp.PyArray_DATA(counts))
        for i in range(n):
            if u == 0 or up[u - 1] != kp[op[i]]:
                up[u] = kp[op[i]]
                u += 1
            if inverse:
                wp[op[i]] = u - 1
    if inverse:
        return out[:u], where
    return out[:u]
