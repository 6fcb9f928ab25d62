"""adapm.node.memory: the node server's own state, counted by walking its parts."""
import numpy as np
import pytest
from node_parts import cluster_fixture  # noqa: F401 (the fixture `cluster`)

from adapm.node.memory import private_bytes

pytestmark = pytest.mark.timeout(60)


def test_every_per_key_array_of_the_parts_is_counted_once(cluster):
    _, (server, _) = cluster(2, num_keys=4000)
    counted = private_bytes(server)
    # ownership counters (4), replica slots (4) and versions (4), arrival rounds (4), the
    # intent counts (4), last uses (4): at least 24 bytes for each of the 4000 keys
    assert counted >= 24 * 4000
    assert counted < 64 * 4000 + 1 << 20        # and nothing like a copy of the table
    server.replicas.extra = np.zeros(4000, dtype=np.float64)   # a new per-key array:
    assert private_bytes(server) == counted + 8 * 4000         # counted without asking
    server.rounds.alias = server.replicas.extra                # the same array twice:
    assert private_bytes(server) == counted + 8 * 4000         # counted once
    server.rounds.view_only = server.replicas.extra[::2]       # a view owns nothing
    assert private_bytes(server) == counted + 8 * 4000


def test_a_compiled_part_is_counted_by_what_it_says_it_holds(cluster):
    """The compiled intent store has no attributes to walk: its nbytes (the per-key
    counts, 4 bytes a key, and its records) is counted."""
    _, (server, _) = cluster(2, num_keys=4000)
    store = server.intents
    assert not hasattr(store, "__dict__") and store.nbytes >= 4 * 4000
    holder = object.__new__(type(server))  # an AdaPM object holding the store alone
    holder.store = store
    assert private_bytes(holder) == store.nbytes
    assert private_bytes(server) >= store.nbytes + 4 * 4000  # with the other parts' arrays
