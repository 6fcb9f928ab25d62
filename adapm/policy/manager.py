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
3. every replica sends its delta to its owner; it stays if some intent still names it or
   it is within its learned **retention** (class Retention: keys that this node used, let
   go and soon wanted again are kept that much longer), else it is dropped after that
   last flush.

The owner decides for each requested key: **relocate** it to the asking node when nobody
else (the owner included) currently intends it or used it within its retention, otherwise
**replicate** it there. The ablation modes fix the answer (relocate_only, replicate_only)
or the placement (static: nothing moves; replicate_all: every node replicates every key).
No option needs tuning."""

import time
from dataclasses import dataclass, field

import numpy as np

from adapm.common.config import INTENT_MODES

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

# Retention (class Retention). Learned per key; these are only its unit and its bound.
# The unit: a replica nobody intends is synced only in full rounds (every 20 ms,
# rounds.REFRESH_INTERVAL), and rounds run at least that often while the node holds
# replicas, so keeping one for a unit costs at most one sync entry (its drop costs one
# too), and a finer retention could not be honoured anyway.
RETAIN_UNIT = 0.02
# The bound: 2**7 units (2.56 s). A kept replica that nobody intends costs a sync entry
# (and the value, when the owner's changed) every full round; the bound caps what a wrong
# guess costs per use of a key at 128 entries, and a key that is wanted again only after
# longer than this is not one that bounces between nodes in turns.
RETAIN_MAX_LEVEL = 8
# Last uses are float32 seconds since a base moved up after this long: float32 holds an
# hour to better than half a millisecond (RETAIN_UNIT is 20 ms).
REBASE_AFTER = 3600.0
# The modes that learn retention: those that drop replicas (replicate_all never does,
# static and relocate_only hold none) or answer requests by what nodes intend.
RETAINING_MODES = ("adaptive", "replicate_only")


class ClockTracker:
    """Per-worker clock speed (clocks per round) and the action window it implies."""

    def __init__(self, workers):
        self.last = np.zeros(workers, dtype=np.int64)
        self.mean = np.zeros(workers)
        self.var = np.zeros(workers)
        self.started = False
        self._windows = self._compute_windows()

    def update(self, clocks):
        clocks = np.asarray(clocks, dtype=np.int64)
        if self.started:
            step = (clocks - self.last).astype(float)
            diff = step - self.mean
            self.mean += SPEED_SMOOTHING * diff
            self.var = (1 - SPEED_SMOOTHING) * (self.var + SPEED_SMOOTHING * diff * diff)
        self.started = True
        self.last = clocks
        self._windows = self._compute_windows()
        return self.windows()

    def windows(self):
        """Clocks ahead of each worker's clock within which intents are acted on: at
        least the current and the next clock, even for a clock that seems to stand
        still. (Computed once per update: the node server asks on every turn.)"""
        return self._windows

    def _compute_windows(self):
        spread = SPREAD * np.sqrt(ROUNDS_AHEAD * self.var)
        windows = np.ceil(ROUNDS_AHEAD * self.mean + spread).astype(np.int64) + MIN_WINDOW
        windows.flags.writeable = False  # shared by every caller until the next update
        return windows


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


class Retention:
    """How long this node keeps a replica after the last intent naming it ended, learned
    per key from what the node sees: a key that it let go (dropped, or gave away by
    relocation) and then wanted again soon "bounces". All state is in per-key arrays,
    allocated once; every call touches only the keys it is given.

    Per key: `last_used`, when this node last wanted it (a round in which an intent named
    it as a replica, a due intent named it, or it was requested; -inf: never), `let_go`
    (its replica dropped since then; a key given away by relocation shows up as requested
    again), and a `level`: the retention is 0 at level 0 (drop at once, as
    without retention: most keys never come back) and RETAIN_UNIT * 2**(level - 1) above.

    When a key comes back, wanted again after this node let it go, the gap since its last
    use says how long keeping it would have taken:
    - gap up to the bound (RETAIN_UNIT * 2**(RETAIN_MAX_LEVEL - 1)): it bounces; its
      retention grows to cover twice the gap (the gaps of a key used in turns vary with
      load and with the other nodes' pace: a retention that just covers the last gap
      bounces again at the next slightly longer one), and at least doubles;
    - a longer gap: no retention would have helped; its retention halves once for every
      doubling by which the gap exceeds the bound (a key not used for much longer than
      any retention loses it).
    A key used once, or only at long gaps, never gets any retention. A replica that no
    intent names any more is kept while the time since its last use is below its
    retention. A retention longer than a key's gaps costs nothing while the key is used
    in turns (it is wanted again before it runs out); only once, when the key stops
    being used here, is it kept that long for nothing.

    Time is in seconds (time.monotonic()), not in rounds: rounds run up to a thousand a
    second while intents come due, every 20 ms while only replicas are held and not at
    all on an idle node, so a gap in rounds says little about how long a key was unused,
    while what keeping a replica costs (one entry per full round, every 20 ms) and what a
    bounce costs (a round trip too late) are both measured in time."""

    SECONDS = np.array([0.0] + [RETAIN_UNIT * 2.0 ** i for i in range(RETAIN_MAX_LEVEL)])
    LONGEST = SECONDS[-1]

    def __init__(self, num_keys):
        # Seconds since `_base` (float32: 4 bytes per key). `relative` moves the base up
        # once it lies REBASE_AFTER behind, so recent uses, the only ones a retention of
        # at most LONGEST can cover, keep a resolution better than a millisecond.
        self.last_used = np.full(num_keys, -np.inf, dtype=np.float32)
        self._base = 0.0
        self.let_go = np.zeros(num_keys, dtype=bool)
        self.level = np.zeros(num_keys, dtype=np.uint8)

    def relative(self, now):
        """`now` (time.monotonic()) as last_used holds times: seconds since the base."""
        if now - self._base > REBASE_AFTER:
            self.last_used -= np.float32(now - self._base)  # never used: stays -inf
            self._base = now
        return now - self._base

    def seconds(self, keys):
        """Each key's retention in seconds."""
        return self.SECONDS[self.level[_index(keys)]]

    def used(self, keys, now):
        """This node wants these keys now (intended replicas, keys of intents that came
        due). Those it had let go since their last use came back: it learns from them."""
        now = self.relative(now)
        keys = _index(keys)
        back = keys[self.let_go[keys]]
        if back.shape[0]:
            self._learn(back, now - self.last_used[back])
        self.last_used[keys] = now
        self.let_go[keys] = False

    def requested(self, keys, now):
        """This node requests these keys (not held: dropped, given away, or never here).
        Those it used before came back; then they are used now."""
        now = self.relative(now)
        keys = _index(keys)
        gaps = now - self.last_used[keys]
        back = np.isfinite(gaps)
        if back.any():
            self._learn(keys[back], gaps[back])
        self.last_used[keys] = now
        self.let_go[keys] = False

    def keeps(self, candidates, now):
        """Mask over the replicas no intent names any more: True for those still within
        their retention since their last use; the others are recorded as let go."""
        now = self.relative(now)
        idx = _index(candidates)
        keep = (now - self.last_used[idx]) < self.SECONDS[self.level[idx]]
        self.let_go[idx[~keep]] = True
        return keep

    def retained(self, keys, now):
        """Mask: keys this node used within their retention (the owner side: a key the
        owner will soon want back is replicated to a requester, not moved away)."""
        now = self.relative(now)
        idx = _index(keys)
        return (now - self.last_used[idx]) < self.SECONDS[self.level[idx]]

    def _learn(self, keys, gaps):
        level = self.level[keys].astype(np.int64)
        bounced = gaps <= self.LONGEST
        cover = np.searchsorted(self.SECONDS, 2 * gaps, side="left")  # 1st level >= 2 gaps
        grown = np.minimum(RETAIN_MAX_LEVEL, np.maximum(level + 1, cover))
        over = np.ceil(np.log2(np.maximum(gaps, self.LONGEST) / self.LONGEST))
        over[~np.isfinite(over)] = RETAIN_MAX_LEVEL  # never used before: back to none
        shrunk = np.maximum(0, level - over.astype(np.int64))
        self.level[keys] = np.where(bounced, grown, shrunk)


@dataclass
class RoundPlan:
    """What a node does in one sync round."""

    requests: np.ndarray                  # keys to ask their owners for (not held yet)
    keep: np.ndarray                      # replicas to sync and keep
    drop: np.ndarray                      # replicas to sync one last time and drop
    late: int = 0                         # keys of due intents already past their start
    due_keys: int = 0                     # keys of intents that came due this round
    windows: np.ndarray = field(default=None)
    retained: int = 0                     # of keep: replicas no intent names (retention)


class Manager:
    def __init__(self, mode, workers, intents, num_keys=None):
        self.mode = mode
        self.clocks = ClockTracker(workers)
        self.intents = intents
        if num_keys is None and intents is not None:
            num_keys = intents.count.shape[0]
        self.retention = (Retention(num_keys) if mode in RETAINING_MODES and num_keys
                          else None)
        self._compiled = hasattr(intents, "plan_round")  # CompiledIntentStore

    @property
    def acts_on_intents(self):
        return self.mode in INTENT_MODES

    def plan(self, clocks, held, replicas, now=None, states=None):
        """The plan of one round. `held(keys)` -> mask of keys this node holds or has
        already requested; `replicas`: keys this node holds as replicas;
        `now`: time.monotonic() unless given. With `states` (each key's table state, a
        uint8 per key, 0: not held nor requested) and the compiled intent store, `held`
        is not called and the plan is one compiled call
        (CompiledIntentStore.plan_round), the same plan (tests/unit/policy/
        test_compiled_plan.py)."""
        now = time.monotonic() if now is None else now
        windows = self.clocks.update(clocks)
        if states is not None and self._compiled:
            return self._plan_compiled(clocks, windows, states, replicas, now)
        requests, due, late, due_keys = [], [], 0, 0
        if self.acts_on_intents:
            for worker, clock in enumerate(clocks):
                keys, starts, lengths = self.intents.due_keys(
                    worker, int(clock) + int(windows[worker]))
                if keys.shape[0] == 0:
                    continue
                due_keys += keys.shape[0]
                due.append(keys)
                missing = ~held(keys)
                if missing.any():
                    requests.append(keys[missing])
                    # keys of intents that started already: late
                    late += int(np.count_nonzero(missing[np.repeat(starts, lengths) <= clock]))
        requests = np.unique(np.concatenate(requests)) if requests else _NO_KEYS
        retention = self.retention
        if retention is not None:
            retention.requested(requests, now)  # before used(): requests are due keys too
            if due:  # owned keys too: the owner side asks retained()
                retention.used(due[0] if len(due) == 1 else np.concatenate(due), now)
        retained = 0
        if self.mode == "replicate_all" or replicas.shape[0] == 0:
            keep, drop = replicas, _NO_KEYS
        else:
            intended = self.intents.intended(replicas)
            if retention is None:
                keep, drop = replicas[intended], replicas[~intended]
            else:
                retention.used(replicas[intended], now)
                unintended = ~intended
                keeping = intended.copy()
                keeping[unintended] = retention.keeps(replicas[unintended], now)
                retained = int(keeping.sum()) - int(intended.sum())
                keep, drop = replicas[keeping], replicas[~keeping]
        return RoundPlan(requests, keep, drop, late, due_keys, windows, retained)

    def _plan_compiled(self, clocks, windows, states, replicas, now):
        retention = self.retention
        arrays = None if retention is None else (
            retention.last_used, retention.let_go, retention.level, retention.SECONDS)
        clocks = np.asarray(clocks, dtype=np.int64)
        requests, keep, drop, late, due_keys, retained = self.intents.plan_round(
            clocks, clocks + windows, states, replicas, arrays,
            0.0 if retention is None else retention.relative(now),
            self.acts_on_intents, self.mode == "replicate_all")
        return RoundPlan(requests, keep, drop, late, due_keys, windows, retained)

    def relocate_mask(self, owner_intends, others_hold, rounds_since_arrival, keys=None,
                      now=None):
        """The owner's answer to requests for keys, True where it relocates a key to the
        requester, False where it replicates it there. Boolean arrays: `owner_intends`: a
        worker of the owner's node intends the key; `others_hold`: nodes other than the
        requester hold replicas of it (so they intend it); `rounds_since_arrival`: how
        long ago the key came here by relocation (< 0: it never did).
        `keys` (the requested keys, optional): a key this node used within its learned
        retention counts as intended here, since it would soon be requested back;
        `now`: time.monotonic() unless given."""
        if self.mode == "relocate_only":
            return np.ones(owner_intends.shape[0], dtype=bool)
        if self.mode in ("replicate_only", "replicate_all"):
            return np.zeros(owner_intends.shape[0], dtype=bool)
        bouncing = (rounds_since_arrival >= 0) & (rounds_since_arrival < SETTLE_ROUNDS)
        if keys is not None and self.retention is not None:
            now = time.monotonic() if now is None else now
            owner_intends = owner_intends | self.retention.retained(keys, now)
        return ~(owner_intends | others_hold | bouncing)


_NO_KEYS = np.empty(0, dtype=np.uint64)


def _index(keys):
    return np.asarray(keys).astype(np.intp, copy=False)
