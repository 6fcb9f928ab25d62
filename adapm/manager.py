"""The adaptive parameter manager (DESIGN.md §6): intents in, placement actions out.

It knows nothing of sockets or of the table's layout: the node server feeds it clocks,
intents and key states, and carries out what it decides.

Each sync round of a node:
1. the clocks of the node's workers are read (from the shared table) and each worker's
   clock speed is estimated (clocks per round, smoothed); the **action window** is a high
   quantile of the clocks that may pass in about two rounds (a request goes out with the
   next round and its answer takes one round trip), so an intent is acted on just early
   enough for its keys to be local when the worker gets there, and not much earlier;
2. every intent whose window starts inside the action window is due: its keys that the
   node does not hold yet are requested from their owners (the node first marks them as
   not-yet-usable replicas, PENDING);
3. every replica sends its delta to its owner; it stays if some intent still names it,
   else it is dropped after that last flush.

The owner decides for each requested key: **relocate** it to the asking node when nobody
else (the owner included) currently intends it, otherwise **replicate** it there. The
ablation modes fix the answer (relocate_only, replicate_only) or the placement
(static: nothing moves; replicate_all: every node replicates every key).
No option needs tuning."""

from dataclasses import dataclass, field

import numpy as np

from adapm.config import INTENT_MODES

# Smoothing of the clock-speed estimate: weight of the newest round.
SPEED_SMOOTHING = 0.2
# The window covers the clocks of this many rounds, at this many standard deviations.
ROUNDS_AHEAD = 2.0
SPREAD = 3.0

MIN_WINDOW = 2
# A key that arrived by relocation fewer rounds ago than this is replicated, not moved on:
# a key that several nodes use in turn would otherwise bounce between them, and every
# bounce makes the next access remote.
SETTLE_ROUNDS = 20

RELOCATE, REPLICATE = "relocate", "replicate"


class ClockTracker:
    """Per-worker clock speed (clocks per round) and the action window it implies."""

    def __init__(self, workers):
        self.last = np.zeros(workers, dtype=np.int64)
        self.mean = np.zeros(workers)
        self.var = np.zeros(workers)
        self.started = False

    def update(self, clocks):
        clocks = np.asarray(clocks, dtype=np.int64)
        if self.started:
            step = (clocks - self.last).astype(float)
            diff = step - self.mean
            self.mean += SPEED_SMOOTHING * diff
            self.var = (1 - SPEED_SMOOTHING) * (self.var + SPEED_SMOOTHING * diff * diff)
        self.started = True
        self.last = clocks
        return self.windows()

    def windows(self):
        """Clocks ahead of each worker's clock within which intents are acted on: at
        least the current and the next clock, even for a clock that seems to stand
        still."""
        spread = SPREAD * np.sqrt(ROUNDS_AHEAD * self.var)
        return np.ceil(ROUNDS_AHEAD * self.mean + spread).astype(np.int64) + MIN_WINDOW


class ReactionTime:
    """How long this node takes to act on an intent, from the sync rounds that asked
    owners for keys: an intent may wait for the round in flight, then its own round must
    come back, so the estimate is two rounds at a high quantile (mean + 1.3 standard
    deviations, about the 90th percentile, smoothed over recent rounds). The node
    publishes it; IntentLoader announces batches at least a few of these ahead."""

    SMOOTHING = 0.05
    SPREAD = 1.3

    def __init__(self):
        self.mean = None
        self.var = 0.0

    def observe(self, seconds):
        if self.mean is None:
            self.mean = seconds
            return
        diff = seconds - self.mean
        self.mean += self.SMOOTHING * diff
        self.var = (1 - self.SMOOTHING) * (self.var + self.SMOOTHING * diff * diff)

    def seconds(self):
        """The estimate (0.0 before any round has asked for a key)."""
        if self.mean is None:
            return 0.0
        return 2.0 * (self.mean + self.SPREAD * self.var ** 0.5)


@dataclass
class RoundPlan:
    """What a node does in one sync round."""

    requests: np.ndarray                  # keys to ask their owners for (not held yet)
    keep: np.ndarray                      # replicas to sync and keep
    drop: np.ndarray                      # replicas to sync one last time and drop
    late: int = 0                         # keys of due intents already past their start
    due_keys: int = 0                     # keys of intents that came due this round
    windows: np.ndarray = field(default=None)


class Manager:
    def __init__(self, mode, workers, intents):
        self.mode = mode
        self.clocks = ClockTracker(workers)
        self.intents = intents

    @property
    def acts_on_intents(self):
        return self.mode in INTENT_MODES

    def plan(self, clocks, held, replicas):
        """The plan of one round. `held(keys)` -> mask of keys this node holds or has
        already requested; `replicas`: keys this node holds as replicas."""
        windows = self.clocks.update(clocks)
        requests, late, due_keys = [], 0, 0
        if self.acts_on_intents:
            for worker, clock in enumerate(clocks):
                for intent in self.intents.due(worker, int(clock) + int(windows[worker])):
                    due_keys += intent.keys.shape[0]
                    missing = intent.keys[~held(intent.keys)]
                    if missing.shape[0]:
                        requests.append(missing)
                        if intent.start <= clock:
                            late += missing.shape[0]
        requests = np.unique(np.concatenate(requests)) if requests else _NO_KEYS
        if self.mode == "replicate_all" or replicas.shape[0] == 0:
            keep, drop = replicas, _NO_KEYS
        else:
            intended = self.intents.intended(replicas)
            keep, drop = replicas[intended], replicas[~intended]
        return RoundPlan(requests, keep, drop, late, due_keys, windows)

    def decide(self, owner_intends, others_hold, rounds_since_arrival=None):
        """The owner's answer to a request for a key: RELOCATE or REPLICATE.
        `owner_intends`: a worker of the owner's node intends the key; `others_hold`:
        nodes other than the requester hold replicas of it (so they intend it);
        `rounds_since_arrival`: how long ago the key came here by relocation (None: it
        never did)."""
        since = -1 if rounds_since_arrival is None else rounds_since_arrival
        relocate = self.relocate_mask(np.array([bool(owner_intends)]),
                                      np.array([bool(others_hold)]), np.array([since]))
        return RELOCATE if relocate[0] else REPLICATE

    def relocate_mask(self, owner_intends, others_hold, rounds_since_arrival):
        """decide() for many keys at once (boolean arrays; rounds_since_arrival < 0 for
        keys that never arrived by relocation): True where the answer is RELOCATE."""
        if self.mode == "relocate_only":
            return np.ones(owner_intends.shape[0], dtype=bool)
        if self.mode in ("replicate_only", "replicate_all"):
            return np.zeros(owner_intends.shape[0], dtype=bool)
        bouncing = (rounds_since_arrival >= 0) & (rounds_since_arrival < SETTLE_ROUNDS)
        return ~(owner_intends | others_hold | bouncing)


_NO_KEYS = np.empty(0, dtype=np.uint64)
