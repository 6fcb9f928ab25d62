"""The worker client: what a training script holds (adapm.Worker).

Reads and writes of keys the node holds go straight to the node's shared-memory table
(Cython hot path): no message, no copy through a server. Keys the node does not hold
are batched per destination (the node's location cache says where each key lives), one
message each; replies come straight back from whichever node owns the keys. Control
calls (barrier, wait_sync, intents, localize, finalize) are messages to the worker's own
node server.

The client is three parts, each with one concern:
- `Worker` (here): the public API, validation and the local path into the table;
- `adapm.client.miss_path.MissPath`: the keys the node does not hold (where they go, and
  what changed meanwhile);
- `adapm.client.requests.Requests`: requests in flight and their replies, over the sockets;
  every wait also watches the cluster's health (`ClusterHealth`), so a dead peer turns
  into ClusterError within seconds instead of a hang;
- `adapm.client.consistency.ReadYourWrites`: which earlier updates a call must wait for;
- `adapm.client.saving.Saving`: the worker's part of a checkpoint save."""

import logging
import os
import time

import numpy as np

from adapm.client import bags as bag_kernels
from adapm.client.consistency import ReadYourWrites
from adapm.client.miss_path import MissPath, compiled_miss_path
from adapm.client.requests import ClusterHealth, CountOp, Pending, Requests, Sockets
from adapm.client.sampling import Sampler
from adapm.client.saving import Saving
from adapm.common import config
from adapm.common.errors import ClosedError, ClusterError
from adapm.table.keys import as_gradients, as_keys, as_values, pull_buffer
from adapm.table.optimizers import FirstTouchCheck, SparseOptimizer, read_params
from adapm.table.shared_table import (
    NODE_SLOT,
    SERVER_ASLEEP,
    SERVER_POLLING,
    WORKER_SLOT,
    LockTimeout,
    SharedTable,
)
from adapm.table.stats import WORKER_STATS, node_stats
from adapm.wire import protocol
from adapm.wire.protocol import MsgType, worker_identity
from adapm.wire.security import client_keys

URGENT_CLOCKS = 2           # an intent this close to the worker's clock wakes a polling server


class Worker:
    """One worker process's connection to its cluster. Create with adapm.worker()."""

    def __init__(self, env):
        self._closed = True
        self._requests = None
        self.rank = env.rank
        self.local_rank = env.local_rank
        self.node = env.node
        self.num_nodes = env.num_nodes
        self.workers_per_node = env.workers_per_node
        self.num_workers = env.num_nodes * env.workers_per_node
        self._table = SharedTable.attach(env.table)
        self._view = self._table.view
        self._view.lock_timeout_ns = int(
            config.env_float(config.ENV_LOCK_TIMEOUT, config.DEFAULT_LOCK_TIMEOUT) * 1e9)
        self.num_keys = self._view.num_keys
        self.dtype = self._view.dtype
        self._health = ClusterHealth(
            self._view,
            config.env_float(config.ENV_HEARTBEAT_TIMEOUT, config.DEFAULT_HEARTBEAT_TIMEOUT),
            f"node {self.node}, worker {self.rank}")
        self._first_touch = FirstTouchCheck(self.num_keys)  # pull_rows: state checked once
        self._last_params = None    # (raw bytes, checked params) of the last optimizer step
        self._samples_started = False  # count_samples was called
        self._clock = 0
        self._barriers = 0
        self._saving = None    # once the node server said the mode
        self._sampler = Sampler(self)
        self._closed = False
        try:
            token = self._cluster_token()
            sockets = Sockets(worker_identity(self.rank, token), client_keys(env.cluster_id))
            self._requests = Requests(sockets, self.node, self.rank, token, self.dtype,
                                      self._health.check, self._count)
            self._consistency = ReadYourWrites(self._view, self._requests.wait,
                                               self._refresh_copies)
            self._miss = MissPath(self._view, self._requests, self._consistency, self._count,
                                  self._lock_error, self.node, self.rank, self.num_nodes)
            self._requests.connect(env.node, env.server)
            self._view.counter_set(self.local_rank, WORKER_SLOT["pid"], os.getpid())
            welcome = self._control(MsgType.HELLO, MsgType.WELCOME, pid=os.getpid(),
                                    timeout=self._connect_timeout())
            if not 0 <= welcome.mode < len(config.MODES):
                raise ClusterError(f"worker {self.rank}: node server sent mode {welcome.mode}")
            self.mode = config.MODES[welcome.mode]
            # One node has nothing to place, and static and replicate_all ignore intents:
            # there they are checked and counted, but not handed to the server.
            self._intents_matter = self.num_nodes > 1 and self.mode in config.INTENT_MODES
            self._saving = Saving(self._view, self._control, self._consistency.drain,
                                  self.wait_sync, self.node, self.rank, self.local_rank,
                                  self.mode, self.num_nodes, self.workers_per_node)
            self._connect_peers(welcome.addresses)
            self._miss.use_compiled(compiled_miss_path(
                self._view, sockets.handles(), self.node, self.rank, self.num_nodes, token))
            logging.getLogger("adapm.worker").debug(
                "attached to node %d at %s (%d node(s), mode %s)", self.node, env.server,
                self.num_nodes, self.mode)
        except BaseException:
            self._teardown()
            raise

    def _connect_peers(self, addresses):
        """Connect to every other node, so that any owner can reply to this worker."""
        if len(addresses) != self.num_nodes:
            raise ClusterError(f"worker {self.rank}: node {self.node} knows "
                               f"{len(addresses)} of {self.num_nodes} nodes")
        hellos = []
        for node, address in enumerate(addresses):
            if node != self.node:
                self._requests.connect(node, address)
                op = CountOp(MsgType.WELCOME)
                self._requests.start(node, protocol.Hello(pid=os.getpid()), op, 1)
                hellos.append((node, op))
        timeout = self._connect_timeout()
        for node, op in hellos:
            self._requests.wait_or_fail(op, timeout,
                                        f"hello to node {node} at {addresses[node]}")

    # -- who and where -------------------------------------------------------------

    @property
    def value_length(self):
        """The uniform value length, or 0 when lengths are per key."""
        return self._view.uniform_length

    def __repr__(self):
        state = "closed" if self._closed else f"clock={self._clock}"
        return (f"<adapm.Worker rank={self.rank}/{self.num_workers} node={self.node}/"
                f"{self.num_nodes} {state}>")

    # -- data ----------------------------------------------------------------------

    def pull(self, keys, out=None):
        """Current values of `keys`: shape (len(keys), D), or flat for per-key lengths."""
        keys, out, nmiss = self._pull_here(keys, out)
        if nmiss == 0:  # every key held here: no operation to track
            return out
        return self._miss.pull_now(keys, out, nmiss)

    def pull_async(self, keys, out=None):
        keys, out, nmiss = self._pull_here(keys, out)
        return Pending(self._requests, self._miss.pull(keys, out, nmiss))

    def _pull_here(self, keys, out):
        """Read the keys this node holds into `out`; (keys, out, misses), the misses'
        indices in the miss buffer."""
        self._check_open()
        keys = as_keys(keys, self._view)
        total = self._view.total_length(keys)
        out = pull_buffer(out, keys, total, self._view)
        self._consistency.before_access(keys)
        misses = self._miss.buffer(keys.shape[0])
        try:
            nmiss = self._view.pull(keys, out, misses)
        except LockTimeout as exc:
            raise self._lock_error(exc, "pull") from None
        self._count("pulls_local", keys.shape[0] - nmiss)
        return keys, out, nmiss

    def push(self, keys, values):
        """Add `values` to the keys' values (duplicate keys add up). Returns when the
        update is applied locally or on its way, in order, to the keys' owners; a later
        pull of this worker sees it, and wait_sync()/barrier() wait for it."""
        self._update(keys, values, True)

    def set(self, keys, values):
        """Overwrite the keys' values (for duplicate keys the last one wins)."""
        self._update(keys, values, False)

    def push_async(self, keys, values):
        """As push; the handle's wait() returns once every owner applied the update."""
        return Pending(self._requests, self._update(keys, values, True))

    def set_async(self, keys, values):
        return Pending(self._requests, self._update(keys, values, False))

    # -- fused optimizers (adapm.optim) -----------------------------------------------

    def pull_rows(self, keys, optimizer):
        """The keys' rows (len(keys), dim), without the optimizer's state beside them (a
        view of the pulled values: no copy). The state of a key read for the first time
        is checked (adapm.optim.FirstTouchCheck): state that cannot be the optimizer's
        (a table initialised for rows alone) is a ValueError saying what to pass."""
        dim = self._row_dim(optimizer)
        keys = as_keys(keys, self._view)
        values = self.pull(keys)
        self._first_touch.check(keys, values, dim, optimizer)
        return values[:, :dim]

    def apply_gradients(self, keys, grads, optimizer):
        """One step of `optimizer` (adapm.optim) per distinct key with its gradients
        summed (grads: (len(keys), dim)): in place where this node holds the key, else at
        its owner. An update like push: a later pull of this worker sees it, and
        wait_sync()/barrier() wait for it."""
        self._check_open()
        dim = self._row_dim(optimizer)
        keys = as_keys(keys, self._view)
        grads = as_gradients(grads, keys.shape[0], dim, self._view)
        if keys.shape[0] == 0:
            return
        params = self._checked_params(optimizer, dim)
        self._consistency.before_access(keys)
        n = keys.shape[0]
        distinct, summed = np.empty(n, dtype=np.uint64), np.empty((n, dim), dtype=self.dtype)
        misses = self._miss.buffer(n)
        try:
            u, nmiss = self._view.apply_optimizer(keys, None, grads, params, distinct, summed,
                                                  misses)  # None: radix-sorted in the call
        except LockTimeout as exc:
            raise self._lock_error(exc, "apply_gradients") from None
        self._count("pushes_local", u - nmiss)
        if nmiss:
            self._miss.apply(distinct[:u], summed[:u], nmiss, params)

    def pool_bags(self, keys, bags, num_bags, optimizer, mode="sum", scale=None):
        """Pooled lookup of embedding bags straight from the rows held here (TBE's
        forward, adapm.client.bags): entry i (keys[i], in bag bags[i], weighted by
        scale[i] if given; mode "sum" or "mean" or "max") pooled into a float32
        (num_bags, dim) array, dim = optimizer's row length. Returns (out, argmax) (argmax:
        for "max", each element's winning entry, for apply_bag_gradients), or None when
        some key is not held here (nothing changed: pull the rows and pool them)."""
        self._check_open()
        dim = self._row_dim(optimizer)
        code = bag_kernels.mode_code(mode)
        keys, bags, scale = bag_kernels.check_entries(keys, bags, scale, self._view)
        self._first_touch_rows(keys, dim, optimizer)
        self._consistency.before_access(keys)
        out = np.empty((num_bags, dim), dtype=np.float32)
        argmax = np.empty((num_bags, dim), dtype=np.int64)
        misses = self._miss.buffer(keys.shape[0])
        try:
            nmiss = self._view.bag_pool(keys, bags, scale, code, out, argmax, misses)
        except LockTimeout as exc:
            raise self._lock_error(exc, "pool_bags") from None
        except IndexError as exc:
            raise bag_kernels.bag_error(exc, num_bags) from None
        if nmiss:
            return None
        self._count("pulls_local", keys.shape[0])
        return out, (argmax if code == bag_kernels.MODES["max"] else None)

    def apply_bag_gradients(self, keys, bags, grad, optimizer, mode="sum", scale=None,
                            argmax=None):
        """The backward of pool_bags fused with `optimizer`'s step (TBE's backward): the
        pooled gradient `grad` ((num_bags, dim)) scattered to one summed gradient per
        distinct key (times scale[i] per entry: the per-sample weight, or 1 / the bag's
        entries for "mean"; for "max" to the entries in `argmax`), each key's step taken
        in place where it is held here, at its owner otherwise, as apply_gradients does.
        Returns (distinct keys, their summed gradients; for keys stepped here with the
        optimizer's weight decay added, as the step leaves them)."""
        self._check_open()
        dim = self._row_dim(optimizer)
        code = bag_kernels.mode_code(mode)
        grad = np.ascontiguousarray(grad, dtype=np.float32)
        if grad.ndim != 2 or grad.shape[1] != dim or not np.isfinite(grad).all():
            raise ValueError(f"the pooled gradient must be finite, (bags, {dim}); got "
                             f"shape {grad.shape}")
        keys, bags, scale = bag_kernels.check_entries(keys, bags, scale, self._view)
        if code == bag_kernels.MODES["max"] and (argmax is None or argmax.shape != grad.shape):
            raise ValueError("mode max needs pool_bags' argmax")
        params = self._checked_params(optimizer, dim)
        n = keys.shape[0]
        if n == 0:
            return keys, np.empty((0, dim), dtype=np.float32)
        self._consistency.before_access(keys)
        distinct, summed = np.empty(n, dtype=np.uint64), np.empty((n, dim), dtype=np.float32)
        misses = self._miss.buffer(n)
        try:
            u, nmiss = self._view.apply_bag_gradients(
                keys, None, bags, scale, code, grad,  # None: a radix sort in the kernel
                None if argmax is None else np.ascontiguousarray(argmax, dtype=np.int64),
                params, distinct, summed, misses)
        except LockTimeout as exc:
            raise self._lock_error(exc, "apply_bag_gradients") from None
        except IndexError as exc:
            raise bag_kernels.bag_error(exc, grad.shape[0]) from None
        self._count("pushes_local", u - nmiss)
        if nmiss:
            self._miss.apply(distinct[:u], summed[:u], nmiss, params)
        return distinct[:u], summed[:u]

    def _checked_params(self, optimizer, dim):
        """The optimizer's params for an APPLY, checked as an owner would check them (a
        schedule may have set lr < 0): refused here. The last params checked are kept,
        so a step with the same hyper-parameters costs no second check."""
        params = optimizer.params(dim)
        raw = np.asarray(params, dtype=np.float64).tobytes()
        if self._last_params is not None and self._last_params[0] == raw:
            return self._last_params[1]
        try:
            checked, _ = read_params(params, self._view.uniform_length)
        except ValueError as exc:
            raise ValueError(f"{optimizer!r}: {exc}") from None
        self._last_params = (raw, checked)
        return checked

    def _first_touch_rows(self, keys, dim, optimizer):
        """FirstTouchCheck for keys read without pull_rows: those never checked are
        pulled whole (once per key) and their optimizer state checked."""
        if optimizer.state_length(dim) == 0:
            return  # no state to check (SGD)
        new = self._first_touch.unchecked(keys)
        if new.shape[0]:
            self._first_touch.check(new, self.pull(new), dim, optimizer)

    def _row_dim(self, optimizer):
        if not isinstance(optimizer, SparseOptimizer):
            raise TypeError(f"optimizer must be an adapm.optim optimizer, got {optimizer!r}")
        if not self._view.uniform_length:
            raise ValueError("fused optimizers need a table of uniform value_length")
        return optimizer.dim_of(self._view.uniform_length)

    def _update(self, keys, values, additive):
        self._check_open()
        keys = as_keys(keys, self._view)
        total = self._view.total_length(keys)
        values = as_values(values, keys, total, self._view)
        self._consistency.before_access(keys)
        misses = self._miss.buffer(keys.shape[0])
        op_name = "push" if additive else "set"
        try:
            # A set is applied here only to keys owned here; a replica here takes it
            # through the node server, which sends it on to the owner (guarantee 3).
            nmiss = self._view.update(keys, values, misses, additive, not additive)
        except LockTimeout as exc:
            raise self._lock_error(exc, op_name) from None
        self._count("pushes_local" if additive else "sets_local", keys.shape[0] - nmiss)
        return self._miss.update(keys, values, nmiss, additive)

    def _refresh_copies(self, keys):
        """Have the node server bring its copies of `keys` up to date (a sync round)."""
        self._control(MsgType.REFRESH, MsgType.SYNCED, keys=keys)

    def _lock_error(self, exc, op):
        return ClusterError(
            f"node {self.node}, worker {self.rank}: {op} gave up on key {exc.key}: its lock "
            f"was held longer than {self._view.lock_timeout_ns / 1e9:.1f} s (a process died "
            "while writing it)")

    # -- intents, clock, placement -------------------------------------------------

    def intent(self, keys, start, end=None):
        """Signal that this worker will access `keys` from clock `start` (inclusive) to `end`
        (exclusive; default start + 1). Never blocks."""
        self._check_open()
        keys = as_keys(keys, self._view)
        start = _clock_value("start", start)
        end = start + 1 if end is None else _clock_value("end", end)
        if end <= start:
            raise ValueError(f"intent needs end > start, got start={start}, end={end}")
        if keys.shape[0] == 0:
            return
        if self._intents_matter:
            # Into this worker's ring in the shared table: no message, unless the ring is
            # full (then as a message) or the node server sleeps, or polls for a while
            # and this intent is due soon (then a WAKE).
            appended, server = self._view.intent_append(self.local_rank, start, end, keys)
            wake = server == SERVER_ASLEEP or (server == SERVER_POLLING and
                                               start <= self._clock + URGENT_CLOCKS)
            if not appended:  # as a message, of the distinct keys (an intent names a set,
                # and no message may hold more than num_keys keys); np.unique copies, and
                # must: `keys` may be the caller's own array, refilled for the next batch
                self._requests.send(self.node, protocol.Intent(start=start, end=end,
                                                               keys=np.unique(keys)))
            elif wake:
                self._requests.send(self.node, protocol.Wake())
        self._count("intents", keys.shape[0])

    def prepare_sample(self, n, start, end=None, key_range=None, distribution=None):
        """Draw `n` keys (with replacement) from the key range, or from
        `key_range=(lo, hi)`, to be used in clocks [start, end) (default start + 1); they
        are announced as an intent, so they are local by then. Returns a handle for
        pull_sample. Uniform by default; `distribution`: one non-negative weight per key of
        the range (normalised), or an adapm.client.sampling.Distribution built from them once.
        See adapm.client.sampling for the distribution."""
        self._check_open()
        return self._sampler.prepare(n, start, end, key_range, distribution)

    def pull_sample(self, handle, count=None):
        """The next `count` (default: all remaining) keys of a prepare_sample handle and
        their values: (keys uint64 array, values array of shape (count, value_length))."""
        keys = self.sample_keys(handle, count)
        return keys, self.pull(keys)

    def sample_keys(self, handle, count=None):
        """The next `count` (default: all remaining) keys of a prepare_sample handle,
        without their values, as pull_sample takes them (uint64 array): for a step that
        pulls a batch's distinct rows once, with the samples among them."""
        self._check_open()
        return self._sampler.take(handle, count)

    @property
    def intents_matter(self):
        """Whether an intent can change where keys are: a cluster of several nodes in an
        intent-driven mode. On one node, or in static and replicate_all, w.intent only
        checks and counts its keys; adapm.data.IntentLoader then computes none."""
        return self._intents_matter

    def reaction_time(self):
        """Seconds this worker's node currently takes from an intent to a usable key, as
        it measures it (0.0 before it has acted on any): announce keys at least this far
        ahead of their use. adapm.data.IntentLoader reads it."""
        return self._view.node_counter_get(NODE_SLOT["reaction_us"]) / 1e6

    @property
    def clock(self):
        return self._clock

    def advance_clock(self):
        """Move this worker's logical clock one step; returns the new clock."""
        self._check_open()
        self._clock += 1
        self._view.counter_set(self.local_rank, WORKER_SLOT["clock"], self._clock)
        return self._clock

    def localize(self, keys):
        """Relocate `keys` to this worker's node now (value and ownership move; updates in
        flight are applied, not lost). The adaptive manager does this by itself from
        intents; this is the manual primitive, refused in modes that keep keys in place."""
        self._check_open()
        if self.mode not in config.RELOCATING_MODES:
            modes = ", ".join(config.RELOCATING_MODES)
            raise ValueError(f"localize needs a mode that relocates keys ({modes}), "
                             f"the cluster runs {self.mode}")
        keys = as_keys(keys, self._view)
        if keys.shape[0]:
            self._consistency.drain()
            self._control(MsgType.LOCALIZE, MsgType.LOCALIZED, keys=np.unique(keys))

    # -- coordination ------------------------------------------------------------------

    def barrier(self):
        """Wait until every worker of the cluster has called barrier()."""
        self._check_open()
        self._consistency.drain()
        self._barriers += 1
        self._control(MsgType.BARRIER, MsgType.RELEASE, generation=self._barriers)

    def wait_sync(self):
        """Return once this worker's updates are applied and every replica its node holds
        has exchanged its updates."""
        self._check_open()
        self._consistency.drain()
        self._control(MsgType.WAIT_SYNC, MsgType.SYNCED)
        self._consistency.synced()

    def save(self, path, optimizer=None):
        """Write a checkpoint of every key's value (optimizer state included) into the
        folder `path`; every worker of the cluster calls it, like barrier(), with the same
        path, which must be a folder every machine sees. The snapshot is consistent: every
        update acknowledged before any worker's save() is in it, none made after.
        `optimizer`: an adapm.optim optimizer whose own state (Adam's step count) is saved
        beside this worker's clock. An interrupted save leaves the previous checkpoint at
        `path` whole. Returns the manifest (a dict) once the checkpoint is complete.
        Restore with adapm.run(..., restore=path) or adapm-launch --restore PATH, on any
        number of nodes and workers; read it with adapm.checkpoint.load(path)."""
        self._check_open()
        return self._saving.save(path, optimizer, self._clock)

    def count_samples(self, n):
        """Count `n` data points (examples, ratings, triples, word pairs) this worker
        trained on, for the cluster-wide figures at the end of the run: the statistics
        table of adapm-launch and adapm.run gets the columns samples and samples/s per
        node and for the whole cluster (a launched script's ranks otherwise see only
        their own throughput). The rate runs from this worker's first call to its last,
        without the first call's samples: call count_samples(0) as the loop starts, then
        count_samples(batch) after each batch. A shared-memory counter: no message."""
        self._check_open()
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"count_samples takes a count >= 0, got {n!r}")
        now = time.monotonic_ns()
        if not self._samples_started:
            self._samples_started = True
            self._view.counter_set(self.local_rank, WORKER_SLOT["samples_first"], int(n))
            self._view.counter_set(self.local_rank, WORKER_SLOT["samples_start_ns"], now)
        self._view.counter_add(self.local_rank, WORKER_SLOT["samples"], int(n))
        self._view.counter_set(self.local_rank, WORKER_SLOT["samples_last_ns"], now)

    def stats(self):
        """Counts of keys for this worker, and in 'node' the same summed over its node plus
        the node's own counters (relocations, replicas, ...)."""
        self._check_open()
        mine = self._view.counters()[self.local_rank]
        result = {name: int(mine[WORKER_SLOT[name]]) for name in WORKER_STATS}
        node = node_stats(self._view)  # bytes: its workers' and its server's own traffic
        result["relocations"] = node["relocations"]
        result["replicas"] = node["replicas_made"]
        result["clock"] = self._clock
        result["node"] = node
        return result

    # -- leaving -------------------------------------------------------------------

    def finalize(self):
        """Wait for this worker's pending operations, then leave. Idempotent."""
        if self._closed:
            return
        linger = 0  # on failure: the cluster is gone, nothing to wait for or to tell
        self._saving.wait_for_cleanup()
        try:
            self._requests.wait_all()
            self._requests.send(self.node, protocol.Goodbye())
            linger = 1000  # let the goodbye leave before the socket closes
        except ClusterError:
            pass
        finally:
            self._teardown(linger)

    def _teardown(self, linger=0):
        self._closed = True
        if self._requests is not None:
            self._requests.close(linger)
        self._table.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finalize()
        return False

    def __del__(self):
        if not getattr(self, "_closed", True):
            self._teardown()

    # -- checks and messages ----------------------------------------------------------

    def _check_open(self):
        """Every call: closed? failed? and, now and then, is the node server alive?"""
        if self._closed:
            raise ClosedError(f"worker {self.rank} was finalized")
        self._health.check_if_due()

    def _count(self, name, n):
        if n:
            self._view.counter_add(self.local_rank, WORKER_SLOT[name], n)

    def _control(self, mtype, reply_type, timeout=None, **fields):
        """A request to this worker's node server; returns its reply."""
        return self._requests.ask(self.node, protocol.BY_TYPE[mtype](**fields), reply_type, timeout)

    def _cluster_token(self):
        """The token every message to a node carries: this node's server writes it into
        the table once the cluster has formed (workers normally start after that)."""
        deadline = time.monotonic() + self._connect_timeout()
        while not self._view.cluster_token:
            self._health.check()
            if time.monotonic() > deadline:
                raise ClusterError(f"node {self.node}, worker {self.rank}: the cluster did "
                                   f"not form within {self._connect_timeout():.0f} s")
            time.sleep(0.01)
        return self._view.cluster_token

    @staticmethod
    def _connect_timeout():
        return config.env_float(config.ENV_START_TIMEOUT, config.DEFAULT_START_TIMEOUT)


def _clock_value(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"intent {name} must be an integer clock, got {value!r}")
    value = int(value)
    if value < 0 or value >= 2**62:
        raise ValueError(f"intent {name} must be a clock in [0, 2**62), got {value}")
    return value


def worker(environ=None):
    """Attach to the node this process was started for (by adapm-launch or adapm.run)."""
    return Worker(config.WorkerEnv.from_environ(environ))
