"""Guarantees 6 and 7 (DESIGN.md §7) at live node servers: no connection that merely
reaches a port poses as a member, no message makes a node allocate more than the largest
legal message, a flood is counted without flooding the log, and an internal error (a bug,
a full arena) fails the cluster loudly instead of being dropped as a malformed message."""
import os
import re
import time

import numpy as np
import pytest
import zmq

import adapm
from adapm.common.failpoints import ENV_FAILPOINTS
from adapm.ops.cluster import LocalCluster
from adapm.wire.protocol import Message, MsgType, node_identity
from adapm.wire.spec import ClusterSpec

pytestmark = pytest.mark.timeout(120)

NUM_KEYS, D = 40, 3


def memory_bytes(pid, field="VmRSS"):
    """A process's resident memory now (VmRSS), or at its peak so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(pid)


def raw_socket(ctx, address, identity):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(address)
    return sock


def forged_push(src_node, keys, amount):
    """A well-formed forwarded push as node `src_node` would send it, without the token."""
    return Message(MsgType.FWD_PUSH, src_node=src_node, arg0=0, keys=keys,
                   values=np.full(keys.shape[0] * D, amount, np.float32)).encode()


def wait_for_malformed(worker, at_least, timeout=20.0):
    deadline = time.monotonic() + timeout
    while worker.stats()["node"]["malformed_messages"] < at_least:
        assert time.monotonic() < deadline, "the node did not count the messages"
        time.sleep(0.02)


def test_no_connection_poses_as_a_member():
    """A forged forwarded push, from the node's own identity, from a peer's identity that
    is not yet in use at that node, and from a stranger: none changes a value."""
    spec = ClusterSpec(num_keys=NUM_KEYS, value_length=D, num_nodes=3, workers_per_node=1)
    with LocalCluster(spec) as cluster:
        w = adapm.Worker(cluster.worker_env(0))
        ctx = zmq.Context()
        try:
            keys = np.arange(0, NUM_KEYS, 3, dtype=np.uint64)  # homed on node 0
            before = w.pull(keys).copy()
            forgers = [
                (raw_socket(ctx, cluster.addresses[0], node_identity(0)), 0),  # its own id
                (raw_socket(ctx, cluster.addresses[0], node_identity(2)), 2),  # a peer's id
                (raw_socket(ctx, cluster.addresses[0], b"stranger"), 1),
            ]
            for sock, claimed in forgers:
                sock.send_multipart(forged_push(claimed, keys, 100.0))
            wait_for_malformed(w, 1)
            time.sleep(0.3)  # give every forged message the time to be handled
            np.testing.assert_array_equal(w.pull(keys), before)
            w.push(keys, np.ones((keys.shape[0], D)))
            np.testing.assert_array_equal(w.pull(keys), before + 1)
        finally:
            ctx.destroy(linger=0)
            w.finalize()


def test_a_flood_is_bounded_in_memory_and_in_log_lines(capfd):
    """Huge frames are refused before they are allocated, thousands of bad messages are
    counted in a few log lines, and the cluster keeps exact sums."""
    spec = ClusterSpec(num_keys=NUM_KEYS, value_length=D, num_nodes=2, workers_per_node=1)
    with LocalCluster(spec) as cluster:
        w = adapm.Worker(cluster.worker_env(0))
        ctx = zmq.Context()
        try:
            keys = np.arange(NUM_KEYS)
            w.push(keys, np.ones((NUM_KEYS, D)))
            node0 = cluster.servers[0].pid
            steady = memory_bytes(node0)
            huge = np.zeros(200 * 2**20, dtype=np.uint8)  # 200 MB: far past any legal frame
            flooder = raw_socket(ctx, cluster.addresses[0], b"flood")
            header = Message(MsgType.PUSH, src_worker=0, keys=np.arange(5, dtype=np.uint64),
                             values=np.zeros(1)).encode()
            for _ in range(3):
                flooder.send_multipart([header[0], header[1], huge], copy=False)
            garbage = raw_socket(ctx, cluster.addresses[0], b"garbage")
            bad = 12_000
            for i in range(bad):
                garbage.send_multipart([b"\x00" * (i % 60)])
            wait_for_malformed(w, bad, timeout=60)
            time.sleep(0.5)
            peak = memory_bytes(node0, "VmHWM")  # at any moment of the flood
            assert peak < 2 * steady, f"steady {steady >> 20} MB, peak {peak >> 20} MB"
            w.push(keys, np.ones((NUM_KEYS, D)))
            np.testing.assert_array_equal(w.pull(keys), np.full((NUM_KEYS, D), 2.0))
            assert cluster.servers[0].exitcode is None
        finally:
            ctx.destroy(linger=0)
            w.finalize()
    lines = [line for line in capfd.readouterr().err.splitlines() if "malformed" in line]
    assert 1 <= len(lines) <= 10, f"{len(lines)} log lines for {bad} malformed messages"


def push_everything(w):
    keys = np.arange(w.num_keys)
    w.push(keys, np.ones((w.num_keys, 1)))
    w.wait_sync()
    w.barrier()
    return float(w.pull(keys).sum())


def test_an_internal_error_fails_the_cluster_naming_node_and_keys(monkeypatch):
    """A handler that raises is a bug, not a malformed message: every worker raises
    ClusterError naming the node and the keys, within seconds."""
    monkeypatch.setenv(ENV_FAILPOINTS, "1:raise_in=PUSH")
    started = time.monotonic()
    with pytest.raises(adapm.WorkerError) as info:
        adapm.run(push_everything, nodes=2, workers_per_node=1, num_keys=20, value_length=1)
    assert time.monotonic() - started < 30
    text = str(info.value)
    assert "ClusterError" in text and "node 1: internal error" in text, text
    assert re.search(r"PUSH from worker 0 \(node 0\) for 10 keys in 1\.\.19", text), text


def localize_remote_keys(w):
    if w.node == 1:
        w.localize(np.arange(0, w.num_keys, 2))  # homed on node 0
    w.barrier()
    return float(w.pull(np.arange(w.num_keys)).sum())


def test_a_full_arena_fails_the_cluster_loudly(monkeypatch):
    """Keys relocated to a node whose arena is full: the MOVE cannot be installed, the
    node fails the cluster (before: counted as malformed, and the moved keys were lost)."""
    monkeypatch.setenv(ENV_FAILPOINTS, "1:arena_full")
    with pytest.raises(adapm.WorkerError) as info:
        adapm.run(localize_remote_keys, nodes=2, workers_per_node=1, num_keys=20,
                  value_length=1)
    text = str(info.value)
    assert "node 1: internal error" in text and "MemoryError" in text, text
    assert re.search(r"MOVE from node 0 for 10 keys in 0\.\.18", text), text


def test_failpoints_are_for_one_node_only():
    from adapm.common.failpoints import OFF, for_node
    one = for_node(1, "1:arena_full,0:raise_in=PUSH")
    assert one and one.armed("arena_full") and one.argument("arena_full") == ""
    assert not one.armed("raise_in") and one.argument("raise_in") is None
    assert for_node(0, "1:arena_full,0:raise_in=PUSH").argument("raise_in") == "PUSH"
    assert for_node(2, "1:arena_full") is OFF and not OFF
    assert for_node(2, "") is OFF
    with pytest.raises(ValueError):
        for_node(0, "arena_full")
    with pytest.raises(ValueError, match="no fail point 'arena_ful'"):
        for_node(0, "1:arena_ful")  # a typo fails, on every node, not silently
    assert os.environ.get(ENV_FAILPOINTS) is None


def test_without_the_variable_fail_points_are_off(monkeypatch):
    from adapm.common import failpoints
    monkeypatch.delenv(ENV_FAILPOINTS, raising=False)
    assert failpoints.for_node(0) is failpoints.OFF
