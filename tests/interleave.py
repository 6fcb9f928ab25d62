"""A harness for interleavings: real NodeServers with real shared-memory tables in this
process, no sockets. Messages go through encode/decode into one FIFO queue per (sender,
receiver) pair, as ZeroMQ gives them, and the test delivers them in whatever order it
wants, so a race that live processes hit once in many runs happens every time. (Written
by an independent review to confirm its findings; kept as the regression tests' base.)"""
import collections

import numpy as np

from adapm.node.server import NodeServer
from adapm.wire import protocol
from adapm.wire.protocol import Message, node_identity, worker_identity
from adapm.wire.spec import ClusterSpec

TOKEN = 12345


class Net:
    def __init__(self):
        self.q = collections.defaultdict(collections.deque)  # (src, dst) -> frames
        self.to_workers = collections.defaultdict(list)       # rank -> decoded msgs

    def pending(self):
        """{(src, dst): [type names]} of the messages not delivered yet."""
        return {k: [protocol.decode(f).type.name for f in v] for k, v in self.q.items() if v}

    def deliver_all(self, servers, first=None):
        """Deliver until nothing is pending; `first(pending)` may pick the (src, dst) queue
        to serve next (default: any)."""
        while True:
            pending = self.pending()
            if not pending:
                return
            src, dst = (first(pending) if first else None) or next(iter(pending))
            self.deliver(src, dst, servers)

    def deliver(self, src, dst, servers, n=1, only=None):
        for _ in range(n):
            frames = self.q[(src, dst)].popleft()
            body = [bytes(memoryview(f)) if not isinstance(f, bytes) else f for f in frames]
            msg = protocol.decode(body)
            if only is not None:
                assert msg.type == only, (msg.type, only)
            servers[dst]._from_router([FakeFrame(node_identity(src, TOKEN)), *body])
            return msg


class FakeFrame:
    def __init__(self, b):
        self.bytes = b


class NetOutbox:
    """A node server's outbox that queues into the Net (encoded and decoded, as on the
    wire) instead of sending."""

    def __init__(self, net, node):
        self.net, self.node = net, node

    def to_peer(self, node, msg):
        self.net.q[(self.node, node)].append(self._wire(msg))

    def to_identity(self, identity, msg):
        self.net.to_workers[identity].append(protocol.decode(self._wire(msg)))

    def to_worker(self, rank, msg):
        self.to_identity(worker_identity(rank, TOKEN), msg)

    def to_coordinator(self, msg):
        pass

    def _wire(self, msg):
        msg.src_node, msg.token = self.node, TOKEN
        return [bytes(memoryview(f)) for f in msg.encode()]


def make_cluster(num_keys=12, nodes=2, mode="replicate_only", wpn=1, length=1):
    """(spec, net, servers) of a formed cluster whose servers send into `net`."""
    spec = ClusterSpec(num_keys=num_keys, value_length=length, num_nodes=nodes,
                       workers_per_node=wpn, mode=mode, init="zeros")
    net = Net()
    servers = []
    for n in range(nodes):
        s = NodeServer(spec, n, "tcp://127.0.0.1:1")
        s.create_table()
        s.assemble(NetOutbox(net, n))
        s.formed(TOKEN, [f"tcp://127.0.0.1:{9000+i}" for i in range(nodes)])
        for w in range(wpn):
            s.local_workers.identities[w] = worker_identity(n * wpn + w, TOKEN)
        servers.append(s)
    return spec, net, servers


def worker_msg(server, rank, mtype, **fields):
    """A worker's request, as it arrives at `server`."""
    msg = Message(mtype, src_node=rank // server.workers, src_worker=rank, token=TOKEN,
                  **fields)
    frames = msg.encode()
    body = [bytes(memoryview(f)) for f in frames]
    server._from_router([FakeFrame(worker_identity(rank, TOKEN)), *body])


def local_pull(server, keys):
    keys = np.asarray(keys, dtype=np.uint64)
    out = np.empty(server.view.total_length(keys), dtype=server.view.dtype)
    misses = np.empty(keys.shape[0], dtype=np.uint64)
    n = server.view.pull(keys, out, misses)
    return out, n


def local_push(server, keys, values, additive=True, owned_only=False):
    keys = np.asarray(keys, dtype=np.uint64)
    values = np.asarray(values, dtype=server.view.dtype)
    misses = np.empty(keys.shape[0], dtype=np.uint64)
    return server.view.update(keys, values, misses, additive, owned_only)


def close(servers):
    for s in servers:
        s.table.unlink()
        s.table.close()
