# A key's value slot in the arena: the element types, and the checks every kernel makes
# before it touches a slot (no allocator here: slots are handed out by adapm.table's
# SlotAllocator in the node server). Declarations and inline bodies only: cimported by
# _table.pyx.
from libc.stdint cimport uint8_t, uint64_t

from layout cimport ADAPM_OWNED, ADAPM_REPLICA, adapm_entry_t

# The arena's element type (the header's dtype: 0 float32, 1 float64).
ctypedef fused real:
    float
    double


cdef inline bint _fits(uint64_t off, uint64_t length, uint64_t capacity) noexcept nogil:
    # A slot inside the arena, written so that no sum can wrap around (a corrupt offset
    # near 2**64 must be a miss, not the bytes before the arena).
    return length <= capacity and off <= capacity - length


cdef inline uint64_t _length(adapm_entry_t* e, uint64_t uniform) noexcept nogil:
    # Buffers of a uniform table are sized by its uniform length: an entry claiming
    # another length (a corrupt directory) gets length 0 and fails _fits' caller check.
    if uniform == 0 or e.length == uniform:
        return e.length
    return 0


cdef inline bint _usable(uint8_t state, bint owned_only) noexcept nogil:
    # A node server serving another node's request uses only keys it owns: a replica
    # may lag the owner and must never acknowledge an update (DESIGN.md §7.1).
    if owned_only:
        return state == ADAPM_OWNED
    return state == ADAPM_OWNED or state == ADAPM_REPLICA
