"""Collectives (adapm.node.control.collectives) over a LocalWorkers and a CheckpointPhases
of their own (node 0, 2 workers) and a recording stand-in of the rounds part: workers
waiting in different collectives fail the cluster saying who waits where, a goodbye
while others wait in a save fails it, and the coordinator's release of a collective goes
to the part that holds it."""
import pytest
from node_parts import (
    RecordingOutbox,
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    context,
    from_worker,
    of_type,
    only,
)

from adapm.common.errors import FAIL_BARRIER, FAIL_COLLECTIVES
from adapm.node.control.checkpoint_phases import CheckpointPhases
from adapm.node.control.collectives import Collectives
from adapm.node.control.local_workers import LocalWorkers
from adapm.wire.collectives import BEGIN, barrier_generation
from adapm.wire.protocol import MsgType, worker_identity

pytestmark = pytest.mark.timeout(60)


class RoundsAsCollectivesSee:
    """The rounds part as Collectives and CheckpointPhases call it, recording."""

    def __init__(self):
        self.released = []
        self.in_flight = False

    def release_after_round(self, generation):
        self.released.append(generation)

    def freeze(self):
        pass

    def thaw(self):
        pass


class Harness:
    def __init__(self, server):
        ctx = context(server)
        self.outbox = RecordingOutbox(server.node)
        self.failures = []
        self.workers = LocalWorkers(ctx, self.outbox,
                                    lambda code, detail: self.failures.append((code, detail)),
                                    lambda: [])
        self.rounds = RoundsAsCollectivesSee()
        self.checkpoints = CheckpointPhases(ctx, self.outbox, self.rounds, self.workers)
        self.part = Collectives(ctx, self.workers, self.checkpoints, self.rounds,
                                lambda *failure: self.failures.append(failure))
        for rank in (0, 1):
            self.workers.on_hello(worker_identity(rank), from_worker(
                MsgType.HELLO, rank, workers_per_node=2))
        self.outbox.take()

    def barrier(self, rank, generation, request_id=1):
        self.part.on_barrier(worker_identity(rank), from_worker(
            MsgType.BARRIER, rank, workers_per_node=2, request_id=request_id,
            generation=generation))

    def save(self, rank, phase, save=1, request_id=1):
        self.part.on_checkpoint(worker_identity(rank), from_worker(
            MsgType.CHECKPOINT, rank, workers_per_node=2, request_id=request_id,
            generation=save, phase=phase))


@pytest.fixture
def collectives(cluster):
    _, (node0, _node1) = cluster(2, workers_per_node=2)
    return Harness(node0)


def test_workers_in_one_barrier_enter_it_in_a_barrier_and_a_save_fail_saying_where(
        collectives):
    collectives.barrier(0, 3)
    collectives.barrier(1, 3)
    assert collectives.failures == []
    assert only(collectives.outbox.take(), MsgType.NODE_BARRIER)[1].generation == 3
    collectives.workers.release_now(3)
    collectives.outbox.take()
    collectives.barrier(0, 4)
    assert collectives.failures == []              # worker 1 has not arrived yet
    collectives.save(1, BEGIN)
    assert collectives.failures == [(FAIL_COLLECTIVES, 0,
                                     "node 0: worker 0 in barrier() number 4; "
                                     "worker 1 in save() number 1 (phase begin)")]
    assert of_type(collectives.outbox.take(), MsgType.NODE_BARRIER) == []


def test_workers_in_different_barriers_fail_when_the_last_arrives(collectives):
    collectives.save(0, BEGIN, save=1)
    collectives.save(1, BEGIN, save=2)
    assert collectives.failures == [(FAIL_COLLECTIVES, 0,
                                     "node 0: worker 0 in save() number 1 (phase begin); "
                                     "worker 1 in save() number 2 (phase begin)")]


def test_a_release_goes_to_the_checkpoint_phases_or_to_the_rounds_part(collectives):
    collectives.save(0, BEGIN, request_id=7)
    collectives.save(1, BEGIN, request_id=8)
    generation = barrier_generation(1, BEGIN)
    assert only(collectives.outbox.take(), MsgType.NODE_BARRIER)[1].generation == generation
    collectives.part.release(generation)
    done = sorted((dest[1], msg.request_id) for dest, msg in
                  of_type(collectives.outbox.take(), MsgType.CHECKPOINTED))
    assert done == [(worker_identity(0), 7), (worker_identity(1), 8)]
    assert collectives.rounds.released == []       # a phase needs no round
    collectives.barrier(0, 5)
    collectives.barrier(1, 5)
    collectives.outbox.take()
    collectives.part.release(5)
    assert collectives.rounds.released == [5]      # the rounds part releases it
    assert of_type(collectives.outbox.take(), MsgType.RELEASE) == []
    assert collectives.failures == []


def test_a_goodbye_while_another_waits_in_a_save_fails_the_save(collectives):
    collectives.save(0, BEGIN)
    collectives.part.on_goodbye(worker_identity(1), from_worker(
        MsgType.GOODBYE, 1, workers_per_node=2))
    assert collectives.failures == [(FAIL_BARRIER, 1)]


def test_a_goodbye_with_nobody_waiting_is_no_failure(collectives):
    for rank in (0, 1):
        collectives.part.on_goodbye(worker_identity(rank), from_worker(
            MsgType.GOODBYE, rank, workers_per_node=2))
    assert collectives.failures == []
    assert only(collectives.outbox.take(), MsgType.NODE_DONE)[0] == ("coordinator", None)
