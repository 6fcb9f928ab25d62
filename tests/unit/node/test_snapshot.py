"""Snapshots (adapm.node.snapshot): node_snapshot, what waits in a formed node's parts in
plain numbers, and Snapshots, which takes it for the metrics' thread only while the node
thread does not hold the guard (so no part is read while it changes)."""
import threading

import pytest
from node_parts import (
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    from_worker,
    keys_of,
    make_replica,
    only,
)

from adapm.node.snapshot import NodeSnapshot, Snapshots, node_snapshot
from adapm.wire.collectives import BEGIN
from adapm.wire.protocol import MsgType, worker_identity

pytestmark = pytest.mark.timeout(60)


def snapshot_of(server):
    return node_snapshot(server.rounds, server.replicas, server.local_workers,
                         server.checkpoints, server.relocation, server.intents)


def test_a_snapshot_counts_what_waits_in_each_part(cluster):
    """Node 0 (workers 0 and 1) holds a replica of key 1, has a round in flight that asks
    for keys 3 and 5, and its workers wait: in wait_sync, refresh, a barrier, a save and
    a localize of key 7."""
    _, (here, owner) = cluster(2, mode="adaptive", workers_per_node=2)
    for rank in (0, 1):
        here.local_workers.on_hello(worker_identity(rank), from_worker(
            MsgType.HELLO, rank, workers_per_node=2))
    idle = snapshot_of(here)
    assert idle == NodeSnapshot(
        waiting=(("wait_sync", 0), ("refresh", 0), ("barrier", 0), ("save", 0),
                 ("set", 0), ("localize", 0)),
        intents_queued=0, keys_requested=0, keys_localizing=0, replicas_held=0)
    owner.intents.add(0, keys_of(1), 0, 1000)      # the owner keeps key 1: a replica
    make_replica(here, owner, keys_of(1))
    here.intents.add(1, keys_of(3, 5), 0, 1000)
    here.rounds.start()
    only(here.outbox.take(), MsgType.SYNC)
    here.rounds.wait_for_round(worker_identity(0), 5)
    here.rounds.refresh_soon(worker_identity(1), 6, keys_of(1))
    here.local_workers.on_barrier(worker_identity(0), from_worker(
        MsgType.BARRIER, 0, workers_per_node=2, generation=1))
    here.checkpoints.on_checkpoint(worker_identity(1), from_worker(
        MsgType.CHECKPOINT, 1, workers_per_node=2, generation=1, phase=BEGIN))
    here.relocation.on_localize(worker_identity(0), from_worker(
        MsgType.LOCALIZE, 0, workers_per_node=2, keys=keys_of(7)))
    snapshot = snapshot_of(here)
    assert snapshot == NodeSnapshot(
        waiting=(("wait_sync", 1), ("refresh", 1), ("barrier", 1), ("save", 1),
                 ("set", 0), ("localize", 1)),
        intents_queued=2, keys_requested=2, keys_localizing=1, replicas_held=1)
    assert all(type(n) is int for n in (*dict(snapshot.waiting).values(), *snapshot[1:]))
    assert here.snapshots.take() == snapshot       # the node's own Snapshots take the same
    assert idle.replicas_held == 0                 # a copy: it does not change


def test_take_calls_the_parts_under_the_guard():
    seen = []
    snapshots = Snapshots(lambda: seen.append(snapshots.guard().locked()) or len(seen))
    assert snapshots.take() == 1 and snapshots.take() == 2
    assert seen == [True, True]
    assert not snapshots.guard().locked()


def test_take_from_another_thread_waits_while_the_node_thread_holds_the_guard():
    state = {"turn": 0}
    snapshots = Snapshots(lambda: state["turn"])
    taken = []
    with snapshots.guard():                        # the node thread handles a turn
        state["turn"] = 1
        scraper = threading.Thread(target=lambda: taken.append(snapshots.take()))
        scraper.start()
        scraper.join(0.2)
        assert scraper.is_alive() and taken == []  # it waits for the turn to end
        state["turn"] = 2
    scraper.join(10)
    assert taken == [2]                            # of the moment after the turn
