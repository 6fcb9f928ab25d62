"""The wire format: the only module that knows byte layouts of messages.

A message is a ZeroMQ multipart message: one fixed 52-byte little-endian header frame,
followed by raw frames (keys as uint64, positions as uint32, values in the table's dtype,
counters as uint32, addresses as UTF-8 text), sent without copying. Nothing is ever
unpickled. `decode` checks what a peer could get wrong (size, magic, version, type,
frame count, frame sizes) and raises ProtocolError; the receiver drops and counts the
message. Value frames are checked against the table by `values_of` (only the receiver
knows the dtype and the keys' lengths).

Header fields:
    magic u16 | version u8 | type u8 | src_node u16 | flags u16 | src_worker u32 |
    request_id u64 | count u64 | arg0 i64 | arg1 i64 | token u64
`src_worker` is a worker's global rank, or SERVER for a node server. The meaning of
count/arg0/arg1 per type is given in MsgType. `token` is the cluster's message token
(random, handed by the coordinator to the nodes that joined, and by each node server to
its workers through the table): a node accepts a message from a peer or a worker only
with it, so a connection that merely reaches a port cannot pose as a member."""

import enum
import functools
import hashlib
import hmac
import struct
from dataclasses import dataclass

import numpy as np
import zmq

from adapm.common.errors import ProtocolError

MAGIC = 0xADA0
VERSION = 4  # 4: JOIN and PEERS carry proofs of the cluster secret
HEADER = struct.Struct("<HBBHHIQQqqQ")
HEADER_BYTES = HEADER.size
SERVER = 0xFFFFFFFF          # src_worker of a node server
MAX_KEYS_PER_MESSAGE = (1 << 32) - 1  # positions are uint32; workers split larger calls
MAX_HOPS = 64                # forwarding bound: more means a routing bug, not a busy key
MAX_TEXT_BYTES = 1024        # a failure's reason
MAX_PROOF_BYTES = 64         # JOIN's and PEERS' proofs (adapm.wire.cluster_secret)

# Per-key flags of SYNC (what the replica node wants) and SYNC_REPLY (what it gets).
SYNC_REQUEST = 0     # the node has no copy yet: relocate or replicate it there
SYNC_KEEP = 1        # a replica: apply its delta (if any), send the value if it is behind
SYNC_DROP = 2        # a replica: apply its delta (if any), forget the replica
SYNC_KIND = 3        # mask of the three above
HAS_DELTA = 4        # bit: the key's delta is in the values frame
REPLY_VALUE = 1      # fresh value follows (the node keeps, or now has, a replica)
REPLY_DROPPED = 2    # the delta is applied and the replica forgotten
REPLY_CURRENT = 3    # the replica is up to date (its own delta included): only the version
MOVE_FOR_ROUND = 1   # MOVE arg1: the answer to a SYNC_REQUEST (request_id: the round)

# flags
ALL_POSITIONS = 1            # PULL_REPLY: values for every key of the request, in order
HOPS_SHIFT = 8               # bits 8..15 of flags: how often a request was forwarded


def worker_identity(rank, token=0):
    """ZeroMQ routing identity of a worker's sockets (the same towards every node)."""
    return member_identity(b"W" + struct.pack("<I", rank), token)


def node_identity(node, token=0):
    """ZeroMQ routing identity of a node server's sockets towards its peers."""
    return member_identity(b"N" + struct.pack("<H", node), token)


@functools.lru_cache(maxsize=1 << 16)  # per message on both ends: an HMAC each costs µs
def member_identity(name, token):
    """`name` followed, once the cluster has formed (`token`), by 8 bytes that only
    holders of the token can compute. A ROUTER ignores a second connection under an
    identity already taken: with names alone, a process that merely reached a node's
    port first under a member's name locked that member out (a hang or a failure)."""
    if not token:
        return name
    return name + hmac.new(int(token).to_bytes(8, "little"), name, hashlib.sha256).digest()[:8]


class MsgType(enum.IntEnum):
    # worker -> node server (any node for data, its own node for control)
    HELLO = 1          # count: pid
    BARRIER = 2        # generation
    WAIT_SYNC = 3
    INTENT = 4         # keys; arg0: start clock, arg1: end clock
    GOODBYE = 5
    PULL = 6           # keys
    PUSH = 7           # keys, values
    SET = 8            # keys, values
    LOCALIZE = 9       # keys: bring them to this node (relocation)
    REFRESH = 10       # keys: sync these replicas with the next round, then answer SYNCED
    WAKE = 11          # an intent waits in the worker's ring and the server was asleep
    APPLY = 12         # keys (distinct), values (their summed gradients, n x dim), params
                       # (the optimizer, adapm.optim.PARAMS): one step per key at its owner
    CHECKPOINT = 13    # arg0: the save's number, arg1: its phase (adapm.wire.collectives)
    # node server -> worker
    WELCOME = 16       # addresses (every node's server, by node id)
    RELEASE = 17       # request_id: barrier generation
    SYNCED = 18
    FAILED = 19        # text (the reason); arg0: failure code, count: detail
    PULL_REPLY = 20    # positions, values (flags ALL_POSITIONS: positions empty)
    UPDATE_ACK = 21    # count: keys applied
    LOCALIZED = 22     # count: keys now owned by the node
    CHECKPOINTED = 23  # the checkpoint phase is complete cluster-wide
    # node server -> node server
    FWD_PULL = 32      # keys, positions; arg0: requester rank
    FWD_PUSH = 33      # keys, values; arg0: requester rank
    FWD_SET = 34       # keys, values; arg0: requester rank
    FWD_APPLY = 40     # keys, values, params; arg0: requester rank
    MOVE_REQUEST = 35  # keys; arg0: node that wants them; request_id: its request
    MOVE = 36          # keys, values, counters, versions (at the old owner);
                       # request_id: the requester's request
    OWNER_UPDATE = 37  # keys, counters; arg0: new owner
    SYNC = 38          # keys, values (deltas of HAS_DELTA keys), counters (SYNC_* flags),
                       # versions (last seen); arg0: replica node; request_id: its round
    SYNC_REPLY = 39    # keys, values (of REPLY_VALUE keys), counters (REPLY_* flags),
                       # versions (the owner's); request_id: the round answered
    # node server <-> coordinator
    JOIN = 48          # addresses (the joining server's own), proof (nonce | MAC of the
                       # cluster secret: adapm.wire.cluster_secret); arg0: spec fingerprint
    PEERS = 49         # addresses (every node's server, by node id), proof (MAC); arg0:
                       # the token, masked for the node that joined
    NODE_BARRIER = 50  # request_id: generation
    NODE_RELEASE = 51  # request_id: generation
    HEARTBEAT = 52
    NODE_DONE = 53     # every worker of the node finalized
    SHUTDOWN = 54      # every node is done: stop serving
    NODE_FAILED = 55   # text (the reason); arg0: failure code, count: detail; to and
                       # from the coordinator
    NODE_STATS = 56    # stats (adapm.table.stats.REPORTED, uint64): a node's statistics, sent
                       # as it shuts down, for the summary that node 0's launcher prints


# Frames that follow the header, per type.
_FRAMES = {
    MsgType.HELLO: (), MsgType.BARRIER: (), MsgType.WAIT_SYNC: (), MsgType.GOODBYE: (),
    MsgType.INTENT: ("keys",), MsgType.PULL: ("keys",), MsgType.PUSH: ("keys", "values"),
    MsgType.SET: ("keys", "values"), MsgType.LOCALIZE: ("keys",), MsgType.REFRESH: ("keys",),
    MsgType.WAKE: (), MsgType.APPLY: ("keys", "values", "params"), MsgType.CHECKPOINT: (),
    MsgType.CHECKPOINTED: (),
    MsgType.WELCOME: ("addresses",), MsgType.RELEASE: (), MsgType.SYNCED: (),
    MsgType.FAILED: ("text",), MsgType.PULL_REPLY: ("positions", "values"),
    MsgType.UPDATE_ACK: (), MsgType.LOCALIZED: (),
    MsgType.FWD_PULL: ("keys", "positions"), MsgType.FWD_PUSH: ("keys", "values"),
    MsgType.FWD_SET: ("keys", "values"), MsgType.FWD_APPLY: ("keys", "values", "params"),
    MsgType.MOVE_REQUEST: ("keys",),
    MsgType.MOVE: ("keys", "values", "counters", "versions"),
    MsgType.OWNER_UPDATE: ("keys", "counters"),
    MsgType.SYNC: ("keys", "values", "counters", "versions"),
    MsgType.SYNC_REPLY: ("keys", "values", "counters", "versions"),
    MsgType.JOIN: ("addresses", "proof"), MsgType.PEERS: ("addresses", "proof"),
    MsgType.NODE_BARRIER: (),
    MsgType.NODE_RELEASE: (), MsgType.HEARTBEAT: (), MsgType.NODE_DONE: (),
    MsgType.SHUTDOWN: (), MsgType.NODE_FAILED: ("text",), MsgType.NODE_STATS: ("stats",),
}
_DTYPES = {"keys": np.uint64, "positions": np.uint32, "counters": np.uint32,
           "versions": np.uint32, "params": np.float64, "stats": np.uint64}
PARAMS_COUNT = 8             # an APPLY's params frame: float64 values (adapm.optim.PARAMS)
# Frames whose element count must equal the keys frame's.
_PER_KEY = ("positions", "counters", "versions")


@dataclass
class Message:
    type: MsgType
    src_node: int = 0
    src_worker: int = SERVER
    request_id: int = 0
    count: int = 0
    arg0: int = 0
    arg1: int = 0
    flags: int = 0
    keys: np.ndarray = None
    positions: np.ndarray = None
    values: object = None       # outgoing: array; incoming: raw bytes (see values_of)
    counters: np.ndarray = None
    versions: np.ndarray = None
    params: np.ndarray = None
    addresses: list = None
    text: str = ""
    proof: bytes = b""          # JOIN, PEERS
    token: int = 0
    stats: np.ndarray = None    # NODE_STATS

    @property
    def hops(self):
        return self.flags >> HOPS_SHIFT

    def encode(self):
        """Frames to pass to send() (socket.send_multipart)."""
        header = HEADER.pack(MAGIC, VERSION, int(self.type), self.src_node, self.flags,
                             self.src_worker, self.request_id, self.count, self.arg0, self.arg1,
                             self.token)
        frames = [header]
        for kind in _FRAMES[self.type]:
            if kind == "values":
                frames.append(_array_frame(self.values, None))
            elif kind == "addresses":
                frames.append("\n".join(self.addresses).encode())
            elif kind == "text":
                frames.append(self.text.encode("utf-8", "replace")[:MAX_TEXT_BYTES])
            elif kind == "proof":
                frames.append(bytes(self.proof))
            else:
                arr = getattr(self, kind)
                frames.append(_array_frame(np.empty(0) if arr is None else arr, _DTYPES[kind]))
        return frames


# Each type's named fields and the header slot each travels in: the one place that knows
# that, say, an INTENT's start clock is arg0. Code reads and writes the names only.
_NAMED = {
    MsgType.HELLO: {"pid": "count"},
    MsgType.BARRIER: {"generation": "arg0"},
    MsgType.INTENT: {"start": "arg0", "end": "arg1"},
    MsgType.CHECKPOINT: {"generation": "arg0", "phase": "arg1"},
    MsgType.WELCOME: {"mode": "arg0"},
    MsgType.FAILED: {"code": "arg0", "detail": "count"},
    MsgType.UPDATE_ACK: {"applied": "count"},
    MsgType.LOCALIZED: {"owned": "count"},
    MsgType.FWD_PULL: {"requester": "arg0"},
    MsgType.FWD_PUSH: {"requester": "arg0"},
    MsgType.FWD_SET: {"requester": "arg0"},
    MsgType.FWD_APPLY: {"requester": "arg0"},
    MsgType.MOVE_REQUEST: {"target": "arg0"},
    MsgType.MOVE: {"purpose": "arg1"},
    MsgType.OWNER_UPDATE: {"owner": "arg0"},
    MsgType.SYNC: {"holder": "arg0", "round": "request_id"},
    MsgType.SYNC_REPLY: {"round": "request_id"},
    MsgType.JOIN: {"fingerprint": "arg0"},
    MsgType.PEERS: {"cluster_token": "arg0"},
    MsgType.NODE_BARRIER: {"generation": "request_id"},
    MsgType.NODE_RELEASE: {"generation": "request_id"},
    MsgType.HEARTBEAT: {"joined": "count"},
    MsgType.NODE_FAILED: {"code": "arg0", "detail": "count"},
}
# Fields every type has besides its own: the request a reply answers, and the flags.
_COMMON = ("request_id", "flags")


def _slot(name, slot):
    return property(lambda self: getattr(self, slot),
                    lambda self, value: setattr(self, slot, value),
                    doc=f"travels in the header's {slot}")


def _message_type(mtype):
    """The builder and reader of one message type: a Message whose constructor takes
    only the type's own fields (by name) and whose named fields read the header slots."""
    named = _NAMED.get(mtype, {})
    allowed = frozenset(named) | frozenset(_FRAMES[mtype]) | frozenset(_COMMON)

    def __init__(self, **fields):
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise TypeError(f"{mtype.name} has no field {', '.join(unknown)}")
        Message.__init__(self, mtype)
        for name, value in fields.items():
            setattr(self, name, value)

    members = {"__init__": __init__, "TYPE": mtype, "FIELDS": tuple(named),
               "__doc__": f"{mtype.name}: fields {', '.join([*named, *_FRAMES[mtype]]) or '-'}"}
    members.update({name: _slot(name, slot) for name, slot in named.items()})
    name = "".join(part.capitalize() for part in mtype.name.split("_"))
    return type(name, (Message,), members)


# worker -> node server
Hello = _message_type(MsgType.HELLO)
Barrier = _message_type(MsgType.BARRIER)
WaitSync = _message_type(MsgType.WAIT_SYNC)
Intent = _message_type(MsgType.INTENT)
Goodbye = _message_type(MsgType.GOODBYE)
Pull = _message_type(MsgType.PULL)
Push = _message_type(MsgType.PUSH)
Set = _message_type(MsgType.SET)
Localize = _message_type(MsgType.LOCALIZE)
Refresh = _message_type(MsgType.REFRESH)
Wake = _message_type(MsgType.WAKE)
Apply = _message_type(MsgType.APPLY)
Checkpoint = _message_type(MsgType.CHECKPOINT)
# node server -> worker
Welcome = _message_type(MsgType.WELCOME)
Release = _message_type(MsgType.RELEASE)
Synced = _message_type(MsgType.SYNCED)
Failed = _message_type(MsgType.FAILED)
PullReply = _message_type(MsgType.PULL_REPLY)
UpdateAck = _message_type(MsgType.UPDATE_ACK)
Localized = _message_type(MsgType.LOCALIZED)
Checkpointed = _message_type(MsgType.CHECKPOINTED)
# node server -> node server
FwdPull = _message_type(MsgType.FWD_PULL)
FwdPush = _message_type(MsgType.FWD_PUSH)
FwdSet = _message_type(MsgType.FWD_SET)
FwdApply = _message_type(MsgType.FWD_APPLY)
MoveRequest = _message_type(MsgType.MOVE_REQUEST)
Move = _message_type(MsgType.MOVE)
OwnerUpdate = _message_type(MsgType.OWNER_UPDATE)
Sync = _message_type(MsgType.SYNC)
SyncReply = _message_type(MsgType.SYNC_REPLY)
# node server <-> coordinator
Join = _message_type(MsgType.JOIN)
Peers = _message_type(MsgType.PEERS)
NodeBarrier = _message_type(MsgType.NODE_BARRIER)
NodeRelease = _message_type(MsgType.NODE_RELEASE)
Heartbeat = _message_type(MsgType.HEARTBEAT)
NodeDone = _message_type(MsgType.NODE_DONE)
Shutdown = _message_type(MsgType.SHUTDOWN)
NodeFailed = _message_type(MsgType.NODE_FAILED)
NodeStats = _message_type(MsgType.NODE_STATS)

BY_TYPE = {cls.TYPE: cls for cls in (
    Hello, Barrier, WaitSync, Intent, Goodbye, Pull, Push, Set, Localize, Refresh, Wake,
    Apply, Checkpoint, Welcome, Release, Synced, Failed, PullReply, UpdateAck, Localized,
    Checkpointed, FwdPull,
    FwdPush, FwdSet, FwdApply, MoveRequest, Move, OwnerUpdate, Sync, SyncReply, Join, Peers,
    NodeBarrier, NodeRelease, Heartbeat, NodeDone, Shutdown, NodeFailed, NodeStats)}
assert set(BY_TYPE) == set(MsgType), "a message type without its builder"


def forwarded(msg, mtype, **fields):
    """A copy of `msg` as a forwarded message of `mtype`, one hop further."""
    hops = msg.hops + 1
    if hops > MAX_HOPS:
        raise ProtocolError(f"{msg.type.name} forwarded more than {MAX_HOPS} times")
    return BY_TYPE[mtype](request_id=msg.request_id,
                          flags=(msg.flags & 0xFF) | (hops << HOPS_SHIFT), **fields)


def _array_frame(arr, dtype):
    arr = np.ascontiguousarray(arr, dtype=dtype)
    return memoryview(arr).cast("B")


def _frame_bytes(frame):
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def frame_size(frames):
    return sum(_frame_bytes(f).nbytes for f in frames)


# Zero-copy sends pay for tracking the buffer (measured: 37 us for a message of 100 keys
# against 12 us copied); above this many bytes, copying costs more than tracking.
ZERO_COPY_MIN_BYTES = 64 * 1024


def send(sock, frames):
    """Send one message's frames (copied when small, zero-copy when large); returns its
    size in bytes. A large frame is read by ZeroMQ after this returns: every caller passes
    arrays that nobody writes afterwards (built for the message, or copied)."""
    size = frame_size(frames)
    sock.send_multipart(frames, copy=size < ZERO_COPY_MIN_BYTES)
    return size


def drain(sock, handle, budget):
    """Hand each message waiting on `sock` (its frames, zero-copy) to handle(frames), at
    most `budget` of them."""
    for _ in range(budget):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        handle(frames)


def decode(frames):
    """Parse the frames of one message (after any routing identity). Raises ProtocolError."""
    if not frames:
        raise ProtocolError("empty message")
    header = _frame_bytes(frames[0])
    if header.nbytes != HEADER_BYTES:
        raise ProtocolError(f"header of {header.nbytes} bytes, expected {HEADER_BYTES}")
    magic, version, mtype, src_node, flags, src_worker, request_id, count, arg0, arg1, token = \
        HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:04x}")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, expected {VERSION}")
    try:
        mtype = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"unknown message type {mtype}") from None
    kinds = _FRAMES[mtype]
    if len(frames) != 1 + len(kinds):
        raise ProtocolError(f"{mtype.name} with {len(frames) - 1} data frames, "
                            f"expected {len(kinds)}")
    msg = object.__new__(BY_TYPE[mtype])  # read through the type's named fields
    Message.__init__(msg, mtype, src_node, src_worker, request_id, count, arg0, arg1, flags,
                     token=token)
    for kind, frame in zip(kinds, frames[1:]):
        buf = _frame_bytes(frame)
        if kind == "values":
            msg.values = buf
        elif kind == "addresses":
            msg.addresses = _addresses(buf)
        elif kind == "text":
            if buf.nbytes > MAX_TEXT_BYTES:
                raise ProtocolError(f"text frame of {buf.nbytes} bytes")
            msg.text = bytes(buf).decode("utf-8", "replace")
        elif kind == "proof":
            if buf.nbytes > MAX_PROOF_BYTES:
                raise ProtocolError(f"proof frame of {buf.nbytes} bytes")
            msg.proof = bytes(buf)
        else:
            setattr(msg, kind, _typed(buf, kind))
    for kind in _PER_KEY:
        arr = getattr(msg, kind)
        if arr is not None and msg.keys is not None and arr.shape[0] != msg.keys.shape[0]:
            raise ProtocolError(f"{mtype.name}: {arr.shape[0]} {kind} for "
                                f"{msg.keys.shape[0]} keys")
    if msg.params is not None and msg.params.shape[0] != PARAMS_COUNT:
        raise ProtocolError(f"{mtype.name}: params frame of {msg.params.shape[0]} values, "
                            f"expected {PARAMS_COUNT}")
    return msg


def _typed(buf, kind):
    dtype = np.dtype(_DTYPES[kind])
    if buf.nbytes % dtype.itemsize != 0:
        raise ProtocolError(f"{kind} frame of {buf.nbytes} bytes is not a whole number "
                            f"of {dtype}")
    if buf.nbytes // dtype.itemsize > MAX_KEYS_PER_MESSAGE:
        raise ProtocolError(f"{kind} frame too large")
    return np.frombuffer(buf, dtype=dtype)


def _addresses(buf):
    try:
        text = bytes(buf).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("addresses frame is not UTF-8") from None
    addresses = text.split("\n") if text else []
    if any(not a.startswith("tcp://") or len(a) > 255 for a in addresses):
        raise ProtocolError("malformed address in addresses frame")
    return addresses


def values_of(msg, dtype, elements):
    """The message's values frame as `elements` values of `dtype`, or ProtocolError."""
    dtype = np.dtype(dtype)
    buf = msg.values
    if buf is None or buf.nbytes != elements * dtype.itemsize:
        got = None if buf is None else buf.nbytes
        raise ProtocolError(f"{msg.type.name}: values frame of {got} bytes, expected "
                            f"{elements} x {dtype}")
    return np.frombuffer(buf, dtype=dtype)


def max_frame_bytes(num_keys, max_length, itemsize):
    """The largest frame a legal message between members can hold, for a table of
    `num_keys` keys of at most `max_length` elements: a request names at most num_keys
    keys (workers split larger calls), so its values are at most num_keys values long.
    Receiving sockets refuse larger frames (ZeroMQ's MAXMSGSIZE disconnects the sender)
    before allocating them."""
    per_key = max(np.dtype(np.uint64).itemsize, int(max_length) * int(itemsize))
    return int(num_keys) * per_key + 64 * 1024
