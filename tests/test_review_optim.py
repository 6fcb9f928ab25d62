"""Adversarial review of the fused-optimizer path (adapm.optim, TableView.apply_optimizer,
APPLY/FWD_APPLY serving) and the owner's sync kernel. Each defect the review found has a test
that failed before its fix; the others pin down behaviour checked and found correct."""
import numpy as np
import pytest

import adapm
from adapm import optim
from adapm.common.errors import FAIL_REJECTED
from adapm.wire.protocol import MsgType, worker_identity

from interleave import TOKEN, close, make_cluster, worker_msg

pytestmark = pytest.mark.timeout(180)

DIM = 4


def _value(server, key):
    out = np.empty(server.view.uniform_length, dtype=server.view.dtype)
    misses = np.empty(1, dtype=np.uint64)
    assert server.view.pull(np.array([key], np.uint64), out, misses) == 0
    return out


def _step(view, keys, grads, params, owned_only=False):
    """TableView.apply_optimizer as the worker calls it."""
    keys = np.asarray(keys, dtype=np.uint64)
    n = keys.shape[0]
    dim = int(params[1])
    grads = np.ascontiguousarray(grads, dtype=view.dtype).reshape(n, dim)
    distinct = np.empty(n, np.uint64)
    summed = np.empty((n, dim), view.dtype)
    misses = np.empty(n, np.uint64)
    return view.apply_optimizer(keys, np.argsort(keys, kind="stable"), grads,
                                np.asarray(params, np.float64), distinct, summed, misses,
                                owned_only)


# -- 1. a remote APPLY with non-finite gradients ---------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_apply_with_non_finite_gradients_is_rejected(bad):
    spec, net, servers = make_cluster(num_keys=8, nodes=2, length=2 * DIM)
    try:
        node1 = servers[1]
        before = node1.view._arena_array().copy()
        grads = np.ones((1, DIM), np.float32)
        grads[0, 1] = bad
        worker_msg(node1, 0, MsgType.APPLY, keys=np.array([3], np.uint64), values=grads,
                   params=optim.Adagrad(0.1).params(DIM))
        replies = net.to_workers[worker_identity(0, TOKEN)]
        assert [m.type for m in replies] == [MsgType.FAILED]
        assert replies[0].code == FAIL_REJECTED
        np.testing.assert_array_equal(node1.view._arena_array(), before)
    finally:
        close(servers)


# -- 2. the optimizer's numbers are checked on the wire, not before a local step ---------

def _negative_lr(w):
    opt = optim.SGD(0.1)
    opt.lr = -0.1  # a public attribute: e.g. a learning-rate schedule gone wrong
    error = None
    if w.rank == 0:
        try:
            # key 0 is owned by node 0 (a local step), key 1 by node 1 (an APPLY)
            w.apply_gradients([0, 1], np.ones((2, DIM), np.float32), opt)
            w.wait_sync()
        except Exception as exc:  # noqa: BLE001
            error = type(exc).__name__
    return error



def test_params_the_owner_refuses_are_refused_before_any_local_step():
    results = adapm.run(_negative_lr, nodes=2, num_keys=8, value_length=DIM, init="zeros",
                        mode="static")
    assert results[0] == "ValueError"


# -- 3. Adam's second moment merged from replicas' deltas --------------------------------


def test_adam_second_moment_merged_from_replicas_stays_usable():
    # One table stands in for three nodes' copies of one key: key 0 is the owner's copy,
    # keys 1 and 2 are replicas on two nodes (the same value at their last sync). Each
    # replica takes 8 steps with beta2 = 0.9 and gradients near 0 before the next sync;
    # the owner then adds both deltas, as serve_sync does.
    spec, net, servers = make_cluster(num_keys=3, nodes=1, length=3 * DIM)
    try:
        view = servers[0].view
        start = np.zeros(3 * DIM, np.float32)
        start[:DIM] = 0.5
        start[2 * DIM:] = 1.0  # v from earlier, larger gradients
        misses = np.empty(3, np.uint64)
        assert view.update(np.arange(3, dtype=np.uint64), np.tile(start, 3), misses,
                           False) == 0
        opt = optim.Adam(0.01, betas=(0.9, 0.9))
        for _ in range(8):
            _step(view, [1, 2], np.full((2, DIM), 1e-3), opt.params(DIM))
        deltas = np.concatenate([_value(servers[0], 1) - start, _value(servers[0], 2) - start])
        view.update(np.array([0], np.uint64), deltas[:3 * DIM], misses, True)
        view.update(np.array([0], np.uint64), deltas[3 * DIM:], misses, True)
        _step(view, [0], np.full((1, DIM), 1e-3), opt.params(DIM))
        value = _value(servers[0], 0)
        assert np.isfinite(value).all(), value
    finally:
        close(servers)


# -- 4. torch gradients in keys.as_gradients ---------------------------------------------

class _Table:
    uniform_length, dtype = 2 * DIM, np.dtype(np.float32)



def test_as_gradients_takes_a_torch_tensor_that_requires_grad():
    torch = pytest.importorskip("torch")
    from adapm.table.keys import as_gradients
    grads = torch.ones(2, DIM, requires_grad=True) * 2  # a non-leaf, as autograd gives
    arr = as_gradients(grads, 2, DIM, _Table)
    assert arr.shape == (2, DIM) and arr.dtype == np.float32 and (arr == 2).all()


# -- checked and found correct: pinned down ----------------------------------------------

def _train_with_empty_calls(w, opt, batches):
    """Worker 0 steps each batch, with an empty call between (no step, no Adam t)."""
    if w.rank == 0:
        for keys, grads in batches:
            w.apply_gradients(keys, grads, opt)
            w.apply_gradients(np.empty(0, np.int64), np.empty((0, DIM)), opt)
    w.barrier()
    w.wait_sync()
    return w.pull(np.arange(30))


@pytest.mark.parametrize("mode", ["static", "replicate_all"])
@pytest.mark.parametrize("opt", [optim.Adam(0.05, betas=(0.8, 0.99), weight_decay=0.01),
                                 optim.RowWiseAdagrad(0.1, weight_decay=0.05)], ids=repr)
def test_float64_two_nodes_duplicates_and_empty_calls_match_the_rules(opt, mode):
    from test_optim import batches_of, reference_steps
    init = opt.init(("normal", 0.5, 3))
    length = opt.value_length(DIM)
    start = init(np.arange(30, dtype=np.uint64), length)
    batches = batches_of(7, steps=5, size=16)
    results = adapm.run(_train_with_empty_calls, args=(opt, batches), nodes=2, num_keys=30,
                        value_length=length, init=init, mode=mode, dtype="float64")
    expected = reference_steps(opt, start, batches)
    for values in results:
        assert values.dtype == np.float64
        np.testing.assert_allclose(values, expected, rtol=1e-9, atol=1e-12)


def test_an_apply_racing_a_relocation_is_forwarded_and_applied_once():
    """Worker 2 (node 2) steps key 0 at its home, node 0, while node 0 is moving it to
    node 1 (the MOVE not yet delivered): the APPLY follows the MOVE and is applied once,
    at node 1, and acknowledged once."""
    spec, net, S = make_cluster(nodes=3, mode="adaptive", length=DIM)
    try:
        k = np.array([0], dtype=np.uint64)
        worker_msg(S[1], 1, MsgType.LOCALIZE, keys=k)
        net.deliver(1, 0, S, only=MsgType.MOVE_REQUEST)      # node 0 evicts, MOVE queued
        params = optim.SGD(0.5).params(DIM)
        worker_msg(S[0], 2, MsgType.APPLY, keys=k, values=np.ones((1, DIM), np.float32),
                   params=params)
        assert net.pending()[(0, 1)] == ["MOVE", "FWD_APPLY"]
        net.deliver_all(S)
        assert _value(S[1], 0).tolist() == [-0.5] * DIM
        acks = [m for m in net.to_workers[worker_identity(2, TOKEN)]
                if m.type == MsgType.UPDATE_ACK]
        assert [m.applied for m in acks] == [1]
    finally:
        close(S)


def test_serve_sync_applies_deltas_and_reads_versions_under_one_lock():
    """The owner's sync kernel: deltas of some keys added (float64 too), versions read,
    values copied for requested keys and for kept keys whose version moved."""
    spec, net, (s,) = make_cluster(num_keys=4, nodes=1, length=2)
    try:
        v = s.view
        keys = np.array([0, 1, 2, 3], np.uint64)
        versions0 = np.empty(4, np.uint32)
        owned = np.empty(4, np.uint8)
        wv = np.empty(4, np.uint8)
        out = np.empty(8, v.dtype)
        wanted = np.zeros(4, np.uint8)
        v.serve_sync(keys, np.empty(0, v.dtype), np.zeros(4, np.uint8),
                     np.zeros(4, np.uint32), wanted, owned, versions0, wv, out)
        has = np.array([1, 0, 1, 0], np.uint8)
        deltas = np.array([1, 2, 3, 4], v.dtype)
        wanted = np.array([2, 2, 1, 0], np.uint8)  # if changed, if changed, value, none
        seen = versions0.copy()
        seen[1] = versions0[1] + np.uint32(7)  # key 1 changed since the replica saw it
        versions = np.empty(4, np.uint32)
        used = v.serve_sync(keys, deltas, has, seen, wanted, owned, versions, wv, out)
        assert owned.tolist() == [1, 1, 1, 1]
        assert wv.tolist() == [0, 1, 1, 0] and used == 4
        assert (versions - versions0).tolist() == [1, 0, 1, 0]
        np.testing.assert_array_equal(out[:4], [0, 0, 3, 4])
        np.testing.assert_array_equal(_value(s, 0), [1, 2])
    finally:
        close([s])
