# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The slot allocator in compiled code: value slots in a table's arena, a bump pointer plus
a free list (a stack) per length. adapm.table.shared_table.SlotAllocator is its reference
(tests/integration/table/test_table.py runs both). The node server's compiled data plane
allocates and frees in the same state (slots.pxd) without Python: a sync round's copies
and a relocation's slots cost no Python call per round."""

cimport numpy as cnp
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport free

from slots cimport slots_allocate, slots_free, slots_reserve, slots_t

import numpy as np

cnp.import_array()


cdef class CompiledSlotAllocator:
    cdef slots_t s
    cdef readonly uint64_t uniform   # the table's one value length (0: lengths per key)

    def __cinit__(self, uint64_t capacity, uint64_t uniform=0):
        self.s.capacity = capacity
        self.s.top = 0
        self.s.lists = NULL
        self.s.nlists = self.s.lists_capacity = 0
        self.uniform = uniform

    def __dealloc__(self):
        cdef size_t i
        for i in range(self.s.nlists):
            free(self.s.lists[i].offsets)
        free(self.s.lists)

    @property
    def capacity(self):
        """Elements of the arena that may be handed out (a node server lowers it to
        `top` to refuse any further slot)."""
        return self.s.capacity

    @capacity.setter
    def capacity(self, uint64_t value):
        self.s.capacity = value

    @property
    def top(self):
        """Elements below it were handed out at some time."""
        return self.s.top

    def handle(self):
        """The address of the allocator's state (a slots_t), for compiled code of this
        node server; valid while this object lives."""
        return <uintptr_t>&self.s

    def allocate(self, lengths):
        """Offsets for slots of the given lengths (uint64 array): freed slots of the same
        length first, then fresh ones. MemoryError (and nothing allocated) when the arena
        is full."""
        cdef cnp.ndarray lens = np.ascontiguousarray(lengths, dtype=np.uint64)
        if lens.ndim != 1:
            raise ValueError("lengths must be a 1-D array")
        cdef cnp.ndarray out = np.empty(lens.shape[0], dtype=np.uint64)
        cdef uint64_t need = int(np.sum(lens, dtype=np.uint64)) if lens.shape[0] else 0
        if not slots_allocate(&self.s, <const uint64_t*>cnp.PyArray_DATA(lens),
                              lens.shape[0], <uint64_t*>cnp.PyArray_DATA(out)):
            raise MemoryError(f"parameter table arena full: {need} more elements asked "
                              f"for, {self.s.capacity - self.s.top} never handed out and "
                              f"too few freed slots of their lengths")
        return out

    def free(self, offsets, lengths):
        """Give slots back (each was allocated here and is no longer used)."""
        cdef cnp.ndarray offs = np.ascontiguousarray(offsets, dtype=np.uint64)
        cdef cnp.ndarray lens = np.ascontiguousarray(lengths, dtype=np.uint64)
        if offs.ndim != 1 or lens.ndim != 1 or offs.shape[0] != lens.shape[0]:
            raise ValueError("offsets and lengths must be 1-D arrays of one length")
        cdef const uint64_t* o = <const uint64_t*>cnp.PyArray_DATA(offs)
        cdef const uint64_t* n = <const uint64_t*>cnp.PyArray_DATA(lens)
        cdef Py_ssize_t i
        for i in range(offs.shape[0]):  # checked first: a bad call gives nothing back
            if n[i] == 0 or o[i] > self.s.top or n[i] > self.s.top - o[i]:
                raise ValueError(f"slot [{o[i]}, {o[i]} + {n[i]}) was never handed out "
                                 f"(top {self.s.top})")
        for i in range(offs.shape[0]):
            if not slots_reserve(&self.s, n[i], 1):
                raise MemoryError("no memory to list a freed slot")
            slots_free(&self.s, o[i], n[i])
