"""Fixtures of the unit tests of the node server's parts: formed nodes with real
shared-memory tables, no processes, no sockets (helpers: node_parts)."""
import pytest
from node_parts import ADDRESSES, LENGTH, TOKEN, RecordingOutbox, initial

from adapm.node.server import NodeServer
from adapm.wire.spec import ClusterSpec


@pytest.fixture
def cluster():
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
