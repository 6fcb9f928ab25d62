"""Checkpoint phases, a part of the node server: the cluster holds still while its workers
write a checkpoint (adapm.checkpoint.write; Worker.save drives the phases).

A save goes through four cluster-wide barriers, each entered by every worker with a
CHECKPOINT message and left with CHECKPOINTED:

- BEGIN: every worker is in save(), so no update is made any more; each then waits for a
  sync round (wait_sync), after which every replica's updates are at the keys' owners.
- FREEZE: the node starts no sync round any more (so no key changes owner and no replica
  is made or dropped) and enters the cluster barrier once the round in flight, if any,
  has completed. It keeps answering peers: a round another node started before it froze
  may still need a key moved. When every node is through, no key is in flight anywhere,
  and every key is owned by exactly one node: the workers write their nodes' parts.
- WRITTEN: every part is on disk; worker 0 commits the checkpoint.
- THAW: the commit is done (or failed, which every worker then sees); rounds resume.

So every update acknowledged before the save is at its owner by FREEZE, and none is made
until THAW. The phases are barriers of their own, apart from the workers' barrier(): a
worker in save() while another waits in barrier() is a mistake that the node (or the
coordinator, across nodes) reports as a failure, never a hang."""

import logging

from adapm.common.errors import ProtocolError
from adapm.wire import protocol
from adapm.wire.collectives import (
    FREEZE,
    GENERATION_BASE,
    MAX_SAVES,
    PHASE_NAMES,
    PHASES,
    THAW,
    barrier_generation,
    describe_generation,
)

log = logging.getLogger("adapm.checkpoint")

class CheckpointPhases:
    def __init__(self, ctx, outbox, rounds, local_workers):
        """rounds: `freeze()`, `thaw()` and `in_flight`; local_workers: their identities,
        who left, and `cannot_complete()` (fail the cluster: a worker left)."""
        self.ctx = ctx
        self.outbox = outbox
        self.rounds = rounds
        self.local_workers = local_workers
        self._arrived = {}       # (save, phase) -> {local worker: request id}
        self._to_quiesce = []    # saves whose FREEZE waits for the round in flight

    @property
    def waiting(self):
        return bool(self._arrived)

    def waiting_workers(self):
        """{local worker: what it waits in} for every worker in a phase here."""
        return {local: describe_generation(barrier_generation(save, phase))
                for (save, phase), arrived in self._arrived.items() for local in arrived}

    def on_checkpoint(self, identity, msg):
        if msg.phase not in PHASES:
            raise ProtocolError(f"checkpoint phase {msg.phase}")
        if not 1 <= msg.generation < MAX_SAVES:
            raise ProtocolError(f"checkpoint number {msg.generation}")
        key = (msg.generation, msg.phase)
        arrived = self._arrived.setdefault(key, {})
        arrived[msg.src_worker - self.ctx.first_rank] = msg.request_id
        if self.local_workers.left:
            self.local_workers.cannot_complete()
        elif len(arrived) == self.ctx.workers:
            if msg.phase == FREEZE:
                self.rounds.freeze()
                self._to_quiesce.append(msg.generation)
                self.poll()
            else:
                self._enter(msg.generation, msg.phase)

    def poll(self):
        """After every batch of messages: a frozen node whose last round completed
        enters the FREEZE barrier."""
        if self._to_quiesce and not self.rounds.in_flight:
            for save in self._to_quiesce:
                self._enter(save, FREEZE)
            self._to_quiesce = []

    def _enter(self, save, phase):
        self.outbox.to_coordinator(protocol.NodeBarrier(
            generation=barrier_generation(save, phase)))

    def on_release(self, generation):
        """Every node is through a phase: its local workers go on."""
        save, phase = divmod(generation - GENERATION_BASE, 8)
        log.debug("node %d: save %d: every node is through phase %s", self.ctx.node, save,
                  PHASE_NAMES.get(phase, phase))
        if phase == THAW:
            self.rounds.thaw()
        identities = self.local_workers.identities
        for local, request_id in self._arrived.pop((save, phase), {}).items():
            self.outbox.to_identity(identities[local],
                                    protocol.Checkpointed(request_id=request_id))

    def fail_all(self, reply_failed):
        """The cluster failed: every worker waiting in a phase here is answered."""
        for arrived in self._arrived.values():
            for local, request_id in arrived.items():
                reply_failed(self.local_workers.identities[local], request_id)
        self._arrived.clear()
        self._to_quiesce = []
