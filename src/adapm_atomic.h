/* Thin wrappers around the GCC/Clang __atomic builtins, so that Cython code
 * (which has no atomics of its own) can use C11 memory ordering. */
#ifndef ADAPM_ATOMIC_H
#define ADAPM_ATOMIC_H

#include <stdint.h>
#include <sched.h>
#include <time.h>

static inline uint32_t adapm_load_acquire_u32(const uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint32_t adapm_load_relaxed_u32(const uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void adapm_store_release_u32(uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
/* Strong CAS; acquire on success so that the critical section stays after it. */
static inline int adapm_cas_acquire_u32(uint32_t *p, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}
static inline uint64_t adapm_load_relaxed_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline uint64_t adapm_load_acquire_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint8_t adapm_load_relaxed_u8(const uint8_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void adapm_store_relaxed_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
static inline void adapm_store_release_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline uint64_t adapm_fetch_add_u64(uint64_t *p, uint64_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline void adapm_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void adapm_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
/* A full fence: a store before it is visible before any load after it (Dekker-style
 * hand-over between a worker appending an intent and a server going to sleep). */
static inline void adapm_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline void adapm_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static inline void adapm_prefetch_read(const void *p) { __builtin_prefetch(p, 0, 3); }
static inline void adapm_prefetch_write(const void *p) { __builtin_prefetch(p, 1, 3); }

static inline uint64_t adapm_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void adapm_yield(void) { sched_yield(); }

#endif
