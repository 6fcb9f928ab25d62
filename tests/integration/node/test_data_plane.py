"""The compiled data plane (src/_plane.pyx) against its reference, the Python path.

A real table, a real ROUTER on 127.0.0.1 and real DEALERs of every worker and of a peer
node. Each message is valid, or a valid one with one thing wrong (header bytes, token,
sender, frames, keys out of range or not owned, other types). The reference model says,
from adapm.wire.protocol and adapm.node.admission alone, whether the Python path would
accept the message as a pull or push that this node serves in full; the plane must serve
exactly those, with the very bytes the Python path would send (protocol's encoding) and
the same change to the table, and hand every other message over untouched, in order."""

import os
import resource
import time
import types

import numpy as np
import pytest
import zmq

from adapm.common.errors import ProtocolError
from adapm.node.admission import check_sender
from adapm.table import optimizers as optim
from adapm.table.shared_table import OWNED, REPLICA
from adapm.wire import libzmq, protocol
from adapm.wire.protocol import MsgType, node_identity, worker_identity

pytestmark = pytest.mark.skipif(libzmq.functions() is None,
                                reason="no libzmq of pyzmq's to reach from compiled code")

NODE, NUM_NODES, WORKERS_PER_NODE, NUM_KEYS, DIM = 1, 3, 2, 64, 4
NUM_WORKERS = NUM_NODES * WORKERS_PER_NODE   # ranks 2 and 3 are node 1's own
TOKEN = 0x1234_5678_9ABC_DEF0
SPEC = types.SimpleNamespace(num_workers=NUM_WORKERS, num_nodes=NUM_NODES)
SERVED = (MsgType.PULL, MsgType.PUSH, MsgType.SET, MsgType.APPLY, MsgType.FWD_PULL,
          MsgType.FWD_PUSH, MsgType.FWD_SET, MsgType.FWD_APPLY)
FORWARDED = {MsgType.FWD_PULL, MsgType.FWD_PUSH, MsgType.FWD_SET, MsgType.FWD_APPLY}
# adapm.optim params that fit values of DIM = 4: SGD (dim 4), Adagrad (2 + 2 state),
# RowWiseAdagrad (3 + 1); Adam would need 3 x dim.
PARAMS = (np.array([0, 4, 0.1, 0, 0.01, 0, 0, 0]), np.array([1, 2, 0.1, 1e-8, 0, 0, 0, 0]),
          np.array([2, 3, 0.05, 1e-6, 0, 0, 0, 0]))
OWNED_KEYS = np.arange(0, NUM_KEYS, 2, dtype=np.uint64)       # even keys: owned here
REPLICA_KEYS = np.arange(1, NUM_KEYS, 4, dtype=np.uint64)     # some odd ones: replicas


def _node_table(make_table):
    table = make_table(num_keys=NUM_KEYS, value_length=DIM, owned=OWNED_KEYS, node=NODE,
                       num_nodes=NUM_NODES,
                       values=np.arange(OWNED_KEYS.shape[0] * DIM, dtype=np.float32) / 10)
    table.install(REPLICA_KEYS, REPLICA, np.full(REPLICA_KEYS.shape[0] * DIM, -1, np.float32))
    return table


@pytest.fixture
def shadow(make_table):
    """A second table like the rig's, changed by the reference model only."""
    return _node_table(make_table)


@pytest.fixture
def rig(make_table):
    """(plane, table, router, dealers by sender name) around a table of node 1."""
    from adapm.node.data import _plane
    table = _node_table(make_table)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    senders = {f"w{r}": worker_identity(r, TOKEN) for r in range(NUM_WORKERS)}
    senders.update({f"n{n}": node_identity(n, TOKEN) for n in range(NUM_NODES)})
    senders["stranger"] = b"W\x00\x00\x00\x00"  # a worker's name without the MAC
    dealers = {}
    for name, identity in senders.items():
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        dealers[name] = sock
    plane = _plane.Plane(libzmq.functions(), router.underlying, table.view,
                         table.view.kernel_handle(), NODE, NUM_NODES, NUM_WORKERS,
                         WORKERS_PER_NODE)
    plane.admit(TOKEN, [worker_identity(r, TOKEN) for r in range(NUM_WORKERS)],
                [node_identity(n, TOKEN) for n in range(NUM_NODES)])
    plane.enabled = True
    _connected(router, dealers)
    yield plane, table, router, dealers
    del plane
    for sock in [router, *dealers.values()]:
        sock.close(0)
    context.term()


def _connected(router, dealers):
    """Wait until the router knows every dealer (a reply to one it does not know fails)."""
    for sock in dealers.values():
        sock.send(b"")
    for _ in dealers:
        assert router.poll(5000)
        router.recv_multipart()


# -- messages ---------------------------------------------------------------------------

def valid_message(rng):
    """(sender, body frames) of a pull or push this node may serve."""
    mtype = SERVED[rng.integers(len(SERVED))]
    n = int(rng.integers(0, 6))
    keys = rng.choice(OWNED_KEYS, n) if rng.random() < 0.7 else \
        rng.integers(0, NUM_KEYS, n).astype(np.uint64)
    if mtype not in (MsgType.PULL, MsgType.FWD_PULL) and rng.random() < 0.9:
        keys = rng.permutation(np.unique(keys))  # pushes name a key once (mostly)
    rank = int(rng.integers(NUM_WORKERS))
    fields = {"request_id": int(rng.integers(1 << 40)), "keys": keys}
    if mtype in (MsgType.APPLY, MsgType.FWD_APPLY):
        params = PARAMS[rng.integers(len(PARAMS))].copy()
        dim = int(params[1])
        if rng.random() < 0.1:  # a hyper-parameter no optimizer takes
            params[int(rng.integers(8))] = [-1.0, np.nan, 7.0, 0.5][int(rng.integers(4))]
        fields.update(params=params, values=rng.standard_normal(
            keys.shape[0] * dim).astype(np.float32))
        if rng.random() < 0.05 and keys.shape[0]:
            fields["values"][0] = np.inf
    elif mtype != MsgType.PULL and mtype != MsgType.FWD_PULL:
        fields["values"] = rng.standard_normal(keys.shape[0] * DIM).astype(np.float32)
    if mtype == MsgType.FWD_PULL:
        fields["positions"] = rng.integers(0, 1000, keys.shape[0]).astype(np.uint32)
    if mtype in FORWARDED:
        fields["requester"] = rank
    msg = protocol.BY_TYPE[mtype](**fields)
    sender = f"w{rank}"
    if mtype in FORWARDED:
        msg.src_node = int(rng.choice([0, 2]))
        sender = f"n{msg.src_node}"
    else:
        msg.src_node = int(rng.integers(NUM_NODES))
    msg.src_worker = rank if sender.startswith("w") else protocol.SERVER
    msg.token = TOKEN
    return sender, [bytes(f) for f in msg.encode()]


def mutated(rng, sender, body):
    """The message with one thing wrong (or, now and then, nothing)."""
    body = list(body)
    kind = int(rng.integers(12))
    if kind == 0:    # a header byte changed
        header = bytearray(body[0])
        header[int(rng.integers(len(header)))] ^= 1 << int(rng.integers(8))
        body[0] = bytes(header)
    elif kind == 1:  # a frame cut or grown
        i = int(rng.integers(len(body)))
        body[i] = body[i][:-1] if body[i] and rng.random() < 0.5 else body[i] + b"\0"
    elif kind == 2:  # a frame too many or too few
        if rng.random() < 0.5:
            body.append(rng.bytes(int(rng.integers(16))))
        else:
            body.pop()
    elif kind == 3:  # another sender
        sender = ["w0", "w1", "w2", "w3", "n0", "n1", "n2", "stranger"][int(rng.integers(8))]
    elif kind == 4:  # a key out of range
        keys = np.frombuffer(body[1], dtype=np.uint64).copy()
        if keys.shape[0]:
            keys[int(rng.integers(keys.shape[0]))] = NUM_KEYS + int(rng.integers(1 << 20))
            body[1] = keys.tobytes()
    elif kind == 5:  # another type
        header = bytearray(body[0])
        header[3] = int(rng.integers(64))
        body[0] = bytes(header)
    elif kind == 6:  # junk
        body = [rng.bytes(int(rng.integers(80))) for _ in range(int(rng.integers(1, 5)))]
    elif kind == 7:  # a requester out of range (forwarded ones)
        header = bytearray(body[0])
        header[28:36] = int(rng.integers(-3, 9)).to_bytes(8, "little", signed=True)
        body[0] = bytes(header)
    elif kind == 8:  # many frames
        body = body + [b""] * int(rng.integers(1, 9))
    return sender, body


def reference(sender_identity, body, table):
    """The Python path's verdict: the decoded message when it is a request this node
    serves whole, from the table (every key owned here, every check passed: a remote
    worker's SET; an APPLY whose params, gradients and keys adapm.optim accepts), else
    None."""
    try:
        msg = protocol.decode(body)
        check_sender(sender_identity, msg, token=TOKEN, spec=SPEC, node=NODE,
                     registered=lambda rank, identity: False)
        if msg.type not in SERVED:
            return None
        if msg.keys.shape[0] and int(msg.keys.max()) >= NUM_KEYS:
            return None
        if msg.type == MsgType.SET and msg.src_worker // WORKERS_PER_NODE == NODE:
            return None  # a local worker's set: DataServing.on_set's deferral
        if msg.type in (MsgType.APPLY, MsgType.FWD_APPLY):
            _, dim = optim.read_params(msg.params, DIM)
            grads = protocol.values_of(msg, np.float32, msg.keys.shape[0] * dim)
            if not np.isfinite(grads).all() or \
                    np.unique(msg.keys).shape[0] != msg.keys.shape[0]:
                return None
        elif msg.type not in (MsgType.PULL, MsgType.FWD_PULL):
            protocol.values_of(msg, np.float32, msg.keys.shape[0] * DIM)
    except (ProtocolError, ValueError):
        return None
    if not (table.states(msg.keys) == OWNED).all():
        return None
    return msg


def reference_effect(msg, shadow):
    """What the Python path (adapm.node.data.serving) does to the table for `msg`, done
    to the shadow table through the same calls."""
    view, keys = shadow.view, np.ascontiguousarray(msg.keys)
    misses = np.empty(keys.shape[0], dtype=np.uint64)
    if msg.type in (MsgType.APPLY, MsgType.FWD_APPLY):
        params, dim = optim.read_params(msg.params, DIM)
        n = keys.shape[0]
        grads = protocol.values_of(msg, np.float32, n * dim).reshape(n, dim)
        view.apply_optimizer(keys, np.argsort(keys, kind="stable"), grads, params,
                             np.empty(n, np.uint64), np.empty((n, dim), np.float32),
                             misses, True)
    elif msg.type not in (MsgType.PULL, MsgType.FWD_PULL):
        additive = msg.type in (MsgType.PUSH, MsgType.FWD_PUSH)
        view.update(keys, np.array(protocol.values_of(msg, np.float32, keys.shape[0] * DIM)),
                    misses, additive, True)


def expected_reply(msg, table):
    """The frames the Python path (adapm.node.data.serving) sends for `msg`, and the
    worker they go to; None for a push of no keys (no acknowledgement)."""
    requester = msg.requester if msg.type in FORWARDED else msg.src_worker
    if msg.type in (MsgType.PULL, MsgType.FWD_PULL):
        values = _values(table, msg.keys)
        reply = protocol.PullReply(request_id=msg.request_id, values=values)
        if msg.type == MsgType.PULL:
            reply.flags = protocol.ALL_POSITIONS
        else:
            reply.positions = msg.positions
    elif msg.keys.shape[0] == 0:
        return None
    else:
        reply = protocol.UpdateAck(request_id=msg.request_id, applied=msg.keys.shape[0])
    reply.src_node, reply.token = NODE, TOKEN
    return requester, [bytes(f) for f in reply.encode()]


def _values(table, keys):
    """The keys' values (flat), read as the node server reads them."""
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    out = np.empty(keys.shape[0] * DIM, dtype=np.float32)
    assert table.view.pull(keys, out, np.empty(keys.shape[0], np.uint64), False) == 0
    return out


def _drain_one(plane, router):
    assert router.poll(5000), "the message did not arrive"
    taken, frames = plane.drain(1)
    assert taken == 1
    return frames


# -- tests ------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plane_agrees_with_the_python_path(rig, shadow, seed):
    plane, table, router, dealers = rig
    rng = np.random.default_rng(seed)
    identities = {name: bytes(sock.getsockopt(zmq.IDENTITY)) for name, sock in dealers.items()}
    served = handed = served_bytes = 0
    kinds = set()
    for _ in range(1500):
        sender, body = valid_message(rng)
        if rng.random() < 0.5:
            sender, body = mutated(rng, sender, body)
        msg = reference(identities[sender], body, table)
        expected = None if msg is None else expected_reply(msg, table)
        before = _values(table, OWNED_KEYS)
        dealers[sender].send_multipart(body)
        frames = _drain_one(plane, router)
        if msg is None:
            handed += 1
            assert frames == [identities[sender], *body][:len(frames)]
            assert len(frames) == min(len(body) + 1, 8)
            assert np.array_equal(_values(table, OWNED_KEYS), before)
            continue
        served += 1
        served_bytes += sum(len(f) for f in body)
        kinds.add(msg.type)
        assert frames is None, f"the plane left a message Python would serve: {msg}"
        reference_effect(msg, shadow)
        assert np.array_equal(_values(table, OWNED_KEYS), _values(shadow, OWNED_KEYS))
        if expected is not None:
            rank, reply = expected
            assert dealers[f"w{rank}"].poll(5000)
            assert dealers[f"w{rank}"].recv_multipart() == reply
    assert served > 300 and handed > 300 and kinds == set(SERVED)
    for sock in dealers.values():  # no reply the Python path would not have sent
        assert not sock.poll(50)
    assert plane.served == served and plane.unroutable == 0
    # only what it served: the node server counts the rest once it handled them
    assert plane.bytes_received == served_bytes


@pytest.mark.timeout(300)
def test_fuzz_hundred_thousand_messages(rig):
    """A seeded random-frame loop: 100,000 messages (mostly valid ones with one thing
    wrong, some junk) through the compiled decoder. No crash, every message taken once
    (served, or handed over whole), memory bounded."""
    plane, table, router, dealers = rig
    rng = np.random.default_rng(1234)
    names = list(dealers)
    total, batch, taken_all, handed, rss = 100_000, 500, 0, 0, []
    for start in range(0, total, batch):
        for _ in range(batch):
            if rng.random() < 0.1:
                sender = names[int(rng.integers(len(names)))]
                body = [rng.bytes(int(rng.integers(0, 70))) for _ in
                        range(int(rng.integers(1, 7)))]
            else:
                sender, body = mutated(rng, *valid_message(rng))
            dealers[sender].send_multipart(body)
        got = 0
        while got < batch:
            assert router.poll(5000), f"{batch - got} messages of batch {start} missing"
            taken, frames = plane.drain(batch - got)
            got += taken
            handed += frames is not None
        taken_all += got
        for sock in dealers.values():  # the replies, read so that no queue grows
            while sock.poll(0):
                sock.recv_multipart()
        rss.append(_rss_bytes())
    assert taken_all == total
    assert plane.served + handed == total
    assert plane.served > 10_000 and handed > 10_000
    assert rss[-1] - rss[len(rss) // 4] < 32 * 2**20, "memory grows with the messages"


def _rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_the_type_stub_names_exactly_what_the_compiled_plane_has():
    """adapm/node/data/_plane.pyi documents the compiled module; it must not drift."""
    import ast
    from pathlib import Path

    from adapm.node.data import _plane
    stub = ast.parse((Path(_plane.__file__).parent / "_plane.pyi").read_text())
    classes = {node.name: node for node in stub.body if isinstance(node, ast.ClassDef)}
    constants = {node.target.id for node in stub.body if isinstance(node, ast.AnnAssign)}
    assert set(classes) | constants == {n for n in dir(_plane) if not n.startswith("_") and
                                        not isinstance(getattr(_plane, n), types.ModuleType)}
    named = {item.target.id if isinstance(item, ast.AnnAssign) else item.name
             for item in classes["Plane"].body if isinstance(item, (ast.AnnAssign,
                                                                    ast.FunctionDef))}
    assert named - {"__init__"} == {n for n in dir(_plane.Plane) if not n.startswith("_")}


def _push_everything_task(w):
    """Every worker pushes to every key (half of them remote in mode static; in mode
    adaptive, announced first so that rounds replicate and relocate them), then pulls
    all."""
    keys = np.arange(w.num_keys, dtype=np.uint64)
    for step in range(5):
        w.intent(keys[step::2], w.clock + 1, w.clock + 3)
        w.advance_clock()
        w.push(keys, np.full((w.num_keys, 4), w.rank + step, dtype=np.float32))
    w.wait_sync()
    w.barrier()
    values = w.pull(keys)
    return values, w.stats()["node"]["plane_served"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["static", "adaptive"])
def test_a_cluster_gives_the_same_results_with_either_plane(monkeypatch, mode):
    """Real node servers: remote pushes and pulls go through the compiled plane (counted
    by plane_served), or all through Python with the Python intent store and key sets;
    the values agree."""
    import adapm
    results = {}
    for plane in ("compiled", "python"):
        monkeypatch.setenv("ADAPM_DATA_PLANE", plane)
        results[plane] = adapm.run(_push_everything_task, nodes=2, workers_per_node=1, num_keys=40,
                                   value_length=4, mode=mode)
    expected = np.full((40, 4), sum(r + s for r in range(2) for s in range(5)), np.float32)
    for plane, rows in results.items():
        for values, _ in rows:
            assert np.array_equal(values, expected), plane
    if mode == "static":
        assert all(served > 0 for _, served in results["compiled"])
    assert all(served == 0 for _, served in results["python"])


@pytest.mark.timeout(60)
def test_a_bad_plane_choice_fails_before_anything_starts(monkeypatch):
    import adapm
    monkeypatch.setenv("ADAPM_DATA_PLANE", "fast")
    with pytest.raises(ValueError, match="ADAPM_DATA_PLANE='fast' must be 'compiled' or"):
        adapm.run(_push_everything_task, nodes=1, workers_per_node=1, num_keys=4, value_length=4)


@pytest.mark.timeout(60)
def test_once_the_node_failed_every_message_goes_to_python(rig):
    """DataPlane: a message handed to Python fails the node; the valid pulls queued behind
    it in the same batch are not served by the compiled plane any more."""
    from adapm.node.data.plane import DataPlane
    _, table, router, dealers = rig
    ctx = types.SimpleNamespace(view=table.view, node=NODE, num_nodes=NUM_NODES,
                                spec=types.SimpleNamespace(
                                    num_workers=NUM_WORKERS, num_nodes=NUM_NODES,
                                    workers_per_node=WORKERS_PER_NODE))
    counted = {}
    plane = DataPlane(ctx, router, lambda name, n: counted.update({name: n}))
    plane.admit(TOKEN)
    pull = protocol.Pull(keys=OWNED_KEYS[:3], request_id=7)
    pull.src_worker, pull.src_node, pull.token = 0, 0, TOKEN
    dealers["w0"].send_multipart([bytes(f) for f in pull.encode()])
    dealers["w0"].send_multipart([b"junk"])                        # handed over: fails
    for _ in range(3):
        dealers["w0"].send_multipart([bytes(f) for f in pull.encode()])
    time.sleep(0.3)
    handled, failed = [], []

    def handle(frames):  # the Python path: this message fails the node
        handled.append(frames)
        failed.append(True)

    plane.drain(10, handle, healthy=lambda: not failed)
    assert counted["plane_served"] == 1  # the first pull only
    assert len(handled) == 4 and handled[0][1:] == [b"junk"]
    dealers["w0"].send_multipart([bytes(f) for f in pull.encode()])
    time.sleep(0.3)
    plane.drain(10, handled.append, healthy=lambda: not failed)
    assert len(handled) == 5 and counted["plane_served"] == 1
    assert not plane.compiled.enabled
