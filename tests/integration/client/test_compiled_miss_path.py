"""The worker's compiled miss path (src/_miss_path.pyx, through MissPath.pull_now) against
the Python miss path it replaces: real DEALER sockets of a worker, ROUTER sockets of four
"nodes" on 127.0.0.1 answered by a thread that plays their servers, a real table whose
location cache routes the keys. Every call is made both ways: the requests must be the
same bytes (but for their ids), the caller's buffer the same values, and every message
that is not a clean answer (late, malformed, FAILED, for another operation) must end as it
does on the Python path, with the same error."""

import os
import resource
import threading

import numpy as np
import pytest
import zmq

from adapm.client._miss_path import CompiledMissPath, Status
from adapm.client.miss_path import MissPath, compiled_miss_path
from adapm.client.requests import CountOp, Requests, Sockets
from adapm.common.errors import ClusterError
from adapm.table.shared_table import REPLICA
from adapm.wire import libzmq, protocol
from adapm.wire.protocol import ALL_POSITIONS, Message, MsgType, worker_identity

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(libzmq.functions() is None,
                                 reason="no libzmq of pyzmq's to reach from compiled code")]

NODES, NODE, RANK, TOKEN, DIM = 4, 0, 0, 0x5EED, 3


def row(keys):
    """What every node answers for a key: its row, made of the key."""
    keys = np.asarray(keys, dtype=np.float32)
    return np.stack([keys, keys * 0.5, -keys], axis=1).astype(np.float32)


class Nodes:
    """Four ROUTERs (nodes 0..3) and a thread that answers each PULL as `script` says:
    script(request frames, decoded request) -> [frames to send back], in order."""

    def __init__(self, script):
        self.ctx = zmq.Context()
        self.routers, self.addresses = [], []
        for _ in range(NODES):
            sock = self.ctx.socket(zmq.ROUTER)
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            self.routers.append(sock)
            self.addresses.append(f"tcp://127.0.0.1:{port}")
        self.script, self.received = script, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        poller = zmq.Poller()
        for sock in self.routers:
            poller.register(sock, zmq.POLLIN)
        while not self.stop.is_set():
            for sock, _ in poller.poll(20):
                ident, *frames = sock.recv_multipart()
                node = self.routers.index(sock)
                msg = protocol.decode(frames)
                self.received.append((node, frames))
                for answer in self.script(node, msg):
                    sock.send_multipart([ident, *answer])

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for sock in self.routers:
            sock.close(0)
        self.ctx.term()


class Tracked:
    """ReadYourWrites' part the miss path calls: the update operations it tracks."""

    def __init__(self):
        self.ops = []

    def track(self, op):
        self.ops.append(op)


def acknowledge(node, msg):
    """A script's answer to an update: every key applied."""
    return [Message(MsgType.UPDATE_ACK, src_node=node, request_id=msg.request_id,
                    count=msg.keys.shape[0]).encode()]


@pytest.fixture
def rig(make_table):
    """(make(script) -> (compiled MissPath, Python MissPath, Nodes), table)."""
    made = []
    # node 0 of 4 owns the keys homed on it but 0 and 40 (absent, cached here: they route
    # nowhere); every other key is cached on a random owner among nodes 1..3
    num_keys = 64
    owned = [k for k in range(0, num_keys, NODES) if k not in (0, 40)]
    table = make_table(num_keys=num_keys, value_length=DIM, workers=1, node=NODE,
                       num_nodes=NODES, owned=owned)
    rng = np.random.default_rng(5)
    for key in range(num_keys):
        if key % NODES:
            table.set_owners(np.array([key], np.uint64), int(rng.integers(1, NODES)))

    def make(script, check_cluster=lambda: None):
        nodes = Nodes(script)
        sockets = Sockets(worker_identity(RANK, TOKEN))
        counts = {}

        def count(name, n):
            counts[name] = counts.get(name, 0) + n

        requests = Requests(sockets, NODE, RANK, TOKEN, np.float32, check_cluster, count)
        for node, address in enumerate(nodes.addresses):
            requests.connect(node, address)
        paths = []
        for compiled in (True, False):
            path = MissPath(table.view, requests, Tracked(), count, None, NODE, RANK, NODES)
            if compiled:
                path.use_compiled(compiled_miss_path(table.view, sockets.handles(), NODE,
                                                     RANK, NODES, TOKEN))
                assert path._compiled is not None
            paths.append(path)
        made.append((nodes, requests))
        return paths[0], paths[1], nodes, requests, counts

    yield make, table
    for nodes, requests in made:
        nodes.close()
        requests.close(0)


def pull(path, view, keys):
    """Worker.pull's steps on `path`: the local read, then the misses."""
    keys = np.asarray(keys, dtype=np.uint64)
    out = np.empty((keys.shape[0], DIM), dtype=np.float32)
    misses = path.buffer(keys.shape[0])
    nmiss = view.pull(keys, out, misses)
    return path.pull_now(keys, out, nmiss)


def answer_in_parts(rng, foreign=()):
    """A script: each PULL answered in 1-3 replies (ALL_POSITIONS when whole, else
    positions in random order), after any `foreign` messages."""
    def script(node, msg):
        if msg.type != MsgType.PULL:
            return acknowledge(node, msg)
        out = [f() for f in foreign]
        n = msg.keys.shape[0]
        if rng.random() < 0.4:
            out.append(Message(MsgType.PULL_REPLY, src_node=node, request_id=msg.request_id,
                               flags=ALL_POSITIONS, positions=np.empty(0, np.uint32),
                               values=row(msg.keys)).encode())
            return out
        order = rng.permutation(n).astype(np.uint32)
        for part in np.array_split(order, min(n, int(rng.integers(1, 4)))):
            out.append(Message(MsgType.PULL_REPLY, src_node=node, request_id=msg.request_id,
                               positions=part, values=row(msg.keys[part])).encode())
        return out
    return script


def requests_by_call(received, first):
    """The received requests from index `first` on, without their request ids, by node
    (each node's in the order it received them; the thread polls the nodes in turn)."""
    return sorted([(node, frames[0][:8] + frames[0][16:], *frames[1:]) for node, frames in
                   received[first:]], key=lambda request: request[0])


@pytest.mark.parametrize("seed", range(3))
def test_the_compiled_path_sends_and_places_what_the_python_path_does(rig, seed):
    make, table = rig
    rng = np.random.default_rng(seed)
    late = Message(MsgType.UPDATE_ACK, src_node=2, request_id=10 ** 6).encode()
    bad = [b"\x00" * protocol.HEADER_BYTES]
    many = [protocol.Message(MsgType.WAKE).encode()[0]] * 9
    foreign = [lambda: late, lambda: bad, lambda: many] if seed else []
    compiled, python, nodes, requests, counts = make(answer_in_parts(rng, foreign))
    view = table.view
    for _ in range(40):
        keys = rng.integers(1, 64, int(rng.integers(1, 30)))
        keys = keys[(keys % NODES != 0) | (rng.random(keys.shape[0]) < 0.3)]
        keys = keys[(keys != 0) & (keys != 40)]
        before = len(nodes.received)
        got = pull(compiled, view, keys)
        between = len(nodes.received)
        want = pull(python, view, keys)
        np.testing.assert_array_equal(got, want)
        expected = row(keys)
        expected[keys % NODES == 0] = 0  # owned here: the table's zeros
        np.testing.assert_array_equal(got, expected)
        sent_compiled = requests_by_call(nodes.received[:between], before)
        assert sent_compiled == requests_by_call(nodes.received, between)
        assert requests.waiting == 0
    assert counts["pulls_remote"] > 0
    assert counts["bytes_sent"] == sum(len(f[0]) + len(f[1]) for _, f in nodes.received)


def update(path, view, keys, values, kind):
    """Worker._update's (or apply_gradients') steps on `path`: the local write, then the
    misses; the operation the misses are in."""
    keys = np.asarray(keys, dtype=np.uint64)
    misses = path.buffer(keys.shape[0])
    if kind == "apply":
        params = np.array([0, DIM, 0.5, 0, 0, 0, 0, 0], dtype=np.float64)  # SGD of DIM
        distinct, index = np.unique(keys, return_index=True)
        summed = np.ascontiguousarray(values[index])
        nmiss = view.pull(distinct, np.empty((distinct.shape[0], DIM), np.float32), misses)
        before = len(path._consistency.ops)
        path.apply(distinct, summed, nmiss, params)
        return path._consistency.ops[before] if len(path._consistency.ops) > before else None
    nmiss = view.update(keys, values.reshape(-1).copy(), misses, kind == "push",
                        kind == "set")
    return path.update(keys, values.reshape(-1), nmiss, kind == "push")


@pytest.mark.parametrize("kind", ["push", "set", "apply"])
def test_updates_are_sent_as_the_python_path_sends_them(rig, kind):
    """Pushes, sets (a key held here as a replica goes to this node's server) and
    optimizer steps: the same messages, the same keys tracked, every ack counted."""
    make, table = rig
    view = table.view
    compiled, python, nodes, requests, counts = make(answer_in_parts(np.random.default_rng(3)))
    rng = np.random.default_rng(4)
    copies = np.array([9, 13], np.uint64)  # held here as replicas: a set goes to node 0
    table.install(copies, REPLICA)
    for _ in range(25):
        keys = rng.integers(1, 64, int(rng.integers(1, 20))).astype(np.uint64)
        keys = keys[(keys % NODES != 0)]
        if kind != "set":
            keys = keys[~np.isin(keys, copies)]
        values = rng.standard_normal((keys.shape[0], DIM)).astype(np.float32)
        before = len(nodes.received)
        got = update(compiled, view, keys, values, kind)
        if got is not None and got.keys is not None:
            requests.wait(got)  # acknowledged: every message of it was received
        between = len(nodes.received)
        want = update(python, view, keys, values, kind)
        if want is None or want.keys is None:
            assert got is None or got.keys is None
            continue
        requests.wait(want)
        np.testing.assert_array_equal(got.keys, want.keys)
        assert requests_by_call(nodes.received[:between], before) == \
            requests_by_call(nodes.received, between)
        assert got.left == 0 and got.error is None
    assert requests.waiting == 0
    assert counts["pushes_remote" if kind != "set" else "sets_remote"] > 0


def test_a_foreign_reply_goes_to_the_operation_that_waits_for_it(rig):
    """An UPDATE_ACK that arrives while a pull waits completes its own operation."""
    make, table = rig
    held = []

    def script(node, msg):
        if msg.type == MsgType.PUSH:  # its ack is held back until a pull waits
            held.append(Message(MsgType.UPDATE_ACK, src_node=node, request_id=msg.request_id,
                                count=1).encode())
            return []
        return held + [Message(MsgType.PULL_REPLY, src_node=node, request_id=msg.request_id,
                               flags=ALL_POSITIONS, positions=np.empty(0, np.uint32),
                               values=row(msg.keys)).encode()]

    compiled, _, _, requests, _ = make(script)
    op = CountOp()
    requests.start(1, protocol.Push(keys=np.array([1], np.uint64), values=row([1])), op, 1)
    assert not op.done
    got = pull(compiled, table.view, [5, 9])
    np.testing.assert_array_equal(got, row([5, 9]))
    assert op.done and op.error is None and requests.waiting == 0


def broken(kind):
    """A script whose first reply to a pull is wrong in one way (then the rest is right)."""
    def script(node, msg):
        n = msg.keys.shape[0]
        reply = dict(src_node=node, request_id=msg.request_id)
        if kind == "failed":
            return [Message(MsgType.FAILED, text="it broke", arg0=0, **reply).encode()]
        if kind == "values":
            return [Message(MsgType.PULL_REPLY, flags=ALL_POSITIONS,
                            positions=np.empty(0, np.uint32),
                            values=row(msg.keys).reshape(-1)[:-1], **reply).encode()]
        if kind == "positions":
            return [Message(MsgType.PULL_REPLY, positions=np.array([n], np.uint32),
                            values=row(msg.keys[:1]), **reply).encode()]
        if kind == "too_many":  # the whole request answered, then a key of it again
            whole = Message(MsgType.PULL_REPLY, flags=ALL_POSITIONS,
                            positions=np.empty(0, np.uint32), values=row(msg.keys), **reply)
            again = Message(MsgType.PULL_REPLY, positions=np.array([0], np.uint32),
                            values=row(msg.keys[:1]), **reply)
            return [again.encode(), whole.encode()]
        if kind == "type":
            return [Message(MsgType.UPDATE_ACK, count=n, **reply).encode()]
        raise AssertionError(kind)
    return script


@pytest.mark.parametrize("kind", ["failed", "values", "positions", "too_many", "type"])
def test_a_bad_answer_fails_the_call_as_on_the_python_path(rig, kind):
    make, table = rig
    # keys of one owner: with several, whichever broken answer came first would be named
    # (a race between the nodes, not between the paths)
    candidates = np.array([k for k in range(64) if k % NODES], np.uint64)
    owners = np.empty(candidates.shape[0], np.uint16)
    table.view.owners_of(candidates, owners)
    keys = candidates[owners == owners[0]][:4]
    assert keys.shape[0] >= 2
    errors = []
    for which in (0, 1):
        paths = make(broken(kind))
        with pytest.raises(ClusterError) as exc:
            pull(paths[which], table.view, keys)
        errors.append(str(exc.value))
        assert paths[3].waiting == 0
    assert errors[0] == errors[1]
    assert "node 0, worker 0" in errors[0]


def test_a_silent_cluster_is_checked_and_a_late_reply_is_dropped(rig):
    """While replies do not come, the cluster is checked every poll slice; once the check
    fails, the call is given up, and its late reply is dropped by the next call."""
    make, table = rig
    held = []
    checks = []

    def script(node, msg):
        if not held:  # the first request is answered only with the second
            held.append(Message(MsgType.PULL_REPLY, src_node=node, request_id=msg.request_id,
                                flags=ALL_POSITIONS, positions=np.empty(0, np.uint32),
                                values=np.full((msg.keys.shape[0], DIM), 7, np.float32)
                                ).encode())
            return []
        return [held[0], Message(MsgType.PULL_REPLY, src_node=node,
                                 request_id=msg.request_id, flags=ALL_POSITIONS,
                                 positions=np.empty(0, np.uint32),
                                 values=row(msg.keys)).encode()]

    def check_cluster():
        checks.append(1)
        if len(checks) == 2:
            raise ClusterError("node 0, worker 0: the cluster failed: test")

    compiled, _, _, requests, _ = make(script, check_cluster)
    with pytest.raises(ClusterError, match="the cluster failed"):
        pull(compiled, table.view, [5])
    assert len(checks) == 2 and compiled._compiled.requests == 0
    got = pull(compiled, table.view, [5])  # the late reply (7s) is not taken for it
    np.testing.assert_array_equal(got, row([5]))
    assert requests.waiting == 0


def test_what_it_declines_is_left_to_the_python_path(rig):
    """A key whose location cache names this node (on its way here) routes nowhere: the
    compiled call sends nothing; nor does it for a node without a socket."""
    make, table = rig
    compiled, _, nodes, _, _ = make(answer_in_parts(np.random.default_rng(0)))
    view = table.view
    path = compiled._compiled
    keys = np.array([5, 40, 9], dtype=np.uint64)
    out = np.empty((3, DIM), np.float32)
    misses = np.array([0, 1, 2], np.uint64)
    assert path.pull(keys, out.view(np.uint8), misses, 3, 1) == Status.FALLBACK
    assert path.requests == 0 and nodes.received == []
    lonely = CompiledMissPath(libzmq.functions(), view, NODE, NODES, RANK, TOKEN, {})
    assert lonely.pull(keys[[0]], out[:1].view(np.uint8), misses, 1, 1) == Status.FALLBACK
    with pytest.raises(ValueError, match="a row of the table's length"):
        path.pull(keys, out[:2].view(np.uint8), misses, 3, 1)
    with pytest.raises(ValueError, match="misses"):
        path.pull(keys, out.view(np.uint8), misses, 4, 1)


def test_large_calls_are_split_into_messages_as_the_python_path_splits_them(make_table):
    """At most num_keys keys per message (here 8): a call of 40 keys with repeats is sent
    as the Python path sends it."""
    table = make_table(num_keys=8, value_length=DIM, workers=1, node=0, num_nodes=2,
                       owned=[0, 2, 4, 6])
    table.set_owners(np.array([1, 3, 5, 7], np.uint64), 1)
    script = answer_in_parts(np.random.default_rng(1))
    nodes = Nodes(script)
    sockets = Sockets(worker_identity(RANK, TOKEN))
    requests = Requests(sockets, 0, RANK, TOKEN, np.float32, lambda: None,
                        lambda name, n: None)
    try:
        for node in (0, 1):
            requests.connect(node, nodes.addresses[node])
        compiled = MissPath(table.view, requests, None, lambda name, n: None, None, 0, RANK, 2)
        compiled.use_compiled(compiled_miss_path(table.view, sockets.handles(), 0, RANK, 2,
                                                 TOKEN))
        python = MissPath(table.view, requests, None, lambda name, n: None, None, 0, RANK, 2)
        keys = np.random.default_rng(2).choice([1, 3, 5, 7], 40).astype(np.uint64)
        got = pull(compiled, table.view, keys)
        between = len(nodes.received)
        want = pull(python, table.view, keys)
        np.testing.assert_array_equal(got, want)
        assert between == 5 and [len(f[1]) // 8 for _, f in nodes.received[:5]] == [8] * 5
        assert requests_by_call(nodes.received[:between], 0) == \
            requests_by_call(nodes.received, between)
    finally:
        nodes.close()
        requests.close(0)


def test_tables_of_per_key_lengths_keep_the_python_path(make_table):
    uniform = make_table(num_keys=8, value_length=DIM, workers=1)
    assert compiled_miss_path(uniform.view, {}, 0, 0, 1, TOKEN) is not None
    per_key = make_table(num_keys=8, value_length=np.arange(1, 9), workers=1)
    assert compiled_miss_path(per_key.view, {}, 0, 0, 1, TOKEN) is None
    with pytest.raises(ValueError, match="one row length"):
        CompiledMissPath(libzmq.functions(), per_key.view, 0, 1, 0, TOKEN, {})


def test_the_type_stub_names_exactly_what_the_compiled_module_has():
    """adapm/client/_miss_path.pyi documents the compiled module; it must not drift."""
    import ast
    import types
    from pathlib import Path

    from adapm.client import _miss_path
    stub = ast.parse((Path(_miss_path.__file__).parent / "_miss_path.pyi").read_text())
    classes = {node.name: node for node in stub.body if isinstance(node, ast.ClassDef)}
    assert set(classes) == {n for n in dir(_miss_path) if not n.startswith("_") and
                            not isinstance(getattr(_miss_path, n), types.ModuleType)}
    named = {item.target.id if isinstance(item, ast.AnnAssign) else item.name
             for item in classes["CompiledMissPath"].body
             if isinstance(item, (ast.AnnAssign, ast.FunctionDef))}
    assert named - {"__init__"} == {n for n in dir(CompiledMissPath) if not n.startswith("_")}
    assert {item.targets[0].id for item in classes["Status"].body
            if isinstance(item, ast.Assign)} == {s.name for s in Status}


def mutated_reply(rng, request_id, keys):
    """A PULL_REPLY to a request of `keys`, wrong in one way or not at all, or junk."""
    n = keys.shape[0]
    if rng.random() < 0.1:
        return [rng.bytes(int(rng.integers(0, 70))) for _ in range(int(rng.integers(1, 7)))]
    positions = rng.permutation(n)[:int(rng.integers(1, n + 1))].astype(np.uint32)
    whole = rng.random() < 0.3
    msg = Message(MsgType.PULL_REPLY, src_node=1, request_id=request_id,
                  flags=ALL_POSITIONS if whole else 0,
                  positions=np.empty(0, np.uint32) if whole else positions,
                  values=row(keys if whole else keys[positions]))
    frames = [bytes(f) for f in msg.encode()]
    header = bytearray(frames[0])
    how = int(rng.integers(0, 13))
    if how == 0:
        header[0] ^= 1                                       # magic
    elif how == 1:
        header[2] += 1                                       # version
    elif how == 2:
        header[3] = int(rng.integers(0, 256))                # type
    elif how == 3:
        header[12:20] = int(rng.integers(0, 1 << 40)).to_bytes(8, "little")  # request id
    elif how == 4:
        frames.append(b"")                                   # a frame too many
    elif how == 5:
        frames.pop()                                         # one too few
    elif how == 6:
        frames[1] = frames[1][:3]                            # positions: 3 bytes
    elif how == 7:
        frames[1] = np.array([n], np.uint32).tobytes() + frames[1][4:]
    elif how == 8:
        frames[2] = frames[2][:-1]                           # values one byte short
    elif how == 9:
        header = header[:-1]                                 # a header of 51 bytes
    elif how == 10:
        frames += [b"x"] * 8                                 # more frames than any message
    return [bytes(header), *frames[1:]]


@pytest.mark.timeout(300)
def test_fuzz_hundred_thousand_replies(make_table):
    """A seeded random-frame loop: 100,000 replies (most to the call in flight, each
    wrong in one way or not at all, some junk) through the compiled reply decoder. No
    crash, every message taken once (placed, handed to Python, or dropped), every row it
    placed right (replies that overlap count keys twice, as the Python path counts them:
    a row may be left out, never wrong), memory bounded."""
    table = make_table(num_keys=64, value_length=DIM, workers=1, node=0, num_nodes=2,
                       owned=list(range(0, 64, 2)))
    table.set_owners(np.arange(1, 64, 2, dtype=np.uint64), 1)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://fuzzed-node")  # no network round trip per message
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, worker_identity(RANK, TOKEN))
    dealer.connect("inproc://fuzzed-node")
    try:
        path = CompiledMissPath(libzmq.functions(), table.view, 0, 2, RANK, TOKEN,
                                {1: dealer})
        rng = np.random.default_rng(99)
        keys = np.arange(1, 17, 2, dtype=np.uint64)
        misses = np.arange(8, dtype=np.uint64)
        total, handed, rss, next_id = 100_000, 0, [], 1

        def start():
            nonlocal next_id
            out = np.zeros((8, DIM), np.float32)
            assert path.pull(keys, out.view(np.uint8), misses, 8, next_id) == Status.STARTED
            ident, *request = router.recv_multipart()
            next_id += path.requests
            return out, ident, protocol.decode(request).request_id

        out, ident, request_id = start()
        for sent in range(1, total + 1):  # one at a time: each for the call in flight
            router.send_multipart([ident, *mutated_reply(rng, request_id, keys)])
            idle = 0
            while path.placed + handed + path.dropped < sent:
                # a partial answer leaves the call waiting: IDLE once the reply is taken
                status = path.wait(0 if idle == 0 else 20)
                idle = idle + 1 if status == Status.IDLE else 0
                assert idle < 250, ("a reply went missing", sent, path.placed, handed)
                if status in (Status.FOREIGN, Status.HANDOFF):
                    path.take_message()
                    handed += 1
                if status == Status.HANDOFF:
                    path.take_call()
                if status == Status.DONE:  # (replies may overlap: a row may be left out)
                    filled = out.any(axis=1)
                    np.testing.assert_array_equal(out[filled], row(keys)[filled])
                if status in (Status.DONE, Status.HANDOFF):
                    out, ident, request_id = start()
            if sent % 2000 == 0:
                rss.append(_rss_bytes())
        assert path.placed + handed + path.dropped == total
        assert path.placed > 5_000 and handed > 10_000 and path.dropped > 1_000
        assert rss[-1] - rss[len(rss) // 4] < 32 * 2**20, "memory grows with the messages"
    finally:
        dealer.close(0)
        router.close(0)
        ctx.term()


def _rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
