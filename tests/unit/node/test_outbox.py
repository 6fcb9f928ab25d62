"""The real Outbox (adapm.node.outbox) over fake sockets: stamping and counting."""

import pytest
import zmq
from node_parts import (
    TOKEN,
    keys_of,
)

from adapm.node.outbox import Outbox
from adapm.wire import protocol
from adapm.wire.protocol import (
    MsgType,
    worker_identity,
)

pytestmark = pytest.mark.timeout(60)


class FakeSocket:
    def __init__(self, fail=False):
        self.frames = []
        self.fail = fail

    def send_multipart(self, frames, copy=True):
        if self.fail:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        self.frames.append([bytes(memoryview(f)) for f in frames])


def counting_outbox(node=3):
    counted = []
    outbox = Outbox(node, lambda name, n: counted.append((name, n)))
    outbox.token = TOKEN
    return outbox, counted


def test_outbox_to_peer_stamps_sender_and_token_and_counts_bytes():
    outbox, counted = counting_outbox()
    outbox.peers = {1: FakeSocket(), 2: FakeSocket()}
    msg = protocol.MoveRequest(request_id=5, target=3, keys=keys_of(1, 4))
    msg.src_node = 9                               # whatever it said: the outbox stamps it
    outbox.to_peer(2, msg)
    assert outbox.peers[1].frames == []
    (frames,) = outbox.peers[2].frames
    got = protocol.decode(frames)
    assert got.type == MsgType.MOVE_REQUEST and got.src_node == 3 and got.token == TOKEN
    assert got.keys.tolist() == [1, 4] and got.target == 3 and got.request_id == 5
    assert counted == [("bytes_sent", sum(len(f) for f in frames))]


def test_outbox_to_identity_and_to_worker_go_through_the_router():
    outbox, counted = counting_outbox()
    outbox.router = FakeSocket()
    outbox.to_identity(b"Wxyz", protocol.Synced(request_id=3))
    outbox.to_worker(7, protocol.UpdateAck(request_id=4, applied=2))
    (first, second) = outbox.router.frames
    assert first[0] == b"Wxyz" and second[0] == worker_identity(7, TOKEN)
    synced, ack = protocol.decode(first[1:]), protocol.decode(second[1:])
    assert synced.type == MsgType.SYNCED and synced.request_id == 3
    assert ack.type == MsgType.UPDATE_ACK and ack.applied == 2
    assert all(m.src_node == 3 and m.token == TOKEN for m in (synced, ack))
    # the routing identity is not counted (nor is it in bytes_received)
    assert counted == [("bytes_sent", sum(len(f) for f in first[1:])),
                       ("bytes_sent", sum(len(f) for f in second[1:]))]


def test_outbox_a_worker_that_is_gone_is_not_an_error():
    outbox, counted = counting_outbox()
    outbox.router = FakeSocket(fail=True)
    outbox.to_worker(1, protocol.Synced(request_id=1))   # logged, not raised
    assert counted == []


def test_outbox_to_coordinator_stamps_sender_and_token():
    outbox, _ = counting_outbox()
    outbox.coordinator = FakeSocket()
    outbox.to_coordinator(protocol.NodeBarrier(generation=4))
    (frames,) = outbox.coordinator.frames
    got = protocol.decode(frames)
    assert got.type == MsgType.NODE_BARRIER and got.generation == 4
    assert got.src_node == 3 and got.token == TOKEN
