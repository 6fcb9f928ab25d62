"""NodeFailure (adapm.node.failure) built alone over a formed node's table: a failure this
node finds goes to the coordinator (NODE_FAILED), one the coordinator tells it does not;
either way it is marked in the table once, and every waiting request is answered FAILED
with the code, the detail and the reason naming the node."""
import pytest
from node_parts import (
    RecordingOutbox,
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    of_type,
    only,
)

from adapm.common.errors import (
    FAIL_COORDINATOR,
    FAIL_INTERNAL,
    FAIL_WORKER_DIED,
    failure_text,
)
from adapm.node.failure import FAILED_LINGER, NodeFailure
from adapm.wire.protocol import MsgType, worker_identity

pytestmark = pytest.mark.timeout(60)


class FailureHarness:
    """NodeFailure of node 1 (of 2), whose waiting requests are two of worker 2's (ids 5
    and 6); the calls of answer_waiting are counted."""

    def __init__(self, server):
        self.view = server.view
        self.outbox = RecordingOutbox(server.node)
        self.answered = 0
        self.part = NodeFailure(server.node, self.outbox, self.view, self.answer_waiting)

    def answer_waiting(self, reply_failed):
        self.answered += 1
        for request_id in (5, 6):
            reply_failed(worker_identity(2), request_id)


@pytest.fixture
def failure(cluster):
    _, (_node0, node1) = cluster(2, workers_per_node=2)
    return FailureHarness(node1)


def test_a_reported_failure_goes_to_the_coordinator_the_table_and_every_waiting_request(
        failure):
    assert failure.part.failed is None and failure.part.text == ""
    failure.part.report(FAIL_WORKER_DIED, 3, "node 1: worker 3 is gone")
    sent = failure.outbox.take()
    dest, told = only(sent, MsgType.NODE_FAILED)
    assert dest == ("coordinator", None)
    assert (told.code, told.detail, told.text) == (FAIL_WORKER_DIED, 3,
                                                   "node 1: worker 3 is gone")
    assert sent.index((dest, told)) == 0           # the coordinator hears first
    replies = of_type(sent, MsgType.FAILED)
    assert [(dest, msg.request_id) for dest, msg in replies] == [
        (("identity", worker_identity(2)), 5), (("identity", worker_identity(2)), 6)]
    assert all((msg.code, msg.detail, msg.text) == (FAIL_WORKER_DIED, 3,
                                                    "node 1: worker 3 is gone")
               for _, msg in replies)
    view = failure.view
    assert (view.failed, view.failed_detail, view.failed_reason) == (
        FAIL_WORKER_DIED, 3, "node 1: worker 3 is gone")
    assert failure.part.text == failure_text(FAIL_WORKER_DIED, 3, "node 1: worker 3 is gone")
    assert "worker 3 died without finalizing" in failure.part.text


def test_a_failure_the_coordinator_tells_is_not_sent_back_and_only_the_first_counts(
        failure):
    failure.part.fail(FAIL_COORDINATOR, 0)
    sent = failure.outbox.take()
    assert of_type(sent, MsgType.NODE_FAILED) == []
    assert len(of_type(sent, MsgType.FAILED)) == 2 and failure.answered == 1
    failure.part.fail(FAIL_WORKER_DIED, 2, "later")
    failure.part.report(FAIL_INTERNAL, 1, "later still")
    sent = failure.outbox.take()
    assert [msg.type for _, msg in sent] == [MsgType.NODE_FAILED]   # told, nothing more
    assert failure.answered == 1
    assert failure.part.failed == (FAIL_COORDINATOR, 0, "")
    assert failure.view.failed == FAIL_COORDINATOR
    failure.part.reply_failed(worker_identity(3), 9)  # a request after the failure
    dest, late = only(failure.outbox.take(), MsgType.FAILED)
    assert dest == ("identity", worker_identity(3))
    assert (late.request_id, late.code, late.detail) == (9, FAIL_COORDINATOR, 0)


def test_an_internal_error_fails_the_cluster_with_a_reason_naming_the_node(failure):
    try:
        raise KeyError("slot")
    except KeyError as exc:
        failure.part.internal_error("a sync round", exc)
    sent = failure.outbox.take()
    _, told = only(sent, MsgType.NODE_FAILED)
    reason = "node 1: internal error in a sync round: KeyError: 'slot'"
    assert (told.code, told.detail, told.text) == (FAIL_INTERNAL, 1, reason)
    assert failure.view.failed_reason == reason
    assert failure.part.text.startswith("node 1 hit an internal error")
    assert failure.part.text.endswith(reason)


def test_a_failed_node_lingers_before_it_may_exit(failure):
    assert not failure.part.lingered(1e12)         # not failed: never
    failure.part.fail(FAIL_COORDINATOR, 0)
    at = failure.part.failed_at
    assert not failure.part.lingered(at + FAILED_LINGER / 2)
    assert failure.part.lingered(at + FAILED_LINGER + 0.01)
