"""What the unit tests of the node server's parts share: a RecordingOutbox (the four
methods of adapm.node.outbox.Outbox) that passes every message through the wire format
and records (destination, decoded message); messages as they arrive from workers and
peers; reads and writes of a node's table as its workers make them; and the `cluster`
fixture (each test module imports `cluster_fixture`: a conftest.py here would shadow
tests/conftest.py, which some tests import as the module `conftest`)."""
import numpy as np
import pytest

from adapm.node.context import NodeContext
from adapm.node.server import NodeServer
from adapm.policy.intents import IntentStore
from adapm.policy.ownership import Ownership
from adapm.table.shared_table import NODE_SLOT, REPLICA
from adapm.wire import protocol
from adapm.wire.protocol import MsgType, node_identity
from adapm.wire.spec import ClusterSpec

TOKEN = 4242
LENGTH = 2
ADDRESSES = ["tcp://127.0.0.1:9000", "tcp://127.0.0.1:9001", "tcp://127.0.0.1:9002"]


def initial(keys):
    """Key k starts as [10k, 10k + 1]: every value tells which key it came from."""
    base = np.asarray(keys, dtype=np.float64) * 10.0
    return np.stack([base, base + 1.0], axis=1).reshape(-1)


def keys_of(*keys):
    return np.array(keys, dtype=np.uint64)


def floats(values):
    return np.asarray(values, dtype=np.float32).reshape(-1)


def wire(msg):
    """`msg` as its receiver sees it: encoded to frames, then decoded (typed reader)."""
    return protocol.decode([bytes(memoryview(f)) for f in msg.encode()])


class RecordingOutbox:
    """An outbox (the four methods of adapm.node.outbox.Outbox) that records instead of
    sending: (destination, message as decoded from the wire), where destination is
    ("worker", rank), ("identity", routing identity), ("peer", node) or
    ("coordinator", None). It stamps src_node and token like the real one."""

    def __init__(self, node=0, token=TOKEN):
        self.node = node
        self.token = token
        self.sent = []

    def to_worker(self, rank, msg):
        self._record(("worker", rank), msg)

    def to_identity(self, identity, msg):
        self._record(("identity", identity), msg)

    def to_peer(self, node, msg):
        self._record(("peer", node), msg)

    def to_coordinator(self, msg):
        self._record(("coordinator", None), msg)

    def _record(self, destination, msg):
        msg.src_node, msg.token = self.node, self.token
        self.sent.append((destination, wire(msg)))

    def take(self):
        """Everything recorded since the last take."""
        sent, self.sent = self.sent, []
        return sent


def of_type(sent, mtype):
    return [(dest, msg) for dest, msg in sent if msg.type == mtype]


def only(sent, mtype):
    """The one message of `mtype` in `sent`, with its destination."""
    found = of_type(sent, mtype)
    assert len(found) == 1, [(d, m.type.name) for d, m in sent]
    return found[0]


def from_worker(mtype, rank, workers_per_node=1, request_id=1, **fields):
    """A worker's request as it arrives at a node server (through the wire)."""
    msg = protocol.BY_TYPE[mtype](request_id=request_id, **fields)
    msg.src_worker, msg.src_node, msg.token = rank, rank // workers_per_node, TOKEN
    return wire(msg)


def from_peer(node, msg):
    msg.src_node, msg.token = node, TOKEN
    return wire(msg)


def context(server):
    """A NodeContext of its own over the server's table (for a part built alone)."""
    return NodeContext(server.spec, server.node, server.table,
                       Ownership(server.node, server.spec.num_nodes, server.spec.num_keys),
                       IntentStore(server.spec.workers_per_node, server.spec.num_keys))


def states(server, keys):
    out = np.empty(len(keys), dtype=np.uint8)
    server.view.states_of(np.asarray(keys, dtype=np.uint64), out)
    return out.tolist()


def owners(server, keys):
    out = np.empty(len(keys), dtype=np.uint16)
    server.view.owners_of(np.asarray(keys, dtype=np.uint64), out)
    return out.tolist()


def read(server, keys):
    """The node's values of keys it holds (as a worker of the node reads them)."""
    keys = np.asarray(keys, dtype=np.uint64)
    out = np.empty(server.view.total_length(keys), dtype=server.view.dtype)
    misses = np.empty(keys.shape[0], dtype=np.uint64)
    assert server.view.pull(keys, out, misses) == 0, "a key is not held here"
    return out


def write(server, keys, values, additive=True):
    """A worker of the node writes keys it holds (owned or replica), in shared memory."""
    keys = np.asarray(keys, dtype=np.uint64)
    misses = np.empty(keys.shape[0], dtype=np.uint64)
    assert server.view.update(keys, floats(values), misses, additive, False) == 0


def node_counter(server, name):
    return server.view.node_counter_get(NODE_SLOT[name])


def make_replica(here, owner, keys):
    """One round in which `here` asks `owner` for `keys` (an intent of here's worker 0)
    and gets replicas (the owner must answer by replicating)."""
    here.intents.add(0, keys, 0, 1000)
    here.rounds.start()
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    owner.rounds.on_sync(node_identity(here.node), sync)
    _, reply = only(owner.outbox.take(), MsgType.SYNC_REPLY)
    here.rounds.on_sync_reply(node_identity(owner.node), reply)
    assert set(states(here, keys)) == {REPLICA}


@pytest.fixture(name="cluster")
def cluster_fixture():
    """make(num_nodes, mode, workers_per_node) -> (spec, [NodeServer]): formed nodes with
    real tables (unique segment names: a random cluster id, under the session's tag),
    whose parts send into a RecordingOutbox each (server.outbox). Tables are unlinked
    and closed afterwards."""
    made = []

    def make(num_nodes=2, mode="adaptive", workers_per_node=1, num_keys=12):
        spec = ClusterSpec(num_keys=num_keys, value_length=LENGTH, num_nodes=num_nodes,
                           workers_per_node=workers_per_node, mode=mode, init=initial)
        servers = []
        for node in range(num_nodes):
            server = NodeServer(spec, node, "tcp://127.0.0.1:1")
            server.create_table()
            made.append(server)
            server.assemble(RecordingOutbox(node))
            server.formed(TOKEN, ADDRESSES[:num_nodes])
            servers.append(server)
        return spec, servers

    yield make
    for server in made:
        server.table.unlink()
        server.table.close()
