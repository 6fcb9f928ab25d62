"""The worker's miss path: the keys of a call its node does not hold at the first look.

Each missed key goes to the node its node's location cache names (`_split`,
`_destinations`); a key that became usable here meanwhile is read or updated here
(`_local_retry`), one that moved on meanwhile goes to its new owner (`_regroup`). Each
node's keys go as messages of legal size (`_messages`), started through `Requests`; an
update sent away is tracked for read-your-writes.

Where a compiled miss path is given (`use_compiled`: adapm.client._miss_path,
src/_miss_path.pyx), one compiled call splits a call's misses by node and sends the
requests (pulls, pushes, sets, optimizer steps); for a pull the caller waits for
(`pull_now`) one more receives the replies into the caller's buffer. Whatever is not a
clean answer to the call is decided here, as before (a reply to another operation goes to
Requests.dispatch; a FAILED or malformed answer hands the call over to the Python path,
which fails it as it always did).

`Worker` owns one MissPath and hands it, per call, the keys and the number of misses the
table's kernel wrote into `buffer(n)`."""

import os
import time

import numpy as np

from adapm.client._miss_path import CompiledMissPath, Status
from adapm.client.requests import POLL_SLICE_MS, CountOp, Pending, PullOp
from adapm.common import config
from adapm.common.errors import ClusterError
from adapm.policy.ownership import route, split_by
from adapm.table.segments import Segments
from adapm.table.shared_table import PENDING, REPLICA, LockTimeout
from adapm.wire import libzmq, protocol
from adapm.wire.protocol import MsgType


def compiled_miss_path(view, sockets, node, rank, num_nodes, token):
    """A CompiledMissPath on this worker's sockets (node -> pyzmq DEALER), or None where
    it cannot serve: ADAPM_DATA_PLANE=python, a table of per-key lengths, no libzmq of
    pyzmq's to reach (adapm.wire.libzmq: nor on a machine other than little-endian Linux)."""
    functions = libzmq.functions()
    if config.data_plane() != "compiled" or functions is None or not view.uniform_length:
        return None
    return CompiledMissPath(functions, view, node, num_nodes, rank, token, sockets)


# What the compiled miss path's calls return (plain ints, compared in every wait).
_STARTED, _DONE, _IDLE, _FOREIGN = (int(Status.STARTED), int(Status.DONE), int(Status.IDLE),
                                    int(Status.FOREIGN))
STATE_CHANGE_TIMEOUT = 1.0  # seconds a key named here may stay unusable (a broken invariant)


class MissPath:
    """Where the keys a call missed go, and what to do with those that arrived meanwhile.

    `view`: the node's table view; `requests`: `Requests.start(node, msg, op, n)` starts a
    request; `consistency`: `track(op)` follows an update sent away; `count(name, n)`: a
    worker statistic; `lock_error(exc, what)`: the ClusterError of a lock held too long;
    `node`, `rank`, `num_nodes`: who this worker is, for routing and error messages."""

    def __init__(self, view, requests, consistency, count, lock_error, node, rank, num_nodes):
        self._view = view
        self._requests = requests
        self._consistency = consistency
        self._count = count
        self._lock_error = lock_error
        self.node = node
        self.rank = rank
        self.num_nodes = num_nodes
        self.dtype = view.dtype
        self.num_keys = view.num_keys
        self._misses = np.empty(1024, dtype=np.uint64)
        self._compiled = None  # a CompiledMissPath (use_compiled)
        self._compiled_bytes = (0, 0, 0)  # its byte counts already counted here
        self._order = np.empty(1024, dtype=np.uint64)  # its keys' order in messages

    def use_compiled(self, compiled):
        """Send misses (and receive the replies of pulls the caller waits for) through
        `compiled` (a CompiledMissPath on this worker's sockets, or None), where it can."""
        self._compiled = compiled

    def buffer(self, n):
        """The buffer the kernel writes a call's miss positions into (at least n long)."""
        if self._misses.shape[0] < n:
            self._misses = np.empty(max(n, 2 * self._misses.shape[0]), dtype=np.uint64)
        return self._misses

    # -- one per kind of call --------------------------------------------------------

    def pull(self, keys, out, nmiss):
        """The operation that fetches the `nmiss` missed keys from other nodes into `out`."""
        misses = self._misses
        op = PullOp(out)
        if nmiss:
            missed = misses[:nmiss].astype(np.intp)
            op.segments = Segments.of(self._view, keys)
            groups, arrived = self._split(keys, missed, "pull")
            if arrived.shape[0]:  # became local since the first look: read them here
                values = np.empty(op.segments.size(arrived), dtype=self.dtype)
                away, dests = self._local_retry(keys[arrived], values, "pull")
                done = np.setdiff1d(np.arange(arrived.shape[0]), away)
                op.segments.put(out, arrived[done],
                                Segments.of(self._view, keys[arrived]).take(values, done))
                groups += self._regroup(arrived, away, dests)
                arrived = arrived[done]
            for dest, part in self._messages(groups):
                request = self._requests.start(dest, protocol.Pull(keys=keys[part]),
                                               op, part.shape[0])
                op.parts[request] = part
            self._count("pulls_remote", nmiss - arrived.shape[0])
            self._count("pulls_local", arrived.shape[0])
        return op

    def pull_now(self, keys, out, nmiss):
        """Fetch the `nmiss` missed keys into `out` and wait: pull(...).wait(), in
        compiled code where it serves the call (a table of one row length, every missed
        key routed to another node)."""
        compiled = self._compiled
        if compiled is not None and out.ndim == 2 and out.flags.c_contiguous:
            started = compiled.pull(keys, out.view(np.uint8), self._misses, nmiss,
                                    self._requests.next_id)
            if started == _STARTED:
                self._requests.claim_ids(compiled.requests)
                self._count("pulls_remote", nmiss)
                self._wait_compiled(keys, out)
                return out
        return Pending(self._requests, self.pull(keys, out, nmiss)).wait()

    def _wait_compiled(self, keys, out):
        """Receive the compiled call's replies; hand Python what is its to decide."""
        compiled, requests = self._compiled, self._requests
        try:
            while True:
                status = compiled.wait(POLL_SLICE_MS)
                if status == _DONE:
                    return
                if status == _IDLE:
                    requests.check_cluster()  # a dead peer is a ClusterError, not a hang
                    continue
                frames = compiled.take_message()
                if status == _FOREIGN:
                    requests.dispatch(frames)
                    continue
                op = self._take_over(keys, out)  # HANDOFF: decided as it always was
                requests.dispatch(frames)
                requests.wait(op)
                return
        except BaseException:
            compiled.abandon()  # its late replies are dropped, as a failed op's are
            raise
        finally:
            self._count_compiled_bytes()

    def _take_over(self, keys, out):
        """The compiled call's unanswered requests, waited for by a PullOp from here on."""
        op = PullOp(out, Segments.of(self._view, keys))
        for request_id, _node, positions, left in self._compiled.take_call():
            op.parts[request_id] = np.array(positions, dtype=np.intp)
            self._requests.adopt(request_id, op, left)
        return op

    def _send_compiled(self, op, keys, rows, nmiss, mtype, params=None):
        """Send an update's `nmiss` missed keys (rows: one per key) in one compiled call,
        each message a request of `op` (its keys in op.keys, in message order, as the
        Python path sends them); False where the compiled path declines (nothing sent)."""
        compiled, requests = self._compiled, self._requests
        if not rows.flags.c_contiguous:
            return False
        if self._order.shape[0] < nmiss:
            self._order = np.empty(max(nmiss, 2 * self._order.shape[0]), dtype=np.uint64)
        first = requests.next_id
        sent = compiled.send_update(
            keys, rows.view(np.uint8), self._misses, nmiss, int(mtype),
            None if params is None else params.view(np.uint8), first, self._order)
        self._count_compiled_bytes()
        if not sent:
            return False
        requests.claim_ids(sent)
        counts = np.empty(sent, dtype=np.uint64)
        compiled.requests_of(counts)
        for i, n in enumerate(counts.tolist()):
            requests.adopt(first + i, op, n)
        op.keys = keys[self._order[:nmiss].astype(np.intp)]
        return True

    def _count_compiled_bytes(self):
        compiled, (sent, to_node, received) = self._compiled, self._compiled_bytes
        self._count("bytes_sent", compiled.bytes_sent - sent)
        self._count("bytes_to_node", compiled.bytes_to_node - to_node)
        self._count("bytes_received", compiled.bytes_received - received)
        self._compiled_bytes = (compiled.bytes_sent, compiled.bytes_to_node,
                                compiled.bytes_received)

    def update(self, keys, values, nmiss, additive):
        """The operation that sends the `nmiss` missed keys' push (`additive`) or set to
        their owners; tracked for read-your-writes."""
        op = CountOp()
        if not nmiss:
            return op
        op_name = "push" if additive else "set"
        kind = "pushes" if additive else "sets"
        mtype = MsgType.PUSH if additive else MsgType.SET
        if self._compiled is not None and \
                self._send_compiled(op, keys, values.reshape(keys.shape[0], -1), nmiss, mtype):
            self._count(f"{kind}_remote", nmiss)
            self._consistency.track(op)
            return op
        missed = self._misses[:nmiss].astype(np.intp)
        segments = Segments.of(self._view, keys)
        groups, arrived = self._split(keys, missed, op_name)
        if arrived.shape[0]:  # became local since the first look: update them here
            away, dests = self._local_retry(keys[arrived], segments.take(values, arrived),
                                            op_name, additive)
            groups += self._regroup(arrived, away, dests)
            arrived = np.delete(arrived, away)
        remote = []
        for dest, part in self._messages(groups):
            remote.append(keys[part])
            self._requests.start(dest, protocol.BY_TYPE[mtype](
                keys=keys[part], values=segments.take(values, part)), op,
                                 part.shape[0])
        if groups:
            op.keys = np.concatenate(remote)
        self._count(f"{kind}_remote", nmiss - arrived.shape[0])
        self._count(f"{kind}_local", arrived.shape[0])
        self._consistency.track(op)
        return op

    def apply(self, keys, summed, nmiss, params):
        """Send the `nmiss` missed distinct keys with their summed gradients to their
        owners; a key that became usable here meanwhile takes its step here."""
        if self._compiled is not None:
            op = CountOp()
            if self._send_compiled(op, keys, summed, nmiss, MsgType.APPLY, params):
                self._count("pushes_remote", nmiss)
                self._consistency.track(op)
                return
        missed = self._misses[:nmiss].astype(np.intp)
        groups, arrived = self._split(keys, missed, "apply")
        deadline = time.monotonic() + STATE_CHANGE_TIMEOUT
        while arrived.shape[0]:  # distinct keys: no step is taken twice
            sub = keys[arrived]
            n = sub.shape[0]
            misses = np.empty(n, dtype=np.uint64)
            again = np.empty((n, summed.shape[1]), dtype=self.dtype)
            try:
                _, nmiss = self._view.apply_optimizer(
                    sub, np.arange(n, dtype=np.int64), np.ascontiguousarray(summed[arrived]),
                    params, np.empty(n, dtype=np.uint64), again, misses)
            except LockTimeout as exc:
                raise self._lock_error(exc, "apply_gradients") from None
            self._count("pushes_local", n - nmiss)
            still = arrived[misses[:nmiss].astype(np.intp)]
            more, arrived = self._split(keys, still, "apply")
            groups += more
            if arrived.shape[0]:
                if time.monotonic() > deadline:
                    raise ClusterError(f"node {self.node}, worker {self.rank}: "
                                       f"apply_gradients of keys {int(keys[arrived].min())}.."
                                       f"{int(keys[arrived].max())}: no node holds them")
                os.sched_yield()
        op = CountOp()
        remote = []
        for dest, part in self._messages(groups):
            remote.append(keys[part])
            self._requests.start(dest, protocol.Apply(
                keys=keys[part], values=np.ascontiguousarray(summed[part]), params=params),
                op, part.shape[0])
        if remote:
            op.keys = np.concatenate(remote)
            self._count("pushes_remote", op.keys.shape[0])
            self._consistency.track(op)

    # -- where the keys go -------------------------------------------------------------

    def _split(self, keys, missed, what):
        """Where to send the keys at indices `missed` (not usable here at the first look):
        ([(node, indices)], indices of keys that became usable here in the meantime; their
        location cache already names this node)."""
        dest = self._destinations(keys[missed], what)
        arrived = missed[dest < 0]
        groups = [(node, missed[idx]) for node, idx in split_by(dest).items() if node >= 0]
        return groups, arrived

    def _local_retry(self, keys, values, what, additive=True):
        """Read (pull, into `values`) or update keys that just became usable here; a key
        whose state change is still under way is tried again. Returns (positions,
        destinations) of keys that moved on to another node meanwhile: the caller sends
        those there, like any miss. A key that stays unusable although the location
        cache names this node is a broken invariant."""
        segments = Segments.of(self._view, keys)
        live = np.arange(keys.shape[0])  # positions still to be served here
        away, dests = [], []
        deadline = time.monotonic() + STATE_CHANGE_TIMEOUT
        while True:
            sub = keys[live]
            misses = np.empty(sub.shape[0], dtype=np.uint64)
            if what == "pull":
                buf = np.empty(segments.size(live), dtype=self.dtype)
                nmiss = self._view.pull(sub, buf, misses)
            else:  # only the keys not updated yet: an update must not apply twice
                buf = segments.take(values, live)
                nmiss = self._view.update(sub, buf, misses, additive, not additive)
            missed = misses[:nmiss].astype(np.intp)
            if what == "pull":
                done = np.ones(sub.shape[0], dtype=bool)
                done[missed] = False
                segments.put(values, live[done],
                              Segments.of(self._view, sub).take(buf, np.flatnonzero(done)))
            live = live[missed]
            if live.shape[0]:
                dest = self._destinations(keys[live], what)
                moved = dest >= 0
                away.append(live[moved])
                dests.append(dest[moved])
                live = live[~moved]
            if live.shape[0] == 0:
                break
            if time.monotonic() > deadline:
                bad = keys[live]
                raise ClusterError(f"node {self.node}, worker {self.rank}: {what} of keys "
                                   f"{int(bad.min())}..{int(bad.max())}: no node holds them")
            # A state change under way completes in microseconds: give the core to the
            # node server making it instead of sleeping a scheduler tick.
            os.sched_yield()
        if not away:
            return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.int32)
        return np.concatenate(away), np.concatenate(dests)

    def _chunks(self, idx):
        """`idx` in parts of at most num_keys: no message is larger than the largest legal
        one, which nodes enforce (protocol.max_frame_bytes); only calls with many
        repeated keys are split."""
        step = min(self.num_keys, protocol.MAX_KEYS_PER_MESSAGE)
        return [idx] if idx.shape[0] <= step else \
            [idx[i:i + step] for i in range(0, idx.shape[0], step)]

    def _messages(self, groups):
        """[(node, indices)] with each group split into messages of legal size."""
        return [(dest, chunk) for dest, part in groups for chunk in self._chunks(part)]

    def _destinations(self, keys, what):
        """The node each missed key is sent to (-1: usable here by now): its cached
        owner, but for a set of a key this node holds as a replica, this node's server,
        which overwrites the replica and passes the set on to the owner."""
        dest = route(self._view, keys, self.node, self.num_nodes)
        if what == "set":
            states = np.empty(keys.shape[0], dtype=np.uint8)
            self._view.states_of(keys, states)
            dest[(states == REPLICA) | (states == PENDING)] = self.node
        return dest

    @staticmethod
    def _regroup(arrived, away, dests):
        """[(node, positions in the batch)] for the keys of `arrived` (at `away`) that
        moved on to `dests` while they were retried here."""
        return [(node, arrived[away[idx]]) for node, idx in split_by(dests).items()]
