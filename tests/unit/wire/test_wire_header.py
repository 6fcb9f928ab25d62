"""src/wire_header.pxd, the compiled data plane's copy of the message header, agrees with
adapm.wire.protocol (the one reference): the fields in order with their sizes, and
every code."""

import re
import struct

from testpaths import ROOT

from adapm.wire import protocol
from adapm.wire.protocol import MsgType

PXD = ROOT / "src" / "wire_header.pxd"
C_FORMATS = {"uint8_t": "B", "uint16_t": "H", "uint32_t": "I", "uint64_t": "Q", "int64_t": "q"}
FIELDS = ("magic", "version", "type", "src_node", "flags", "src_worker", "request_id",
          "count", "arg0", "arg1", "token")


def _struct_fields(text):
    body = text.split("cdef packed struct header_t:")[1].split("\n\n")[0]
    return re.findall(r"^\s+(\w+) (\w+)$", body, re.MULTILINE)


def _constants(text):
    return {name: int(value, 0) for name, value in
            re.findall(r"^\s+(WIRE_\w+) = (0x[0-9A-Fa-f]+|\d+)", text, re.MULTILINE)}


def test_header_fields_match_protocol():
    fields = _struct_fields(PXD.read_text())
    assert tuple(name for _, name in fields) == FIELDS
    layout = "<" + "".join(C_FORMATS[ctype] for ctype, _ in fields)
    assert layout == protocol.HEADER.format
    assert struct.calcsize(layout) == protocol.HEADER_BYTES


def test_codes_match_protocol():
    codes = _constants(PXD.read_text())
    assert codes == {
        "WIRE_MAGIC": protocol.MAGIC, "WIRE_VERSION": protocol.VERSION,
        "WIRE_HEADER_BYTES": protocol.HEADER_BYTES, "WIRE_SERVER": protocol.SERVER,
        "WIRE_ALL_POSITIONS": protocol.ALL_POSITIONS,
        "WIRE_PULL": MsgType.PULL, "WIRE_PUSH": MsgType.PUSH,
        "WIRE_PULL_REPLY": MsgType.PULL_REPLY, "WIRE_UPDATE_ACK": MsgType.UPDATE_ACK,
        "WIRE_FWD_PULL": MsgType.FWD_PULL, "WIRE_FWD_PUSH": MsgType.FWD_PUSH,
        "WIRE_SET": MsgType.SET, "WIRE_APPLY": MsgType.APPLY, "WIRE_FWD_SET": MsgType.FWD_SET,
        "WIRE_FWD_APPLY": MsgType.FWD_APPLY, "WIRE_PARAMS_COUNT": protocol.PARAMS_COUNT,
        "WIRE_SYNC": MsgType.SYNC, "WIRE_MOVE": MsgType.MOVE,
        "WIRE_OWNER_UPDATE": MsgType.OWNER_UPDATE,
        "WIRE_MOVE_FOR_ROUND": protocol.MOVE_FOR_ROUND, "WIRE_SYNC_REPLY": MsgType.SYNC_REPLY,
        "WIRE_SYNC_KEEP": protocol.SYNC_KEEP, "WIRE_SYNC_DROP": protocol.SYNC_DROP,
        "WIRE_HAS_DELTA": protocol.HAS_DELTA, "WIRE_REPLY_VALUE": protocol.REPLY_VALUE,
        "WIRE_REPLY_DROPPED": protocol.REPLY_DROPPED,
        "WIRE_REPLY_CURRENT": protocol.REPLY_CURRENT, "WIRE_HOPS_SHIFT": protocol.HOPS_SHIFT}


def test_the_check_notices_a_drift():
    drifted = PXD.read_text().replace("WIRE_PUSH = 7", "WIRE_PUSH = 8")
    assert _constants(drifted)["WIRE_PUSH"] != MsgType.PUSH
    swapped = PXD.read_text().replace("uint16_t src_node", "uint32_t src_node")
    assert "".join(C_FORMATS[c] for c, _ in _struct_fields(swapped)) != \
        protocol.HEADER.format[1:]
