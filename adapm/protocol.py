"""The wire format: the only module that knows byte layouts of messages.

A message is a ZeroMQ multipart message: one fixed 48-byte little-endian header frame,
followed by raw array frames (keys as uint64, values in the table's dtype), sent without
copying. Nothing is ever unpickled. `decode` checks everything a peer could get wrong
(size, magic, version, type, frame count and frame sizes) and raises ProtocolError; the
receiver then drops and counts the message.

Header fields:
    magic u16 | version u8 | type u8 | src_node u16 | flags u16 | src_worker u32 |
    request_id u64 | count u64 | arg0 i64 | arg1 i64
`src_worker` is SERVER for messages from a node server. The meaning of count/arg0/arg1
depends on the type (see MsgType)."""

import enum
import struct
from dataclasses import dataclass

import numpy as np

from adapm.errors import ProtocolError

MAGIC = 0xADA0
VERSION = 1
HEADER = struct.Struct("<HBBHHIQQqq")
HEADER_BYTES = HEADER.size
SERVER = 0xFFFFFFFF  # src_worker of a node server
MAX_KEYS_PER_MESSAGE = 1 << 28


class MsgType(enum.IntEnum):
    # worker -> its node server
    HELLO = 1        # count: pid
    BARRIER = 2      # request_id: barrier generation
    WAIT_SYNC = 3
    INTENT = 4       # frames: keys; arg0: start clock, arg1: end clock
    GOODBYE = 5
    # node server -> worker
    WELCOME = 16
    RELEASE = 17     # request_id: barrier generation
    SYNCED = 18
    FAILED = 19      # the cluster failed; arg0: failure code


# Frames that follow the header, per type: a tuple of frame kinds ("keys").
_FRAMES = {
    MsgType.HELLO: (), MsgType.BARRIER: (), MsgType.WAIT_SYNC: (), MsgType.GOODBYE: (),
    MsgType.INTENT: ("keys",),
    MsgType.WELCOME: (), MsgType.RELEASE: (), MsgType.SYNCED: (), MsgType.FAILED: (),
}


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

    def encode(self):
        """Frames to pass to socket.send_multipart(copy=False)."""
        header = HEADER.pack(MAGIC, VERSION, int(self.type), self.src_node, self.flags,
                             self.src_worker, self.request_id, self.count, self.arg0, self.arg1)
        frames = [header]
        for kind in _FRAMES[self.type]:
            if kind == "keys":
                frames.append(_as_frame(self.keys, np.uint64))
        return frames


def _as_frame(arr, dtype):
    arr = np.ascontiguousarray(arr, dtype=dtype)
    return memoryview(arr).cast("B")


def _frame_bytes(frame):
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def decode(frames):
    """Parse the frames of one message (after any routing identity). Raises ProtocolError."""
    if not frames:
        raise ProtocolError("empty message")
    header = _frame_bytes(frames[0])
    if header.nbytes != HEADER_BYTES:
        raise ProtocolError(f"header of {header.nbytes} bytes, expected {HEADER_BYTES}")
    magic, version, mtype, src_node, flags, src_worker, request_id, count, arg0, arg1 = \
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
    msg = Message(mtype, src_node, src_worker, request_id, count, arg0, arg1, flags)
    for kind, frame in zip(kinds, frames[1:]):
        if kind == "keys":
            msg.keys = _keys_frame(frame)
    return msg


def _keys_frame(frame):
    buf = _frame_bytes(frame)
    if buf.nbytes % 8 != 0:
        raise ProtocolError(f"keys frame of {buf.nbytes} bytes is not a whole number of uint64")
    if buf.nbytes // 8 > MAX_KEYS_PER_MESSAGE:
        raise ProtocolError("keys frame too large")
    return np.frombuffer(buf, dtype=np.uint64)
