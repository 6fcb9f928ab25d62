"""The node's record of its workers' intents (adapm.policy.intents): memory that must not
grow with the training run (no processes)."""
import gc
import weakref

import numpy as np
import pytest

from adapm.policy.intents import IntentStore

pytestmark = pytest.mark.timeout(60)


def test_expired_intents_are_not_kept_alive_while_counts_are_not_read():
    """IntentStore.add/expire queue the key arrays and only `count` consumes the queues.
    On a node server `count` is read only when another node requests a key from it, when
    it holds replicas, or when it drops one: a node without replicas whose keys nobody
    requests (relocate_only, or settled partitioned data in adaptive) never reads it, so
    every intent's keys stay referenced forever (twice: added and removed); memory grows
    with every batch of the whole training run."""
    store = IntentStore(1, 1000)
    alive = []
    for clock in range(2000):
        keys = np.arange(clock % 500, clock % 500 + 400, dtype=np.uint64)
        alive.append(weakref.ref(keys))
        store.add(0, keys, clock, clock + 1)
        del keys
        store.expire(np.array([clock + 1]))  # as every round does; the intent is over
    assert len(store) == 0
    gc.collect()
    still = sum(ref() is not None for ref in alive)
    assert still < 100, f"{still} key arrays of 2000 expired intents are still held"


