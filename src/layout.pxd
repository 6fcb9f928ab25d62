# Cython declarations of src/table_layout.h.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "table_layout.h" nogil:
    uint64_t ADAPM_MAGIC
    uint32_t ADAPM_LAYOUT_VERSION
    uint32_t ADAPM_HEADER_BYTES
    uint32_t ADAPM_WORKER_BLOCK_SLOTS
    uint32_t ADAPM_NODE_COUNTER_SLOTS
    uint32_t ADAPM_REASON_BYTES
    uint32_t ADAPM_RING_CONTROL_WORDS
    uint32_t ADAPM_RING_HEAD
    uint32_t ADAPM_RING_TAIL
    uint32_t ADAPM_RING_WORDS
    uint64_t ADAPM_RING_WRAP
    uint8_t ADAPM_ABSENT
    uint8_t ADAPM_OWNED
    uint8_t ADAPM_REPLICA
    uint8_t ADAPM_PENDING

    ctypedef struct adapm_header_t:
        uint64_t magic
        uint32_t layout_version
        uint32_t dtype
        uint64_t num_keys
        uint64_t uniform_length
        uint32_t node
        uint32_t num_nodes
        uint32_t num_workers
        uint64_t directory_offset
        uint64_t workers_offset
        uint64_t arena_offset
        uint64_t arena_capacity
        uint64_t total_bytes
        uint8_t cluster_id[16]
        uint64_t heartbeat_ns
        uint32_t failed
        uint32_t failed_detail
        uint64_t rings_offset
        uint64_t server_idle
        uint64_t node_counters[64]
        uint64_t cluster_token
        char failed_reason[512]
        uint64_t fresh_offset

    ctypedef struct adapm_entry_t:
        uint32_t seq
        uint8_t state
        uint8_t flags
        uint16_t owner
        uint32_t version
        uint32_t length
        uint64_t offset
