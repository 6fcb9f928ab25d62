import numpy as np
import pytest

from adapm.common.errors import ProtocolError
from adapm.wire import protocol
from adapm.wire.protocol import HEADER_BYTES, Message, MsgType


def frames_of(msg):
    return [bytes(f) for f in msg.encode()]


def test_round_trip_with_keys():
    keys = np.array([5, 1, 2**40], dtype=np.uint64)
    msg = Message(MsgType.INTENT, src_node=3, src_worker=7, request_id=9, arg0=4, arg1=10,
                  keys=keys)
    got = protocol.decode(frames_of(msg))
    assert (got.type, got.src_node, got.src_worker, got.request_id, got.arg0, got.arg1) == \
        (MsgType.INTENT, 3, 7, 9, 4, 10)
    np.testing.assert_array_equal(got.keys, keys)


def test_header_is_fixed_size():
    assert len(frames_of(Message(MsgType.BARRIER))[0]) == HEADER_BYTES


@pytest.mark.parametrize("mangle", [
    lambda f: [],
    lambda f: [f[0][:-1]],
    lambda f: [b"\x00" * HEADER_BYTES],
    lambda f: [f[0][:2] + b"\x09" + f[0][3:]] + f[1:],      # wrong version
    lambda f: [f[0][:3] + b"\xee" + f[0][4:]] + f[1:],      # unknown type
    lambda f: f[:1],                                       # keys frame missing
    lambda f: f + [b"extra"],                              # one frame too many
    lambda f: [f[0], f[1][:-3]],                           # keys not whole uint64
])
def test_malformed_messages_are_rejected(mangle):
    good = frames_of(Message(MsgType.INTENT, arg0=0, arg1=1, keys=np.arange(4)))
    with pytest.raises(ProtocolError):
        protocol.decode(mangle(good))


def test_random_bytes_never_decode_into_anything_but_protocol_error():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        frames = [rng.bytes(int(rng.integers(0, 80))) for _ in range(int(rng.integers(1, 4)))]
        try:
            protocol.decode(frames)
        except ProtocolError:
            pass


# -- one builder and one reader per type, with named fields -----------------------------

def test_every_type_has_a_builder_whose_named_fields_survive_the_wire():
    from adapm.wire.protocol import _NAMED, BY_TYPE, decode

    for mtype, cls in BY_TYPE.items():
        names = _NAMED.get(mtype, {})
        fields = {name: 1000 + i for i, name in enumerate(names)}
        msg = cls(**fields)
        assert msg.type is mtype
        if "addresses" in protocol._FRAMES[mtype]:
            msg.addresses = []
        if "params" in protocol._FRAMES[mtype]:
            msg.params = np.zeros(protocol.PARAMS_COUNT)
        back = decode([bytes(memoryview(f)) for f in msg.encode()])
        assert type(back) is cls, mtype
        assert {name: getattr(back, name) for name in names} == fields, mtype


def test_a_builder_refuses_fields_of_other_types_and_raw_header_slots():
    from adapm.wire.protocol import Intent, Pull

    with pytest.raises(TypeError, match="INTENT has no field arg0"):
        Intent(arg0=3)
    with pytest.raises(TypeError, match="PULL has no field start"):
        Pull(start=3)


def test_named_fields_read_the_header_slot_that_the_type_puts_them_in():
    from adapm.wire.protocol import FwdPull, Intent, Sync

    keys = np.arange(3, dtype=np.uint64)
    msg = protocol.decode([bytes(memoryview(f)) for f in
                           Intent(start=7, end=9, keys=keys).encode()])
    assert (msg.start, msg.end) == (7, 9)
    fwd = FwdPull(requester=5, keys=keys, positions=np.arange(3, dtype=np.uint32))
    assert protocol.decode([bytes(memoryview(f)) for f in fwd.encode()]).requester == 5
    sync = Sync(round=4, holder=1, keys=keys, values=np.empty(0, np.float32),
                counters=np.zeros(3, np.uint32), versions=np.zeros(3, np.uint32))
    back = protocol.decode([bytes(memoryview(f)) for f in sync.encode()])
    assert (back.round, back.holder) == (4, 1)
