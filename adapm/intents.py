"""The node's record of its workers' intents: which keys each worker will access in which
window [start, end) of its own clock. The node server fills it from INTENT messages; an
intent is forgotten once the worker's clock has passed its end. The manager reads it to
decide what to fetch, relocate or replicate (DESIGN.md §6)."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Intent:
    worker: int
    start: int
    end: int
    keys: np.ndarray


class IntentStore:
    def __init__(self, num_workers):
        self._by_worker = [[] for _ in range(num_workers)]
        self.received = 0  # keys signalled, over the node's lifetime

    def add(self, worker, keys, start, end):
        if not 0 <= worker < len(self._by_worker):
            raise ValueError(f"intent from unknown worker {worker}")
        if end <= start:
            raise ValueError(f"intent window [{start}, {end}) is empty")
        self._by_worker[worker].append(Intent(worker, start, end, keys))
        self.received += keys.shape[0]

    def expire(self, clocks):
        """Forget intents whose window ended before each worker's current clock."""
        for worker, intents in enumerate(self._by_worker):
            clock = int(clocks[worker])
            if intents and any(i.end <= clock for i in intents):
                self._by_worker[worker] = [i for i in intents if i.end > clock]

    def active(self, worker=None):
        """Intents not yet expired, of one worker or of all."""
        if worker is not None:
            return list(self._by_worker[worker])
        return [i for intents in self._by_worker for i in intents]

    def starting_before(self, worker, clock):
        """This worker's intents whose window starts before `clock` (the action horizon)."""
        return [i for i in self._by_worker[worker] if i.start < clock]

    def __len__(self):
        return sum(len(intents) for intents in self._by_worker)
