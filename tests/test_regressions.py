"""Regressions for defects an independent review found in the intent ring, the vectorised
owner decisions, the lazy intent counts and protocol.send; each failed before its fix."""
import gc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

import adapm
from adapm.node.data.holders import ReplicaHolders
from adapm.node.data.rounds import Rounds
from adapm.policy.intents import IntentStore, read_intent_log
from adapm.policy.manager import SETTLE_ROUNDS, Manager
from adapm.table.keyset import KeyFlags
from adapm.wire.protocol import SYNC_KEEP, SYNC_REQUEST

pytestmark = pytest.mark.timeout(60)


# -- 1. A key that arrived in the current round is moved on again (bouncing) ------------

def owner_side(num_keys=10, round_now=7):
    """The rounds part of an owner with just what _answer_requests reads: intents, the
    manager, replica holders and its arrival stamps (no table, nothing sent)."""
    intents = IntentStore(1, num_keys)
    ctx = SimpleNamespace(view=None, intents=intents, num_keys=num_keys, counts={})
    ctx.count = lambda name, n: ctx.counts.__setitem__(name, ctx.counts.get(name, 0) + n)
    ctx.new_key_set = KeyFlags(num_keys).new_set
    rounds = Rounds(ctx, outbox=None, routes=None, replicas=None,
                    holders=ReplicaHolders(num_keys, 2),
                    manager=Manager("adaptive", 1, intents), eviction=None,
                    deferred_sets=None, release_barrier=None, resume_set=None)
    rounds.round = round_now
    return rounds


def test_a_key_that_arrived_during_the_current_round_is_not_moved_on():
    """A key that arrives is stamped with the round in flight, so until the next round
    starts it is younger than any key that came in an earlier round. A vectorised
    _answer_requests of before mapped it to 'never arrived' and relocated it straight
    on: the anti-bounce rule (SETTLE_ROUNDS) was off for the freshest arrivals."""
    owner = owner_side()
    now = owner.round
    fresh, settled, old, never = 1, 2, 3, 4
    for key, at in ((fresh, now), (settled, now - 1), (old, now - SETTLE_ROUNDS - 6)):
        owner.round = at                              # as on_move stamps it, then
        owner.arrived(np.array([key], dtype=np.uint64))
    owner.round = now
    keys = np.array([fresh, settled, old, never], dtype=np.uint64)
    kinds = np.full(4, SYNC_REQUEST, dtype=np.uint32)
    relocate = owner._answer_requests(keys, kinds, holder=1)
    assert relocate.tolist()[1:] == [False, True, True]     # these are right
    assert not relocate[0], "a key that arrived this round was relocated on (bounces)"


def test_answer_requests_ignores_keys_that_are_not_requests():
    owner = owner_side()
    keys = np.array([1, 2], dtype=np.uint64)
    kinds = np.array([SYNC_KEEP, SYNC_REQUEST], dtype=np.uint32)
    assert owner._answer_requests(keys, kinds, holder=1).tolist() == [False, True]


# -- 2. Lazy intent counts keep every intent's keys while nobody reads the counts -------

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


# -- 3. A large intent sent as a message is sent from the caller's buffer -------------

def reuse_buffer_task(w, rounds, n):
    buf = np.empty(n, dtype=np.uint64)
    for i in range(rounds):
        buf[:] = i                      # this batch's keys, in a buffer the loop reuses
        w.intent(buf, 1000 + i)         # too large for the ring: sent as INTENT
    w.barrier()
    return w.rank


def test_an_intent_sent_as_a_message_is_not_changed_by_reusing_the_keys_buffer(
        tmp_path, monkeypatch):
    """protocol.send passes messages of 64 KiB or more zero-copy; Worker.intent's
    fallback message carries `keys` as as_keys returned it, which for a contiguous
    int64/uint64 array is the caller's own memory. intent() returns at once ("never
    blocks"), so a caller that refills its buffer for the next batch changes what the
    node server receives for this one."""
    log = tmp_path / "intents"
    monkeypatch.setenv("ADAPM_INTENT_LOG", str(log))
    rounds, n = 12, 70_000              # 70000 keys > ring: always the message path
    adapm.run(reuse_buffer_task, args=(rounds, n), nodes=2, workers_per_node=1,
              num_keys=100, value_length=1, mode="adaptive")
    for node in range(2):
        records = read_intent_log(f"{log}.node{node}")
        assert len(records) == rounds
        wrong = [(start - 1000, sorted(set(keys.tolist()))) for _, start, _, keys in records
                 if set(keys.tolist()) != {start - 1000}]
        assert not wrong, f"node {node}: (batch, keys received) {wrong}"
