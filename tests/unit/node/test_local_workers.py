"""LocalWorkers (adapm.node.control.local_workers) built alone: hello, barriers,
goodbyes and liveness of a node's workers."""
import os

import pytest
from node_parts import (
    ADDRESSES,
    RecordingOutbox,
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    context,
    from_worker,
    of_type,
    only,
)

from adapm.common.config import MODES
from adapm.common.errors import FAIL_BARRIER, FAIL_WORKER_DIED
from adapm.node.control.local_workers import LocalWorkers
from adapm.table.shared_table import WORKER_SLOT
from adapm.wire.protocol import (
    MsgType,
    worker_identity,
)

pytestmark = pytest.mark.timeout(60)


class LocalWorkersHarness:
    """LocalWorkers of node 1 (2 workers: ranks 2 and 3) built alone, its callables
    recorded."""

    def __init__(self, server):
        self.ctx = context(server)
        self.outbox = RecordingOutbox(server.node)
        self.failures = []
        self.part = LocalWorkers(self.ctx, self.outbox,
                                 lambda code, detail: self.failures.append((code, detail)),
                                 lambda: list(ADDRESSES[:2]))

    def say(self, mtype, rank, request_id=1, **fields):
        handler = {MsgType.HELLO: self.part.on_hello, MsgType.BARRIER: self.part.on_barrier,
                   MsgType.GOODBYE: self.part.on_goodbye}[mtype]
        handler(worker_identity(rank), from_worker(mtype, rank, workers_per_node=2,
                                                   request_id=request_id, **fields))

    def hello_all(self):
        for rank in (2, 3):
            self.say(MsgType.HELLO, rank)
        self.outbox.take()


@pytest.fixture
def workers(cluster):
    _, (_node0, node1) = cluster(2, mode="relocate_only", workers_per_node=2)
    return LocalWorkersHarness(node1)


def test_hello_registers_the_worker_and_answers_welcome(workers):
    segment = "/dev/shm" + workers.ctx.table.name
    workers.say(MsgType.HELLO, 2, request_id=8)
    dest, welcome = only(workers.outbox.take(), MsgType.WELCOME)
    assert dest == ("identity", worker_identity(2)) and welcome.request_id == 8
    assert welcome.mode == MODES.index("relocate_only")
    assert welcome.addresses == ADDRESSES[:2]
    assert workers.part.registered(2, worker_identity(2))
    assert not workers.part.registered(3, worker_identity(3))
    assert not workers.part.registered(2, worker_identity(3))
    assert os.path.exists(segment)                 # worker 3 has not mapped it yet
    workers.say(MsgType.HELLO, 3)
    assert workers.part.registered(3, worker_identity(3))
    assert not os.path.exists(segment)             # every worker mapped it: unlinked


def test_a_barrier_of_all_local_workers_goes_to_the_coordinator_and_is_released(workers):
    workers.hello_all()
    workers.say(MsgType.BARRIER, 2, request_id=10, generation=1)
    assert workers.outbox.take() == []
    workers.say(MsgType.BARRIER, 3, request_id=11, generation=1)
    dest, node_barrier = only(workers.outbox.take(), MsgType.NODE_BARRIER)
    assert dest == ("coordinator", None) and node_barrier.generation == 1
    workers.part.release_now(1)
    releases = {dest[1]: msg.request_id for dest, msg in
                of_type(workers.outbox.take(), MsgType.RELEASE)}
    assert releases == {worker_identity(2): 10, worker_identity(3): 11}
    workers.part.release_now(1)                    # released once
    assert workers.outbox.take() == [] and workers.failures == []


def test_a_goodbye_while_others_wait_in_a_barrier_fails_the_barrier(workers):
    workers.hello_all()
    workers.say(MsgType.BARRIER, 2, request_id=10, generation=1)
    workers.say(MsgType.GOODBYE, 3)
    assert workers.failures == [(FAIL_BARRIER, 3)]
    assert of_type(workers.outbox.take(), MsgType.NODE_BARRIER) == []
    failed = []
    workers.part.fail_all(lambda identity, request_id: failed.append((identity, request_id)))
    assert failed == [(worker_identity(2), 10)]


def test_a_barrier_after_a_goodbye_fails(workers):
    workers.hello_all()
    workers.say(MsgType.GOODBYE, 2)
    workers.say(MsgType.BARRIER, 3, request_id=10, generation=1)
    assert workers.failures == [(FAIL_BARRIER, 2)]
    assert of_type(workers.outbox.take(), MsgType.NODE_BARRIER) == []


def test_all_goodbyes_send_node_done_once(workers):
    workers.hello_all()
    workers.say(MsgType.GOODBYE, 2)
    assert workers.outbox.take() == []
    workers.say(MsgType.GOODBYE, 3)
    dest, _ = only(workers.outbox.take(), MsgType.NODE_DONE)
    assert dest == ("coordinator", None)
    workers.say(MsgType.GOODBYE, 3)
    assert workers.outbox.take() == [] and workers.failures == []


def test_check_alive_reports_a_dead_worker(workers):
    workers.hello_all()
    view = workers.ctx.view
    view.counter_set(0, WORKER_SLOT["pid"], 1111)
    view.counter_set(1, WORKER_SLOT["pid"], 2222)
    asked = []

    def alive(pid):
        asked.append(pid)
        return pid != 2222

    workers.part.check_alive(alive)
    assert workers.failures == [(FAIL_WORKER_DIED, 3)]
    assert 1111 in asked
    # a worker that said goodbye may be gone
    workers.failures.clear()
    workers.say(MsgType.GOODBYE, 3)
    workers.part.check_alive(alive)
    assert workers.failures == []


def test_check_alive_skips_workers_without_a_pid(workers):
    workers.hello_all()
    workers.part.check_alive(lambda pid: False)
    assert workers.failures == []


