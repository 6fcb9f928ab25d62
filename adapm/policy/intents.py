"""The node's record of its workers' intents: which keys each worker will access in which
window [start, end) of its own clock (DESIGN.md §6).

Two implementations with one interface: `IntentStore` here, the reference (readable, a
Python object per intent), and `adapm.policy._intents.CompiledIntentStore` (src/
_intents.pyx, no Python object per intent), which node servers use (`new_store`); a test
runs both side by side on random sequences of calls.

The node server fills it from its workers' intent rings and INTENT messages. The manager
asks it for the intents that came due (start inside the action window) and whether a key
is intended at all (any intent not yet expired); an intent is forgotten once its worker's
clock passed its end."""

import bisect
import heapq
from dataclasses import dataclass, field

import numpy as np

# Queued keys are counted with a bincount over the whole key range once they are at least
# 1/BINCOUNT_RATIO of it (sorting them would cost more than touching every counter).
BINCOUNT_RATIO = 16


@dataclass(order=True)
class Intent:
    start: int
    end: int = field(compare=False)
    keys: np.ndarray = field(compare=False)
    acted: bool = field(default=False, compare=False)
    expired: bool = field(default=False, compare=False)


class IntentStore:
    def __init__(self, num_workers, num_keys):
        self._by_worker = [[] for _ in range(num_workers)]  # sorted by start
        self._next_due = [0] * num_workers                  # first intent not acted on
        # Per worker, a heap of (end, sequence, intent): expire() pops what ended, at a
        # cost that grows with the intents that ended, not with the thousands that may
        # wait ahead. An expired intent is flagged and leaves the sorted list once it
        # reaches its front (or when flagged ones are half the list).
        self._ends = [[] for _ in range(num_workers)]
        self._flagged = [0] * num_workers                   # expired, still listed
        self._sequence = 0
        self._live = 0
        # How many unexpired intents name each key (a key named twice counts twice).
        # Intents come and go one batch at a time, thousands a second: their keys are
        # queued and counted in one pass when the counts are read (about once a round).
        self._count = np.zeros(num_keys, dtype=np.int32)
        self._added, self._removed = [], []

    def add(self, worker, keys, start, end):
        """Worker `worker` will access `keys` in clocks [start, end)."""
        if not 0 <= worker < len(self._by_worker):
            raise ValueError(f"intent from unknown worker {worker}")
        if end <= start:
            raise ValueError(f"intent window [{start}, {end}) is empty")
        keys = np.asarray(keys, dtype=np.uint64)
        if keys.shape[0] and int(keys.max()) >= self._count.shape[0]:
            raise ValueError(f"key {int(keys.max())} out of range [0, {self._count.shape[0]})")
        intents = self._by_worker[worker]
        intent = Intent(start, end, keys)
        if not intents or intents[-1].start <= start:  # the usual order: no search
            position = len(intents)
            intents.append(intent)
        else:
            position = bisect.bisect_right(intents, intent)
            intents.insert(position, intent)
        if position < self._next_due[worker]:  # arrived late, behind acted ones
            self._next_due[worker] = position
        self._sequence += 1
        heapq.heappush(self._ends[worker], (end, self._sequence, intent))
        self._live += 1
        self._added.append(keys)

    def expire(self, clocks):
        """Forget intents whose window ended before each worker's current clock."""
        for worker, ends in enumerate(self._ends):
            clock = int(clocks[worker])
            while ends and ends[0][0] <= clock:
                intent = heapq.heappop(ends)[2]
                intent.expired = True
                self._removed.append(intent.keys)
                self._flagged[worker] += 1
                self._live -= 1
            if self._flagged[worker]:
                self._unlist_expired(worker)
        self._fold()  # at most once a round: the queues never outgrow a round's intents

    def _unlist_expired(self, worker):
        intents = self._by_worker[worker]
        front = 0
        while front < len(intents) and intents[front].expired:
            front += 1
        if front:
            del intents[:front]
            self._flagged[worker] -= front
            self._next_due[worker] = max(0, self._next_due[worker] - front)
        if self._flagged[worker] * 2 > len(intents):
            kept = [i for i in intents if not i.expired]
            self._next_due[worker] = next(
                (n for n, i in enumerate(kept) if not i.acted), len(kept))
            self._by_worker[worker] = kept
            self._flagged[worker] = 0

    @property
    def count(self):
        """Per key: how many unexpired intents name it."""
        self._fold()
        return self._count

    def _fold(self):
        """Count the queued keys: by one bincount over the key range when they are many
        (no sort), else by sorting them (np.unique; faster than np.add.at)."""
        for queue, step in ((self._added, 1), (self._removed, -1)):
            if not queue:
                continue
            keys = (np.concatenate(queue) if len(queue) > 1 else queue[0]).astype(np.intp)
            queue.clear()
            if keys.shape[0] * BINCOUNT_RATIO >= self._count.shape[0]:
                times = np.bincount(keys, minlength=self._count.shape[0])
                self._count += step * times.astype(np.int32)
            else:
                unique, times = np.unique(keys, return_counts=True)
                self._count[unique] += step * times.astype(np.int32)

    def due(self, worker, horizon):
        """This worker's intents not acted on yet whose window starts before `horizon`;
        they are marked acted on."""
        intents = self._by_worker[worker]
        found = []
        i = self._next_due[worker]
        while i < len(intents) and intents[i].start < horizon:
            if not intents[i].acted and not intents[i].expired:
                intents[i].acted = True
                found.append(intents[i])
            i += 1
        self._next_due[worker] = i
        return found

    def due_keys(self, worker, horizon):
        """due(), as arrays: (the intents' keys concatenated, each one's start, each one's
        number of keys)."""
        found = self.due(worker, horizon)
        if not found:
            return _NO_KEYS, np.empty(0, np.int64), np.empty(0, np.int64)
        return (np.concatenate([i.keys for i in found]).astype(np.uint64, copy=False),
                np.array([i.start for i in found], dtype=np.int64),
                np.array([i.keys.shape[0] for i in found], dtype=np.int64))

    def next_start(self, worker):
        """Start of this worker's first intent not acted on yet (a huge number if none)."""
        intents = self._by_worker[worker]
        i = self._next_due[worker]
        while i < len(intents) and (intents[i].acted or intents[i].expired):
            i += 1
        return intents[i].start if i < len(intents) else 2**62

    def any_due(self, clocks, windows):
        """Whether some worker w has an intent not acted on yet that starts before
        clocks[w] + windows[w] (its action window)."""
        return any(self.next_start(w) < int(clocks[w]) + int(windows[w])
                   for w in range(len(self._by_worker)))

    def intended(self, keys):
        """Mask: keys named by any intent not yet expired."""
        return self.count[keys.astype(np.intp)] > 0

    def __len__(self):
        """Intents not expired."""
        return self._live


def new_store(num_workers, num_keys, compiled=True):
    """The intent store a node server keeps: the compiled one, or the reference."""
    if compiled:
        from adapm.policy._intents import CompiledIntentStore
        return CompiledIntentStore(num_workers, num_keys)
    return IntentStore(num_workers, num_keys)


_NO_KEYS = np.empty(0, dtype=np.uint64)


class IntentLog:
    """Diagnostics (ADAPM_INTENT_LOG=FILE): every intent a node server receives, one line
    each in FILE.nodeN, `rank start end key key ...`, written as it arrives."""

    def __init__(self, path, node):
        self.path = f"{path}.node{node}"
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - open for the node's life

    def record(self, rank, start, end, keys):
        self._file.write(f"{rank} {start} {end} {' '.join(map(str, keys.tolist()))}\n")

    def close(self):
        self._file.close()


def read_intent_log(path):
    """[(rank, start, end, keys array)] of one IntentLog file, in arrival order."""
    records = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            records.append((int(fields[0]), int(fields[1]), int(fields[2]),
                            np.array(fields[3:], dtype=np.uint64)))
    return records
