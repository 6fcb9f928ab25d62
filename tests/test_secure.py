"""--secure: CURVE keys per cluster; a process without them can neither join nor inject."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

import adapm
from adapm.cluster import LocalCluster
from adapm.config import ClusterSpec
from adapm.protocol import Message, MsgType, worker_identity
from adapm.security import ENV_CURVE_KEYS, CurveKeys

pytestmark = pytest.mark.timeout(90)

LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))
SCRIPT = str(Path(__file__).with_name("launch_script.py"))


def sums(w):
    w.push(np.arange(w.num_keys), np.ones((w.num_keys, 2)))
    w.wait_sync()
    w.barrier()
    return float(w.pull(np.arange(w.num_keys)).sum())


def test_secure_run_works():
    assert adapm.run(sums, nodes=2, num_keys=10, value_length=2, secure=True) == [40.0, 40.0]


def test_secure_launch_works(tmp_path):
    proc = subprocess.run([LAUNCHER, "--secure", "--nodes", "2", "--workers-per-node", "1",
                           "--num-keys", "30", "--value-length", "2", SCRIPT, "sums",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("total 300") == 2


def _outsider_gets_answer(address, keys=None):
    """Send a well-formed HELLO as worker 0 would; True if any answer comes back."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, worker_identity(5))
        if keys is not None:
            keys.connect(sock)
        sock.connect(address)
        sock.send_multipart(Message(MsgType.HELLO, src_worker=5).encode())
        return bool(sock.poll(1500))
    finally:
        ctx.destroy(linger=0)


def test_outsiders_are_rejected(monkeypatch):
    keys = CurveKeys.generate()
    spec = ClusterSpec(num_keys=8, value_length=2, num_nodes=1, workers_per_node=6,
                       curve=keys)
    with LocalCluster(spec) as cluster:
        address = cluster.addresses[0]
        assert not _outsider_gets_answer(address)                     # no CURVE at all
        stranger = CurveKeys(keys.server_public, keys.server_secret,
                             *zmq.curve_keypair())
        assert not _outsider_gets_answer(address, stranger)           # wrong client key
        assert _outsider_gets_answer(address, keys)                   # the cluster's keys
        monkeypatch.setenv(ENV_CURVE_KEYS, keys.to_text())
        w = adapm.Worker(cluster.worker_env(0))
        try:
            w.push([1], [[1.0, 2.0]])
            assert w.pull([1]).tolist() == [[1.0, 2.0]]
            assert w.stats()["node"]["malformed_messages"] == 0  # nothing even reached it
        finally:
            w.finalize()


def test_keys_file_round_trip(tmp_path):
    keys = CurveKeys.generate()
    path = tmp_path / "keys"
    keys.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert CurveKeys.load(path) == keys
    with pytest.raises(ValueError):
        CurveKeys.from_text("not,keys")
