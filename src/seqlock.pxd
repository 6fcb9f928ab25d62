# The per-key seqlock of the directory (see docs/table.md): every entry's 32-bit `seq`
# word is even while the key is free and odd while a writer holds it. Writers take it
# with a CAS from even to odd and release it with +2 (or restore it when they changed
# nothing); readers copy optimistically and retry when the word was odd or changed.
# A wait that lasts longer than the lock timeout (a writer died holding the key) gives
# up instead of hanging. Declarations and inline bodies only: cimported by _table.pyx.
from libc.stdint cimport uint32_t, uint64_t

from atomic cimport (
    adapm_cas_acquire_u32, adapm_cpu_relax, adapm_fence_release, adapm_load_relaxed_u32,
    adapm_monotonic_ns, adapm_store_release_u32, adapm_yield,
)
from layout cimport adapm_entry_t

cdef enum:
    # Spins between two looks at the clock while waiting for a key's lock.
    SPINS_PER_CHECK = 256


cdef struct Spinner:
    uint64_t spins
    uint64_t deadline_ns
    uint64_t timeout_ns


cdef inline Spinner _spinner(uint64_t timeout_ns) noexcept nogil:
    cdef Spinner sp
    sp.spins = 0
    sp.deadline_ns = 0
    sp.timeout_ns = timeout_ns
    return sp


cdef inline bint _spin(Spinner* sp) noexcept nogil:
    """One wait step. Returns True when the deadline passed."""
    cdef uint64_t now
    sp.spins += 1
    if sp.spins < 64:
        adapm_cpu_relax()
        return False
    adapm_yield()
    if sp.spins % SPINS_PER_CHECK != 0:
        return False
    now = adapm_monotonic_ns()
    if sp.deadline_ns == 0:
        sp.deadline_ns = now + sp.timeout_ns
        return False
    return now > sp.deadline_ns


cdef inline bint _try_lock(adapm_entry_t* e, uint32_t* seq_out) noexcept nogil:
    """One attempt at the key's write lock."""
    cdef uint32_t s = adapm_load_relaxed_u32(&e.seq)
    if (s & 1) == 0 and adapm_cas_acquire_u32(&e.seq, s, s + 1):
        # Order the odd sequence word before the value stores (seqlock writer rule).
        adapm_fence_release()
        seq_out[0] = s
        return True
    return False


cdef inline int _lock_wait(adapm_entry_t* e, uint32_t* seq_out,
                           uint64_t timeout_ns) noexcept nogil:
    # _lock's slow path: spin (then yield) until the lock is free or the timeout passed.
    cdef Spinner sp = _spinner(timeout_ns)
    while True:
        if _spin(&sp):
            return -1
        if _try_lock(e, seq_out):
            return 0


cdef inline int _lock(adapm_entry_t* e, uint32_t* seq_out, uint64_t timeout_ns) noexcept nogil:
    """Take the key's write lock; 0 on success, -1 on timeout. The first attempt is
    apart from the wait, so that a batch's loop keeps its registers when it succeeds."""
    if _try_lock(e, seq_out):
        return 0
    return _lock_wait(e, seq_out, timeout_ns)


cdef inline void _unlock(adapm_entry_t* e, uint32_t seq_before, bint changed) noexcept nogil:
    # Unchanged: restore the old word, so optimistic readers need not retry.
    adapm_store_release_u32(&e.seq, seq_before + 2 if changed else seq_before)
