"""CheckpointPhases (adapm.node.control.checkpoint_phases): the four phases of a save on
one node, built alone over the real rounds part of a formed node (so freezing is real)
and a LocalWorkers of its own, both sending into recording outboxes."""
import pytest
from node_parts import (
    RecordingOutbox,
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    context,
    from_worker,
    keys_of,
    of_type,
    only,
)

from adapm.common.errors import FAIL_BARRIER, ProtocolError
from adapm.node.control.checkpoint_phases import CheckpointPhases
from adapm.node.control.local_workers import LocalWorkers
from adapm.wire.collectives import (
    BEGIN,
    FREEZE,
    THAW,
    WRITTEN,
    barrier_generation,
    describe_generation,
)
from adapm.wire.protocol import MsgType, node_identity, worker_identity

pytestmark = pytest.mark.timeout(60)

RANKS = (0, 1)  # node 0's two workers


class Phases:
    """CheckpointPhases of node 0 (2 workers), with the node's rounds part and a
    LocalWorkers whose failure reports are recorded."""

    def __init__(self, server):
        self.server = server
        ctx = context(server)
        self.outbox = RecordingOutbox(server.node)
        self.failures = []
        self.workers = LocalWorkers(ctx, self.outbox,
                                    lambda code, detail: self.failures.append((code, detail)),
                                    lambda: [])
        self.part = CheckpointPhases(ctx, self.outbox, server.rounds, self.workers)
        for rank in RANKS:
            self.workers.on_hello(worker_identity(rank), from_worker(
                MsgType.HELLO, rank, workers_per_node=2))
        self.outbox.take()

    def enter(self, rank, phase, save=1, request_id=None):
        self.part.on_checkpoint(worker_identity(rank), from_worker(
            MsgType.CHECKPOINT, rank, workers_per_node=2,
            request_id=request_id or 10 * phase + rank, generation=save, phase=phase))

    def everyone(self, phase, save=1):
        for rank in RANKS:
            self.enter(rank, phase, save)


@pytest.fixture
def phases(cluster):
    _, (node0, node1) = cluster(2, mode="replicate_only", workers_per_node=2)
    phases = Phases(node0)
    phases.owner = node1
    return phases


def barriers(sent):
    return [msg.generation for dest, msg in of_type(sent, MsgType.NODE_BARRIER)
            if dest == ("coordinator", None)]


def test_a_phase_enters_the_cluster_barrier_once_every_local_worker_is_in_it(phases):
    phases.enter(0, BEGIN)
    assert phases.outbox.take() == [] and phases.part.waiting
    assert phases.part.waiting_workers() == {
        0: describe_generation(barrier_generation(1, BEGIN))}
    phases.enter(1, BEGIN)
    assert barriers(phases.outbox.take()) == [barrier_generation(1, BEGIN)]
    phases.part.on_release(barrier_generation(1, BEGIN))
    done = {dest[1]: msg.request_id for dest, msg in
            of_type(phases.outbox.take(), MsgType.CHECKPOINTED)}
    assert done == {worker_identity(0): 10 * BEGIN, worker_identity(1): 10 * BEGIN + 1}
    assert not phases.part.waiting


def test_freeze_waits_for_the_round_in_flight_and_stops_rounds_until_thaw(phases):
    server, owner = phases.server, phases.owner
    rounds = server.rounds
    server.intents.add(0, keys_of(1), 0, 1000)
    rounds.start()                                 # round 1 in flight
    _, sync = only(server.outbox.take(), MsgType.SYNC)
    phases.everyone(FREEZE)
    phases.part.poll()
    assert barriers(phases.outbox.take()) == []    # not while the round is in flight
    owner.rounds.on_sync(node_identity(0), sync)
    rounds.on_sync_reply(node_identity(1), only(owner.outbox.take(), MsgType.SYNC_REPLY)[1])
    assert not rounds.in_flight
    phases.part.poll()
    assert barriers(phases.outbox.take()) == [barrier_generation(1, FREEZE)]
    phases.part.on_release(barrier_generation(1, FREEZE))
    server.intents.add(0, keys_of(3), 0, 1000)     # due: a round would start at once
    rounds.maybe_start()
    assert rounds.round == 1                       # frozen: none started
    for phase in (WRITTEN, THAW):
        phases.everyone(phase)
        assert barriers(phases.outbox.take()) == [barrier_generation(1, phase)]
        phases.part.on_release(barrier_generation(1, phase))
        assert len(of_type(phases.outbox.take(), MsgType.CHECKPOINTED)) == 2
    rounds.maybe_start()
    assert rounds.round == 2                       # thawed
    assert only(server.outbox.take(), MsgType.SYNC)[1].keys.tolist() == [3]


def test_a_worker_that_left_fails_the_save_instead_of_hanging(phases):
    phases.workers.on_goodbye(worker_identity(1), from_worker(
        MsgType.GOODBYE, 1, workers_per_node=2))
    phases.outbox.take()
    phases.enter(0, BEGIN)
    assert phases.failures == [(FAIL_BARRIER, 1)]
    assert barriers(phases.outbox.take()) == []


def test_fail_all_answers_every_waiting_worker_once(phases):
    phases.enter(0, BEGIN)
    phases.enter(1, WRITTEN, request_id=77)
    failed = []
    phases.part.fail_all(lambda identity, request_id: failed.append((identity, request_id)))
    assert sorted(failed) == [(worker_identity(0), 10 * BEGIN), (worker_identity(1), 77)]
    assert not phases.part.waiting
    phases.part.fail_all(lambda *args: failed.append(args))
    assert len(failed) == 2


@pytest.mark.parametrize("fields, error", [({"phase": 9, "generation": 1}, "phase"),
                                           ({"phase": BEGIN, "generation": 0}, "number")])
def test_an_unknown_phase_or_save_number_raises(phases, fields, error):
    with pytest.raises(ProtocolError, match=error):
        phases.part.on_checkpoint(worker_identity(0), from_worker(
            MsgType.CHECKPOINT, 0, workers_per_node=2, **fields))
    assert not phases.part.waiting and phases.outbox.take() == []
    assert phases.failures == []
