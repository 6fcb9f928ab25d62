"""Sync rounds, a part of the node server: carrying out the manager's decisions.

The decisions are the manager's (adapm.policy.manager), the copies' slots the replicas
part's (adapm.node.data.replicas), giving keys away the eviction part's
(adapm.node.data.eviction), the waits on rounds the waiters' (adapm.node.data.waiters),
the sets that wait for a round the deferred sets' (adapm.node.data.deferred_sets); this
part runs the rounds between them, and it is the one owner of their state: the others
(relocation, the checkpoint phases, the metrics) act on it through its methods.

Replica node H, one round (one SYNC message per owner, at most one round in flight):
- keys a due intent names and H does not hold become PENDING (a zeroed, not yet usable
  slot, plus a zeroed "value at last sync" slot) and are sent with SYNC_REQUEST;
- each replica's delta (value - value at last sync) is taken under its lock and sent with
  SYNC_KEEP, or SYNC_DROP when no intent names it any more;
- the answers: SYNC_REPLY with REPLY_VALUE (value = owner's + updates made here since the
  delta was taken; PENDING becomes REPLICA), REPLY_DROPPED (the replica goes once it has
  no newer update, else its delta goes with the next round), or a MOVE (relocation: the
  PENDING key becomes owned here). The round completes when every key is answered;
  wait_sync and barriers wait for a round that started after they were asked.

Owner O, on a SYNC from H: applies every delta (additive, like a push), answers KEEP with
the fresh value, DROP with an acknowledgement, and REQUEST by relocating the key to H or
replicating it there, as the manager decides. Keys O does not own any more are passed on
along their path, like any request."""

import time
from typing import NamedTuple

import numpy as np

from adapm.common.errors import ProtocolError
from adapm.node.data.waiters import RoundWaiters
from adapm.policy.manager import ReactionTime
from adapm.policy.ownership import split_by
from adapm.table._keyset import difference_sorted, intersect_sorted, union_sorted
from adapm.table.segments import Segments
from adapm.table.shared_table import (
    NODE_SLOT,
    OWNED,
    REPLICA,
    SERVE_NO_VALUE,
    SERVE_VALUE,
    SERVE_VALUE_IF_CHANGED,
    WORKER_SLOT,
)
from adapm.wire import protocol
from adapm.wire.protocol import (
    HAS_DELTA,
    MOVE_FOR_ROUND,
    REPLY_CURRENT,
    REPLY_DROPPED,
    REPLY_VALUE,
    SYNC_DROP,
    SYNC_KEEP,
    SYNC_KIND,
    SYNC_REQUEST,
    MsgType,
)

MIN_ROUND_INTERVAL = 0.001  # at most about a thousand rounds per second
# Replicas are synced (delta up, value down when behind) at most this often, unless a
# wait_sync or a barrier needs a full exchange; rounds in between carry only new requests
# and drops. Hot replicas are rewritten all the time, and syncing them faster than this
# buys little staleness for a lot of traffic: on benchmark B5 (MF), 5 ms sent 40 MB per
# epoch, 20 ms 31 MB at the same speed and test error, 50 ms 24 MB but 0.6% worse error.
REFRESH_INTERVAL = 0.02


class RoundsSnapshot(NamedTuple):
    """The rounds' state in plain numbers (for the metrics)."""

    round: int            # last round started
    round_done: int       # last round completed
    waiting_sync: int     # wait_sync requests waiting for a round
    waiting_refresh: int  # refresh requests waiting for a round
    deferred_sets: int    # local sets waiting for the round in flight


_STAMPS = (1 << 32) - 1


def _stamp(round_id):
    """A round as stored per key: uint32, 1 .. 2**32 - 1 (0 means none), modulo _STAMPS."""
    return round_id % _STAMPS + 1


class Rounds:
    def __init__(self, ctx, outbox, routes, replicas, holders, manager, *, eviction,
                 deferred_sets, release_barrier, resume_set):
        """eviction: evict_and_move(keys, target, request_id, purpose) (a request
        answered by relocation); deferred_sets: the local sets that wait for the round in
        flight (adapm.node.data.deferred_sets), each handed back to
        resume_set(identity, msg) once it completed; release_barrier(generation): release
        a barrier on this node (local workers)."""
        self.ctx = ctx
        self.view = ctx.view
        self.intents = ctx.intents
        self.outbox = outbox
        self.routes = routes
        self.replicas = replicas
        self.holders = holders
        self.manager = manager
        self.eviction = eviction
        self.deferred_sets = deferred_sets
        self.resume_set = resume_set
        self._release_barrier = release_barrier
        self.waiters = RoundWaiters(self._reply_synced, release_barrier)
        self.reaction = ReactionTime()
        # Replicas whose drop was acknowledged but that are intended again: asked anew.
        self.rejoin = ctx.new_key_set()
        self.refresh = ctx.new_key_set()  # replicas to sync with the next round anyway
        self.initial_requests = None         # replicate_all: every key, once
        self.round = 0               # last round started
        self.round_done = 0          # last round completed (all earlier ones too)
        self.round_left = 0          # keys of the round in flight still unanswered
        self.round_started_at = 0.0
        self.round_is_full = False   # the round in flight syncs every replica
        self.round_asks = False      # ... asks owners for keys (its time is a reaction)
        self.refreshed_at = 0.0      # when a round last synced every replica
        # Per key, the round it arrived here by relocation (_stamp: 0 is never), 4 bytes
        # per key; only recent arrivals matter.
        self.arrived_round = np.zeros(ctx.num_keys, dtype=np.uint32)
        self._observers = []         # observe(seconds, asked owners for keys), per round
        self._frozen = False         # a checkpoint is being written: start no round
        # send_round(round, keys, kinds) -> (keys with a delta, keys sent) or None: the
        # compiled data plane's (adapm.node.data.plane), set by the node server
        self.compiled_sender = None

    def add_observer(self, observe):
        """Call observe(seconds, asked) on every completed round, with its time and
        whether it asked owners for keys (its time is a reaction time then)."""
        self._observers.append(observe)

    def freeze(self):
        """A checkpoint is being written: start no round until thaw()."""
        self._frozen = True

    def thaw(self):
        self._frozen = False

    def snapshot(self):
        """The rounds' state in plain numbers (RoundsSnapshot): each a single read, so
        it is safe from another thread; consistent as a whole when taken while the node
        thread does not run (adapm.node.snapshot)."""
        return RoundsSnapshot(self.round, self.round_done, len(self.waiters.sync),
                              len(self.waiters.refresh), len(self.deferred_sets))

    def replicate_everything(self):
        """replicate_all: every key this node does not own becomes a replica."""
        keys = np.arange(self.ctx.num_keys, dtype=np.uint64)
        self.initial_requests = keys[keys % np.uint64(self.ctx.num_nodes) != self.ctx.node]

    # -- scheduling ----------------------------------------------------------------

    @property
    def in_flight(self):
        return self.round > self.round_done

    def busy(self):
        """Whether rounds should run now (the server then polls without sleeping)."""
        return bool(self.replicas or self.waiters or self.rejoin or
                    self.initial_requests is not None or
                    (self.manager.acts_on_intents and len(self.intents)))

    def maybe_start(self):
        if self._frozen or self.in_flight or not self.busy():
            return
        now = time.monotonic()
        since = now - self.round_started_at
        due = self._intents_due()
        # Keys that intents want now do not wait for the round rate limit: a round in
        # flight is the only thing they wait for (reaction time, B8).
        if since < MIN_ROUND_INTERVAL and not due:
            return
        urgent = (due or self.waiters or self.rejoin or self.initial_requests is not None)
        if not urgent and since < REFRESH_INTERVAL:
            return
        self.round_started_at = now
        self.start()

    def _intents_due(self):
        """Whether an intent of a local worker comes due within its action window."""
        if not self.manager.acts_on_intents:
            return False
        clocks = self.view.counters()[:, WORKER_SLOT["clock"]]
        return self.intents.any_due(clocks, self.manager.clocks.windows())

    def start(self):
        """Start a round now (maybe_start decides when; tests start one directly)."""
        self.round += 1
        self.ctx.count("rounds_started", 1)
        clocks = self.view.counters()[:, WORKER_SLOT["clock"]]
        self.intents.expire(clocks)
        plan = self.manager.plan(clocks, self.replicas.held_mask, self.replicas.to_sync(),
                                 states=self.ctx.state_bytes)
        if plan.late:
            self.ctx.count("late_intents", plan.late)
        if plan.retained:
            self.ctx.count("replicas_retained", plan.retained)
        requests, rejoin = self._requests(plan)
        self._choose_syncs(plan)
        keys = np.concatenate([requests, rejoin, plan.keep, plan.drop])
        kinds = np.concatenate([
            np.full(requests.shape[0] + rejoin.shape[0], SYNC_REQUEST, np.uint32),
            np.full(plan.keep.shape[0], SYNC_KEEP, np.uint32),
            np.full(plan.drop.shape[0], SYNC_DROP, np.uint32)])
        self.round_asks = requests.shape[0] + rejoin.shape[0] > 0
        self._send_round(keys, kinds)

    def _requests(self, plan):
        """The keys this round asks owners for: due intents' keys not held (made PENDING
        here), and kept replicas whose owner forgot them (rejoin)."""
        requests = plan.requests
        if self.initial_requests is not None:
            requests = union_sorted(requests, self.initial_requests)
            self.initial_requests = None
        rejoin = self.rejoin.take()
        if rejoin.shape[0]:  # meanwhile moved here or dropped: not asked
            rejoin = rejoin[self.ctx.states(rejoin) == REPLICA]
            plan.keep = difference_sorted(plan.keep, rejoin)
            plan.drop = difference_sorted(plan.drop, rejoin)
        return self.replicas.make_pending(requests), rejoin

    def _choose_syncs(self, plan):
        """Which replicas this round syncs: every one in a full round (a wait_sync or a
        barrier waits, or REFRESH_INTERVAL passed), else only those a worker asked to
        refresh, besides the drops. (Every array here is sorted and distinct: the set
        algebra is one merge pass each, adapm.table._keyset.)"""
        now = time.monotonic()
        full = self.waiters.want_full_round or now - self.refreshed_at >= REFRESH_INTERVAL
        wanted = self.refresh.take()
        # A worker waits to read its own write through these replicas, so they come back
        # with the owner's value (KEEP), also those that no intent names any more: a drop
        # brings no value back, and a dropped replica may stay (updated since, or intended
        # again). They are dropped in a later round.
        refresh = intersect_sorted(plan.drop, wanted)
        plan.drop = difference_sorted(plan.drop, refresh)
        self.round_is_full = bool(full)
        if full:
            self.refreshed_at = now
            plan.keep = union_sorted(plan.keep, refresh)
        else:
            plan.keep = union_sorted(intersect_sorted(plan.keep, wanted), refresh)
        if self.replicas.moving_in and plan.drop.shape[0]:
            # kept until they arrive: a drop would not take their delta
            moving = self.replicas.moving_in.contains(plan.drop)
            plan.keep = union_sorted(plan.keep, plan.drop[moving])
            plan.drop = plan.drop[~moving]

    def _send_round(self, keys, kinds):
        sent = None if self.compiled_sender is None else \
            self.compiled_sender(self.round, keys, kinds)
        if sent is not None:  # the compiled plane took the deltas and sent the SYNCs
            dirty_keys, self.round_left = sent
            self.deferred_sets.carry(dirty_keys)
            self.progress(0)
            return
        segments = Segments.of(self.view, keys)
        deltas = self.replicas.deltas(keys, segments)
        dirty = segments.nonzero(deltas)
        self.deferred_sets.carry(keys[dirty])  # distinct: requests, keep, drop are disjoint
        flags = kinds | np.where(dirty, HAS_DELTA, 0).astype(np.uint32)
        versions = self.replicas.seen_version[keys.astype(np.intp)]
        self.round_left = keys.shape[0]
        for dest, idx in split_by(self.routes.route(keys)).items():
            if dest < 0:  # owned here by now: nothing to ask anybody
                self.round_left -= idx.shape[0]
                continue
            self.outbox.to_peer(dest, protocol.Sync(
                round=self.round, holder=self.ctx.node, keys=keys[idx],
                values=segments.take(deltas, idx[dirty[idx]]), counters=flags[idx],
                versions=versions[idx]))
        self.progress(0)

    def progress(self, answered, round_id=None):
        """`answered` keys of round `round_id` (default: the one in flight) are done."""
        if round_id is not None and round_id != self.round:
            return  # counted for a round that is already over: nothing left to count
        self.round_left -= answered
        if self.round_left > 0:
            return
        self.round_done = self.round
        self.ctx.count("rounds_done", 1)
        if self.round_is_full:  # workers read it: replicas held then are fresh as of it
            self.view.node_counter_set(NODE_SLOT["full_round_done"], self.round)
        for observe in self._observers:  # the metrics (adapm.node.control.metrics)
            observe(time.monotonic() - self.round_started_at, self.round_asks)
        if self.round_asks:
            self.reaction.observe(time.monotonic() - self.round_started_at)
            self.view.node_counter_set(NODE_SLOT["reaction_us"],
                                       int(self.reaction.seconds() * 1e6))
        deferred = self.deferred_sets.round_done()
        self.answer_waiters()
        for identity, msg in deferred:  # their keys' earlier deltas are applied now
            self.resume_set(identity, msg)

    # -- waits on rounds -----------------------------------------------------------

    def answer_waiters(self):
        """Answer the waits that the rounds done so far satisfy (adapm.node.data.waiters)."""
        self.waiters.answer(self.round_done, keys_moving_in=bool(self.replicas.moving_in))

    def _reply_synced(self, identity, request_id):
        self.outbox.to_identity(identity, protocol.Synced(request_id=request_id))

    def not_full_after_all(self):
        """A replica of the round in flight stays without a fresh value (its drop was
        answered, but it is kept): the round does not count as syncing every replica, and
        the waits for such a round wait for the next one, which syncs it."""
        if not self.round_is_full:
            return
        self.round_is_full = False
        self.waiters.not_before(self.round + 1)

    def wait_for_round(self, identity, request_id):
        """wait_sync: answer once a round that starts after now has completed."""
        self.waiters.wait_sync(identity, request_id, self.round + 1)

    def refresh_soon(self, identity, request_id, keys):
        """A worker's update of these keys was applied by their owners; answer once the
        replicas here have synced with a round that starts after now."""
        self.refresh.add(keys)
        self.waiters.wait_refresh(identity, request_id, self.round + 1)

    def release_after_round(self, generation):
        """A barrier: replicas fetch the values that every node flushed before it."""
        if self.replicas:
            self.waiters.wait_release(generation, self.round + 1)
        else:
            self._release_barrier(generation)

    # -- owner side ----------------------------------------------------------------

    def on_sync(self, identity, msg):
        keys = msg.keys
        self.ctx.check_keys(keys)
        holder = int(msg.holder)
        if not 0 <= holder < self.ctx.num_nodes:
            raise ProtocolError(f"sync for node {holder}")
        kinds = msg.counters & SYNC_KIND
        has_delta = (msg.counters & HAS_DELTA) != 0
        if (kinds > SYNC_DROP).any() or (msg.counters > (SYNC_KIND | HAS_DELTA)).any():
            raise ProtocolError("unknown sync flag")
        deltas = _Deltas(self.view, keys, has_delta, msg)
        if holder == self.ctx.node:  # the path led back: these keys were moved here meanwhile
            self._own_sync_returned(msg, keys, deltas)
            return
        owned = self.ctx.states(keys) == OWNED
        if not owned.all():  # moved on: pass those keys on along their path
            self._forward_sync(msg, holder, np.flatnonzero(~owned), deltas)
        idx = np.flatnonzero(owned)
        if idx.shape[0]:
            self._answer_sync(msg, holder, idx, kinds[idx], has_delta, deltas)

    def _answer_sync(self, msg, holder, idx, kinds, has_delta, deltas):
        """Answer the keys of a SYNC owned here: the manager decides for the requested
        ones, then one kernel call (serve_sync) applies every delta and reads each key's
        version and, where the answer carries it, its value, under the key's lock."""
        keys = msg.keys[idx]
        relocate = self._answer_requests(keys, kinds, holder)
        self._track_holders(keys, kinds, holder, forwarded=msg.hops > 0)
        wanted = np.where(kinds == SYNC_KEEP, SERVE_VALUE_IF_CHANGED,
                          SERVE_VALUE).astype(np.uint8)
        wanted[(kinds == SYNC_DROP) | relocate] = SERVE_NO_VALUE  # a MOVE takes the value
        n = keys.shape[0]
        owned, with_value = np.empty(n, dtype=np.uint8), np.empty(n, dtype=np.uint8)
        versions = np.empty(n, dtype=np.uint32)
        values = np.empty(self.view.total_length(keys), dtype=self.view.dtype)
        delta = has_delta[idx]
        used = self.view.serve_sync(keys, deltas.of(idx[delta]), delta.view(np.uint8),
                                    np.ascontiguousarray(msg.versions[idx]), wanted, owned,
                                    versions, with_value, values)
        if not owned.all():  # only this thread changes states: a broken invariant
            raise RuntimeError(f"{int((owned == 0).sum())} keys of a SYNC stopped being "
                               f"owned here while it was answered")
        if relocate.any():
            self.eviction.evict_and_move(keys[relocate], holder, msg.round,
                                         MOVE_FOR_ROUND)
        reply = ~relocate
        if reply.any():
            answer = np.where(with_value == 1, REPLY_VALUE, REPLY_CURRENT).astype(np.uint32)
            answer[kinds == SYNC_DROP] = REPLY_DROPPED
            self.outbox.to_peer(holder, protocol.SyncReply(
                round=msg.round, keys=keys[reply], values=values[:used],
                counters=answer[reply], versions=versions[reply]))

    def _answer_requests(self, keys, kinds, holder):
        """The manager's decision for each requested key; returns the mask to relocate."""
        relocate = np.zeros(keys.shape[0], dtype=bool)
        idx = np.flatnonzero(kinds == SYNC_REQUEST)
        if idx.shape[0] == 0:
            return relocate
        requested = keys[idx]
        relocate[idx] = self.manager.relocate_mask(
            self.intents.count[requested.astype(np.intp)] > 0,
            self.holders.others(requested, holder),
            self._rounds_since_arrival(requested),
            keys=requested)
        replicated = requested[~relocate[idx]]
        if replicated.shape[0]:
            self.holders.add(replicated, holder)
            self.ctx.count("replicas_made", replicated.shape[0])
        return relocate

    def arrived(self, keys):
        """These keys arrived here by relocation (the relocation part says so)."""
        self.arrived_round[keys.astype(np.intp)] = _stamp(self.round)

    def _rounds_since_arrival(self, keys):
        """Per key: rounds since it arrived here by relocation (-1: it never did). A key
        that came during the current round (stamped round + 1) counts 0."""
        arrived = self.arrived_round[keys.astype(np.intp)]
        # Counted modulo _STAMPS, as stamped: a key that came this round is 0 rounds old.
        since = (np.int64(_stamp(self.round)) - arrived.astype(np.int64)) % _STAMPS
        return np.where(arrived > 0, np.maximum(since - 1, 0), -1)

    def _track_holders(self, keys, kinds, holder, forwarded):
        """Who holds replicas of the keys owned here (for the next decisions)."""
        self.holders.discard(keys[kinds == SYNC_DROP], holder)
        if forwarded:  # replicas made by an earlier owner of these keys
            self.holders.add(keys[kinds == SYNC_KEEP], holder)

    def _forward_sync(self, msg, holder, idx, deltas):
        keys = msg.keys
        has_delta = (msg.counters & HAS_DELTA) != 0
        for dest, part in split_by(self.routes.route(keys[idx])).items():
            sub = idx[part]
            if dest < 0:
                continue
            self.outbox.to_peer(dest, protocol.forwarded(
                msg, MsgType.SYNC, holder=holder, keys=keys[sub],
                values=deltas.of(sub[has_delta[sub]]), counters=msg.counters[sub],
                versions=msg.versions[sub]))

    def _own_sync_returned(self, msg, keys, deltas):
        """Part of this node's own round came back: its keys are owned here now (their
        copies were absorbed on arrival), so their deltas are applied here."""
        has_delta = (msg.counters & HAS_DELTA) != 0
        dirty = np.flatnonzero(has_delta)
        unserved = np.zeros(keys.shape[0], dtype=bool)
        if dirty.shape[0]:
            misses = np.empty(dirty.shape[0], dtype=np.uint64)
            nmiss = self.view.update(keys[dirty], deltas.of(dirty), misses, True, True)
            unserved[dirty[misses[:nmiss].astype(np.intp)]] = True
        if unserved.any():  # not owned here after all: pass them on once more
            self._forward_sync(msg, self.ctx.node, np.flatnonzero(unserved), deltas)
        self.progress(keys.shape[0] - int(unserved.sum()), msg.round)

    # -- replica side --------------------------------------------------------------

    def on_sync_reply(self, identity, msg):
        keys = msg.keys
        self.ctx.check_keys(keys)
        answer = msg.counters
        if (answer > REPLY_CURRENT).any() or (answer == 0).any():
            raise ProtocolError("unknown sync reply flag")
        with_value = keys[answer == REPLY_VALUE]
        values = protocol.values_of(msg, self.view.dtype, self.view.total_length(with_value))
        if with_value.shape[0]:
            self.replicas.refreshed(with_value, values)
        seen = answer != REPLY_DROPPED
        self.replicas.seen_version[keys[seen].astype(np.intp)] = msg.versions[seen]
        # Up to date as of this round (a value, or "current"): workers waiting to read an
        # update the owner acknowledged before this round started need no refresh.
        self.view.stamp_fresh(np.ascontiguousarray(keys[seen]), int(msg.round) & 0xFFFFFFFF)
        dropped = keys[answer == REPLY_DROPPED]
        if dropped.shape[0]:
            self._release(dropped)
        self.progress(keys.shape[0], msg.round)

    def _release(self, keys):
        """Forget replicas that have no update newer than their last flush. A replica
        that an intent names again meanwhile stays, and is asked for anew."""
        again = self.intents.intended(keys)
        if again.any():
            self.rejoin.add(keys[again])
            keys = keys[~again]
            self.not_full_after_all()
        gone = self.replicas.release_clean(keys)
        if not gone.all():  # written meanwhile: its delta goes, and a value comes, next round
            self.refresh.add(keys[~gone])
            self.not_full_after_all()
        if gone.any():
            self.ctx.count("replicas_dropped", int(gone.sum()))


class _Deltas:
    """The deltas of a SYNC: values only for keys flagged HAS_DELTA, in key order."""

    def __init__(self, view, keys, has_delta, msg):
        dirty_keys = keys[has_delta]
        self.values = protocol.values_of(msg, view.dtype, view.total_length(dirty_keys))
        self.segments = Segments.of(view, dirty_keys)
        self.rank = np.cumsum(has_delta) - 1  # index among the dirty keys

    def of(self, idx):
        """Flat deltas of the keys at `idx` (all of which have a delta)."""
        return self.segments.take(self.values, self.rank[idx])
