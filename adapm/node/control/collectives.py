"""The collectives of a node's workers, a part of the node server: barrier() and the
phases of save(). The local workers part (adapm.node.control.local_workers) keeps the
barriers, the checkpoint phases part (adapm.node.control.checkpoint_phases) the phases;
this part sees both: once every local worker waits in one, they must all wait in the
same, else none can complete (a script's mistake), and the cluster fails saying who
waits where, instead of hanging. It also routes the coordinator's release of a
collective to the part that holds it."""

import logging

from adapm.common.errors import FAIL_COLLECTIVES
from adapm.wire.collectives import describe_generation, is_checkpoint_generation

log = logging.getLogger("adapm.server")


class Collectives:
    def __init__(self, ctx, local_workers, checkpoints, rounds, report_failure):
        """rounds: release_after_round(generation) (a barrier waits for a sync round);
        report_failure(code, detail, reason): fail the cluster."""
        self.ctx = ctx
        self.local_workers = local_workers
        self.checkpoints = checkpoints
        self.rounds = rounds
        self.report_failure = report_failure

    def on_barrier(self, identity, msg):
        self.local_workers.on_barrier(identity, msg)
        self._check_same()

    def on_checkpoint(self, identity, msg):
        self.checkpoints.on_checkpoint(identity, msg)
        self._check_same()

    def on_goodbye(self, identity, msg):
        self.local_workers.on_goodbye(identity, msg)
        if self.checkpoints.waiting:  # others wait in a save it will never finish
            self.local_workers.cannot_complete()

    def release(self, generation):
        """Every node reached the barrier: release it here once replicas fetched what
        was flushed before it. A checkpoint's phases need no round: nothing changed."""
        log.debug("node %d: every node reached %s", self.ctx.node,
                  describe_generation(generation))
        if is_checkpoint_generation(generation):
            self.checkpoints.on_release(generation)
        else:
            self.rounds.release_after_round(generation)

    def _check_same(self):
        waiting = {**self.local_workers.waiting_workers(),
                   **self.checkpoints.waiting_workers()}
        if len(waiting) == self.ctx.workers and len(set(waiting.values())) > 1:
            where = "; ".join(f"worker {self.ctx.first_rank + local} in {what}"
                              for local, what in sorted(waiting.items()))
            self.report_failure(FAIL_COLLECTIVES, self.ctx.node,
                                f"node {self.ctx.node}: {where}")
