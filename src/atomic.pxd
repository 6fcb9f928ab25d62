# Cython declarations of src/adapm_atomic.h (C11 atomics via GCC builtins).
from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef extern from "adapm_atomic.h" nogil:
    uint32_t adapm_load_acquire_u32(const uint32_t *p)
    uint32_t adapm_load_relaxed_u32(const uint32_t *p)
    void adapm_store_release_u32(uint32_t *p, uint32_t v)
    bint adapm_cas_acquire_u32(uint32_t *p, uint32_t expected, uint32_t desired)
    uint64_t adapm_load_relaxed_u64(const uint64_t *p)
    uint8_t adapm_load_relaxed_u8(const uint8_t *p)
    uint64_t adapm_load_acquire_u64(const uint64_t *p)
    void adapm_store_relaxed_u64(uint64_t *p, uint64_t v)
    void adapm_store_release_u64(uint64_t *p, uint64_t v)
    uint64_t adapm_fetch_add_u64(uint64_t *p, uint64_t v)
    void adapm_fence_acquire()
    void adapm_fence_release()
    void adapm_fence_seq_cst()
    void adapm_cpu_relax()
    void adapm_prefetch_read(const void *p)
    void adapm_prefetch_write(const void *p)
    uint64_t adapm_monotonic_ns()
    void adapm_yield()
