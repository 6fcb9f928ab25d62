"""The compiled data plane's part in sync rounds (src/_plane.pyx) against the Python path.

A real table of node 1 (even keys owned, some odd ones replicas, some pending), the
rounds' per-key state as the node server keeps it (ReplicaCopies' "value at last sync"
slots, seen versions and pending set, ReplicaHolders' bits), a real ROUTER on 127.0.0.1,
the DEALERs of nodes 0 and 2 sending to it, and node 1's DEALERs to them (where answers
go). Each SYNC or SYNC_REPLY is valid or has one thing wrong. The reference model says,
from adapm.wire.protocol, adapm.node.admission and rounds.on_sync/on_sync_reply, what the
Python path would do: the plane must serve the steady-state part (synced and dropped
keys; answers with a value or "current"), with the same change to a shadow table and
state made through the Python path's own calls and byte for byte the answer the Python
path sends, and hand the rest (requests; drops) over as a message of those keys alone,
or the whole message, untouched, when it is not one it serves."""

import types

import numpy as np
import pytest
import zmq

from adapm.common.errors import ProtocolError
from adapm.node.admission import check_sender
from adapm.node.data.holders import ReplicaHolders
from adapm.node.data.rounds import Rounds
from adapm.policy.manager import SETTLE_ROUNDS, Manager
from adapm.policy.ownership import route, split_by
from adapm.table._keyset import CompiledKeySet
from adapm.table.shared_table import ABSENT, OWNED, PENDING, REPLICA
from adapm.wire import libzmq, protocol
from adapm.wire.protocol import (
    HAS_DELTA,
    MOVE_FOR_ROUND,
    REPLY_CURRENT,
    REPLY_DROPPED,
    REPLY_VALUE,
    SYNC_DROP,
    SYNC_KEEP,
    SYNC_REQUEST,
    MsgType,
    node_identity,
    worker_identity,
)

pytestmark = pytest.mark.skipif(libzmq.functions() is None,
                                reason="no libzmq of pyzmq's to reach from compiled code")

NODE, NUM_NODES, WORKERS_PER_NODE, NUM_KEYS, DIM = 1, 3, 1, 64, 4
NUM_WORKERS = NUM_NODES * WORKERS_PER_NODE
PEERS = (0, 2)
TOKEN = 0x0FED_CBA9_8765_4321
SPEC = types.SimpleNamespace(num_workers=NUM_WORKERS, num_nodes=NUM_NODES)
OWNED_KEYS = np.arange(0, NUM_KEYS, 2, dtype=np.uint64)
REPLICA_KEYS = np.arange(1, NUM_KEYS, 4, dtype=np.uint64)
PENDING_KEYS = np.arange(3, NUM_KEYS, 8, dtype=np.uint64)
ALL_KEYS = np.arange(NUM_KEYS, dtype=np.uint64)


class RoundState:
    """A node's per-key round state around a table, as ReplicaCopies and ReplicaHolders
    keep it."""

    def __init__(self, make_table, seed):
        rng = np.random.default_rng(seed)
        self.table = make_table(num_keys=NUM_KEYS, value_length=DIM, owned=OWNED_KEYS,
                                node=NODE, num_nodes=NUM_NODES, arena_capacity=4 * NUM_KEYS * DIM,
                                values=np.arange(
                                    OWNED_KEYS.shape[0] * DIM, dtype=np.float32) / 10)
        self.table.install(REPLICA_KEYS, REPLICA, np.full(REPLICA_KEYS.shape[0] * DIM, -1,
                                                          np.float32))
        self.table.install(PENDING_KEYS, PENDING, np.zeros(PENDING_KEYS.shape[0] * DIM,
                                                           np.float32))
        held = np.union1d(REPLICA_KEYS, PENDING_KEYS)
        lengths = self.table.lengths(held)
        offsets = self.table.allocator.allocate(lengths)
        self.table.view.zero_slots(offsets, lengths)
        self.synced = np.zeros(NUM_KEYS, dtype=np.uint32)
        self.synced[held.astype(np.intp)] = offsets
        self.seen = np.zeros(NUM_KEYS, dtype=np.uint32)
        self.holders = rng.integers(0, 8, (NUM_KEYS, 1)).astype(np.uint8)
        self.flags = np.zeros(NUM_KEYS, dtype=np.uint8)
        self.pending = CompiledKeySet(NUM_KEYS, self.flags, 1)
        self.pending.add(PENDING_KEYS)
        self.moving_in = CompiledKeySet(NUM_KEYS, self.flags, 2)
        self.held = CompiledKeySet(NUM_KEYS, self.flags, 3)
        self.held.add(held)
        # The location cache: odd keys at node 0 or 2, or (on their way here) node 1.
        odd = np.arange(1, NUM_KEYS, 2, dtype=np.uint64)
        self.table.set_owners(odd, rng.choice([0, 2, 2, NODE], odd.shape[0]))

    def snapshot(self):
        view = self.table.view
        fresh = np.empty(NUM_KEYS, dtype=np.uint32)
        view.fresh_rounds(ALL_KEYS, fresh)
        versions = np.empty(NUM_KEYS, dtype=np.uint32)
        view.versions_of(ALL_KEYS, versions)
        owners = np.empty(NUM_KEYS, dtype=np.uint16)
        view.owners_of(ALL_KEYS, owners)
        return {"arena": bytes(view._arena_array()), "states": self.table.states(ALL_KEYS),
                "owners": owners,
                "versions": versions, "fresh": fresh, "seen": self.seen.copy(),
                "holders": self.holders.copy(), "pending": self.pending.keys(),
                "moving_in": self.moving_in.keys()}


@pytest.fixture
def rig(make_table):
    """(plane, state, router, senders, inboxes): the plane serving node 1's state,
    senders by name (nodes 0 and 2, a worker, a stranger), inboxes: node -> the ROUTER
    that receives node 1's messages to that node."""
    from adapm.node.data import _plane
    state = RoundState(make_table, seed=7)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    names = {f"n{n}": node_identity(n, TOKEN) for n in PEERS}
    names.update({"n1": node_identity(NODE, TOKEN), "w0": worker_identity(0, TOKEN),
                  "stranger": b"N\x00\x00"})
    senders, inboxes, peers = {}, {}, {}
    for name, identity in names.items():
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        senders[name] = sock
    for node in PEERS:
        inboxes[node] = context.socket(zmq.ROUTER)
        inboxes[node].setsockopt(zmq.LINGER, 0)
        inbox_port = inboxes[node].bind_to_random_port("tcp://127.0.0.1")
        peers[node] = context.socket(zmq.DEALER)
        peers[node].setsockopt(zmq.IDENTITY, node_identity(NODE, TOKEN))
        peers[node].setsockopt(zmq.LINGER, 0)
        peers[node].connect(f"tcp://127.0.0.1:{inbox_port}")
    plane = _plane.Plane(libzmq.functions(), router.underlying, state.table.view,
                         state.table.view.kernel_handle(), NODE, NUM_NODES, NUM_WORKERS,
                         WORKERS_PER_NODE)
    plane.admit(TOKEN, [worker_identity(r, TOKEN) for r in range(NUM_WORKERS)],
                [node_identity(n, TOKEN) for n in range(NUM_NODES)], peers)
    plane.serve_rounds(state.holders, state.seen, state.synced, state.pending,
                       state.moving_in)
    plane.enabled = True
    yield plane, state, router, senders, inboxes
    del plane
    for sock in [router, *senders.values(), *inboxes.values(), *peers.values()]:
        sock.close(0)
    context.term()


# -- messages ---------------------------------------------------------------------------

def valid_sync(rng, table):
    """(sender, body) of a SYNC from node 0 or 2 (synced, dropped and requested keys,
    some with deltas) or of a SYNC_REPLY to this node (values, "current", drops)."""
    src = int(rng.choice(PEERS))
    n = int(rng.integers(1, 7))
    round_id = int(rng.integers(1, 1 << 40))
    if rng.random() < 0.5:
        keys = rng.permutation(rng.choice(OWNED_KEYS, n, replace=False)) \
            if rng.random() < 0.8 else rng.integers(0, NUM_KEYS, n).astype(np.uint64)
        kinds = rng.choice([SYNC_KEEP, SYNC_KEEP, SYNC_DROP, SYNC_REQUEST], n).astype(
            np.uint32)
        if rng.random() < 0.4:
            kinds[:] = SYNC_KEEP
        dirty = rng.random(n) < 0.6
        versions = np.empty(n, dtype=np.uint32)
        table.view.versions_of(np.ascontiguousarray(keys), versions)
        versions -= (rng.random(n) < 0.5).astype(np.uint32) * dirty.astype(np.uint32)
        versions += (rng.random(n) < 0.3).astype(np.uint32)   # some behind, some not
        msg = protocol.Sync(round=round_id, holder=src, keys=keys,
                            values=rng.standard_normal(int(dirty.sum()) * DIM).astype(
                                np.float32),
                            counters=kinds | np.where(dirty, HAS_DELTA, 0).astype(np.uint32),
                            versions=versions)
    else:
        held = np.union1d(REPLICA_KEYS, PENDING_KEYS)
        keys = rng.permutation(rng.choice(held, n, replace=False)) \
            if rng.random() < 0.8 else rng.integers(0, NUM_KEYS, n).astype(np.uint64)
        answers = rng.choice([REPLY_VALUE, REPLY_VALUE, REPLY_CURRENT, REPLY_DROPPED],
                             n).astype(np.uint32)
        if rng.random() < 0.4:
            answers[answers == REPLY_DROPPED] = REPLY_CURRENT
        msg = protocol.SyncReply(
            round=round_id, keys=keys, counters=answers,
            values=rng.standard_normal(int((answers == REPLY_VALUE).sum()) * DIM).astype(
                np.float32),
            versions=rng.integers(0, 1 << 32, n).astype(np.uint32))
    msg.src_node, msg.token = src, TOKEN
    return f"n{src}", [bytes(f) for f in msg.encode()]


def mutated(rng, sender, body):
    """The message with one thing wrong (or, now and then, nothing)."""
    body = list(body)
    kind = int(rng.integers(11))
    header = bytearray(body[0])
    if kind == 0:    # a header byte changed
        header[int(rng.integers(len(header)))] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # a frame cut or grown
        i = int(rng.integers(len(body)))
        body[i] = body[i][:-1] if body[i] and rng.random() < 0.5 else body[i] + b"\0"
    elif kind == 2:  # a frame too many or too few
        body = body + [b""] if rng.random() < 0.5 else body[:-1]
    elif kind == 3:  # another sender
        sender = ["n0", "n1", "n2", "w0", "stranger"][int(rng.integers(5))]
    elif kind == 4:  # a key out of range
        keys = np.frombuffer(body[1], dtype=np.uint64).copy()
        keys[int(rng.integers(keys.shape[0]))] = NUM_KEYS + int(rng.integers(1 << 20))
        body[1] = keys.tobytes()
    elif kind == 5:  # forwarded (hops), or other flag bits
        header[6:8] = int(rng.choice([1, 1 << 8, 3 << 8])).to_bytes(2, "little")
    elif kind == 6:  # another holder
        header[28:36] = int(rng.integers(-1, 4)).to_bytes(8, "little", signed=True)
    elif kind == 7:  # an unknown per-key flag or answer
        flags = np.frombuffer(body[3], dtype=np.uint32).copy()
        flags[int(rng.integers(flags.shape[0]))] = int(rng.choice([0, 3, 7, 8, 99]))
        body[3] = flags.tobytes()
    body[0] = bytes(header)
    return sender, body


def verdict(identity, body, table):
    """What the Python path does with the message: None when the plane must hand it over
    whole (the Python path rejects it, or it is not the steady state), else (msg, served
    mask over its keys)."""
    try:
        msg = protocol.decode(body)
        check_sender(identity, msg, token=TOKEN, spec=SPEC, node=NODE,
                     registered=lambda rank, ident: False)
    except ProtocolError:
        return None
    if msg.type not in (MsgType.SYNC, MsgType.SYNC_REPLY) or msg.flags != 0 or \
            msg.keys.shape[0] == 0 or int(msg.keys.max()) >= NUM_KEYS:
        return None
    lengths = table.lengths(msg.keys)
    if msg.type == MsgType.SYNC:
        if msg.holder != msg.src_node:
            return None
        kinds, dirty = msg.counters & ~np.uint32(HAS_DELTA), (msg.counters & HAS_DELTA) != 0
        if (kinds > SYNC_DROP).any() or msg.values.nbytes != int(lengths[dirty].sum()) * 4:
            return None  # rounds.on_sync raises: the node fails in Python
        served = kinds != SYNC_REQUEST
        if not served.any() or not (table.states(msg.keys[served]) == OWNED).all():
            return None
        return msg, served
    answers = msg.counters
    if ((answers == 0) | (answers > REPLY_CURRENT)).any() or \
            msg.values.nbytes != int(lengths[answers == REPLY_VALUE].sum()) * 4:
        return None  # rounds.on_sync_reply raises
    served = answers != REPLY_DROPPED
    return (msg, served) if served.any() else None


def apply_reference(msg, served, shadow):
    """What the Python path does for the served keys, done to the shadow state through
    the same calls; returns the reply it sends (frames) or the event it reports."""
    view, keys = shadow.table.view, np.ascontiguousarray(msg.keys[served])
    n = keys.shape[0]
    lengths = shadow.table.lengths(msg.keys).astype(np.int64)
    if msg.type == MsgType.SYNC:
        dirty_all = (msg.counters & HAS_DELTA) != 0
        starts = np.concatenate([[0], np.cumsum(np.where(dirty_all, lengths, 0))])
        deltas_all = np.frombuffer(msg.values, dtype=np.float32)
        idx = np.flatnonzero(served & dirty_all)
        deltas = np.concatenate([deltas_all[starts[i]:starts[i] + lengths[i]] for i in idx]) \
            if idx.shape[0] else np.empty(0, np.float32)
        kinds = msg.counters[served] & ~np.uint32(HAS_DELTA)
        wanted = np.where(kinds == SYNC_KEEP, 2, 0).astype(np.uint8)   # SERVE_VALUE_IF_CHANGED
        owned, with_value = np.empty(n, np.uint8), np.empty(n, np.uint8)
        versions = np.empty(n, np.uint32)
        out = np.empty(n * DIM, np.float32)
        used = view.serve_sync(keys, deltas, dirty_all[served].astype(np.uint8),
                               np.ascontiguousarray(msg.versions[served]), wanted, owned,
                               versions, with_value, out)
        assert owned.all()
        shadow.holders[keys[kinds == SYNC_DROP].astype(np.intp), 0] &= \
            np.uint8(~(1 << msg.holder) & 0xFF)
        answer = np.where(with_value == 1, REPLY_VALUE, REPLY_CURRENT).astype(np.uint32)
        answer[kinds == SYNC_DROP] = REPLY_DROPPED
        reply = protocol.SyncReply(round=msg.round, keys=keys, values=out[:used],
                                   counters=answer, versions=versions)
        reply.src_node, reply.token = NODE, TOKEN
        return [bytes(f) for f in reply.encode()]
    answers = msg.counters[served]
    with_value = keys[answers == REPLY_VALUE]
    if with_value.shape[0]:
        view.replica_refresh(with_value, shadow.synced[with_value.astype(np.intp)].astype(
            np.uint64), np.frombuffer(msg.values, dtype=np.float32).copy())
        shadow.pending.discard(with_value)
    shadow.seen[keys.astype(np.intp)] = msg.versions[served]
    view.stamp_fresh(keys, msg.round & 0xFFFFFFFF)
    return (1, msg.round, n)


def rest_of(identity, body, msg, served):
    """The message the plane hands over for the keys it leaves: same identity and header,
    those keys' frames."""
    left = ~served
    keys = msg.keys[left]
    values = b""
    if msg.type == MsgType.SYNC:
        lengths = np.where((msg.counters & HAS_DELTA) != 0, 4 * DIM, 0)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        raw = bytes(msg.values)
        values = b"".join(raw[starts[i]:starts[i + 1]] for i in np.flatnonzero(left))
    return [identity, body[0], keys.tobytes(), values, msg.counters[left].tobytes(),
            msg.versions[left].tobytes()]


def _equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])) if name != "arena" \
            else a[name] == b[name], name


# -- tests ------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plane_serves_the_steady_state_of_rounds_as_python_does(rig, make_table, seed):
    plane, state, router, senders, inboxes = rig
    shadow = RoundState(make_table, seed=7)
    _equal(state.snapshot(), shadow.snapshot())
    rng = np.random.default_rng(seed)
    identities = {name: bytes(s.getsockopt(zmq.IDENTITY)) for name, s in senders.items()}
    counts = {"whole": 0, "served": 0, "split": 0, MsgType.SYNC: 0, MsgType.SYNC_REPLY: 0}
    for _ in range(1200):
        sender, body = valid_sync(rng, state.table)
        if rng.random() < 0.4:
            sender, body = mutated(rng, sender, body)
        judged = verdict(identities[sender], body, state.table)
        expected = None if judged is None else apply_reference(*judged, shadow)
        senders[sender].send_multipart(body)
        assert router.poll(5000)
        taken, frames = plane.drain(1)
        assert taken == 1
        events = plane.take_events()
        if judged is None:
            counts["whole"] += 1
            assert frames == [identities[sender], *body][:len(frames)]
            assert events == []
        else:
            msg, served = judged
            counts[msg.type] += 1
            if served.all():
                counts["served"] += 1
                assert frames is None
            else:
                counts["split"] += 1
                assert frames == rest_of(identities[sender], body, msg, served)
            if msg.type == MsgType.SYNC:
                assert events == []
                inbox = inboxes[msg.holder]
                assert inbox.poll(5000), "no answer to the SYNC"
                assert inbox.recv_multipart() == [node_identity(NODE, TOKEN), *expected]
            else:
                assert events == [expected]
        _equal(state.snapshot(), shadow.snapshot())
    for inbox in inboxes.values():  # no answer the Python path would not have sent
        assert not inbox.poll(50)
    assert counts["whole"] > 200 and counts["served"] > 100 and counts["split"] > 100
    assert counts[MsgType.SYNC] > 100 and counts[MsgType.SYNC_REPLY] > 100
    assert plane.served == counts["served"] + counts["split"]


@pytest.mark.timeout(60)
def test_events_of_one_round_add_up_and_a_full_queue_stops_the_drain(rig):
    """Answers of one round in a row make one event; a round per message fills the
    queue, and the drain stops there (events_full) until they are taken."""
    plane, state, router, senders, _ = rig
    keys = REPLICA_KEYS[:2]

    def reply(round_id):
        msg = protocol.SyncReply(round=round_id, keys=keys, values=np.empty(0, np.float32),
                                 counters=np.full(2, REPLY_CURRENT, np.uint32),
                                 versions=np.zeros(2, np.uint32))
        msg.src_node, msg.token = 0, TOKEN
        return [bytes(f) for f in msg.encode()]

    for _ in range(3):
        senders["n0"].send_multipart(reply(5))
    taken = 0
    while taken < 3:
        assert router.poll(5000)
        taken += plane.drain(3 - taken)[0]
    assert plane.take_events() == [(1, 5, 6)]
    for round_id in range(100):
        senders["n0"].send_multipart(reply(round_id + 10))
    taken, seen = 0, []
    while taken < 100:
        assert router.poll(5000)
        got, frames = plane.drain(100 - taken)
        assert frames is None
        taken += got
        if plane.events_full:
            assert got > 0
        seen += plane.take_events()
    assert seen == [(1, r + 10, 2) for r in range(100)]


@pytest.mark.timeout(60)
def test_without_round_state_every_sync_goes_to_python(make_table):
    """A plane that was not given the rounds' state (or the peers) serves no sync."""
    from adapm.node.data import _plane
    state = RoundState(make_table, seed=1)
    context = zmq.Context()
    try:
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        sender = context.socket(zmq.DEALER)
        sender.setsockopt(zmq.IDENTITY, node_identity(0, TOKEN))
        sender.setsockopt(zmq.LINGER, 0)
        sender.connect(f"tcp://127.0.0.1:{port}")
        plane = _plane.Plane(libzmq.functions(), router.underlying, state.table.view,
                             state.table.view.kernel_handle(), NODE, NUM_NODES,
                             NUM_WORKERS, WORKERS_PER_NODE)
        plane.admit(TOKEN, [worker_identity(r, TOKEN) for r in range(NUM_WORKERS)],
                    [node_identity(n, TOKEN) for n in range(NUM_NODES)])
        plane.enabled = True
        msg = protocol.Sync(round=3, holder=0, keys=OWNED_KEYS[:3],
                            values=np.empty(0, np.float32),
                            counters=np.full(3, SYNC_KEEP, np.uint32),
                            versions=np.zeros(3, np.uint32))
        msg.src_node, msg.token = 0, TOKEN
        body = [bytes(f) for f in msg.encode()]
        sender.send_multipart(body)
        assert router.poll(5000)
        assert plane.drain(1) == (1, [node_identity(0, TOKEN), *body])
        del plane
    finally:
        context.destroy(0)


def python_round(state, round_id, keys, kinds):
    """What rounds._send_round sends for these keys (the Python path's calls, on the
    shadow state): (keys with a delta, keys sent, {node: frames of its SYNC})."""
    view = state.table.view
    lengths = state.table.lengths(keys).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    deltas = np.zeros(int(lengths.sum()), dtype=np.float32)
    take = np.flatnonzero(~state.moving_in.contains(keys))  # ReplicaCopies.deltas: none
    part = np.empty(int(lengths[take].sum()), dtype=np.float32)  # for keys moving in
    view.replica_deltas(keys[take], state.synced[keys[take].astype(np.intp)].astype(
        np.uint64), part)
    at = 0
    for i in take:
        deltas[starts[i]:starts[i + 1]] = part[at:at + lengths[i]]
        at += lengths[i]
    dirty = np.array([deltas[starts[i]:starts[i + 1]].any() for i in range(keys.shape[0])],
                     dtype=bool)
    flags = kinds | np.where(dirty, HAS_DELTA, 0).astype(np.uint32)
    versions = state.seen[keys.astype(np.intp)]
    sent, syncs = 0, {}
    for dest, idx in split_by(route(view, keys, NODE, NUM_NODES)).items():
        if dest < 0:
            continue
        sent += idx.shape[0]
        part = [deltas[starts[i]:starts[i + 1]] for i in idx[dirty[idx]]]
        msg = protocol.Sync(round=round_id, holder=NODE, keys=keys[idx],
                            values=np.concatenate(part) if part else np.empty(0, np.float32),
                            counters=flags[idx], versions=versions[idx])
        msg.src_node, msg.token = NODE, TOKEN
        syncs[dest] = [bytes(f) for f in msg.encode()]
    return keys[dirty], sent, syncs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plane_sends_rounds_as_python_does(rig, make_table, seed):
    """send_round against rounds._send_round: the same deltas taken (the copies' slots
    changed alike), the same SYNC to each node, byte for byte, the same keys reported
    with a delta; keys on their way here go to their home, or nowhere."""
    plane, state, router, senders, inboxes = rig
    shadow = RoundState(make_table, seed=7)
    rng = np.random.default_rng(seed)
    held = np.union1d(REPLICA_KEYS, PENDING_KEYS)
    writes = 0
    for round_id in range(1, 200):
        for target in (state, shadow):  # workers write some replicas here meanwhile
            written = REPLICA_KEYS[np.random.default_rng(round_id).random(
                REPLICA_KEYS.shape[0]) < 0.3]
            misses = np.empty(written.shape[0], dtype=np.uint64)
            target.table.view.update(written, np.full(written.shape[0] * DIM, 0.5, np.float32),
                                     misses, True, False)
            writes += written.shape[0]
        moving = held[rng.random(held.shape[0]) < 0.1]
        for target in (state, shadow):
            target.moving_in.clear()
            target.moving_in.add(moving)
        n = int(rng.integers(0, held.shape[0] + 1))
        keys = np.sort(rng.choice(held, n, replace=False))
        kinds = rng.choice([SYNC_REQUEST, SYNC_KEEP, SYNC_DROP], n).astype(np.uint32)
        dirty, sent, syncs = python_round(shadow, round_id, keys, kinds)
        got_dirty, got_sent = plane.send_round(round_id, keys, kinds)
        assert np.array_equal(got_dirty, dirty) and got_sent == sent
        for node, inbox in inboxes.items():
            if node in syncs:
                assert inbox.poll(5000), f"no SYNC to node {node}"
                assert inbox.recv_multipart() == [node_identity(NODE, TOKEN), *syncs[node]]
            assert not inbox.poll(0)
        _equal(state.snapshot(), shadow.snapshot())
    assert writes > 500


@pytest.mark.timeout(60)
def test_send_round_refuses_before_anything_changed(rig):
    plane, state, _, _, _ = rig
    before = state.snapshot()
    keys = REPLICA_KEYS[:3].copy()
    with pytest.raises(IndexError):
        plane.send_round(1, np.array([1, NUM_KEYS], np.uint64), np.ones(2, np.uint32))
    with pytest.raises(ValueError):
        plane.send_round(1, keys, np.ones(2, np.uint32))
    plane.enabled = False
    assert not plane.can_send_rounds
    with pytest.raises(RuntimeError):
        plane.send_round(1, keys, np.ones(3, np.uint32))
    _equal(state.snapshot(), before)


class Policy:
    """The owner's decision state, as the node server keeps it: a Manager in `mode` (its
    Retention), intent counts, arrival stamps, ownership counters; the same on the rig's
    plane and for the reference."""

    NOW, ROUND = 100.0, 7

    def __init__(self, mode, seed):
        rng = np.random.default_rng(seed)
        self.manager = Manager(mode, 1, None, num_keys=NUM_KEYS)
        self.counts = (rng.random(NUM_KEYS) < 0.3).astype(np.int32)
        retention = self.manager.retention
        if retention is not None:
            retention.last_used[:] = np.where(rng.random(NUM_KEYS) < 0.3, -np.inf,
                                              self.NOW - rng.random(NUM_KEYS) * 6)
            retention.level[:] = rng.integers(0, 9, NUM_KEYS)
        self.rounds = Rounds.__new__(Rounds)  # its arrival arithmetic, nothing else
        self.rounds.round = self.ROUND
        self.rounds.arrived_round = np.where(rng.random(NUM_KEYS) < 0.3,
                                             rng.integers(1, 30, NUM_KEYS), 0).astype(np.uint32)
        self.counter = rng.integers(0, 1 << 32, NUM_KEYS).astype(np.uint32)

    def install(self, plane):
        retention = self.manager.retention
        plane.set_policy(self.manager.mode, self.counts,
                         None if retention is None else retention.last_used,
                         None if retention is None else retention.level,
                         [] if retention is None else list(retention.SECONDS),
                         self.rounds.arrived_round, self.counter, SETTLE_ROUNDS)
        plane.set_clock(self.NOW, self.ROUND)

    def relocate(self, keys, holders, holder):
        """Manager.relocate_mask as rounds._answer_requests calls it."""
        return self.manager.relocate_mask(
            self.counts[keys.astype(np.intp)] > 0, holders.others(keys, holder),
            self.rounds._rounds_since_arrival(keys), keys=keys, now=self.NOW)


def owner_reference(msg, shadow, holders, policy):
    """rounds._answer_sync for a SYNC of keys all owned here (requests decided): the
    frames it sends (a MOVE, then a SYNC_REPLY, either may be missing), the slots it
    frees, and the counts of replicas made and MOVEs."""
    view, keys, n = shadow.table.view, np.ascontiguousarray(msg.keys), msg.keys.shape[0]
    kinds = msg.counters & ~np.uint32(HAS_DELTA)
    dirty = (msg.counters & HAS_DELTA) != 0
    relocate = np.zeros(n, dtype=bool)
    requested = np.flatnonzero(kinds == SYNC_REQUEST)
    relocate[requested] = policy.relocate(keys[requested], holders, msg.holder)
    holders.add(keys[requested[~relocate[requested]]], msg.holder)
    holders.discard(keys[kinds == SYNC_DROP], msg.holder)
    wanted = np.where(kinds == SYNC_KEEP, 2, 1).astype(np.uint8)
    wanted[(kinds == SYNC_DROP) | relocate] = 0
    owned, with_value = np.empty(n, np.uint8), np.empty(n, np.uint8)
    versions = np.empty(n, np.uint32)
    out = np.empty(n * DIM, np.float32)
    used = view.serve_sync(keys, np.frombuffer(msg.values, dtype=np.float32).copy(),
                           dirty.astype(np.uint8), np.ascontiguousarray(msg.versions), wanted,
                           owned, versions, with_value, out)
    assert owned.all()
    sent, freed = [], (np.empty(0, np.uint64), np.empty(0, np.uint64))
    if relocate.any():
        moved = keys[relocate]
        values = np.empty(moved.shape[0] * DIM, np.float32)
        offsets = np.zeros(moved.shape[0], np.uint64)
        taken = np.zeros(moved.shape[0], np.uint8)
        view.evict(moved, msg.holder, values, offsets, taken)
        assert taken.all()
        moved_versions = np.empty(moved.shape[0], np.uint32)
        view.versions_of(moved, moved_versions)
        move = protocol.Move(request_id=msg.round, purpose=MOVE_FOR_ROUND, keys=moved,
                             values=values, counters=policy.counter[moved.astype(np.intp)] +
                             np.uint32(1), versions=moved_versions)
        move.src_node, move.token = NODE, TOKEN
        sent.append([bytes(f) for f in move.encode()])
        holders.forget(moved)
        freed = (offsets, shadow.table.lengths(moved))
    reply = ~relocate
    if reply.any():
        answer = np.where(with_value == 1, REPLY_VALUE, REPLY_CURRENT).astype(np.uint32)
        answer[kinds == SYNC_DROP] = REPLY_DROPPED
        sync_reply = protocol.SyncReply(round=msg.round, keys=keys[reply], values=out[:used],
                                        counters=answer[reply], versions=versions[reply])
        sync_reply.src_node, sync_reply.token = NODE, TOKEN
        sent.append([bytes(f) for f in sync_reply.encode()])
    return sent, freed, int((~relocate[requested]).sum()), int(relocate.any())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["adaptive", "relocate_only", "replicate_only"])
def test_plane_answers_requests_as_the_manager_decides(rig, make_table, mode):
    """With the manager's state (set_policy), the plane answers requests itself: each
    key relocated (one MOVE: values, counters + 1, versions; its slot freed, its holders
    forgotten) or replicated (holder bit, value) exactly where Manager.relocate_mask
    says so, in mode adaptive (intents, retention, other holders, recent arrival),
    relocate_only and replicate_only."""
    plane, state, router, senders, inboxes = rig
    shadow = RoundState(make_table, seed=7)
    rng = np.random.default_rng(11)
    state.holders[rng.random(NUM_KEYS) < 0.7] = 0  # fewer keys held elsewhere
    holders = ReplicaHolders(NUM_KEYS, NUM_NODES)
    holders.raw()[:] = state.holders
    shadow.holders = holders.raw()
    policy = Policy(mode, seed=3)
    policy.install(plane)
    identity = {NODE: node_identity(NODE, TOKEN)}
    moves = relocated = replicated = 0
    for _ in range(300):
        owned = OWNED_KEYS[state.table.states(OWNED_KEYS) == OWNED]
        if owned.shape[0] < 4:
            break
        src = int(rng.choice(PEERS))
        n = int(rng.integers(1, 5))
        keys = rng.permutation(rng.choice(owned, n, replace=False))
        kinds = rng.choice([SYNC_REQUEST, SYNC_REQUEST, SYNC_KEEP, SYNC_DROP], n).astype(
            np.uint32)
        dirty = rng.random(n) < 0.5
        msg = protocol.Sync(round=int(rng.integers(1, 1 << 30)), holder=src, keys=keys,
                            values=rng.standard_normal(int(dirty.sum()) * DIM).astype(
                                np.float32),
                            counters=kinds | np.where(dirty, HAS_DELTA, 0).astype(np.uint32),
                            versions=rng.integers(0, 3, n).astype(np.uint32))
        msg.src_node, msg.token = src, TOKEN
        body = [bytes(f) for f in msg.encode()]
        sent, freed, made, moved = owner_reference(protocol.decode(body), shadow, holders,
                                                   policy)
        senders[f"n{src}"].send_multipart(body)
        assert router.poll(5000)
        assert plane.drain(1) == (1, None)
        for frames in sent:
            assert inboxes[src].poll(5000)
            assert inboxes[src].recv_multipart() == [identity[NODE], *frames]
        assert not inboxes[src].poll(0)
        got_offsets, got_lengths = plane.take_freed()
        assert np.array_equal(got_offsets, freed[0]) and np.array_equal(got_lengths, freed[1])
        moves += moved
        relocated += freed[0].shape[0]
        replicated += made
        _equal(state.snapshot(), shadow.snapshot())
    assert plane.replicas_made == replicated and plane.owner_changes == moves
    if mode != "replicate_only":
        assert relocated > 10
    if mode != "relocate_only":
        assert replicated > 10


HOMES = len(range(NODE, NUM_KEYS, NUM_NODES))


def key_values(table, keys):
    """Each key's value where its slot is (any state), flat."""
    directory = table.view._directory_array()
    offsets = directory["offset"][keys.astype(np.intp)].astype(np.uint64)
    return table.view.read_slots(offsets, table.lengths(keys))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plane_installs_keys_moved_for_its_round_as_python_does(rig, seed):
    """A MOVE answering a round, of keys held here as copies: each becomes OWNED with
    the arriving value plus the updates made here since its last sync (a replica) or
    the arriving value (a pending copy), version + 1, owner this node; it leaves the
    copies' sets; counters, arrival stamps and home records are written; the other
    homes get OWNER_UPDATEs; the "value at last sync" slots go back; the round's keys
    are answered (events). Relocation.on_move's semantics; a localize's MOVE, a key
    not held as a copy, a key twice: handed over whole."""
    plane, state, router, senders, inboxes = rig
    policy = Policy("adaptive", seed=seed)
    policy.install(plane)
    home_owner = np.full(HOMES, NODE, dtype=np.uint16)
    home_counter = np.random.default_rng(seed).integers(0, 4, HOMES).astype(np.uint32)
    plane.serve_arrivals(state.held, home_owner, home_counter)
    rng = np.random.default_rng(seed + 10)
    # workers wrote some replicas here since their last sync
    written = REPLICA_KEYS[rng.random(REPLICA_KEYS.shape[0]) < 0.5]
    state.table.view.update(written, np.full(written.shape[0] * DIM, 0.25, np.float32),
                            np.empty(written.shape[0], np.uint64), True, False)
    state.moving_in.add(np.union1d(REPLICA_KEYS, PENDING_KEYS)[:3])
    installed = handed = 0
    for step in range(1000):
        held = state.held.keys()
        if held.shape[0] == 0:
            break
        src = int(rng.choice(PEERS))
        n = int(rng.integers(1, min(5, held.shape[0]) + 1))
        keys = rng.permutation(rng.choice(held, n, replace=False))
        purpose = MOVE_FOR_ROUND
        wrong = (step % 10) / 10 if step < 30 else 1.0  # a wrong one of each kind first
        if wrong < 0.1:
            purpose = 0                               # a localize's MOVE
        elif wrong < 0.2:
            keys = np.append(keys, OWNED_KEYS[:1])    # a key owned here already
        elif wrong < 0.3:
            keys = np.append(keys, keys[:1])          # a key twice
        n = keys.shape[0]
        values = rng.standard_normal(n * DIM).astype(np.float32)
        counters = rng.integers(0, 6, n).astype(np.uint32)
        versions = rng.integers(0, 100, n).astype(np.uint32)
        msg = protocol.Move(request_id=int(rng.integers(1, 1 << 30)), purpose=purpose,
                            keys=keys, values=values, counters=counters, versions=versions)
        msg.src_node, msg.token = src, TOKEN
        body = [bytes(f) for f in msg.encode()]
        states = state.table.states(keys)
        synced = state.synced[keys.astype(np.intp)].astype(np.uint64)
        expected = values + np.where(np.repeat(states == REPLICA, DIM),
                                     key_values(state.table, keys) -
                                     state.table.view.read_slots(synced, state.table.lengths(keys)),
                                     0)
        moving_before = bool(state.moving_in)
        senders[f"n{src}"].send_multipart(body)
        assert router.poll(5000)
        taken, frames = plane.drain(1)
        events = plane.take_events()
        if wrong < 0.3:
            handed += 1
            assert frames == [node_identity(src, TOKEN), *body] and events == []
            assert np.array_equal(state.table.states(keys), states)
            continue
        installed += n
        assert frames is None
        assert (state.table.states(keys) == OWNED).all()
        assert np.array_equal(key_values(state.table, keys), expected)
        got_versions = np.empty(n, np.uint32)
        state.table.view.versions_of(keys, got_versions)
        assert np.array_equal(got_versions, versions + 1)
        owners = np.empty(n, np.uint16)
        state.table.view.owners_of(keys, owners)
        assert (owners == NODE).all()
        for keyset in (state.held, state.pending, state.moving_in):
            assert not keyset.contains(keys).any()
        assert np.array_equal(policy.counter[keys.astype(np.intp)], counters)
        assert (policy.rounds.arrived_round[keys.astype(np.intp)] == Policy.ROUND + 1).all()
        offsets, lengths = plane.take_freed()
        assert np.array_equal(offsets, synced) and (lengths == DIM).all()
        mine = keys % NUM_NODES == NODE
        slots = (keys[mine] // NUM_NODES).astype(np.intp)
        assert (home_counter[slots] >= counters[mine]).all()
        assert (home_owner[slots][home_counter[slots] == counters[mine]] == NODE).all()
        for home in PEERS:  # one OWNER_UPDATE per other home, its keys in the MOVE's order
            part = keys % NUM_NODES == home
            if part.any():
                update = protocol.OwnerUpdate(owner=NODE, keys=keys[part],
                                              counters=counters[part])
                update.src_node, update.token = NODE, TOKEN
                assert inboxes[home].poll(5000)
                assert inboxes[home].recv_multipart() == \
                    [node_identity(NODE, TOKEN), *[bytes(f) for f in update.encode()]]
            assert not inboxes[home].poll(0)
        moved_in = [(2, 0, 0)] if moving_before and not state.moving_in else []
        assert events == moved_in + [(1, msg.request_id, n)]
    assert installed > 10 and handed >= 3  # each wrong kind at least once
    assert plane.relocations == installed


def _live_slots(state, keys_with_values):
    """(offset, length) of every slot in use: the values of held keys and the "value at
    last sync" slots of the copies."""
    directory = state.table.view._directory_array()
    live = [(int(directory["offset"][k]), DIM) for k in keys_with_values]
    live += [(int(state.synced[k]), DIM) for k in state.held.keys()]
    return live


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plane_makes_requested_keys_pending_as_the_replicas_part_does(rig, seed):
    """Plane.make_pending (ReplicaCopies.make_pending's work, slots from the table's
    compiled allocator): of the keys asked for, exactly the ABSENT ones, in their order,
    become PENDING with zeroed value and "value at last sync" slots, version + 1, the
    location cache unchanged, held and pending; no slot overlaps one in use; keys held
    in any way are left alone. The slots a relocation gives up go back to the
    allocator at once (take_freed has none) and are taken again."""
    plane, state, router, senders, inboxes = rig
    allocator = state.table.allocator
    plane.serve_rounds(state.holders, state.seen, state.synced, state.pending,
                       state.moving_in, allocator)
    with pytest.raises(RuntimeError, match="no copies"):
        plane.make_pending(np.array([5], dtype=np.uint64))  # serve_arrivals not given yet
    Policy("adaptive", seed=seed).install(plane)
    plane.serve_arrivals(state.held, np.full(HOMES, NODE, dtype=np.uint16),
                         np.zeros(HOMES, dtype=np.uint32))
    rng = np.random.default_rng(seed)
    made_all = []
    for _ in range(12):
        absent_now = np.flatnonzero(state.table.states(ALL_KEYS) == ABSENT)
        keys = np.unique(np.concatenate([  # some keys of every state, an ABSENT one or two
            rng.integers(0, NUM_KEYS, int(rng.integers(0, 9))),
            rng.choice(absent_now, min(absent_now.shape[0], int(rng.integers(0, 3))),
                       replace=False)]).astype(np.uint64))
        states = state.table.states(keys)
        versions, owners = np.empty(keys.shape[0], np.uint32), np.empty(keys.shape[0], np.uint16)
        state.table.view.versions_of(keys, versions)
        state.table.view.owners_of(keys, owners)
        before = state.snapshot()
        made = plane.make_pending(keys)
        absent = keys[states == ABSENT]
        assert made.dtype == np.uint64 and np.array_equal(made, absent)
        assert (state.table.states(absent) == PENDING).all()
        after_versions, after_owners = np.empty_like(versions), np.empty_like(owners)
        state.table.view.versions_of(keys, after_versions)
        state.table.view.owners_of(keys, after_owners)
        assert np.array_equal(after_versions, versions + (states == ABSENT))
        assert np.array_equal(after_owners, owners)
        assert state.held.contains(absent).all() and state.pending.contains(absent).all()
        assert not key_values(state.table, absent).any()
        synced = state.synced[absent.astype(np.intp)].astype(np.uint64)
        assert not state.table.view.read_slots(synced, state.table.lengths(absent)).any()
        held_here = keys[states != ABSENT]
        assert np.array_equal(key_values(state.table, held_here),
                              before_values(before, state, held_here))
        made_all += absent.tolist()
    assert len(made_all) >= 6  # of the 8 ABSENT keys
    held = np.flatnonzero(state.table.states(ALL_KEYS) != ABSENT)
    cells = np.zeros(allocator.capacity, dtype=int)
    for off, length in _live_slots(state, held):
        cells[off:off + length] += 1
    assert cells.max() == 1
    # a relocation of copies: their "value at last sync" slots go back to the allocator
    keys = state.held.keys()[:3]
    synced = state.synced[keys.astype(np.intp)].astype(np.uint64)
    msg = protocol.Move(request_id=9, purpose=MOVE_FOR_ROUND, keys=keys,
                        values=np.zeros(keys.shape[0] * DIM, np.float32),
                        counters=np.ones(keys.shape[0], np.uint32),
                        versions=np.zeros(keys.shape[0], np.uint32))
    msg.src_node, msg.token = 0, TOKEN
    senders["n0"].send_multipart([bytes(f) for f in msg.encode()])
    assert router.poll(5000)
    assert plane.drain(1) == (1, None)
    assert (state.table.states(keys) == OWNED).all()
    assert plane.nfreed == 0 and plane.take_freed()[0].shape[0] == 0
    top = allocator.top
    again = allocator.allocate(np.full(keys.shape[0], DIM, dtype=np.uint64))
    assert sorted(again.tolist()) == sorted(synced.tolist()) and allocator.top == top


def before_values(snapshot, state, keys):
    """The keys' values in a snapshot's arena (their slots then and now are the same)."""
    arena = np.frombuffer(snapshot["arena"], dtype=np.float32)
    return key_values_in(arena, state, keys)


def key_values_in(arena, state, keys):
    directory = state.table.view._directory_array()
    return np.concatenate([arena[int(directory["offset"][k]):int(directory["offset"][k]) + DIM]
                           for k in keys]) if keys.shape[0] else np.empty(0, np.float32)


@pytest.mark.timeout(60)
def test_make_pending_refuses_before_anything_changed(rig):
    """A key out of range or an arena too full for the copies: an error, and no key,
    set or slot changed."""
    plane, state, router, senders, inboxes = rig
    allocator = state.table.allocator
    plane.serve_rounds(state.holders, state.seen, state.synced, state.pending,
                       state.moving_in, allocator)
    Policy("adaptive", seed=0).install(plane)
    plane.serve_arrivals(state.held, np.full(HOMES, NODE, dtype=np.uint16),
                         np.zeros(HOMES, dtype=np.uint32))
    absent = np.flatnonzero(state.table.states(ALL_KEYS) == ABSENT).astype(np.uint64)
    before = state.snapshot()
    with pytest.raises(IndexError, match="of 64"):
        plane.make_pending(np.array([absent[0], NUM_KEYS], dtype=np.uint64))
    allocator.capacity = allocator.top  # nothing fresh; no slot freed yet
    with pytest.raises(MemoryError, match="arena full"):
        plane.make_pending(absent[:2])
    _equal(state.snapshot(), before)
    assert state.held.contains(absent).sum() == 0


def release_reference(keys, shadow, counts, rejoin, refresh):
    """Rounds._release of dropped keys, on the shadow state: (keys given up, their value
    and "value at last sync" slots, whether a key stays)."""
    again = counts[keys.astype(np.intp)] > 0
    rejoin.add(keys[again])
    rest = np.ascontiguousarray(keys[~again])
    synced = shadow.synced[rest.astype(np.intp)].astype(np.uint64)
    offsets, released = np.zeros(rest.shape[0], np.uint64), np.zeros(rest.shape[0], np.uint8)
    shadow.table.view.release_clean(rest, synced, offsets, released)
    gone = released.astype(bool)
    shadow.held.discard(rest[gone])
    refresh.add(rest[~gone])
    return rest[gone], np.concatenate([offsets[gone], synced[gone]]), \
        bool(again.any() or (~gone).any())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plane_answers_drops_of_its_rounds_as_python_does(rig, make_table, seed):
    """With serve_drops, a SYNC_REPLY's REPLY_DROPPED keys are handled in the plane as
    Rounds._release does: a key an intent names again rejoins; a replica no worker wrote
    since its last sync goes (ABSENT, out of the held set, both slots back to the
    allocator); any other stays and is refreshed next round; either way kept, the round
    is reported as not full (before its keys are counted as answered). The whole message
    is served; the state matches the reference's byte for byte."""
    plane, state, router, senders, inboxes = rig
    allocator = state.table.allocator
    plane.serve_rounds(state.holders, state.seen, state.synced, state.pending,
                       state.moving_in, allocator)
    policy = Policy("adaptive", seed=seed)
    policy.install(plane)
    plane.serve_arrivals(state.held, np.full(HOMES, NODE, dtype=np.uint16),
                         np.zeros(HOMES, dtype=np.uint32))
    rejoin, refresh = CompiledKeySet(NUM_KEYS), CompiledKeySet(NUM_KEYS)
    plane.serve_drops(rejoin, refresh)
    shadow = RoundState(make_table, seed=7)
    shadow_rejoin, shadow_refresh = CompiledKeySet(NUM_KEYS), CompiledKeySet(NUM_KEYS)
    rng = np.random.default_rng(seed)
    # workers wrote some replicas since their last sync: those are not clean
    written = REPLICA_KEYS[rng.random(REPLICA_KEYS.shape[0]) < 0.4]
    for table in (state.table, shadow.table):
        table.view.update(written, np.full(written.shape[0] * DIM, 0.5, np.float32),
                          np.empty(written.shape[0], np.uint64), True, False)
    identities = {name: bytes(s.getsockopt(zmq.IDENTITY)) for name, s in senders.items()}
    freed, dropped_total, kept_rounds = [], 0, 0
    for _ in range(300):
        sender, body = valid_sync(rng, state.table)
        judged = verdict(identities[sender], body, state.table)
        msg = protocol.decode(body)
        if msg.type != MsgType.SYNC_REPLY or judged is None and \
                not (msg.counters == REPLY_DROPPED).all():
            continue  # the rest is the steady-state test's
        drops = msg.keys[msg.counters == REPLY_DROPPED]
        served = msg.counters != REPLY_DROPPED
        if served.any():
            apply_reference(msg, served, shadow)
        gone, slots, kept = release_reference(drops, shadow, policy.counts, shadow_rejoin,
                                              shadow_refresh)
        senders[sender].send_multipart(body)
        assert router.poll(5000)
        assert plane.drain(1) == (1, None)
        expected = ([(3, msg.round, 0)] if kept and drops.shape[0] else []) + \
            [(1, msg.round, msg.keys.shape[0])]
        assert plane.take_events() == expected
        _equal(state.snapshot(), shadow.snapshot())
        for mine, theirs in ((state.held, shadow.held), (rejoin, shadow_rejoin),
                             (refresh, shadow_refresh)):
            assert np.array_equal(mine.keys(), theirs.keys())
        freed += slots.tolist()
        dropped_total += gone.shape[0]
        kept_rounds += kept and drops.shape[0] > 0
        if not state.held:
            break
    assert dropped_total >= 3 and kept_rounds >= 3
    assert plane.replicas_dropped == dropped_total and plane.nfreed == 0
    # the freed slots are the allocator's again: taken before any fresh one
    top = allocator.top
    again = allocator.allocate(np.full(len(freed), DIM, dtype=np.uint64))
    assert sorted(again.tolist()) == sorted(freed) and allocator.top == top
