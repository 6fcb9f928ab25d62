# A compiled key set's state (_keyset.pyx's CompiledKeySet holds one), declared here so
# that the node's compiled data plane (_plane.pyx) can change the same set without Python:
# CompiledKeySet.handle() gives its address. Declarations and inline bodies only.
from libc.stdint cimport uint8_t, uint64_t


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
