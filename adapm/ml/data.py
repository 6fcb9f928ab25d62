"""Intent signaling for training loops: a wrapper around any iterable of batches.

    loader = adapm.data.IntentLoader(w, batches, keys_of=lambda b: b["keys"])
    for batch in loader:        # batch i is used at clock start + i
        ...                     # pull, compute, push
    # each step advances w's clock once

The wrapper reads batches ahead of the training loop, signals an intent for each batch's
keys at the clock at which the loop will use it (`w.intent(keys, clock)`), and advances
the worker's clock each time the loop comes back for the next batch. `batches` may be any
iterable: a list, a generator, a `torch.utils.data.DataLoader` (whose tensors `keys_of`
may return; they are converted with numpy). Where intents cannot change where keys are
(`w.intents_matter` is False: a cluster of one node, or modes static and replicate_all)
the wrapper still advances the clock but calls no `keys_of` and announces nothing.

How far ahead: by default the wrapper measures how long the loop takes per batch, and
reads how long the node takes to act on an intent (`w.reaction_time()`, which the node
measures from its own sync rounds), and keeps SAFETY times that much time of batches
announced (at least MIN_LEAD_SECONDS; LEAD_SECONDS until the node has measured anything),
never fewer than MIN_AHEAD batches, and never more than MAX_AHEAD (a bound on the memory
of batches read ahead, not a tuning knob). The manager acts on an intent only once it
comes into its action window, so announcing early costs nothing but the memory of the
batches read ahead; what matters is announcing early enough, and a fixed number of
batches cannot be right both for 50 µs and for 5 s steps, nor for a node that reacts in
1 ms and one that takes 20. `lookahead=N` fixes the number instead."""

import collections
import math
import time

import numpy as np

# The time a node needs to act on an intent is a few sync rounds: under 10 ms on an idle
# machine, 10-20 ms on a 2-core machine shared with 4 busy workers (docs/benchmarks.md).
# Keeping 50 ms of batches announced leaves room for that with a wide margin.
LEAD_SECONDS = 0.05        # until the node has measured its reaction time
SAFETY = 4                 # reaction times of batches announced
MIN_LEAD_SECONDS = 0.005
MIN_AHEAD = 4
MAX_AHEAD = 4096
FIRST_AHEAD = 32          # before the first batch has been timed
STEP_SMOOTHING = 0.1      # weight of the newest step in the step-time estimate


class IntentLoader:
    """Wraps `batches`; iterate over it instead of over `batches`.

    keys_of(batch) -> the keys the batch will access (any integer array-like).
    lookahead: batches announced ahead of the one in use; None (default) adapts it to
    the measured step time. Each iteration (epoch) continues from the worker's clock."""

    def __init__(self, worker, batches, keys_of, lookahead=None):
        if lookahead is not None and (not isinstance(lookahead, int) or lookahead < 0):
            raise ValueError(f"lookahead must be None or an int >= 0, got {lookahead!r}")
        if not callable(keys_of):
            raise TypeError("keys_of must be a function from a batch to its keys")
        self.worker = worker
        self.batches = batches
        self.keys_of = keys_of
        self.lookahead = lookahead
        self.step_seconds = None   # smoothed wall time per step of the loop

    def __len__(self):
        return len(self.batches)

    def ahead(self):
        """How many batches beyond the one in use are announced now."""
        if self.lookahead is not None:
            return self.lookahead
        if self.step_seconds is None:
            return FIRST_AHEAD
        reaction = self.worker.reaction_time()
        lead = max(MIN_LEAD_SECONDS, SAFETY * reaction) if reaction > 0 else LEAD_SECONDS
        wanted = math.ceil(lead / max(self.step_seconds, 1e-9))
        return max(MIN_AHEAD, min(MAX_AHEAD, wanted))

    def __iter__(self):
        w = self.worker
        source = iter(self.batches)
        queue = collections.deque()   # (batch, clock at which it is used)
        next_clock = w.clock
        exhausted = False
        # Where intents change nothing (one node; modes static, replicate_all) keys_of is
        # not called: its keys would only be counted.
        announce = getattr(w, "intents_matter", True)

        def read_ahead():
            nonlocal next_clock, exhausted
            # Nothing announced: one batch at a time (reading ahead would gain nothing).
            while not exhausted and len(queue) <= (self.ahead() if announce else 0):
                try:
                    batch = next(source)
                except StopIteration:
                    exhausted = True
                    return
                if announce:
                    keys = _as_key_array(self.keys_of(batch))
                    if keys.shape[0]:
                        w.intent(keys, next_clock)
                queue.append((batch, next_clock))
                next_clock += 1

        read_ahead()
        while queue:
            batch, _ = queue.popleft()
            started = time.perf_counter()
            yield batch
            self._timed(time.perf_counter() - started)
            w.advance_clock()
            read_ahead()

    def _timed(self, seconds):
        if self.step_seconds is None:
            self.step_seconds = seconds
        else:
            self.step_seconds += STEP_SMOOTHING * (seconds - self.step_seconds)


def _as_key_array(keys):
    """Keys as a 1-D array; torch tensors and lists are accepted (validated by intent)."""
    if hasattr(keys, "detach"):  # a torch tensor, possibly on a device
        keys = keys.detach().cpu().numpy()
    return np.asarray(keys).reshape(-1)
