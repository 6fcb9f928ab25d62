"""This node's workers, a part of the node server: who they are (their connections), the
barriers they wait in, their goodbyes, and whether they are still alive."""

from adapm.common.config import MODES
from adapm.common.errors import FAIL_BARRIER, FAIL_WORKER_DIED, ProtocolError
from adapm.table.shared_table import WORKER_SLOT
from adapm.wire import protocol
from adapm.wire.collectives import GENERATION_BASE, describe_generation


class LocalWorkers:
    def __init__(self, ctx, outbox, report_failure, addresses):
        """report_failure(code, detail): fail the cluster; addresses(): every node's
        address (for WELCOME). A barrier complete cluster-wide is released through
        `release_now`, by the rounds part once replicas fetched what was flushed."""
        self.ctx = ctx
        self.outbox = outbox
        self.report_failure = report_failure
        self.addresses = addresses
        self.identities = {}    # local worker index -> routing identity
        self.left = set()       # local workers that said goodbye
        self._barrier = {}      # generation -> {local worker: request id}
        self._done_sent = False

    def registered(self, rank, identity):
        """Whether `identity` is the connection that worker `rank` of this node said
        hello on."""
        return self.identities.get(rank - self.ctx.first_rank) == identity

    def on_hello(self, identity, msg):
        local = msg.src_worker - self.ctx.first_rank
        if 0 <= local < self.ctx.workers:
            self.identities[local] = identity
            self.left.discard(local)
            if len(self.identities) == self.ctx.workers:
                # Every worker has mapped the table: its name is no longer needed, and
                # without a name nothing can leak, however the processes end.
                self.ctx.table.unlink()
        self.outbox.to_identity(identity, protocol.Welcome(
            request_id=msg.request_id, mode=MODES.index(self.ctx.spec.mode),
            addresses=self.addresses()))

    def on_barrier(self, identity, msg):
        generation = msg.generation
        if not 1 <= generation < GENERATION_BASE:  # above: the checkpoint phases' own
            raise ProtocolError(f"barrier generation {generation}")
        arrived = self._barrier.setdefault(generation, {})
        arrived[msg.src_worker - self.ctx.first_rank] = msg.request_id
        if self.left:
            self.cannot_complete()
        elif len(arrived) == self.ctx.workers:
            self.outbox.to_coordinator(protocol.NodeBarrier(generation=generation))

    def cannot_complete(self):
        """A worker that finalized can never arrive: fail instead of hanging."""
        self.report_failure(FAIL_BARRIER, self.ctx.first_rank + min(self.left))

    def waiting_workers(self):
        """{local worker: what it waits in} for every worker in a barrier here."""
        return {local: describe_generation(generation)
                for generation, arrived in self._barrier.items() for local in arrived}

    def release_now(self, generation):
        for local, request_id in self._barrier.pop(generation, {}).items():
            self.outbox.to_identity(self.identities[local],
                                    protocol.Release(request_id=request_id))

    def on_goodbye(self, identity, msg):
        """Returns True once every worker of the node said goodbye (the first time)."""
        self.left.add(msg.src_worker - self.ctx.first_rank)
        if self._barrier:  # others of this node wait for a barrier it will never join
            self.cannot_complete()
        if len(self.left) == self.ctx.workers and not self._done_sent:
            self._done_sent = True
            self.outbox.to_coordinator(protocol.NodeDone())

    def check_alive(self, alive):
        """A worker that died without saying goodbye fails the cluster. alive(pid)."""
        for local in self.identities:
            if local in self.left:
                continue
            pid = int(self.ctx.view.counter_get(local, WORKER_SLOT["pid"]))
            if pid and not alive(pid):
                self.report_failure(FAIL_WORKER_DIED, self.ctx.first_rank + local)
                return

    def fail_all(self, reply_failed):
        """The cluster failed: every worker waiting in a barrier here is answered."""
        for arrived in self._barrier.values():
            for local, request_id in arrived.items():
                reply_failed(self.identities[local], request_id)
        self._barrier.clear()
