"""Malformed and hostile messages at live node servers: dropped and counted, never
executed, never a crash, never a corrupted table."""
import struct

import numpy as np
import pytest
import zmq

import adapm
from adapm.ops.cluster import LocalCluster
from adapm.wire import protocol
from adapm.wire.protocol import HEADER, MAGIC, VERSION, Message, MsgType
from adapm.wire.spec import ClusterSpec

pytestmark = pytest.mark.timeout(120)

NUM_KEYS, D = 40, 3


def corrupted_messages(rng, count):
    """Valid templates, each broken in one way, and plain random frames."""
    keys = np.arange(5, dtype=np.uint64)
    templates = [
        Message(MsgType.PULL, src_worker=9, keys=keys),
        Message(MsgType.PUSH, src_worker=9, keys=keys, values=np.ones(5 * D, np.float32)),
        Message(MsgType.FWD_PULL, src_node=1, keys=keys, positions=np.arange(5)),
        Message(MsgType.MOVE, src_node=1, keys=keys, values=np.ones(5 * D, np.float32),
                counters=np.ones(5)),
        Message(MsgType.OWNER_UPDATE, src_node=1, keys=keys, counters=np.ones(5), arg0=1),
        Message(MsgType.INTENT, src_worker=0, keys=keys, arg0=0, arg1=1),
        Message(MsgType.JOIN, src_node=0, addresses=["tcp://127.0.0.1:1"]),
    ]
    for i in range(count):
        if i % 50 == 1:  # well-formed, but from a worker the cluster does not have
            yield [bytes(f) for f in templates[1].encode()]
            continue
        if i % 4 == 0:
            yield [rng.bytes(int(rng.integers(0, 96))) for _ in range(int(rng.integers(1, 5)))]
            continue
        frames = [bytes(f) for f in templates[i % len(templates)].encode()]
        header = list(HEADER.unpack(frames[0]))
        how = int(rng.integers(0, 9))
        if how == 0:
            header[0] = MAGIC ^ 1
        elif how == 1:
            header[1] = VERSION + 1
        elif how == 2:
            header[2] = 250
        elif how == 3:
            header[3] = 9999  # src_node out of range
        elif how == 4 and len(frames) > 1:
            frames[1] = frames[1][:-3]  # truncated frame
        elif how == 5:
            frames = frames[:-1] if len(frames) > 1 else frames + [b"x"]
        elif how == 6 and len(frames) > 1:
            frames[1] = np.array([NUM_KEYS + 7] * 5, np.uint64).tobytes()  # keys out of range
        elif how == 7 and len(frames) > 2:
            frames[2] = frames[2] + b"\0" * 4  # values/positions of the wrong size
        else:
            frames[0] = frames[0][:-1]
        frames[0] = HEADER.pack(*header) if how in (0, 1, 2, 3) else frames[0]
        yield frames


def test_fuzzed_nodes_keep_serving_correctly():
    spec = ClusterSpec(num_keys=NUM_KEYS, value_length=D, num_nodes=2, workers_per_node=1)
    with LocalCluster(spec) as cluster:
        w = adapm.Worker(cluster.worker_env(0))
        ctx = zmq.Context()
        try:
            rng = np.random.default_rng(1)
            fuzzers = []
            for node in (0, 1):
                for identity in (b"W" + struct.pack("<I", 9), b"N" + struct.pack("<H", 7),
                                 b"\x00junk", b"N\x00\x00"):
                    sock = ctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.IDENTITY, identity)
                    sock.connect(cluster.addresses[node])
                    fuzzers.append(sock)
            keys = np.arange(NUM_KEYS)
            for i, frames in enumerate(corrupted_messages(rng, 3000)):
                fuzzers[i % len(fuzzers)].send_multipart(frames)
                if i % 500 == 0:
                    w.push(keys, np.ones((NUM_KEYS, D)))
            w.push(keys, np.ones((NUM_KEYS, D)))
            np.testing.assert_array_equal(w.pull(keys), np.full((NUM_KEYS, D), 7.0))
            assert all(proc.exitcode is None for proc in cluster.servers.values())
            assert w.stats()["node"]["malformed_messages"] > 100
        finally:
            for sock in fuzzers:
                sock.close()
            ctx.term()
            w.finalize()


def test_decode_never_raises_anything_but_protocol_error():
    rng = np.random.default_rng(2)
    for frames in corrupted_messages(rng, 5000):
        try:
            protocol.decode(frames)
        except adapm.ProtocolError:
            pass
