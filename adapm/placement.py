"""Carrying out the manager's decisions: sync rounds, replicas, relocations on request.

A part of the node server (NodeServer inherits it); the decisions themselves are the
manager's (adapm.manager), the byte layouts the protocol's (adapm.protocol).

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

import numpy as np

from adapm import protocol
from adapm.errors import ProtocolError
from adapm.manager import Manager, ReactionTime
from adapm.ownership import split_by
from adapm.protocol import (
    HAS_DELTA,
    MOVE_FOR_ROUND,
    REPLY_CURRENT,
    REPLY_DROPPED,
    REPLY_VALUE,
    SYNC_DROP,
    SYNC_KEEP,
    SYNC_KIND,
    SYNC_REQUEST,
    Message,
    MsgType,
)
from adapm.segments import Segments, element_index
from adapm.table import ABSENT, KEEP_OWNER, NODE_SLOT, OWNED, PENDING, REPLICA, WORKER_SLOT
from adapm.waiters import RoundWaiters

_NO_KEYS = np.empty(0, dtype=np.uint64)
MIN_ROUND_INTERVAL = 0.001  # at most about a thousand rounds per second
# Replicas are synced (delta up, value down when behind) at most this often, unless a
# wait_sync or a barrier needs a full exchange; rounds in between carry only new requests
# and drops. Hot replicas are rewritten all the time, and syncing them faster than this
# buys little staleness for a lot of traffic: on benchmark B5 (MF), 5 ms sent 40 MB per
# epoch, 20 ms 31 MB at the same speed and test error, 50 ms 24 MB but 0.6% worse error.
REFRESH_INTERVAL = 0.02


class Placement:
    """Mixin of NodeServer: needs view, table, spec, node, intents, ownership, _route,
    _to_peer, _to_identity, _count, _owners_changed."""

    def _init_placement(self):
        num_keys = self.spec.num_keys
        self.manager = Manager(self.spec.mode, self.workers, self.intents)
        self.synced = np.zeros(num_keys, dtype=np.uint64)  # "value at last sync" slots
        self.seen_version = np.zeros(num_keys, dtype=np.uint32)  # owner's, at last sync
        self.arrived_round = np.zeros(num_keys, dtype=np.int64)  # 0: never moved here
        self.rejoin = set()          # replicas whose drop was acknowledged but that are
                                     # intended again: ask the owner for them anew
        self.replica_keys = set()    # keys held here as REPLICA or PENDING
        self.pending = set()         # of those, requested and not answered yet
        self.moving_in = set()       # keys a localize asked to move here, not arrived yet:
                                     # no delta of theirs is sent after that request, so
                                     # the owner applies every earlier one before it moves
                                     # the key (FIFO along the key's path)
        self.replicas_of = {}        # owner side: key -> nodes holding a replica
        self.round = 0               # last round started
        self.round_done = 0          # last round completed (all earlier ones too)
        self.round_left = 0          # keys of the round in flight still unanswered
        self.round_started_at = 0.0
        self.round_is_full = False   # the round in flight syncs every replica
        self.round_asks = False      # ... asks owners for keys (its time is a reaction)
        self.reaction = ReactionTime()
        self.round_deltas = _NO_KEYS  # keys whose delta the round in flight carries
        self.deferred_sets = []      # (identity, SET) of local workers, waiting for that
        self.refreshed_at = 0.0      # when a round last synced every replica
        self.waiters = RoundWaiters(self._reply_synced, self._release_now)
        self.refresh_keys = set()    # replicas to sync with the next round in any case
        self.initial_requests = None

    def _replicate_everything(self):
        """replicate_all: every key this node does not own becomes a replica."""
        keys = np.arange(self.spec.num_keys, dtype=np.uint64)
        self.initial_requests = keys[keys % np.uint64(self.spec.num_nodes) != self.node]

    # -- scheduling ----------------------------------------------------------------

    @property
    def round_in_flight(self):
        return self.round > self.round_done

    def placement_busy(self):
        """Whether rounds should run now (the server then polls without sleeping)."""
        return bool(self.replica_keys or self.waiters or
                    self.rejoin or
                    self.initial_requests is not None or
                    (self.manager.acts_on_intents and len(self.intents)))

    def maybe_start_round(self):
        if self._failed is not None or self.round_in_flight or self.addresses is None:
            return
        now = time.monotonic()
        since = now - self.round_started_at
        if not self.placement_busy():
            return
        due = self._intents_due()
        # Keys that intents want now do not wait for the round rate limit: a round in
        # flight is the only thing they wait for (reaction time, B8).
        if since < MIN_ROUND_INTERVAL and not due:
            return
        urgent = (due or self.waiters or self.rejoin or self.initial_requests is not None)
        if not urgent and since < REFRESH_INTERVAL:
            return
        self.round_started_at = now
        self._start_round()

    def _intents_due(self):
        """Whether an intent of a local worker comes due within its action window."""
        if not self.manager.acts_on_intents:
            return False
        clocks = self.view.counters()[:, WORKER_SLOT["clock"]]
        windows = self.manager.clocks.windows()
        return any(self.intents.next_start(w) < int(clocks[w]) + int(windows[w])
                   for w in range(self.workers))

    def _start_round(self):
        self.round += 1
        self._count("rounds_started", 1)
        clocks = self.view.counters()[:, WORKER_SLOT["clock"]]
        self.intents.expire(clocks)
        replicas = np.fromiter(sorted(self.replica_keys - self.pending), dtype=np.uint64)
        plan = self.manager.plan(clocks, self._held, replicas)
        requests = plan.requests
        if self.rejoin:  # kept replicas the owner has forgotten: requested like new keys
            rejoin = np.fromiter(sorted(self.rejoin), dtype=np.uint64)
            self.rejoin = set()
            states = np.empty(rejoin.shape[0], dtype=np.uint8)
            self.view.states_of(rejoin, states)
            rejoin = rejoin[states == REPLICA]  # meanwhile moved here or dropped: not asked
            plan.keep = np.setdiff1d(plan.keep, rejoin)
            plan.drop = np.setdiff1d(plan.drop, rejoin)
        else:
            rejoin = np.empty(0, dtype=np.uint64)
        if self.initial_requests is not None:
            requests = np.union1d(requests, self.initial_requests)
            self.initial_requests = None
        if plan.late:
            self._count("late_intents", plan.late)
        now = time.monotonic()
        full = (self.waiters.want_full_round or now - self.refreshed_at >= REFRESH_INTERVAL)
        wanted = np.fromiter(self.refresh_keys, dtype=np.uint64, count=len(self.refresh_keys))
        self.refresh_keys = set()
        # A worker waits to read its own write through these replicas, so they come back
        # with the owner's value (KEEP), also those that no intent names any more: a drop
        # brings no value back, and a dropped replica may stay (updated since, or intended
        # again). They are dropped in a later round.
        refresh = np.intersect1d(plan.drop, wanted)
        plan.drop = np.setdiff1d(plan.drop, refresh)
        self.round_is_full = bool(full)
        if full:
            self.refreshed_at = now
            plan.keep = np.union1d(plan.keep, refresh)
        else:  # new requests, drops, and the replicas a worker asked to refresh
            plan.keep = np.union1d(np.intersect1d(plan.keep, wanted), refresh)
        moving_in = np.fromiter(self.moving_in, dtype=np.uint64, count=len(self.moving_in))
        if moving_in.shape[0]:  # kept until they arrive: a drop would not take the delta
            moving = np.isin(plan.drop, moving_in)
            plan.keep = np.union1d(plan.keep, plan.drop[moving])
            plan.drop = plan.drop[~moving]
        requests = np.concatenate([self._make_pending(requests), rejoin])
        self.round_asks = requests.shape[0] > 0
        keys = np.concatenate([requests, plan.keep, plan.drop])
        kinds = np.concatenate([np.full(requests.shape[0], SYNC_REQUEST, np.uint32),
                                np.full(plan.keep.shape[0], SYNC_KEEP, np.uint32),
                                np.full(plan.drop.shape[0], SYNC_DROP, np.uint32)])
        segments = Segments.of(self.view, keys)
        deltas = self._take_deltas(keys, segments, moving_in)
        dirty = segments.nonzero(deltas)
        self.round_deltas = keys[dirty]  # distinct: requests, keep and drop are disjoint
        flags = kinds | np.where(dirty, HAS_DELTA, 0).astype(np.uint32)
        versions = self.seen_version[keys.astype(np.intp)]
        self.round_left = keys.shape[0]
        for dest, idx in split_by(self._route(keys)).items():
            if dest < 0:  # owned here by now: nothing to ask anybody
                self.round_left -= idx.shape[0]
                continue
            self._to_peer(dest, Message(
                MsgType.SYNC, request_id=self.round, arg0=self.node, keys=keys[idx],
                values=segments.take(deltas, idx[dirty[idx]]), counters=flags[idx],
                versions=versions[idx]))
        self._round_progress(0)

    def _take_deltas(self, keys, segments, moving_in):
        """The keys' deltas (value - value at last sync; zero where not a replica), flat.
        Keys that a localize asked to move here (`moving_in`) give none: their delta stays
        in the copy and joins the key when it arrives (absorb_copies), since a delta sent
        after the move request could reach the owner after the key left it."""
        deltas = np.empty(self.view.total_length(keys), dtype=self.view.dtype)
        if moving_in.shape[0] == 0:
            self.view.replica_deltas(keys, self.synced[keys.astype(np.intp)], deltas)
            return deltas
        deltas[:] = 0
        take = np.flatnonzero(~np.isin(keys, moving_in))
        if take.shape[0]:
            part = np.empty(segments.size(take), dtype=self.view.dtype)
            self.view.replica_deltas(keys[take], self.synced[keys[take].astype(np.intp)], part)
            segments.put(deltas, take, part)
        return deltas

    def _held(self, keys):
        """Mask: keys this node holds (owned, replica) or has requested."""
        states = np.empty(keys.shape[0], dtype=np.uint8)
        self.view.states_of(keys, states)
        return states != ABSENT

    def _make_pending(self, keys):
        """Mark requested keys PENDING with zeroed slots; returns those that were ABSENT."""
        if keys.shape[0] == 0:
            return keys
        keys = keys[~self._held(keys)]
        if keys.shape[0] == 0:
            return keys
        lengths = self.view.directory_array()["length"][keys].astype(np.uint64)
        offsets = self.table.allocator.allocate(lengths)
        synced = self.table.allocator.allocate(lengths)
        self.view.arena_array()[element_index(synced, lengths)] = 0
        zeros = np.zeros(int(lengths.sum()), dtype=self.view.dtype)
        admitted = np.zeros(keys.shape[0], dtype=np.uint8)
        # The location cache stays: this node's misses and requests still go to the owner.
        self.view.admit(keys, zeros, offsets, PENDING, KEEP_OWNER, admitted)
        self.synced[keys.astype(np.intp)] = synced
        self.replica_keys.update(keys.tolist())
        self.pending.update(keys.tolist())
        return keys

    def _round_progress(self, answered, round_id=None):
        if round_id is not None and round_id != self.round:
            return  # counted for a round that is already over: nothing left to count
        self.round_left -= answered
        if self.round_left > 0:
            return
        self.round_done = self.round
        self._count("rounds_done", 1)
        if self.round_is_full:  # workers read it: replicas held then are fresh as of it
            self.view.node_counter_set(NODE_SLOT["full_round_done"], self.round)
        if self.round_asks:
            self.reaction.observe(time.monotonic() - self.round_started_at)
            self.view.node_counter_set(NODE_SLOT["reaction_us"],
                                       int(self.reaction.seconds() * 1e6))
        self.round_deltas = _NO_KEYS
        self.answer_waiters()
        deferred, self.deferred_sets = self.deferred_sets, []
        for identity, msg in deferred:  # their keys' earlier deltas are applied now
            self._on_set(identity, msg)

    def answer_waiters(self):
        """Answer the waits that the rounds done so far satisfy (adapm.waiters)."""
        self.waiters.answer(self.round_done, keys_moving_in=bool(self.moving_in))

    def _reply_synced(self, identity, request_id):
        self._to_identity(identity, Message(MsgType.SYNCED, request_id=request_id))

    def defer_set(self, identity, msg, keys):
        """A local worker's set of replicas whose delta (updates made here before the
        set) is on its way in the round in flight: the set waits for the round, so that
        the owner applies the delta first (the two could take different paths)."""
        if self.round_deltas.shape[0] == 0 or not self.round_in_flight:
            return False
        if not np.isin(keys, self.round_deltas).any():
            return False
        self.deferred_sets.append((identity, msg))
        return True

    def _not_full_after_all(self):
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
        self.refresh_keys.update(keys.tolist())
        self.waiters.wait_refresh(identity, request_id, self.round + 1)

    def release_after_round(self, generation):
        """A barrier: replicas fetch the values that every node flushed before it."""
        if self.replica_keys:
            self.waiters.wait_release(generation, self.round + 1)
        else:
            self._release_now(generation)

    # -- owner side ----------------------------------------------------------------

    def _on_sync(self, identity, msg):
        keys = msg.keys
        _check_key_range(keys, self.spec.num_keys)
        holder = int(msg.arg0)
        if not 0 <= holder < self.spec.num_nodes:
            raise ProtocolError(f"sync for node {holder}")
        kinds = msg.counters & SYNC_KIND
        has_delta = (msg.counters & HAS_DELTA) != 0
        if (kinds > SYNC_DROP).any() or (msg.counters > (SYNC_KIND | HAS_DELTA)).any():
            raise ProtocolError("unknown sync flag")
        deltas = _Deltas(self.view, keys, has_delta, msg)
        if holder == self.node:  # the path led back: these keys were moved here meanwhile
            self._own_sync_returned(msg, keys, deltas)
            return
        states = np.empty(keys.shape[0], dtype=np.uint8)
        self.view.states_of(keys, states)
        owned = states == OWNED
        if not owned.all():  # moved on: pass those keys on along their path
            self._forward_sync(msg, holder, np.flatnonzero(~owned), deltas)
        idx = np.flatnonzero(owned)
        if idx.shape[0] == 0:
            return
        dirty = idx[has_delta[idx]]
        if dirty.shape[0]:
            misses = np.empty(dirty.shape[0], dtype=np.uint64)
            self.view.update(keys[dirty], deltas.of(dirty), misses, True, True)  # owned
        keys, kinds, seen = keys[idx], kinds[idx], msg.versions[idx]
        versions = np.empty(keys.shape[0], dtype=np.uint32)
        self.view.versions_of(keys, versions)  # before the values: never newer than them
        expected = seen + has_delta[idx].astype(np.uint32)
        answer = np.where(versions == expected, REPLY_CURRENT, REPLY_VALUE).astype(np.uint32)
        answer[kinds == SYNC_DROP] = REPLY_DROPPED
        answer[kinds == SYNC_REQUEST] = REPLY_VALUE
        relocate = self._answer_requests(keys, kinds, holder)
        self._track_holders(keys, kinds, holder, forwarded=msg.hops > 0)
        if relocate.any():
            self._evict_and_move(keys[relocate], holder, msg.request_id, MOVE_FOR_ROUND)
        reply = ~relocate
        if reply.any():
            rkeys, ranswer = keys[reply], answer[reply]
            with_value = rkeys[ranswer == REPLY_VALUE]
            values = np.empty(self.view.total_length(with_value), dtype=self.view.dtype)
            self.view.pull(with_value, values, np.empty(with_value.shape[0], np.uint64))
            self._to_peer(holder, Message(MsgType.SYNC_REPLY, request_id=msg.request_id,
                                          keys=rkeys, values=values, counters=ranswer,
                                          versions=versions[reply]))

    def _answer_requests(self, keys, kinds, holder):
        """The manager's decision for each requested key; returns the mask to relocate."""
        relocate = np.zeros(keys.shape[0], dtype=bool)
        idx = np.flatnonzero(kinds == SYNC_REQUEST)
        if idx.shape[0] == 0:
            return relocate
        requested = keys[idx].astype(np.intp)
        others = np.fromiter(
            (bool(h) and bool(h - {holder}) for h in map(self.replicas_of.get,
                                                         requested.tolist())),
            dtype=bool, count=requested.shape[0])
        arrived = self.arrived_round[requested]
        # arrived_round is round + 1 for a key that came during the current round: 0 then
        since = np.where(arrived > 0, np.maximum(self.round - arrived, 0), -1)
        relocate[idx] = self.manager.relocate_mask(self.intents.count[requested] > 0, others,
                                                   since)
        replicated = requested[~relocate[idx]].tolist()
        for key in replicated:
            self.replicas_of.setdefault(key, set()).add(holder)
        if replicated:
            self._count("replicas_made", len(replicated))
        return relocate

    def _track_holders(self, keys, kinds, holder, forwarded):
        """Who holds replicas of the keys owned here (for the next decisions)."""
        for key in keys[kinds == SYNC_DROP].tolist():
            holders = self.replicas_of.get(key)
            if holders:
                holders.discard(holder)
        if forwarded:  # replicas made by an earlier owner of these keys
            for key in keys[kinds == SYNC_KEEP].tolist():
                self.replicas_of.setdefault(key, set()).add(holder)

    def _forward_sync(self, msg, holder, idx, deltas):
        keys = msg.keys
        has_delta = (msg.counters & HAS_DELTA) != 0
        for dest, part in split_by(self._route(keys[idx])).items():
            sub = idx[part]
            if dest < 0:
                continue
            self._to_peer(dest, protocol.forwarded(
                msg, MsgType.SYNC, arg0=holder, keys=keys[sub],
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
            self._forward_sync(msg, self.node, np.flatnonzero(unserved), deltas)
        self._round_progress(keys.shape[0] - int(unserved.sum()), msg.request_id)

    # -- replica side --------------------------------------------------------------

    def _on_sync_reply(self, identity, msg):
        keys = msg.keys
        _check_key_range(keys, self.spec.num_keys)
        answer = msg.counters
        if (answer > REPLY_CURRENT).any() or (answer == 0).any():
            raise ProtocolError("unknown sync reply flag")
        with_value = keys[answer == REPLY_VALUE]
        values = protocol.values_of(msg, self.view.dtype, self.view.total_length(with_value))
        if with_value.shape[0]:
            self.view.replica_refresh(with_value, self.synced[with_value.astype(np.intp)],
                                      np.ascontiguousarray(values))
            if self.pending:
                self.pending.difference_update(with_value.tolist())
        seen = answer != REPLY_DROPPED
        self.seen_version[keys[seen].astype(np.intp)] = msg.versions[seen]
        # Up to date as of this round (a value, or "current"): workers waiting to read an
        # update the owner acknowledged before this round started need no refresh.
        self.view.stamp_fresh(np.ascontiguousarray(keys[seen]), int(msg.request_id) & 0xFFFFFFFF)
        dropped = keys[answer == REPLY_DROPPED]
        if dropped.shape[0]:
            self._release_replicas(dropped)
        self._round_progress(keys.shape[0], msg.request_id)

    def _release_replicas(self, keys):
        """Forget replicas that have no update newer than their last flush. A replica
        that an intent names again meanwhile stays, and is asked for anew."""
        again = self.intents.intended(keys)
        if again.any():
            self.rejoin.update(keys[again].tolist())
            keys = keys[~again]
            self._not_full_after_all()
        offsets = np.zeros(keys.shape[0], dtype=np.uint64)
        released = np.zeros(keys.shape[0], dtype=np.uint8)
        synced = self.synced[keys.astype(np.intp)]
        self.view.release_clean(keys, synced, offsets, released)
        gone = released.astype(bool)
        if not gone.all():  # written meanwhile: its delta goes, and a value comes, next round
            self.refresh_keys.update(keys[~gone].tolist())
            self._not_full_after_all()
        if gone.any():
            lengths = self.view.directory_array()["length"][keys[gone]].astype(np.uint64)
            self.table.allocator.free(offsets[gone], lengths)
            self.table.allocator.free(synced[gone], lengths)
            self.replica_keys.difference_update(keys[gone].tolist())
            self._count("replicas_dropped", int(gone.sum()))

    def overwrite_copies(self, keys, values):
        """A local worker sets keys this node holds as replicas (the set itself goes on to
        the owner): the copies take the set value and forget their pending delta, which
        holds updates made here before the set (guarantee 3: a set overwrites them). The
        delta of updates made after it follows the set to the owner on this node's path."""
        self.view.replica_overwrite(keys, self.synced[keys.astype(np.intp)],
                                    np.ascontiguousarray(values, dtype=self.view.dtype))

    def absorb_copies(self, keys, values):
        """Keys arriving as owned (a MOVE) that this node holds as REPLICA or PENDING:
        add the updates made here since the last flush to the arriving values, and free
        the copies' slots, so that the keys can be installed as owned.

        Each copy is released (made ABSENT, under its lock) before its local updates are
        read: from then on no worker writes its slot (a worker's push misses and goes to
        the owner, which forwards it here), so no update can land between the reading and
        the release and be lost."""
        states = np.empty(keys.shape[0], dtype=np.uint8)
        self.view.states_of(keys, states)
        mine = (states == REPLICA) | (states == PENDING)
        if not mine.any():
            return values
        values = np.array(values, dtype=self.view.dtype)
        segments = Segments.of(self.view, keys)
        arena = self.view.arena_array()
        lengths_of = self.view.directory_array()["length"]
        for state in (PENDING, REPLICA):
            idx = np.flatnonzero(states == state)
            if idx.shape[0] == 0:
                continue
            held = keys[idx]
            offsets = np.zeros(held.shape[0], dtype=np.uint64)
            released = np.zeros(held.shape[0], dtype=np.uint8)
            self.view.release(held, state, offsets, released)
            gone = released.astype(bool)
            held, idx, offsets = held[gone], idx[gone], offsets[gone]
            synced = self.synced[held.astype(np.intp)]
            lengths = lengths_of[held].astype(np.uint64)
            if state == REPLICA:  # a PENDING copy was never written: nothing to add
                local = arena[element_index(offsets, lengths)] - \
                    arena[element_index(synced, lengths)]
                segments.put(values, idx, segments.take(values, idx) + local)
            self.table.allocator.free(offsets, lengths)
            self.table.allocator.free(synced, lengths)
            self.pending.difference_update(held.tolist())
            self.replica_keys.difference_update(held.tolist())
        return values


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


def _check_key_range(keys, num_keys):
    if keys.shape[0] and int(keys.max()) >= num_keys:
        raise ProtocolError(f"key {int(keys.max())} out of range [0, {num_keys})")

