# The compiled half of adapm.wire.protocol: the 52-byte message header and the codes the
# compiled data plane (_plane.pyx) reads and writes. protocol.py is the reference;
# tests/unit/wire/test_wire_header.py checks that every offset and code here matches it.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef packed struct header_t:   # little-endian, as protocol.HEADER ("<HBBHHIQQqqQ")
    uint16_t magic
    uint8_t version
    uint8_t type
    uint16_t src_node
    uint16_t flags
    uint32_t src_worker
    uint64_t request_id
    uint64_t count
    int64_t arg0
    int64_t arg1
    uint64_t token

cdef enum:
    WIRE_MAGIC = 0xADA0
    WIRE_VERSION = 4
    WIRE_HEADER_BYTES = 52
    WIRE_SERVER = 0xFFFFFFFF          # src_worker of a node server
    WIRE_ALL_POSITIONS = 1            # PULL_REPLY flag
    WIRE_PULL = 6
    WIRE_PUSH = 7
    WIRE_SET = 8
    WIRE_APPLY = 12
    WIRE_PULL_REPLY = 20
    WIRE_UPDATE_ACK = 21
    WIRE_FWD_PULL = 32
    WIRE_FWD_PUSH = 33
    WIRE_FWD_SET = 34
    WIRE_FWD_APPLY = 40
    WIRE_MOVE = 36
    WIRE_MOVE_FOR_ROUND = 1           # MOVE's purpose: the answer to a sync's request
    WIRE_OWNER_UPDATE = 37
    WIRE_SYNC = 38
    WIRE_SYNC_REPLY = 39
    WIRE_SYNC_KEEP = 1                # SYNC's per-key flags
    WIRE_SYNC_DROP = 2
    WIRE_HAS_DELTA = 4
    WIRE_REPLY_VALUE = 1              # SYNC_REPLY's per-key answers
    WIRE_REPLY_DROPPED = 2
    WIRE_REPLY_CURRENT = 3
    WIRE_HOPS_SHIFT = 8               # flags bits 8..15: how often a message was forwarded
    WIRE_PARAMS_COUNT = 8             # float64s in an APPLY's params frame
