"""A worker's requests and their replies (adapm.client.requests), without processes: a stand-in
transport records what is sent and hands back the replies a test queues."""
import time

import numpy as np
import pytest

from adapm.client.requests import ClusterHealth, CountOp, Pending, PullOp, Requests
from adapm.common.errors import FAIL_NODE_SILENT, FAIL_REJECTED, ClusterError
from adapm.table.segments import Segments
from adapm.wire import protocol
from adapm.wire.protocol import ALL_POSITIONS, Message, MsgType

pytestmark = pytest.mark.timeout(30)

NODE, RANK, TOKEN = 0, 3, 77


class Transport:
    """Sends into a list; receives what the test queued in `inbox` (or what `answer`
    makes of each message sent)."""

    def __init__(self, answer=None):
        self.sent = []      # (node, decoded message)
        self.inbox = []     # frame lists
        self.answer = answer
        self.closed_with = None

    def connect(self, node, address):
        pass

    def send(self, node, frames):
        msg = protocol.decode(frames)
        self.sent.append((node, msg))
        if self.answer is not None:
            self.inbox.append(self.answer(msg))
        return protocol.frame_size(frames)

    def receive(self, timeout_ms):
        if not self.inbox:
            time.sleep(min(timeout_ms, 10) / 1000)  # as a poll that saw nothing
        got, self.inbox = self.inbox, []
        return got

    def close(self, linger):
        self.closed_with = linger


def make(answer=None, check_cluster=lambda: None):
    transport = Transport(answer)
    counts = {}

    def count(name, n):
        counts[name] = counts.get(name, 0) + n

    requests = Requests(transport, NODE, RANK, TOKEN, np.float32, check_cluster, count)
    return requests, transport, counts


def reply(request_id, mtype, src_node=1, **fields):
    return Message(mtype, src_node=src_node, request_id=request_id, **fields).encode()


def values(*rows):
    return np.array(rows, dtype=np.float32).reshape(-1)


def test_messages_carry_sender_request_id_and_token_and_are_counted():
    requests, transport, counts = make()
    requests.send(1, Message(MsgType.WAKE))
    first = requests.start(0, Message(MsgType.WAIT_SYNC), CountOp(MsgType.SYNCED), 1)
    second = requests.start(2, Message(MsgType.WAIT_SYNC), CountOp(MsgType.SYNCED), 1)
    assert second == first + 1 and requests.waiting == 2
    (_, wake), (_, sync), _ = transport.sent
    assert (wake.src_node, wake.src_worker, wake.token) == (NODE, RANK, TOKEN)
    assert sync.request_id == first and wake.request_id == 0
    # traffic with the worker's own node is counted apart from traffic with other nodes
    assert counts["bytes_to_node"] == protocol.HEADER_BYTES
    assert counts["bytes_sent"] == 2 * protocol.HEADER_BYTES
    requests.dispatch(reply(first, MsgType.SYNCED))
    requests.pump(0)
    assert counts.get("bytes_received", 0) == 0  # dispatch alone counts nothing
    transport.inbox.append(reply(second, MsgType.SYNCED))
    assert requests.pump(0) == 1 and counts["bytes_received"] == protocol.HEADER_BYTES
    assert requests.waiting == 0


def test_a_pull_completes_from_partial_replies_of_several_nodes_in_any_order():
    requests, transport, _ = make()
    out = np.zeros((4, 2), dtype=np.float32)
    op = PullOp(out, Segments(None, 2))
    for node, part in ((1, np.array([0, 2])), (2, np.array([1, 3]))):
        op.parts[requests.start(node, Message(MsgType.PULL), op, 2)] = part
    (_, to_1), (_, to_2) = transport.sent
    requests.dispatch(reply(to_2.request_id, MsgType.PULL_REPLY, src_node=2,
                            flags=ALL_POSITIONS, values=values([1, 1], [3, 3])))
    # forwarded: node 1 answers one key itself, the key's new owner the other
    requests.dispatch(reply(to_1.request_id, MsgType.PULL_REPLY,
                            positions=np.array([1], np.uint32), values=values([2, 2])))
    assert not op.done and requests.waiting == 1
    transport.inbox.append(reply(to_1.request_id, MsgType.PULL_REPLY, src_node=3,
                                 positions=np.array([0], np.uint32), values=values([0, 5])))
    assert Pending(requests, op).wait() is out
    np.testing.assert_array_equal(out, [[0, 5], [1, 1], [2, 2], [3, 3]])
    assert requests.waiting == 0


def test_a_pull_answered_whole_by_one_node_is_copied_in_order():
    requests, _, _ = make()
    out = np.zeros((3, 2), dtype=np.float32)
    op = PullOp(out, Segments(None, 2))
    rid = requests.start(1, Message(MsgType.PULL), op, 3)
    op.parts[rid] = np.arange(3)
    requests.dispatch(reply(rid, MsgType.PULL_REPLY, flags=ALL_POSITIONS,
                            values=values([1, 2], [3, 4], [5, 6])))
    assert op.done and op.error is None
    np.testing.assert_array_equal(out, [[1, 2], [3, 4], [5, 6]])


def test_update_acknowledgements_add_up_per_request():
    requests, _, _ = make()
    op = CountOp()
    a = requests.start(1, Message(MsgType.PUSH), op, 3)
    b = requests.start(2, Message(MsgType.PUSH), op, 2)
    requests.dispatch(reply(a, MsgType.UPDATE_ACK, count=2))
    requests.dispatch(reply(b, MsgType.UPDATE_ACK, count=2))
    assert not op.done and op.left == 1 and requests.waiting == 1
    requests.dispatch(reply(a, MsgType.UPDATE_ACK, src_node=2, count=1))  # forwarded rest
    assert op.done and op.error is None and requests.waiting == 0


def test_replies_nobody_waits_for_and_malformed_messages_are_dropped():
    requests, _, _ = make()
    op = CountOp()
    rid = requests.start(1, Message(MsgType.PUSH), op, 2)
    requests.dispatch(reply(rid + 100, MsgType.UPDATE_ACK, count=2))  # unknown id
    requests.dispatch(reply(rid + 100, MsgType.FAILED, arg0=FAIL_REJECTED, count=1))
    requests.dispatch([b"not a header"])
    requests.dispatch([])
    assert not op.done and op.error is None and requests.waiting == 1
    requests.dispatch(reply(rid, MsgType.UPDATE_ACK, count=2))
    assert op.done and op.error is None


@pytest.mark.parametrize("make_op, wrong", [
    (lambda: CountOp(), MsgType.SYNCED),                      # an update answered by control
    (lambda: CountOp(MsgType.SYNCED), MsgType.RELEASE),       # the wrong control reply
    (lambda: CountOp(MsgType.WELCOME), MsgType.UPDATE_ACK),
    (lambda: PullOp(np.zeros((2, 2), np.float32), Segments(None, 2)), MsgType.UPDATE_ACK),
])
def test_a_reply_of_the_wrong_type_fails_the_operation(make_op, wrong):
    requests, _, _ = make()
    op = make_op()
    rid = requests.start(1, Message(MsgType.PULL), op, 2)
    if isinstance(op, PullOp):
        op.parts[rid] = np.arange(2)
    requests.dispatch(reply(rid, wrong, count=2))
    assert op.done and isinstance(op.error, ClusterError)
    assert "malformed reply from node 1" in str(op.error) and wrong.name in str(op.error)
    assert requests.waiting == 0  # a later reply to it is dropped
    with pytest.raises(ClusterError, match="malformed reply"):
        requests.wait(op)


def test_a_pull_reply_with_positions_outside_the_request_fails_it():
    requests, _, _ = make()
    out = np.zeros((4, 2), dtype=np.float32)
    op = PullOp(out, Segments(None, 2))
    rid = requests.start(1, Message(MsgType.PULL), op, 2)
    op.parts[rid] = np.array([1, 3])
    requests.dispatch(reply(rid, MsgType.PULL_REPLY, positions=np.array([2], np.uint32),
                            values=values([9, 9])))
    assert isinstance(op.error, ClusterError) and "outside the request" in str(op.error)
    assert not out.any()  # nothing was written


def test_a_pull_reply_with_values_of_the_wrong_size_fails_it():
    requests, _, _ = make()
    op = PullOp(np.zeros((2, 2), np.float32), Segments(None, 2))
    rid = requests.start(1, Message(MsgType.PULL), op, 2)
    op.parts[rid] = np.arange(2)
    requests.dispatch(reply(rid, MsgType.PULL_REPLY, flags=ALL_POSITIONS,
                            values=values([1, 2, 3])))
    assert isinstance(op.error, ClusterError) and "values frame" in str(op.error)


def test_a_reply_answering_more_keys_than_its_request_waits_for_fails_it():
    requests, _, _ = make()
    op = CountOp()
    a = requests.start(1, Message(MsgType.PUSH), op, 3)
    requests.start(2, Message(MsgType.PUSH), op, 2)
    requests.dispatch(reply(a, MsgType.UPDATE_ACK, count=5))  # would hide b's keys
    assert isinstance(op.error, ClusterError) and "waiting for 3" in str(op.error)
    assert requests.waiting == 0


def test_a_failed_reply_raises_cluster_error_with_the_reason():
    requests, transport, _ = make()
    op = CountOp()
    rid = requests.start(1, Message(MsgType.PUSH), op, 4)
    requests.start(2, Message(MsgType.PUSH), op, 1)
    transport.inbox.append(reply(rid, MsgType.FAILED, arg0=FAIL_NODE_SILENT, count=2,
                                 text="while forwarding keys 10..12"))
    with pytest.raises(ClusterError) as caught:
        Pending(requests, op).wait()
    text = str(caught.value)
    assert text.startswith(f"node {NODE}, worker {RANK}: ")
    assert "node 2 stopped responding" in text and "while forwarding keys 10..12" in text
    assert requests.waiting == 0  # both requests given up, late replies are dropped
    requests.dispatch(reply(rid, MsgType.UPDATE_ACK, count=4))
    assert op.left == 5


def test_wait_times_out_and_the_operation_stays_pending():
    requests, transport, _ = make()
    op = CountOp()
    rid = requests.start(1, Message(MsgType.PUSH), op, 1)
    handle = Pending(requests, op)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="still pending after 0.05 s"):
        handle.wait(timeout=0.05)
    assert 0.05 <= time.monotonic() - began < 5
    assert not handle.done() and requests.waiting == 1
    transport.inbox.append(reply(rid, MsgType.UPDATE_ACK, count=1))
    assert handle.done() and handle.wait(timeout=0.05) is None


def test_no_answer_to_a_control_request_in_time_is_a_cluster_error():
    requests, _, _ = make()
    with pytest.raises(ClusterError, match="no answer to wait_sync within 0 s"):
        requests.ask(NODE, Message(MsgType.WAIT_SYNC), MsgType.SYNCED, timeout=0.05)
    assert requests.waiting == 0


def test_ask_returns_the_reply():
    def welcome(msg):
        return Message(MsgType.WELCOME, request_id=msg.request_id, arg0=2,
                       addresses=["tcp://127.0.0.1:1"]).encode()
    requests, transport, _ = make(answer=welcome)
    got = requests.ask(NODE, Message(MsgType.HELLO, count=123), MsgType.WELCOME)
    assert got.arg0 == 2 and got.addresses == ["tcp://127.0.0.1:1"]
    assert transport.sent[0][1].count == 123


def test_a_cluster_failure_while_waiting_gives_the_operation_up():
    checks = []

    def check():
        checks.append(1)
        if len(checks) > 2:
            raise ClusterError("the cluster failed: test")
    requests, _, _ = make(check_cluster=check)
    op = CountOp()
    requests.start(1, Message(MsgType.PUSH), op, 1)
    with pytest.raises(ClusterError, match="test"):
        requests.wait(op)
    assert len(checks) == 3 and requests.waiting == 0


def test_wait_all_waits_for_every_operation_and_close_hands_on_the_linger():
    pending = []
    requests, transport, _ = make(answer=lambda msg: pending.append(msg) or [])
    ops = [CountOp() for _ in range(3)]
    for op in ops:
        requests.start(1, Message(MsgType.PUSH), op, 1)
    transport.inbox = [reply(msg.request_id, MsgType.UPDATE_ACK, count=1) for msg in pending]
    requests.wait_all()
    assert all(op.done for op in ops) and requests.waiting == 0
    requests.close(1000)
    assert transport.closed_with == 1000


class View:
    def __init__(self):
        self.failed, self.failed_detail, self.failed_reason = 0, 0, ""
        self.age = 0.0
        self.ages_read = 0

    def heartbeat_age(self):
        self.ages_read += 1
        return self.age


def test_cluster_health_reads_the_failure_flag_and_the_heartbeat():
    view = View()
    health = ClusterHealth(view, heartbeat_timeout=5.0, who="node 0, worker 3")
    health.check()
    view.age = 6.0
    with pytest.raises(ClusterError, match="node server silent for 6.0 s"):
        health.check()
    view.age, view.failed, view.failed_detail = 0.0, FAIL_NODE_SILENT, 1
    view.failed_reason = "seen by node 0"
    with pytest.raises(ClusterError, match="node 1 stopped responding .*: seen by node 0"):
        health.check()


def test_cluster_health_checks_the_heartbeat_now_and_then_but_a_failure_at_once():
    view = View()
    health = ClusterHealth(view, heartbeat_timeout=5.0, who="w")
    for _ in range(100):
        health.check_if_due()
    assert view.ages_read == 0  # well within POLL_SLICE_MS of its creation
    view.failed = FAIL_REJECTED
    with pytest.raises(ClusterError, match="the cluster failed"):
        health.check_if_due()
