"""Admission (adapm.node.admission): check_sender, who may send a node server which
message (workers their requests, only a registered local worker its control requests,
peers their forwarded requests, relocations and rounds, everyone with the cluster's
token), and describe, the words that logs and failure reasons use for a message."""
import numpy as np
import pytest
from node_parts import TOKEN, from_peer, from_worker, keys_of

from adapm.common.errors import ProtocolError
from adapm.node.admission import check_sender, describe
from adapm.wire import protocol
from adapm.wire.protocol import MsgType, node_identity, worker_identity
from adapm.wire.spec import ClusterSpec

pytestmark = pytest.mark.timeout(60)

ONE_COUNTER = np.ones(1, dtype=np.uint32)
NODE = 1  # the node that checks: 2 nodes x 2 workers, its workers are ranks 2 and 3


@pytest.fixture(name="check")
def check_fixture():
    """check(identity, msg, registered=()) as node 1 checks it; `registered`: the
    (rank, identity) pairs that said hello here."""
    spec = ClusterSpec(num_keys=12, num_nodes=2, workers_per_node=2)

    def check(identity, msg, registered=()):
        check_sender(identity, msg, token=TOKEN, spec=spec, node=NODE,
                     registered=lambda rank, ident: (rank, ident) in set(registered))

    return check


def worker(rank):
    return worker_identity(rank, TOKEN)


def peer(node):
    return node_identity(node, TOKEN)


def request(mtype, rank, **fields):
    return from_worker(mtype, rank, workers_per_node=2, **fields)


def test_a_workers_data_requests_pass_from_any_node_its_control_requests_only_if_local(check):
    pull = request(MsgType.PULL, 0, keys=keys_of(1))
    check(worker(0), pull)                         # a worker of node 0: data is anyone's
    barrier = request(MsgType.BARRIER, 2, generation=1)
    check(worker(2), barrier, registered=[(2, worker(2))])
    with pytest.raises(ProtocolError, match="not a registered worker of node 1"):
        check(worker(2), barrier)                  # never said hello here
    with pytest.raises(ProtocolError, match="not a registered worker"):
        check(worker(0), request(MsgType.GOODBYE, 0), registered=[(2, worker(2))])


def test_a_worker_identity_sending_a_peers_message_is_refused(check):
    sync = from_peer(0, protocol.Sync(keys=keys_of(1), counters=ONE_COUNTER,
                                            versions=ONE_COUNTER, holder=0))
    check(peer(0), sync)                           # from the peer itself: fine
    for identity in (worker(0), worker(2)):
        with pytest.raises(ProtocolError, match="SYNC from an unknown peer"):
            check(identity, sync)
    move = from_peer(0, protocol.MoveRequest(keys=keys_of(0), target=0))
    with pytest.raises(ProtocolError, match="MOVE_REQUEST from an unknown peer"):
        check(worker(0), move)


def test_a_workers_request_from_another_identity_or_an_unknown_rank_is_refused(check):
    push = request(MsgType.PUSH, 3, keys=keys_of(1))
    with pytest.raises(ProtocolError, match="sender that is not worker 3"):
        check(worker(2), push)                     # worker 2 posing as worker 3
    with pytest.raises(ProtocolError, match="sender that is not worker 3"):
        check(peer(0), push)                       # a peer posing as a worker
    with pytest.raises(ProtocolError, match="sender that is not worker 3"):
        check(worker_identity(3), push)            # the name without the token's part
    with pytest.raises(ProtocolError, match="from worker 4, of 4"):
        check(worker(4), request(MsgType.PULL, 4, keys=keys_of(1)))


def test_peer_messages_claiming_this_node_or_for_an_unknown_worker_are_refused(check):
    with pytest.raises(ProtocolError, match="from this node itself"):
        check(peer(NODE), from_peer(NODE, protocol.OwnerUpdate(keys=keys_of(1),
                                                              counters=ONE_COUNTER, owner=0)))
    with pytest.raises(ProtocolError, match="unknown peer"):
        check(peer(2), from_peer(2, protocol.SyncReply()))  # no node 2
    with pytest.raises(ProtocolError, match="unknown peer"):
        check(peer(0), from_peer(1, protocol.SyncReply()))  # 0 posing as 1
    check(peer(0), from_peer(0, protocol.FwdPull(requester=3)))
    with pytest.raises(ProtocolError, match="FWD_PULL for worker 4"):
        check(peer(0), from_peer(0, protocol.FwdPull(requester=4)))


def test_a_message_without_the_token_or_that_is_no_request_is_refused(check):
    pull = request(MsgType.PULL, 2, keys=keys_of(1))
    pull.token = TOKEN + 1
    with pytest.raises(ProtocolError, match="without the cluster's token"):
        check(worker(2), pull, registered=[(2, worker(2))])
    for reply in (protocol.Welcome(mode=0, addresses=[]), protocol.NodeRelease(generation=1)):
        with pytest.raises(ProtocolError, match="is not a request for a node server"):
            check(peer(0), from_peer(0, reply))


def test_describe_names_the_sender_and_the_key_range():
    push = request(MsgType.PUSH, 3, keys=keys_of(10, 99, 42))
    assert describe(push) == "PUSH from worker 3 (node 1) for 3 keys in 10..99"
    move = from_peer(0, protocol.Move(keys=keys_of(7), counters=ONE_COUNTER,
                                             versions=ONE_COUNTER))
    assert describe(move) == "MOVE from node 0 for 1 keys in 7..7"
    assert describe(request(MsgType.GOODBYE, 2)) == "GOODBYE from worker 2 (node 1)"
