"""A stranger cannot join before the cluster forms (issue 17, point 1).

Per-machine launches leave node 0 waiting for the others for seconds or minutes. Before,
anyone who reached the coordinator's port then could JOIN as a missing node with the
fingerprint of the public launch options, be handed the cluster token (PEERS), and push
to any key; merely connecting under node 1's routing identity locked the real node 1 out.
Now a JOIN proves knowledge of the cluster secret (adapm.wire.cluster_secret), PEERS carries
the token masked for the node that joined, and the coordinator knows each node by the
connection of its valid JOIN."""
import os
import secrets
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq
from testpaths import TESTS

from adapm.node.control.coordinator import Coordinator
from adapm.wire import protocol
from adapm.wire.cluster_secret import NONCE_BYTES, PROOF_BYTES, ClusterSecret
from adapm.wire.protocol import MsgType, node_identity
from adapm.wire.spec import ClusterSpec

from conftest import coordinator_port, wait_until_clean

pytestmark = pytest.mark.timeout(120)

HERE = TESTS
SCRIPT = str(HERE / "launch_script.py")
LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))
SECRET = "a-secret-every-machine-of-this-test-shares"


def per_machine(rank, coordinator, cluster_id, tmp_path, secret=SECRET, extra_env=None):
    env = dict(os.environ, **(extra_env or {}))
    env.pop("ADAPM_CLUSTER_SECRET", None)
    if secret is not None:
        env["ADAPM_CLUSTER_SECRET"] = secret
    return subprocess.Popen(
        [LAUNCHER, "--nnodes", "2", "--node-rank", str(rank), "--coordinator", coordinator,
         "--host", "127.0.0.1", "--workers-per-node", "1", "--num-keys", "30",
         "--value-length", "2", "--cluster-id", cluster_id, SCRIPT, "sums", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def public_fingerprint(cluster_id):
    """What anyone can compute from the launch options of per_machine."""
    return ClusterSpec(num_keys=30, value_length=2, num_nodes=2, workers_per_node=1,
                       init="zeros", cluster_id=cluster_id).fingerprint()


def stranger_join(ctx, coordinator, cluster_id, identity=None, proof=None):
    """A DEALER of a process without the secret, connected under node 1's identity, that
    sends a JOIN as node 1 with the right fingerprint and a made-up proof."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity or node_identity(1))
    sock.connect(f"tcp://{coordinator}")
    join = protocol.Join(fingerprint=public_fingerprint(cluster_id),
                         addresses=["tcp://127.0.0.1:1"],
                         proof=proof if proof is not None else secrets.token_bytes(PROOF_BYTES))
    join.src_node = 1
    protocol.send(sock, join.encode())
    return sock


def test_a_stranger_joining_early_learns_nothing_and_locks_nobody_out(tmp_path):
    coordinator = f"127.0.0.1:{coordinator_port()}"
    cluster_id = f"js{uuid.uuid4().hex[:6]}"
    node0 = per_machine(0, coordinator, cluster_id, tmp_path)
    ctx = zmq.Context()
    try:
        strangers = [stranger_join(ctx, coordinator, cluster_id),  # a forged proof
                     stranger_join(ctx, coordinator, cluster_id, identity=b"S1", proof=b"")]
        deadline = time.monotonic() + 4.0  # node 0 is up and heartbeating meanwhile
        while time.monotonic() < deadline:
            for sock in strangers:
                assert not sock.poll(100), "a stranger was answered: " + repr(
                    protocol.decode(sock.recv_multipart()).type)
        node1 = per_machine(1, coordinator, cluster_id, tmp_path)  # still node 1's place
        outs = [node0.communicate(timeout=90)[0], node1.communicate(timeout=90)[0]]
    finally:
        ctx.destroy(linger=0)
        for proc in (node0, locals().get("node1")):
            if proc is not None and proc.poll() is None:
                proc.kill()
    for proc, out in zip((node0, node1), outs):
        assert proc.returncode == 0, out
    assert sum(out.count("total 300") for out in outs) == 2, outs
    assert "without a valid proof of the cluster secret" in outs[0], outs[0]
    assert "has the cluster secret: True" not in "".join(outs)  # workers never get it
    assert "has the cluster secret: False" in outs[0]
    segments, processes = wait_until_clean(timeout=15)
    assert not segments and not processes


@pytest.mark.parametrize("squatted", ["worker 1", "node 1", "worker 0"])
def test_a_stranger_connected_first_under_a_members_name_locks_nobody_out(tmp_path,
                                                                          squatted):
    """A ROUTER ignores a second connection under an identity already taken: with plain
    names (W<rank>, N<node>), a process that connected to node 0's port first under a
    member's name made that worker's hello go unanswered or the peers' syncs vanish (a
    failure or a hang). Members' identities now carry 8 bytes derived from the token."""
    from adapm.wire.protocol import worker_identity
    coordinator = f"127.0.0.1:{coordinator_port()}"
    node_port = coordinator_port()
    cluster_id = f"js{uuid.uuid4().hex[:6]}"
    env = {"ADAPM_START_TIMEOUT": "30"}
    node0 = subprocess.Popen(
        [LAUNCHER, "--nnodes", "2", "--node-rank", "0", "--coordinator", coordinator,
         "--host", "127.0.0.1", "--port", str(node_port), "--workers-per-node", "1",
         "--num-keys", "30", "--value-length", "2", "--cluster-id", cluster_id, SCRIPT,
         "sums", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=dict(os.environ, ADAPM_CLUSTER_SECRET=SECRET, **env))
    ctx = zmq.Context()
    node1 = None
    try:
        kind, number = squatted.split()
        squatter = ctx.socket(zmq.DEALER)
        squatter.setsockopt(zmq.LINGER, 0)
        squatter.setsockopt(zmq.IDENTITY, worker_identity(int(number)) if kind == "worker"
                            else node_identity(int(number)))
        squatter.connect(f"tcp://127.0.0.1:{node_port}")
        squatter.send(b"")  # an empty frame: the connection is made, nothing is read
        time.sleep(1.0)
        node1 = per_machine(1, coordinator, cluster_id, tmp_path, extra_env=env)
        outs = [node0.communicate(timeout=90)[0], node1.communicate(timeout=90)[0]]
    finally:
        ctx.destroy(linger=0)
        for proc in (node0, node1):
            if proc is not None and proc.poll() is None:
                proc.kill()
    for proc, out in zip((node0, node1), outs):
        assert proc.returncode == 0, out
    assert sum(out.count("total 300") for out in outs) == 2, outs


def test_a_node_with_another_secret_is_not_admitted(tmp_path):
    coordinator = f"127.0.0.1:{coordinator_port()}"
    cluster_id = f"js{uuid.uuid4().hex[:6]}"
    env = {"ADAPM_START_TIMEOUT": "5"}
    node0 = per_machine(0, coordinator, cluster_id, tmp_path, extra_env=env)
    node1 = per_machine(1, coordinator, cluster_id, tmp_path, secret="x" * 16 + SECRET,
                        extra_env=env)
    outs = [node0.communicate(timeout=60)[0], node1.communicate(timeout=60)[0]]
    assert node0.returncode != 0 and node1.returncode != 0, outs
    assert "JOIN as node 1 without a valid proof of the cluster secret" in outs[0], outs[0]
    assert "the same cluster secret" in outs[1], outs[1]  # the hint in its start failure


def test_a_per_machine_launch_without_a_secret_says_what_that_risks(tmp_path):
    coordinator = f"127.0.0.1:{coordinator_port()}"
    cluster_id = f"js{uuid.uuid4().hex[:6]}"
    procs = [per_machine(rank, coordinator, cluster_id, tmp_path, secret=None)
             for rank in (0, 1)]
    outs = [proc.communicate(timeout=90)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outs
    for out in outs:
        assert "WARNING: no cluster secret" in out and "could join it" in out, out
    assert sum(out.count("total 300") for out in outs) == 2, outs


@pytest.mark.parametrize("bad", ["fifo", "short", "missing", "two lines"])
def test_a_bad_secret_file_is_refused_at_once(tmp_path, bad):
    path = tmp_path / "secret"
    if bad == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer for ever
    elif bad == "short":
        path.write_text("tooshort\n")
    elif bad == "two lines":  # --hosts would hand on the first line only
        path.write_text(SECRET + "\n" + SECRET + "\n")
    proc = subprocess.run(
        [LAUNCHER, "--nnodes", "2", "--node-rank", "1", "--coordinator", "127.0.0.1:1",
         "--secret-file", str(path), "--num-keys", "4", SCRIPT, "ok", str(tmp_path)],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    expected = {"fifo": "not a regular file", "short": "at least 16 characters",
                "missing": "No such file", "two lines": "is one line"}[bad]
    assert expected in proc.stderr, proc.stderr


def test_a_short_secret_in_the_environment_is_refused(tmp_path):
    proc = subprocess.run(
        [LAUNCHER, "--nnodes", "2", "--node-rank", "1", "--coordinator", "127.0.0.1:1",
         "--num-keys", "4", SCRIPT, "ok", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
        env=dict(os.environ, ADAPM_CLUSTER_SECRET="short"))
    assert proc.returncode == 2 and "ADAPM_CLUSTER_SECRET" in proc.stderr, proc.stderr


# -- the parts, without processes -------------------------------------------------------

def test_a_join_proof_binds_every_field_and_the_secret():
    secret = ClusterSecret.from_text(SECRET, "test")
    proof = secret.join_proof(1, 12345, "tcp://10.0.0.1:5000")
    assert secret.check_join(proof, 1, 12345, "tcp://10.0.0.1:5000") == proof[:NONCE_BYTES]
    for node, fingerprint, address in ((2, 12345, "tcp://10.0.0.1:5000"),
                                       (1, 12346, "tcp://10.0.0.1:5000"),
                                       (1, 12345, "tcp://10.0.0.2:5000")):
        assert secret.check_join(proof, node, fingerprint, address) is None
    other = ClusterSecret.from_text(SECRET + "!", "test")
    assert other.check_join(proof, 1, 12345, "tcp://10.0.0.1:5000") is None
    tampered = bytes([proof[0] ^ 1]) + proof[1:]
    assert secret.check_join(tampered, 1, 12345, "tcp://10.0.0.1:5000") is None
    assert secret.check_join(proof[:-1], 1, 12345, "tcp://10.0.0.1:5000") is None
    assert "secret" not in repr(secret).replace("ClusterSecret", "") and SECRET not in repr(
        ClusterSpec(num_keys=1, secret=secret))


def test_the_token_is_masked_for_the_node_that_joined_and_peers_are_authenticated():
    secret = ClusterSecret.generate()
    nonce = secrets.token_bytes(NONCE_BYTES)
    token = secrets.randbits(63) | 1
    masked = secret.mask_token(token, 1, nonce)
    assert masked != token and 0 <= masked < 2**63
    assert secret.mask_token(masked, 1, nonce) == token
    assert ClusterSecret.generate().mask_token(masked, 1, nonce) != token
    addresses = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
    proof = secret.peers_proof(1, nonce, masked, addresses)
    assert secret.check_peers(proof, 1, nonce, masked, addresses)
    assert not secret.check_peers(proof, 1, nonce, masked ^ 2, addresses)
    assert not secret.check_peers(proof, 1, nonce, masked, addresses[::-1])
    assert not ClusterSecret.generate().check_peers(proof, 1, nonce, masked, addresses)


def test_the_coordinator_answers_only_proven_joins_on_their_own_connections():
    """A stranger under node 1's identity first, then node 0 and node 1 with proofs on
    connections of random identities: PEERS reach the proven connections, with tokens
    only they can unmask; the stranger gets nothing, and its later messages are dropped."""
    secret = ClusterSecret.generate()
    ctx = zmq.Context()
    coord = Coordinator(ctx, "tcp://127.0.0.1:0", 2, node_timeout=5.0, secret=secret)
    try:
        def dealer(identity):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(coord.address)
            return sock

        def send(sock, node, msg):
            msg.src_node = node
            protocol.send(sock, msg.encode())
            assert coord.socket.poll(5000)
            coord.handle_ready()

        stranger = dealer(node_identity(1))
        send(stranger, 1, protocol.Join(fingerprint=7, addresses=["tcp://127.0.0.1:9"],
                                        proof=secrets.token_bytes(PROOF_BYTES)))
        assert coord.routes == [None, None] and coord.malformed.total == 1
        nodes, proofs = [], []
        for node in (0, 1):
            nodes.append(dealer(node_identity(node) + secrets.token_bytes(16)))
            address = f"tcp://127.0.0.1:{node + 1}"
            proofs.append(secret.join_proof(node, 7, address))
            send(nodes[node], node, protocol.Join(fingerprint=7, addresses=[address],
                                                  proof=proofs[node]))
        assert coord.formed
        for node in (0, 1):
            assert nodes[node].poll(2000)
            peers = protocol.decode(nodes[node].recv_multipart())
            assert peers.type == MsgType.PEERS
            nonce = proofs[node][:NONCE_BYTES]
            assert secret.check_peers(peers.proof, node, nonce, peers.cluster_token,
                                      peers.addresses)
            assert secret.mask_token(peers.cluster_token, node, nonce) == coord.token
        assert not stranger.poll(200)
        failed = protocol.NodeFailed(code=2, detail=1)
        failed.token = coord.token  # even with the token: not node 1's connection
        send(stranger, 1, failed)
        assert coord.failed is None
    finally:
        coord.close()
        ctx.destroy(linger=0)


def test_python_m_adapm_cluster_secret_prints_a_usable_secret(tmp_path):
    out = subprocess.run([sys.executable, "-m", "adapm.wire.cluster_secret"], capture_output=True,
                         text=True, timeout=30, cwd=tmp_path, check=True).stdout.strip()
    assert len(out) == 64 and int(out, 16) >= 0
    path = tmp_path / "secret"
    path.write_text(out + "\n")
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    from adapm.wire.cluster_secret import read_secret_text
    assert read_secret_text(str(path)) == out
    assert np.all([c in "0123456789abcdef" for c in out])


def test_a_flood_at_the_coordinator_does_not_starve_node_0s_loop():
    """handle_ready reads at most MAX_BATCH messages a call: it used to read until the
    socket was empty, and a stranger sending ~100k messages/s kept node 0's loop in it
    (no heartbeats, no peers): the cluster failed within 10-30 s (found by review)."""
    from adapm.node.control import coordinator as coordination
    ctx = zmq.Context()
    coord = Coordinator(ctx, "tcp://127.0.0.1:0", 2, node_timeout=5.0,
                        secret=ClusterSecret.generate())
    try:
        flood = ctx.socket(zmq.DEALER)
        flood.setsockopt(zmq.LINGER, 0)
        flood.connect(coord.address)
        beat = protocol.Heartbeat()
        beat.src_node = 1
        frames = beat.encode()
        for _ in range(3 * coordination.MAX_BATCH):
            flood.send_multipart(frames)
        assert coord.socket.poll(5000)
        time.sleep(0.5)  # all of them queued at the coordinator
        coord.handle_ready()
        assert coord.malformed.total == coordination.MAX_BATCH  # the rest wait
        assert coord.socket.poll(0)  # and the poll still reports them
        coord.handle_ready()
        coord.handle_ready()
        assert coord.malformed.total == 3 * coordination.MAX_BATCH
    finally:
        coord.close()
        ctx.destroy(linger=0)
