"""Serving remote pull/push/set, a part of the node server.

Workers of any node send PULL/PUSH/SET for keys their node does not hold; peers pass on
what they could not serve (FWD_*). Keys owned here are answered from the table; the rest
is forwarded along the keys' paths, so the final owner replies straight to the worker.
Only owned keys are served: a replica here may lag its owner (DESIGN.md §7.1), and an
update acknowledged by a replica would wait in its delta, lost to the owner while this
node stalls."""

import numpy as np

from adapm.common.errors import ProtocolError
from adapm.table import optimizers as optim
from adapm.table.segments import Segments
from adapm.wire import protocol
from adapm.wire.protocol import ALL_POSITIONS, MsgType


class DataServing:
    def __init__(self, ctx, outbox, routes, replicas, set_gate):
        """replicas: overwrite(keys, values) of this node's copies (a local set);
        set_gate: defer_set(identity, msg, keys) -> True when a local set must wait
        for the sync round in flight (then it is handed back to `on_set` later)."""
        self.ctx = ctx
        self.view = ctx.view
        self.outbox = outbox
        self.routes = routes
        self.replicas = replicas
        self.set_gate = set_gate

    # -- pull ----------------------------------------------------------------------

    def on_pull(self, identity, msg):
        self._serve_pull(msg, msg.src_worker, msg.keys, None)

    def on_fwd_pull(self, identity, msg):
        self._serve_pull(msg, int(msg.requester), msg.keys, msg.positions)

    def _serve_pull(self, msg, rank, keys, positions):
        self.ctx.check_keys(keys)
        n = keys.shape[0]
        out = np.empty(self.view.total_length(keys), dtype=self.view.dtype)
        misses = np.empty(n, dtype=np.uint64)
        nmiss = self.view.pull(keys, out, misses, True)  # owned keys only
        if nmiss == 0:
            reply = protocol.PullReply(request_id=msg.request_id, values=out)
            if positions is None:
                reply.flags = ALL_POSITIONS
            else:
                reply.positions = positions
            self.outbox.to_worker(rank, reply)
            return
        missed = misses[:nmiss].astype(np.intp)
        served = np.setdiff1d(np.arange(n), missed, assume_unique=True)
        own_positions = np.arange(n, dtype=np.uint32) if positions is None else positions
        if served.shape[0]:
            segs = Segments.of(self.view, keys)
            self.outbox.to_worker(rank, protocol.PullReply(request_id=msg.request_id,
                                                   positions=own_positions[served],
                                                values=segs.take(out, served)))
        fwd_positions = own_positions[missed]
        self.routes.forward_request(msg, MsgType.FWD_PULL, keys[missed], rank,
                                    lambda idx: {"positions": fwd_positions[idx]})

    # -- push and set --------------------------------------------------------------

    def on_push(self, identity, msg):
        self._apply(msg, msg.src_worker, True, MsgType.FWD_PUSH, self._values(msg))

    def on_set(self, identity, msg):
        values = self._values(msg)  # checked before it may wait for a round
        if self.ctx.is_local_worker(msg.src_worker) and \
                self.set_gate.defer_set(identity, msg, msg.keys):
            return
        self._apply(msg, msg.src_worker, False, MsgType.FWD_SET, values)

    def on_fwd_push(self, identity, msg):
        self._apply(msg, int(msg.requester), True, MsgType.FWD_PUSH, self._values(msg))

    def on_fwd_set(self, identity, msg):
        self._apply(msg, int(msg.requester), False, MsgType.FWD_SET, self._values(msg))

    def _values(self, msg):
        """The values of a push or set, checked against its keys and the table."""
        self.ctx.check_keys(msg.keys)
        return protocol.values_of(msg, self.view.dtype, self.view.total_length(msg.keys))

    def _apply(self, msg, rank, additive, fwd_type, values):
        keys = msg.keys
        misses = np.empty(keys.shape[0], dtype=np.uint64)
        nmiss = self.view.update(keys, values, misses, additive, True)  # owned keys only
        applied = keys.shape[0] - nmiss
        if applied:
            self.outbox.to_worker(rank, protocol.UpdateAck(request_id=msg.request_id,
                                                   applied=applied))
        if nmiss == 0:
            return
        missed = misses[:nmiss].astype(np.intp)
        fwd_values = Segments.of(self.view, keys).take(values, missed)
        if msg.type == MsgType.SET and self.ctx.is_local_worker(rank):
            self.replicas.overwrite(keys[missed], fwd_values)
        fwd_segs = Segments.of(self.view, keys[missed])
        self.routes.forward_request(msg, fwd_type, keys[missed], rank,
                                    lambda idx: {"values": fwd_segs.take(fwd_values, idx)})

    # -- optimizer steps (adapm.optim) ---------------------------------------------

    def on_apply(self, identity, msg):
        self._apply_gradients(msg, msg.src_worker)

    def on_fwd_apply(self, identity, msg):
        self._apply_gradients(msg, int(msg.requester))

    def _apply_gradients(self, msg, rank):
        """One optimizer step per key owned here (the same kernel as a worker's local
        step), acknowledged with the count; the rest is passed on along the path with its
        gradients and the same params."""
        keys = msg.keys
        self.ctx.check_keys(keys)
        try:
            params, dim = optim.read_params(msg.params, self.view.uniform_length)
        except ValueError as exc:
            raise ProtocolError(f"{msg.type.name}: {exc}") from None
        n = keys.shape[0]
        grads = protocol.values_of(msg, self.view.dtype, n * dim).reshape(n, dim)
        if not np.isfinite(grads).all():  # the step would spoil rows and their state
            raise ProtocolError(f"{msg.type.name} with NaN or infinite gradients")
        order = np.argsort(keys, kind="stable")
        if n > 1 and (keys[order[1:]] == keys[order[:-1]]).any():
            raise ProtocolError(f"{msg.type.name} names a key twice (gradients are summed "
                                "by the sender)")
        distinct = np.empty(n, dtype=np.uint64)
        summed = np.empty((n, dim), dtype=self.view.dtype)
        misses = np.empty(n, dtype=np.uint64)
        _, nmiss = self.view.apply_optimizer(keys, order, grads, params, distinct, summed,
                                             misses, True)  # owned keys only
        if n - nmiss:
            self.outbox.to_worker(rank, protocol.UpdateAck(request_id=msg.request_id,
                                                           applied=n - nmiss))
        if nmiss:
            missed = misses[:nmiss].astype(np.intp)
            fwd_keys, fwd_grads = distinct[missed], summed[missed]
            self.routes.forward_request(msg, MsgType.FWD_APPLY, fwd_keys, rank,
                                        lambda idx: {"values": fwd_grads[idx],
                                                     "params": params})
