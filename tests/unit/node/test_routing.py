"""Routes (adapm.node.data.routing) on its own: where a key goes (the location cache or
its home), and requests that cannot go anywhere failing instead of looping."""
import numpy as np
import pytest
from node_parts import (
    RecordingOutbox,
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    context,
    from_peer,
    from_worker,
    keys_of,
    of_type,
    only,
)

from adapm.common.errors import FAIL_ROUTING
from adapm.node.data.routing import Routes
from adapm.wire import protocol
from adapm.wire.protocol import HOPS_SHIFT, MAX_HOPS, MsgType

pytestmark = pytest.mark.timeout(60)


def routes_alone(server):
    outbox = RecordingOutbox(server.node)
    return Routes(context(server), outbox), outbox


def test_keys_go_to_their_cached_owner_or_home_and_nowhere_when_owned_here(cluster):
    _, (node0, _node1, _node2) = cluster(3)
    node0.table.set_owners(keys_of(4), 2)          # the cache says key 4 is at node 2
    routes, _ = routes_alone(node0)
    assert routes.route(keys_of(0, 1, 2, 4, 5)).tolist() == [-1, 1, 2, 2, 2]


def test_a_request_is_forwarded_per_destination_with_its_requester(cluster):
    _, (node0, _node1, _node2) = cluster(3)
    routes, outbox = routes_alone(node0)
    request = from_worker(MsgType.PULL, 0, request_id=3, keys=keys_of(1, 2, 4))
    routes.forward_request(request, MsgType.FWD_PULL, request.keys, 0,
                           lambda idx: {"positions": idx.astype(np.uint32)})
    forwards = {dest[1]: msg for dest, msg in of_type(outbox.take(), MsgType.FWD_PULL)}
    assert forwards[1].keys.tolist() == [1, 4] and forwards[2].keys.tolist() == [2]
    assert all(m.requester == 0 and m.request_id == 3 and m.hops == 1
               for m in forwards.values())


def test_keys_that_cannot_be_routed_fail_the_request(cluster):
    _, (node0, _node1) = cluster(2)
    routes, outbox = routes_alone(node0)
    # owned here: the path leads back (the caller forwards only what it does not own)
    request = from_worker(MsgType.PULL, 1, request_id=8, keys=keys_of(2))
    routes.forward_request(request, MsgType.FWD_PULL, request.keys, 1, lambda idx: {})
    dest, failed = only(outbox.take(), MsgType.FAILED)
    assert dest == ("worker", 1) and failed.request_id == 8
    assert failed.code == FAIL_ROUTING and failed.detail == 2
    # forwarded too often: failed, never passed on again
    tired = from_peer(0, protocol.FwdPull(requester=1, keys=keys_of(1),
                                          positions=np.zeros(1, np.uint32),
                                          flags=MAX_HOPS << HOPS_SHIFT))
    assert tired.hops == MAX_HOPS
    routes.forward_request(tired, MsgType.FWD_PULL, tired.keys, 1,
                           lambda idx: {"positions": tired.positions[idx]})
    assert only(outbox.take(), MsgType.FAILED)[1].code == FAIL_ROUTING
