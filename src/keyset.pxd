# A compiled key set's state (_keyset.pyx's CompiledKeySet holds one), declared here so
# that the node's compiled data plane (_plane.pyx) can change the same set without Python:
# CompiledKeySet.handle() gives its address. Declarations and inline bodies only.
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport realloc


cdef struct keyset_t:
    uint8_t* flags          # a byte per key, maybe shared with other sets (KeyFlags)
    uint8_t bit             # this set's bit in it
    uint64_t num_keys
    uint64_t* listed        # the members in some order, maybe with removed keys
    size_t length           # used part of listed
    size_t capacity         # its room
    size_t size             # members
    bint compact            # listed[:length] is exactly the members, sorted


cdef inline bint keyset_contains(const keyset_t* s, uint64_t key) noexcept nogil:
    return (s.flags[key] & s.bit) != 0


cdef inline bint keyset_discard(keyset_t* s, uint64_t key) noexcept nogil:
    """Remove `key` (< num_keys) if it is a member; whether it was. Its stale entry in
    `listed` goes at the next compaction."""
    if not s.flags[key] & s.bit:
        return False
    s.flags[key] &= ~s.bit
    s.size -= 1
    s.compact = False
    return True


cdef inline bint keyset_reserve(keyset_t* s, size_t wanted) noexcept nogil:
    """Room in `listed` for `wanted` entries; False: no memory (nothing changed)."""
    cdef size_t grown
    cdef void* p
    if wanted <= s.capacity:
        return True
    grown = s.capacity * 2 if s.capacity * 2 > wanted else wanted
    grown = grown if grown > 64 else 64
    p = realloc(s.listed, grown * 8)
    if p == NULL:
        return False
    s.listed = <uint64_t*>p
    s.capacity = grown
    return True


cdef inline bint keyset_add(keyset_t* s, uint64_t key) noexcept nogil:
    """Add `key` (< num_keys), with room for it reserved (keyset_reserve); whether it
    was new. Keys added in increasing order after the last member keep the set compact."""
    if s.flags[key] & s.bit:
        return False
    s.flags[key] |= s.bit
    if s.length and s.listed[s.length - 1] >= key:
        s.compact = False
    s.listed[s.length] = key
    s.length += 1
    s.size += 1
    return True
