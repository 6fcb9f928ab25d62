/* Byte layout of a node's shared-memory parameter table (see docs/table.md).
 *
 *   [header: 4096 bytes][directory: num_keys x 24 bytes][worker blocks][intent rings]
 *   [fresh rounds: num_keys x 4 bytes][value arena]
 *
 * The header and directory are fixed at creation. Every region starts on a
 * 64-byte boundary so that no two workers' counters share a cache line. */
#ifndef ADAPM_TABLE_LAYOUT_H
#define ADAPM_TABLE_LAYOUT_H

#include <stdint.h>

#define ADAPM_MAGIC 0x31764d5041414441ULL /* "ADAAPMv1" little endian */
#define ADAPM_LAYOUT_VERSION 5u
#define ADAPM_HEADER_BYTES 4096u
#define ADAPM_WORKER_BLOCK_SLOTS 64u      /* uint64 counters per worker: 512 bytes */
#define ADAPM_NODE_COUNTER_SLOTS 64u
#define ADAPM_REASON_BYTES 512u
/* One intent ring per worker: the worker appends intents, the node server takes them.
 * Control words first (the head, written by the worker, and the tail, written by the
 * server, a cache line apart), then the ring's words. */
#define ADAPM_RING_CONTROL_WORDS 16u
#define ADAPM_RING_HEAD 0u
#define ADAPM_RING_TAIL 8u
#define ADAPM_RING_WORDS 524288u         /* 4 MB per worker (sparse: pages are touched as
                                            intents fill them); at 512 KB, MF look-ahead
                                            overflowed it and 2 in 3 intents went as messages */
#define ADAPM_RING_WRAP 0xFFFFFFFFFFFFFFFFULL /* "the next record starts at word 0" */

/* Key states. Only the node server changes them. */
#define ADAPM_ABSENT 0u   /* not held here: a miss, served remotely */
#define ADAPM_OWNED 1u    /* held and owned by this node */
#define ADAPM_REPLICA 2u  /* held as a replica of another node's key */
#define ADAPM_PENDING 3u  /* replica requested, value not yet usable */

typedef struct {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t dtype;             /* 0: float32, 1: float64 */
    uint64_t num_keys;
    uint64_t uniform_length;    /* 0 when lengths are per key */
    uint32_t node;
    uint32_t num_nodes;
    uint32_t num_workers;       /* worker blocks on this node */
    uint32_t _pad0;
    uint64_t directory_offset;  /* bytes from the segment start */
    uint64_t workers_offset;
    uint64_t arena_offset;
    uint64_t arena_capacity;    /* elements */
    uint64_t total_bytes;
    uint8_t cluster_id[16];
    uint64_t heartbeat_ns;      /* server's CLOCK_MONOTONIC, refreshed every loop */
    uint32_t failed;            /* non-zero: the cluster failed, every call must raise */
    uint32_t failed_detail;     /* which node or worker, for the message */
    uint64_t rings_offset;      /* the workers' intent rings */
    uint64_t server_idle;       /* non-zero while the server sleeps without a deadline
                                   soon: a worker that appends an intent wakes it */
    uint64_t node_counters[ADAPM_NODE_COUNTER_SLOTS];
    uint64_t cluster_token;     /* the cluster's message token, once it has formed: every
                                   worker message carries it (docs/protocol.md) */
    char failed_reason[ADAPM_REASON_BYTES]; /* why the cluster failed (UTF-8, NUL-ended):
                                   node, worker and key range; written before `failed` */
    uint64_t fresh_offset;      /* per key, uint32: the sync round whose answer last
                                   brought this node's replica of the key up to date */
} adapm_header_t;

/* One per key, dense over [0, num_keys). 24 bytes. */
typedef struct {
    uint32_t seq;      /* seqlock: odd while a writer holds the key */
    uint8_t state;     /* ADAPM_ABSENT ... ADAPM_PENDING */
    uint8_t flags;
    uint16_t owner;    /* location cache: owning node as far as this node knows */
    uint32_t version;  /* count of updates applied here */
    uint32_t length;   /* value length in elements (fixed at creation) */
    uint64_t offset;   /* element offset of the value slot in the arena */
} adapm_entry_t;

#endif
