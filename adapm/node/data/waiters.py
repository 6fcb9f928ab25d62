"""Waits on sync rounds, a part of the node server of its own (no sockets, no table).

Workers wait for rounds in three ways: `wait_sync()` (a round that starts after the
request and syncs every replica), a REFRESH of some replicas (a round that starts after
it), and a barrier's release (every node flushed, then this node's replicas fetched what
was flushed: a full round after the cluster-wide barrier). Each wait names the round that
must complete; `answer` answers every wait that the completed rounds satisfy, through the
two callables the owner passes in (so a test replaces them with lists)."""


class RoundWaiters:
    def __init__(self, reply_synced, release_barrier):
        """reply_synced(identity, request_id): tell a worker its wait is over;
        release_barrier(generation): release a barrier on this node."""
        self._reply_synced = reply_synced
        self._release_barrier = release_barrier
        self.sync = []      # (identity, request id, round that must complete)
        self.refresh = []   # the same, for REFRESH of some replicas only
        self.release = []   # (barrier generation, round that must complete)

    def __bool__(self):
        return bool(self.sync or self.refresh or self.release)

    @property
    def want_full_round(self):
        """A wait_sync or a barrier waits: the next round must sync every replica."""
        return bool(self.sync or self.release)

    def wait_sync(self, identity, request_id, next_round):
        self.sync.append((identity, request_id, next_round))

    def wait_refresh(self, identity, request_id, next_round):
        self.refresh.append((identity, request_id, next_round))

    def wait_release(self, generation, next_round):
        self.release.append((generation, next_round))

    def answer(self, done, keys_moving_in=False):
        """Answer the waits that round `done` (and every earlier one) satisfies. While
        keys a localize asked for are on their way here, wait_sync and barriers keep
        waiting: those keys' local updates reach an owner only with the key."""
        for waiter in [w for w in self.refresh if w[2] <= done]:
            self.refresh.remove(waiter)
            self._reply_synced(waiter[0], waiter[1])
        if keys_moving_in:
            return
        for waiter in [w for w in self.sync if w[2] <= done]:
            self.sync.remove(waiter)
            self._reply_synced(waiter[0], waiter[1])
        for waiter in [w for w in self.release if w[1] <= done]:
            self.release.remove(waiter)
            self._release_barrier(waiter[0])

    def not_before(self, next_round):
        """The round in flight turned out not to sync every replica: the waits that
        need such a round wait at least for `next_round`."""
        self.sync = [(i, r, max(n, next_round)) for i, r, n in self.sync]
        self.release = [(g, max(n, next_round)) for g, n in self.release]
