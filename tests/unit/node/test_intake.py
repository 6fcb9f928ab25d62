"""IntentIntake (adapm.node.intake) built alone over a formed node's table: intents from
INTENT messages and from the workers' rings in the table go into the node's intent store
(and the intent log), counted; an intent that fails validation is refused (a message) or
dropped and counted as malformed (a ring)."""
import mmap

import numpy as np
import posix_ipc
import pytest
from node_parts import (
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    context,
    from_worker,
    keys_of,
    node_counter,
)

from adapm.common.errors import ProtocolError
from adapm.node.intake import IntentIntake
from adapm.policy.intents import IntentLog, read_intent_log
from adapm.table._table import layout_sizes
from adapm.wire.protocol import MsgType

pytestmark = pytest.mark.timeout(60)


class Intake:
    """IntentIntake of node 1 (2 workers: ranks 2 and 3), with an intent log in
    `log_path` and its malformed reasons recorded."""

    def __init__(self, server, log_path):
        self.ctx = context(server)
        self.view = self.ctx.view
        self.server = server
        self.log = IntentLog(str(log_path), server.node)
        self.dropped = []
        self.part = IntentIntake(self.ctx, self.log, self.dropped.append)

    def logged(self):
        return [(rank, start, end, keys.tolist())
                for rank, start, end, keys in read_intent_log(self.log.path)]

    def intended(self):
        return np.flatnonzero(self.ctx.intents.count).tolist()


@pytest.fixture
def intake(cluster, tmp_path):
    _, (_node0, node1) = cluster(2, workers_per_node=2)
    intake = Intake(node1, tmp_path / "intents")
    yield intake
    intake.log.close()


def test_an_intent_message_is_recorded_for_its_local_worker_logged_and_counted(intake):
    intake.part.on_intent(None, from_worker(MsgType.INTENT, 3, workers_per_node=2,
                                            start=4, end=9, keys=keys_of(1, 7, 8)))
    assert intake.dropped == []
    assert intake.intended() == [1, 7, 8] and len(intake.ctx.intents) == 1
    assert intake.ctx.intents.next_start(1) == 4   # local worker 1 is rank 3
    assert intake.ctx.intents.next_start(0) == 2**62
    assert intake.logged() == [(3, 4, 9, [1, 7, 8])]
    assert node_counter(intake.server, "intents_received") == 3


@pytest.mark.parametrize("start, end, keys, error", [
    (5, 5, [1], "intent window"), (-1, 3, [1], "intent window"),
    (0, 3, [1, 12], "out of range")])
def test_an_intent_message_that_fails_validation_raises_and_records_nothing(
        intake, start, end, keys, error):
    with pytest.raises(ProtocolError, match=error):
        intake.part.on_intent(None, from_worker(MsgType.INTENT, 2, workers_per_node=2,
                                                start=start, end=end, keys=keys_of(*keys)))
    assert intake.intended() == [] and len(intake.ctx.intents) == 0
    assert intake.logged() == []
    assert node_counter(intake.server, "intents_received") == 0


def test_intents_queued_in_the_rings_are_taken_per_worker_and_bad_ones_dropped(intake):
    view = intake.view
    assert view.intent_append(0, 0, 10, keys_of(2, 3))[0]
    assert view.intent_append(0, 3, 3, keys_of(4))[0]      # an empty window
    assert view.intent_append(1, 1, 5, keys_of(11))[0]
    assert view.intent_append(1, 2, 6, keys_of(5, 99))[0]  # a key out of range
    assert view.intents_queued()
    intake.part.take_queued()
    assert not view.intents_queued()
    assert intake.intended() == [2, 3, 11]
    assert intake.ctx.intents.next_start(0) == 0 and intake.ctx.intents.next_start(1) == 1
    assert intake.logged() == [(2, 0, 10, [2, 3]), (3, 1, 5, [11])]
    assert node_counter(intake.server, "intents_received") == 3
    assert len(intake.dropped) == 2
    assert intake.dropped[0].startswith("an intent of worker 2: intent window [3, 3)")
    assert intake.dropped[1].startswith("an intent of worker 3: key 99 out of range")
    intake.part.take_queued()                      # nothing queued: nothing new
    assert len(intake.ctx.intents) == 2 and len(intake.dropped) == 2


def test_a_corrupt_ring_is_dropped_as_malformed_and_the_other_workers_ring_taken(intake):
    view = intake.view
    assert view.intent_append(0, 5, 6, keys_of(1, 2, 3, 4))[0]
    assert view.intent_append(1, 7, 8, keys_of(9))[0]
    shm = posix_ipc.SharedMemory(intake.ctx.table.name)  # a second mapping, to break it
    mapping = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    offset = layout_sizes(view.num_keys, view.num_workers, view.arena_capacity,
                          view.dtype.itemsize)["rings_offset"]
    ring = np.frombuffer(mapping, dtype=np.uint64, offset=offset, count=16 + 8)
    ring[16 + 2] = 10**9  # worker 0's record's key count, past what was written
    try:
        intake.part.take_queued()
    finally:
        del ring
        mapping.close()
    assert len(intake.dropped) == 1
    assert intake.dropped[0].startswith("worker 2's intent ring: ")
    assert intake.intended() == [9] and intake.logged() == [(3, 7, 8, [9])]
    assert view.intent_append(0, 9, 10, keys_of(4))[0]   # the ring works again
    intake.part.take_queued()
    assert intake.intended() == [4, 9] and len(intake.dropped) == 1
