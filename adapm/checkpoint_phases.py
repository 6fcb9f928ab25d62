"""Checkpoint phases, a part of the node server: the cluster holds still while its workers
write a checkpoint (adapm.checkpoint; Worker.save drives the phases).

A save goes through three cluster-wide barriers, each entered by every worker with a
CHECKPOINT message and left with CHECKPOINTED:

- FREEZE: the node starts no sync round any more (so no key changes owner and no replica
  is made or dropped) and enters the cluster barrier once the round in flight, if any,
  has completed. It keeps answering peers: a round another node started before it froze
  may still need a key moved. When every node is through, no key is in flight anywhere,
  and every key is owned by exactly one node: the workers write their nodes' parts.
- WRITTEN: every part is on disk; worker 0 commits the checkpoint.
- THAW: the commit is done (or failed, which every worker then sees); rounds resume.

The workers enter FREEZE after a barrier and a wait_sync, so every update acknowledged
before the save is at its owner by then, and none is made until THAW."""

from adapm import protocol
from adapm.coordinator import FAIL_BARRIER
from adapm.errors import ProtocolError

FREEZE, WRITTEN, THAW = 1, 2, 3
PHASES = (FREEZE, WRITTEN, THAW)
# Cluster barriers (NODE_BARRIER generations) of checkpoint phases lie above every
# generation of the workers' own barriers, which count from 1.
GENERATION_BASE = 1 << 48
MAX_SAVES = 1 << 40


def barrier_generation(save, phase):
    return GENERATION_BASE + save * 4 + phase


def is_checkpoint_generation(generation):
    return generation >= GENERATION_BASE


class CheckpointPhases:
    def __init__(self, ctx, outbox, rounds, local_workers, report_failure):
        """rounds: its `frozen` flag and `in_flight`; local_workers: their identities and
        who left; report_failure(code, detail): fail the cluster."""
        self.ctx = ctx
        self.outbox = outbox
        self.rounds = rounds
        self.local_workers = local_workers
        self.report_failure = report_failure
        self._arrived = {}       # (save, phase) -> {local worker: request id}
        self._to_quiesce = []    # saves whose FREEZE waits for the round in flight

    @property
    def waiting(self):
        return bool(self._arrived)

    def on_checkpoint(self, identity, msg):
        if msg.phase not in PHASES:
            raise ProtocolError(f"checkpoint phase {msg.phase}")
        if not 1 <= msg.generation < MAX_SAVES:
            raise ProtocolError(f"checkpoint number {msg.generation}")
        key = (msg.generation, msg.phase)
        arrived = self._arrived.setdefault(key, {})
        arrived[msg.src_worker - self.ctx.first_rank] = msg.request_id
        if self.local_workers.left:
            self.report_failure(FAIL_BARRIER, self.ctx.first_rank + min(self.local_workers.left))
        elif len(arrived) == self.ctx.workers:
            if msg.phase == FREEZE:
                self.rounds.frozen = True
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
        save, phase = divmod(generation - GENERATION_BASE, 4)
        if phase == THAW:
            self.rounds.frozen = False
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
