"""Counting rejected messages without flooding the log.

Anyone who can reach a port can send garbage (without --secure). Each rejected message is
counted, but a log line per message would let a flood fill the disk and slow the node:
at most one warning per interval, saying how many were dropped since the last one and
what the latest was."""

import time

LOG_EVERY = 5.0  # seconds between two warnings about dropped messages


class MalformedLog:
    def __init__(self, logger, who, every=LOG_EVERY, clock=time.monotonic):
        self.logger = logger
        self.who = who              # "node 3", "coordinator": the log line's subject
        self.every = every
        self.clock = clock
        self.total = 0
        self._unlogged = 0
        self._latest = ""
        self._logged_at = None

    def dropped(self, reason):
        """Count one rejected message; warn now if none was logged within the interval."""
        self.total += 1
        self._unlogged += 1
        self._latest = str(reason)
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= self.every:
            self.flush(now)

    def flush(self, now=None):
        """Log what was counted since the last warning (housekeeping calls this)."""
        if not self._unlogged:
            return
        now = self.clock() if now is None else now
        if self._unlogged == 1:
            self.logger.warning("%s: dropped a malformed message: %s", self.who, self._latest)
        else:
            self.logger.warning("%s: dropped %d malformed messages (latest: %s)", self.who,
                                self._unlogged, self._latest)
        self._unlogged = 0
        self._logged_at = now

    def due(self):
        """Whether unlogged drops wait and the interval has passed (for a periodic flush)."""
        return bool(self._unlogged) and (self._logged_at is None or
                                         self.clock() - self._logged_at >= self.every)
