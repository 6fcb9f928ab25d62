"""The intake of intents, a part of the node server: the intents of this node's workers,
from their rings in the shared table (the usual way: no message) and from INTENT messages
(an intent that did not fit into the ring, or a huge one), checked and recorded in the
node's intent store (adapm.policy.intents), and in the intent log when one is kept."""

from adapm.common.errors import ProtocolError


class IntentIntake:
    def __init__(self, ctx, intent_log, malformed):
        """intent_log: an adapm.policy.intents.IntentLog, or None; malformed(reason): drop
        and count what fails validation."""
        self.ctx = ctx
        self.view = ctx.view
        self.intents = ctx.intents
        self.intent_log = intent_log
        self.malformed = malformed

    def on_intent(self, identity, msg):
        """An intent that did not fit into the worker's ring (or a huge one)."""
        self._record(msg.src_worker - self.ctx.first_rank, msg.start, msg.end,
                     msg.keys.copy())

    def take_queued(self):
        """Intents the local workers appended to their rings in the shared table."""
        first_rank = self.ctx.first_rank
        received = 0
        for worker in range(self.ctx.workers):
            try:
                queued = self.view.intent_take(worker)
            except ValueError as exc:
                self.malformed(f"worker {first_rank + worker}'s intent ring: {exc}")
                continue
            for start, end, keys in queued:
                try:
                    received += self._add(worker, start, end, keys)
                except ProtocolError as exc:
                    self.malformed(f"an intent of worker {first_rank + worker}: {exc}")
        if received:
            self.ctx.count("intents_received", received)

    def _record(self, worker, start, end, keys):
        self.ctx.count("intents_received", self._add(worker, start, end, keys))

    def _add(self, worker, start, end, keys):
        """Record one intent (the store checks its keys); returns its number of keys."""
        if end <= start or start < 0:
            raise ProtocolError(f"intent window [{start}, {end})")
        try:
            self.intents.add(worker, keys, start, end)
        except ValueError as exc:  # a key out of range
            raise ProtocolError(str(exc)) from None
        if self.intent_log is not None:
            self.intent_log.record(self.ctx.first_rank + worker, start, end, keys)
        return keys.shape[0]
