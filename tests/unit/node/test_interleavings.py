"""Races that live processes hit rarely, forced in every run: real node servers and
tables in this process, messages delivered in an adversarial order (tests/interleave.py).
Each test is a finding of the independent review of the guarantees."""
import numpy as np
import pytest

from adapm.table.shared_table import NODE_SLOT, REPLICA, WORKER_SLOT
from adapm.wire.protocol import MsgType, worker_identity

from interleave import TOKEN, close, local_pull, local_push, make_cluster, worker_msg

pytestmark = pytest.mark.timeout(30)


def state(server, key):
    out = np.empty(1, np.uint8)
    server.view.states_of(np.array([key], np.uint64), out)
    return int(out[0])


def replica_on_node_0(net, here, owner, k):
    here.intents.add(0, k, 0, 5)
    here.rounds.refreshed_at = 0
    here.rounds.start()
    net.deliver(0, 1, [here, owner], only=MsgType.SYNC)
    net.deliver(1, 0, [here, owner], only=MsgType.SYNC_REPLY)
    assert state(here, int(k[0])) == REPLICA


@pytest.mark.parametrize("kept_because", ["intended again", "written meanwhile"])
def test_a_dropped_replica_that_stays_does_not_count_as_synced(kept_because):
    """A full round drops a replica (no value comes back), but the replica stays: the
    round must not count as having synced every replica, or a worker that waits for such
    a round to read its own acknowledged set reads the replica's stale value."""
    spec, net, (here, owner) = make_cluster(mode="replicate_only")
    try:
        k = np.array([1], dtype=np.uint64)  # owned by node 1 (owner); node 0 (here) replicates it
        replica_on_node_0(net, here, owner, k)
        here.rounds.round_started_at = here.rounds.refreshed_at = 0
        here.rounds.start()                                   # a round in flight (KEEP k)
        worker_msg(here, 0, MsgType.SET, keys=k, values=np.array([7.0], np.float32))
        local_push(owner, k, [1.0])                            # the owner's worker writes k
        net.deliver(0, 1, [here, owner], only=MsgType.SYNC)       # answered with value 1
        net.deliver_all([here, owner], first=lambda p: (0, 1) if (0, 1) in p else None)
        acks = [m.type for m in net.to_workers[worker_identity(0, TOKEN)]]
        assert MsgType.UPDATE_ACK in acks
        # the worker prunes the acknowledgement: it reads k after a full round >= this one
        unseen_round = here.view.node_counter_get(NODE_SLOT["rounds_started"]) + 1
        here.view.counter_set(0, WORKER_SLOT["clock"], 6)     # the intent has ended
        here.rounds.round_started_at = here.rounds.refreshed_at = 0
        here.rounds.start()                                   # a full round: k is dropped
        if kept_because == "intended again":
            here.intents.add(0, k, 8, 12)
        else:
            local_push(here, k, [0.5])
        net.deliver_all([here, owner])
        done = here.view.node_counter_get(NODE_SLOT["full_round_done"])
        at_owner = float(local_pull(owner, k)[0][0])
        assert at_owner == 7.0
        if done >= unseen_round and state(here, 1) == REPLICA:  # the worker would read here
            local = float(local_pull(here, k)[0][0])
            assert local == at_owner + (0.5 if kept_because == "written meanwhile" else 0.0)
    finally:
        close([here, owner])


def test_a_set_does_not_overtake_the_same_nodes_earlier_delta():
    """Node 0 (the home) replicates k, owned by node 1; its worker pushes +5 into the
    replica, and the round's delta goes to node 1, which has just moved k to node 2 and
    passes the delta on. Node 0 learns the new owner; the same worker then sets k = 7.
    The set must not reach node 2 before the delta (push, then set: 7, not 12)."""
    spec, net, S = make_cluster(nodes=3, mode="adaptive")
    here, first, second = S
    try:
        k = np.array([0], dtype=np.uint64)
        worker_msg(first, 1, MsgType.LOCALIZE, keys=k)
        net.deliver(1, 0, S, only=MsgType.MOVE_REQUEST)
        net.deliver(0, 1, S, only=MsgType.MOVE)
        net.deliver(1, 0, S, only=MsgType.OWNER_UPDATE)
        first.intents.add(0, k, 0, 10**6)
        here.intents.add(0, k, 0, 10**6)
        here.refreshed_at = 0
        here.rounds.start()
        net.deliver(0, 1, S, only=MsgType.SYNC)
        net.deliver(1, 0, S, only=MsgType.SYNC_REPLY)
        assert state(here, 0) == REPLICA
        local_push(here, k, [5.0])
        worker_msg(second, 2, MsgType.LOCALIZE, keys=k)
        net.deliver(2, 0, S, only=MsgType.MOVE_REQUEST)
        here.rounds.round_started_at = here.rounds.refreshed_at = 0
        here.rounds.start()                                   # SYNC with delta 5 -> node 1
        net.deliver(0, 1, S, only=MsgType.MOVE_REQUEST)    # node 1 moves k to node 2
        net.deliver(0, 1, S, only=MsgType.SYNC)            # and passes the SYNC on
        net.deliver(1, 2, S, only=MsgType.MOVE)
        net.deliver(2, 0, S, only=MsgType.OWNER_UPDATE)    # node 0's cache: node 2
        worker_msg(here, 0, MsgType.SET, keys=k, values=np.array([7.0], np.float32))
        # the adversary: a set on its way to node 2 goes first
        net.deliver_all(S, first=lambda p: next(
            (q for q, types in p.items() if "FWD_SET" in types), None))
        assert float(local_pull(second, k)[0][0]) == 7.0
    finally:
        close(S)


def test_wait_sync_waits_for_keys_a_localize_is_moving_here():
    """A replica that a localize asked to move here sends no delta (its local updates
    travel with the key): wait_sync must not return before the key has arrived, or the
    owner could serve another node's read without those updates."""
    spec, net, (here, owner) = make_cluster(mode="adaptive")
    try:
        k = np.array([1], dtype=np.uint64)
        owner.intents.add(0, k, 0, 10**6)                      # the owner uses k: here replicates
        replica_on_node_0(net, here, owner, k)
        local_push(here, k, [3.0])                            # a local update of the replica
        worker_msg(here, 0, MsgType.LOCALIZE, keys=k)         # MOVE_REQUEST queued to owner
        worker_msg(here, 0, MsgType.WAIT_SYNC)
        here.rounds.round_started_at = here.rounds.refreshed_at = 0
        here.rounds.start()                                   # KEEP k, without its delta
        # the adversary answers the round before the move request is served
        pending = net.pending()
        assert pending[(0, 1)] == ["MOVE_REQUEST", "SYNC"]
        net.q[(0, 1)].rotate(-1)  # SYNC first: with 3 nodes they may take different paths
        net.deliver(0, 1, [here, owner], only=MsgType.SYNC)
        net.deliver(1, 0, [here, owner], only=MsgType.SYNC_REPLY)
        synced = [m for m in net.to_workers[worker_identity(0, TOKEN)]
                  if m.type == MsgType.SYNCED]
        assert not synced, "wait_sync returned while the key's update was not at an owner"
        net.deliver_all([here, owner])
        synced = [m for m in net.to_workers[worker_identity(0, TOKEN)]
                  if m.type == MsgType.SYNCED]
        assert synced and float(local_pull(here, k)[0][0]) == 3.0
    finally:
        close([here, owner])
