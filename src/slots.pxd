# The slot allocator's state (_slots.pyx's CompiledSlotAllocator holds one), declared here
# so that the node's compiled data plane (_plane.pyx) takes and gives back value slots in
# the same allocator without Python: CompiledSlotAllocator.handle() gives its address.
# Only the node server allocates, so this is private state of one thread: no locks.
# Declarations and inline bodies only.
from libc.stdint cimport uint64_t
from libc.stdlib cimport realloc
from libc.string cimport memmove


cdef enum:
    SLOTS_GROWTH = 64               # a free list's first room, in slots


cdef struct free_list_t:
    uint64_t length                 # the slots' length, in elements
    uint64_t* offsets               # free slots, used as a stack
    size_t size, capacity


cdef struct slots_t:
    uint64_t capacity               # elements of the arena
    uint64_t top                    # elements below it were handed out at some time
    free_list_t* lists              # one per length freed so far, sorted by length
    size_t nlists, lists_capacity


cdef inline size_t slots_find(const slots_t* s, uint64_t length) noexcept nogil:
    """Index of the first list whose length is >= `length` (binary search)."""
    cdef size_t lo = 0, hi = s.nlists, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if s.lists[mid].length < length:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline free_list_t* slots_list(slots_t* s, uint64_t length, bint create) noexcept nogil:
    """The free list of slots of `length`; created (empty) when missing and `create`.
    NULL: missing, or no memory to create it."""
    cdef size_t i = slots_find(s, length)
    cdef free_list_t* grown
    if i < s.nlists and s.lists[i].length == length:
        return &s.lists[i]
    if not create:
        return NULL
    if s.nlists == s.lists_capacity:
        grown = <free_list_t*>realloc(s.lists, (2 * s.lists_capacity + 4) *
                                      sizeof(free_list_t))
        if grown == NULL:
            return NULL
        s.lists, s.lists_capacity = grown, 2 * s.lists_capacity + 4
    memmove(&s.lists[i + 1], &s.lists[i], (s.nlists - i) * sizeof(free_list_t))
    s.nlists += 1
    s.lists[i].length = length
    s.lists[i].offsets = NULL
    s.lists[i].size = s.lists[i].capacity = 0
    return &s.lists[i]


cdef inline bint slots_reserve(slots_t* s, uint64_t length, size_t more) noexcept nogil:
    """Room for `more` further free slots of `length`; False: no memory."""
    cdef free_list_t* f = slots_list(s, length, True)
    cdef size_t want
    cdef uint64_t* grown
    if f == NULL:
        return False
    if f.size + more <= f.capacity:
        return True
    want = f.capacity * 2 if f.capacity * 2 >= f.size + more else f.size + more
    if want < SLOTS_GROWTH:
        want = SLOTS_GROWTH
    grown = <uint64_t*>realloc(f.offsets, want * sizeof(uint64_t))
    if grown == NULL:
        return False
    f.offsets, f.capacity = grown, want
    return True


cdef inline bint slots_free(slots_t* s, uint64_t offset, uint64_t length) noexcept nogil:
    """Give a slot back; False: no memory to list it (nothing changed)."""
    if not slots_reserve(s, length, 1):
        return False
    cdef free_list_t* f = slots_list(s, length, False)
    f.offsets[f.size] = offset
    f.size += 1
    return True


cdef inline bint slots_allocate(slots_t* s, const uint64_t* lengths, size_t n,
                                uint64_t* out) noexcept nogil:
    """A slot for each of `lengths` into `out`: freed ones of the same length first (the
    last freed first), then fresh ones from the top. All or nothing: False (the arena is
    full) leaves the allocator as it was."""
    cdef size_t i, j
    cdef uint64_t top = s.top
    cdef free_list_t* f
    for i in range(n):
        f = slots_list(s, lengths[i], False)
        if f != NULL and f.size:
            f.size -= 1
            out[i] = f.offsets[f.size]
        elif lengths[i] <= s.capacity and s.top <= s.capacity - lengths[i]:
            out[i] = s.top
            s.top += lengths[i]
        else:  # undo in reverse: each stack gets its slots back in its order
            j = i
            while j > 0:
                j -= 1
                if out[j] < top:
                    f = slots_list(s, lengths[j], False)
                    f.offsets[f.size] = out[j]
                    f.size += 1
            s.top = top
            return False
    return True
