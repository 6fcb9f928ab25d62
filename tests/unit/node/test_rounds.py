"""Sync rounds (adapm.node.data.rounds): requests, replicas, deltas, waits on rounds,
the sets that wait for a round, and what the rounds offer other parts (freeze, observers,
snapshots)."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from node_parts import (
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    floats,
    from_peer,
    from_worker,
    initial,
    keys_of,
    make_replica,
    node_counter,
    of_type,
    only,
    owners,
    read,
    states,
    write,
)

from adapm.common.errors import ProtocolError
from adapm.node.data.holders import ReplicaHolders
from adapm.node.data.rounds import Rounds
from adapm.policy.intents import IntentStore
from adapm.policy.manager import SETTLE_ROUNDS, Manager
from adapm.table.keyset import KeyFlags
from adapm.table.shared_table import ABSENT, OWNED, PENDING, REPLICA
from adapm.wire import protocol
from adapm.wire.protocol import (
    HAS_DELTA,
    MOVE_FOR_ROUND,
    REPLY_CURRENT,
    REPLY_VALUE,
    SYNC_KEEP,
    SYNC_REQUEST,
    MsgType,
    node_identity,
    worker_identity,
)

pytestmark = pytest.mark.timeout(60)


def test_start_makes_due_keys_pending_and_asks_their_owner(cluster):
    _, (here, _owner) = cluster(2)
    here.intents.add(0, keys_of(1, 3, 0), 0, 10)   # key 0 is owned here already
    here.rounds.start()
    assert states(here, [1, 3, 0]) == [PENDING, PENDING, OWNED]
    dest, sync = only(here.outbox.take(), MsgType.SYNC)
    assert dest == ("peer", 1)
    assert sync.keys.tolist() == [1, 3] and sync.holder == 0 and sync.round == 1
    assert sync.counters.tolist() == [SYNC_REQUEST, SYNC_REQUEST]
    assert here.rounds.in_flight and here.rounds.round_left == 2
    assert node_counter(here, "rounds_started") == 1


@pytest.mark.parametrize("owner_intends", [True, False])
def test_the_owner_replicates_or_relocates_as_the_manager_decides(cluster, owner_intends):
    """adaptive: the owner keeps keys its own workers intend (a replica goes to the asking
    node, with the values), and relocates keys nobody else intends (a MOVE)."""
    _, (here, owner) = cluster(2, mode="adaptive")
    keys = keys_of(1, 3)
    if owner_intends:
        owner.intents.add(0, keys, 0, 10)
    here.intents.add(0, keys, 0, 10)
    here.rounds.start()
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    owner.rounds.on_sync(node_identity(0), sync)
    sent = owner.outbox.take()
    if owner_intends:
        dest, reply = only(sent, MsgType.SYNC_REPLY)
        assert dest == ("peer", 0) and reply.round == 1 and len(sent) == 1
        assert reply.counters.tolist() == [REPLY_VALUE, REPLY_VALUE]
        np.testing.assert_array_equal(np.frombuffer(reply.values, np.float32),
                                      initial([1, 3]))
        assert states(owner, keys) == [OWNED, OWNED]
        assert owner.rounds.holders.others(keys, 1).all()   # node 0 holds replicas now
        assert node_counter(owner, "replicas_made") == 2
        here.rounds.on_sync_reply(node_identity(1), reply)
        assert states(here, keys) == [REPLICA, REPLICA]
    else:
        dest, move = only(sent, MsgType.MOVE)
        assert dest == ("peer", 0) and len(sent) == 1
        assert move.purpose == MOVE_FOR_ROUND and move.request_id == 1
        assert move.keys.tolist() == [1, 3]
        assert states(owner, keys) == [ABSENT, ABSENT] and owners(owner, keys) == [0, 0]
        here.relocation.on_move(node_identity(1), move)
        dest, update = only(here.outbox.take(), MsgType.OWNER_UPDATE)
        assert dest == ("peer", 1) and update.owner == 0
        assert states(here, keys) == [OWNED, OWNED]
    np.testing.assert_array_equal(read(here, keys), initial([1, 3]))
    assert here.rounds.round_done == 1 and not here.rounds.in_flight


def test_sync_reply_makes_pending_keys_replicas_and_completes_the_round(cluster):
    _, (here, owner) = cluster(2, mode="replicate_only")
    keys = keys_of(1, 5)
    here.intents.add(0, keys, 0, 10)
    here.rounds.start()
    assert states(here, keys) == [PENDING, PENDING]
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    owner.rounds.on_sync(node_identity(0), sync)
    _, reply = only(owner.outbox.take(), MsgType.SYNC_REPLY)
    assert here.rounds.round_done == 0
    here.rounds.on_sync_reply(node_identity(1), reply)
    assert states(here, keys) == [REPLICA, REPLICA]
    np.testing.assert_array_equal(read(here, keys), initial([1, 5]))
    assert here.rounds.round_done == 1 and node_counter(here, "rounds_done") == 1
    assert here.replicas.to_sync().tolist() == [1, 5]


def test_wait_sync_is_answered_only_after_a_round_that_started_later(cluster):
    _, (here, owner) = cluster(2, mode="replicate_only")
    identity = worker_identity(0)
    here.intents.add(0, keys_of(1), 0, 10)
    here.rounds.start()                            # round 1 in flight
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    here.rounds.wait_for_round(identity, 77)       # needs round 2
    owner.rounds.on_sync(node_identity(0), sync)
    here.rounds.on_sync_reply(node_identity(1), only(owner.outbox.take(),
                                                     MsgType.SYNC_REPLY)[1])
    assert here.rounds.round_done == 1
    assert of_type(here.outbox.take(), MsgType.SYNCED) == []
    here.rounds.start()                            # round 2: syncs the replica
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    assert sync.round == 2 and sync.counters.tolist() == [SYNC_KEEP]
    owner.rounds.on_sync(node_identity(0), sync)
    assert here.rounds.in_flight
    here.rounds.on_sync_reply(node_identity(1), only(owner.outbox.take(),
                                                     MsgType.SYNC_REPLY)[1])
    dest, synced = only(here.outbox.take(), MsgType.SYNCED)
    assert dest == ("identity", identity) and synced.request_id == 77


@pytest.mark.parametrize("owner_wrote", [False, True])
def test_a_replicas_delta_goes_with_has_delta_and_is_added_at_the_owner(cluster, owner_wrote):
    """The replica's delta travels flagged HAS_DELTA and the owner adds it. A replica
    that is behind then (the owner's worker wrote too) gets the owner's value back; one
    that is not gets REPLY_CURRENT and no value."""
    _, (here, owner) = cluster(2, mode="replicate_only")
    k = keys_of(1)
    make_replica(here, owner, k)
    write(here, k, [1, 2])
    if owner_wrote:
        write(owner, k, [100, 100])
    here.rounds.refreshed_at = 0
    here.rounds.start()
    dest, sync = only(here.outbox.take(), MsgType.SYNC)
    assert dest == ("peer", 1)
    assert sync.counters.tolist() == [SYNC_KEEP | HAS_DELTA]
    np.testing.assert_array_equal(np.frombuffer(sync.values, np.float32), [1, 2])
    owner.rounds.on_sync(node_identity(0), sync)
    expected = initial([1]) + floats([1, 2]) + (100 if owner_wrote else 0)
    np.testing.assert_array_equal(read(owner, k), expected)
    _, reply = only(owner.outbox.take(), MsgType.SYNC_REPLY)
    if owner_wrote:
        assert reply.counters.tolist() == [REPLY_VALUE]
        np.testing.assert_array_equal(np.frombuffer(reply.values, np.float32), expected)
    else:
        assert reply.counters.tolist() == [REPLY_CURRENT]
        assert len(reply.values) == 0
    here.rounds.on_sync_reply(node_identity(1), reply)
    np.testing.assert_array_equal(read(here, k), expected)
    # the delta was sent once: the next round carries none
    here.rounds.refreshed_at = 0
    here.rounds.start()
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    assert sync.counters.tolist() == [SYNC_KEEP]
    owner.rounds.on_sync(node_identity(0), sync)
    np.testing.assert_array_equal(read(owner, k), expected)


def test_sync_for_keys_out_of_range_or_with_unknown_flags_raises(cluster):
    _, (_here, owner) = cluster(2)
    for counters, keys, error in (([SYNC_KEEP], keys_of(12), "out of range"),
                                  ([8], keys_of(1), "flag")):
        msg = from_peer(0, protocol.Sync(round=1, holder=0, keys=keys,
                                         values=np.empty(0, np.float32),
                                         counters=np.array(counters, np.uint32),
                                         versions=np.zeros(1, np.uint32)))
        with pytest.raises(ProtocolError, match=error):
            owner.rounds.on_sync(node_identity(0), msg)
    assert owner.outbox.take() == []




def test_a_local_set_waits_for_the_round_that_carries_its_keys_delta(cluster):
    """Node 0 replicates key 1 (owned by node 1), its worker pushes +5 into the replica,
    and a round takes that delta to the owner. A set of key 1 by the same worker meanwhile
    is deferred (the round's set_gate) and goes on only once the round completed, so the
    owner applies push, then set: 7, not 12."""
    _, (here, owner) = cluster(2, mode="replicate_only")
    k = keys_of(1)
    make_replica(here, owner, k)
    write(here, k, [5, 5])
    here.rounds.refreshed_at = 0             # a full round: it syncs every replica
    here.rounds.start()
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    assert here.rounds.deferred_sets.carried.tolist() == [1]
    here.serving.on_set(worker_identity(0), from_worker(MsgType.SET, 0, request_id=11,
                                                        keys=k, values=floats([7, 7])))
    assert here.outbox.take() == []          # deferred: nothing applied or forwarded
    assert len(here.rounds.deferred_sets) == 1
    # a set of a key whose delta is not in the round is not deferred
    here.serving.on_set(worker_identity(0), from_worker(MsgType.SET, 0, request_id=12,
                                                        keys=keys_of(0), values=floats([1, 1])))
    assert only(here.outbox.take(), MsgType.UPDATE_ACK)[1].request_id == 12
    owner.rounds.on_sync(node_identity(0), sync)
    np.testing.assert_array_equal(read(owner, k), initial([1]) + 5)
    _, reply = only(owner.outbox.take(), MsgType.SYNC_REPLY)
    here.rounds.on_sync_reply(node_identity(1), reply)
    assert not here.rounds.in_flight and len(here.rounds.deferred_sets) == 0
    dest, fwd = only(here.outbox.take(), MsgType.FWD_SET)   # the set goes on now
    assert dest == ("peer", 1) and fwd.request_id == 11 and fwd.requester == 0
    np.testing.assert_array_equal(read(here, k), [7, 7])   # the replica took the set
    owner.serving.on_fwd_set(node_identity(0), fwd)
    dest, ack = only(owner.outbox.take(), MsgType.UPDATE_ACK)
    assert dest == ("worker", 0) and ack.request_id == 11
    np.testing.assert_array_equal(read(owner, k), [7, 7])




def test_a_frozen_node_starts_no_round_until_thawed(cluster):
    _, (here, _owner) = cluster(2, mode="replicate_only")
    here.intents.add(0, keys_of(1), 0, 10)
    here.rounds.freeze()
    here.rounds.maybe_start()
    assert here.rounds.round == 0 and here.outbox.take() == []
    here.rounds.thaw()
    here.rounds.maybe_start()
    assert here.rounds.round == 1
    assert only(here.outbox.take(), MsgType.SYNC)[1].keys.tolist() == [1]


def test_observers_hear_of_every_completed_round_and_whether_it_asked(cluster):
    _, (here, owner) = cluster(2, mode="replicate_only")
    heard = []
    here.rounds.add_observer(lambda seconds, asked: heard.append((seconds >= 0, asked)))
    make_replica(here, owner, keys_of(1))          # asks the owner for key 1
    assert heard == [(True, True)]
    here.rounds.refreshed_at = 0                   # a full round: syncs the replica
    here.rounds.start()
    owner.rounds.on_sync(node_identity(0), only(here.outbox.take(), MsgType.SYNC)[1])
    here.rounds.on_sync_reply(node_identity(1), only(owner.outbox.take(),
                                                     MsgType.SYNC_REPLY)[1])
    assert heard == [(True, True), (True, False)]


def test_a_snapshot_is_plain_numbers(cluster):
    _, (here, owner) = cluster(2, mode="replicate_only")
    here.intents.add(0, keys_of(1), 0, 10)
    here.rounds.start()
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    here.rounds.wait_for_round(worker_identity(0), 5)
    snapshot = here.rounds.snapshot()
    assert snapshot == (1, 0, 1, 0, 0)
    assert all(type(number) is int for number in snapshot)
    owner.rounds.on_sync(node_identity(0), sync)
    here.rounds.on_sync_reply(node_identity(1), only(owner.outbox.take(),
                                                     MsgType.SYNC_REPLY)[1])
    assert snapshot.round_done == 0                # a copy: it does not change
    assert here.rounds.snapshot().round_done == 1


def test_snapshots_taken_by_another_thread_while_the_node_thread_works(cluster):
    """The metrics' scrape thread takes snapshots (adapm.node.snapshot) while the node
    thread runs rounds and registers and answers waits. Taken under the guard that the
    node thread holds while it works, each is of one moment: never a torn read of a
    part's dict, and never a round completed that was not started."""
    _, (here, owner) = cluster(2, mode="replicate_only", workers_per_node=2)
    for rank in (0, 1):
        here.local_workers.on_hello(worker_identity(rank), from_worker(
            MsgType.HELLO, rank, workers_per_node=2))
    here.outbox.take()
    taken, errors, stop = [], [], threading.Event()

    def scrape():
        while not stop.is_set():
            try:
                taken.append(here.snapshots.take())
                taken.append(here.rounds.snapshot())
            except Exception as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
                return

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for turn in range(200):
            with here.snapshots.guard():           # as the node thread's loop does
                here.intents.add(0, keys_of(1 + 2 * (turn % 5)), turn, turn + 1000)
                here.rounds.wait_for_round(worker_identity(turn % 2), turn)
                here.local_workers.on_barrier(worker_identity(0), from_worker(
                    MsgType.BARRIER, 0, workers_per_node=2, request_id=turn,
                    generation=turn + 1))
                here.rounds.start()
                _, sync = only(here.outbox.take(), MsgType.SYNC)
                owner.rounds.on_sync(node_identity(0), sync)
                here.rounds.on_sync_reply(node_identity(1), only(owner.outbox.take(),
                                                                 MsgType.SYNC_REPLY)[1])
                here.local_workers.release_now(turn + 1)
                here.outbox.take()
    finally:
        stop.set()
        scraper.join(10)
    assert errors == [] and len(taken) > 0
    rounds = [t for t in taken if hasattr(t, "round_done")]
    assert all(t.round_done <= t.round for t in rounds)
    nodes = [t for t in taken if hasattr(t, "waiting")]
    assert all(dict(t.waiting)["barrier"] == 0 for t in nodes)  # each turn leaves none


@pytest.mark.parametrize("start", [5, (1 << 32) - 3])
def test_rounds_since_arrival_count_across_the_wrap_of_the_stored_rounds(cluster, start):
    """Arrival rounds are kept modulo 2**32 (4 bytes per key): the count of rounds since
    a key arrived stays right when the round number passes 2**32."""
    _, (here, _) = cluster(2)
    rounds = here.rounds
    keys = keys_of(1, 3)
    rounds.round = start
    assert rounds._rounds_since_arrival(keys).tolist() == [-1, -1]  # never arrived
    rounds.arrived(keys)
    assert rounds._rounds_since_arrival(keys).tolist() == [0, 0]    # during this round
    for later in range(1, 6):
        rounds.round = start + later
        assert rounds._rounds_since_arrival(keys).tolist() == [later - 1] * 2


# -- 1. A key that arrived in the current round is moved on again (bouncing) ------------

def owner_side(num_keys=10, round_now=7):
    """The rounds part of an owner with just what _answer_requests reads: intents, the
    manager, replica holders and its arrival stamps (no table, nothing sent)."""
    intents = IntentStore(1, num_keys)
    ctx = SimpleNamespace(view=None, intents=intents, num_keys=num_keys, counts={})
    ctx.count = lambda name, n: ctx.counts.__setitem__(name, ctx.counts.get(name, 0) + n)
    ctx.new_key_set = KeyFlags(num_keys).new_set
    rounds = Rounds(ctx, outbox=None, routes=None, replicas=None,
                    holders=ReplicaHolders(num_keys, 2),
                    manager=Manager("adaptive", 1, intents), eviction=None,
                    deferred_sets=None, release_barrier=None, resume_set=None)
    rounds.round = round_now
    return rounds


def test_a_key_that_arrived_during_the_current_round_is_not_moved_on():
    """A key that arrives is stamped with the round in flight, so until the next round
    starts it is younger than any key that came in an earlier round. A vectorised
    _answer_requests of before mapped it to 'never arrived' and relocated it straight
    on: the anti-bounce rule (SETTLE_ROUNDS) was off for the freshest arrivals."""
    owner = owner_side()
    now = owner.round
    fresh, settled, old, never = 1, 2, 3, 4
    for key, at in ((fresh, now), (settled, now - 1), (old, now - SETTLE_ROUNDS - 6)):
        owner.round = at                              # as on_move stamps it, then
        owner.arrived(np.array([key], dtype=np.uint64))
    owner.round = now
    keys = np.array([fresh, settled, old, never], dtype=np.uint64)
    kinds = np.full(4, SYNC_REQUEST, dtype=np.uint32)
    relocate = owner._answer_requests(keys, kinds, holder=1)
    assert relocate.tolist()[1:] == [False, True, True]     # these are right
    assert not relocate[0], "a key that arrived this round was relocated on (bounces)"


def test_answer_requests_ignores_keys_that_are_not_requests():
    owner = owner_side()
    keys = np.array([1, 2], dtype=np.uint64)
    kinds = np.array([SYNC_KEEP, SYNC_REQUEST], dtype=np.uint32)
    assert owner._answer_requests(keys, kinds, holder=1).tolist() == [False, True]
