"""Fused sparse optimizers (adapm.optim): one step per distinct key, in the table or at
the key's owner, equal to torch.optim's arithmetic; their inits, params and bad input."""
import numpy as np
import pytest
from optimizer_rules import reference_step

import adapm
from adapm import optim
from adapm.common.errors import FAIL_REJECTED
from adapm.wire import protocol
from adapm.wire.protocol import MsgType, worker_identity

from interleave import TOKEN, close, make_cluster, worker_msg

pytestmark = pytest.mark.timeout(180)

DIM, KEYS = 4, 30


def reference_steps(optimizer, values, batches):
    """What the optimizer's rules give, in float64 numpy, one step per distinct key of
    each batch (gradients summed; weight decay on the rows that get a step)."""
    values = values.astype(np.float64).copy()
    for t, (keys, grads) in enumerate(batches, start=1):
        reference_step(optimizer, values, keys, grads, DIM, t)
    return values


def batches_of(seed, steps=6, size=12):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, KEYS, size), rng.normal(size=(size, DIM)).astype(np.float32))
            for _ in range(steps)]


def optimizers():
    return [optim.SGD(0.1), optim.SGD(0.05, weight_decay=0.1),
            optim.Adagrad(0.1), optim.Adagrad(0.2, eps=1e-6, weight_decay=0.01,
                                              initial_accumulator_value=0.1),
            optim.RowWiseAdagrad(0.1), optim.RowWiseAdagrad(0.1, weight_decay=0.05),
            optim.Adam(0.01), optim.Adam(0.05, betas=(0.8, 0.99), weight_decay=0.01)]


def train(w, opt, batches):
    if w.rank == 0:  # one worker steps, in order: the result is deterministic
        for keys, grads in batches:
            w.apply_gradients(keys, grads, opt)
    w.barrier()
    w.wait_sync()
    everything = np.arange(KEYS)
    return w.pull(everything), w.pull_rows(everything, opt)


@pytest.mark.parametrize("opt", optimizers(), ids=repr)
def test_steps_equal_the_update_rules_on_one_node(opt):
    init = opt.init(("normal", 0.5, 3))
    length = opt.value_length(DIM)
    start = init(np.arange(KEYS, dtype=np.uint64), length)
    batches = batches_of(1)
    (values, rows), = adapm.run(train, args=(opt, batches), num_keys=KEYS,
                                value_length=length, init=init)
    expected = reference_steps(opt, start, batches)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rows, values[:, :DIM])


@pytest.mark.parametrize("mode", ["static", "adaptive"])
def test_steps_at_the_owner_equal_local_steps(mode):
    """2 nodes: node 0's worker steps keys owned by node 1 (their gradients travel in an
    APPLY) and its own; the result equals the one-node result."""
    opt = optim.Adagrad(0.1, weight_decay=0.01)
    init = opt.init(("normal", 0.5, 3))
    length = opt.value_length(DIM)
    start = init(np.arange(KEYS, dtype=np.uint64), length)
    batches = batches_of(2)
    results = adapm.run(train, args=(opt, batches), nodes=2, num_keys=KEYS,
                        value_length=length, init=init, mode=mode)
    expected = reference_steps(opt, start, batches)
    for values, _ in results:  # every worker reads the same rows after wait_sync
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)


def test_matches_torch_optimizers():
    torch = pytest.importorskip("torch")
    for opt, make in [
            (optim.SGD(0.1), lambda p: torch.optim.SGD([p], lr=0.1)),
            (optim.Adagrad(0.1), lambda p: torch.optim.Adagrad([p], lr=0.1, eps=1e-10)),
            (optim.Adam(0.01), lambda p: torch.optim.SparseAdam([p], lr=0.01))]:
        init = opt.init(("normal", 0.5, 3))
        length = opt.value_length(DIM)
        start = init(np.arange(KEYS, dtype=np.uint64), length).astype(np.float32)
        batches = batches_of(4)
        (values, rows), = adapm.run(train, args=(opt, batches), num_keys=KEYS,
                                    value_length=length, init=init)
        emb = torch.nn.Embedding(KEYS, DIM, sparse=isinstance(opt, optim.Adam))
        emb.weight.data = torch.from_numpy(start[:, :DIM].copy())
        reference = make(emb.weight)
        for keys, grads in batches:
            reference.zero_grad()
            emb(torch.from_numpy(keys)).backward(torch.from_numpy(grads))
            reference.step()
        np.testing.assert_allclose(rows, emb.weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_init_fills_the_state_and_refuses_a_negative_or_nan_accumulator():
    opt = optim.Adagrad(0.1, initial_accumulator_value=0.25)
    values = opt.init(("normal", 1.0, 0))(np.arange(5, dtype=np.uint64), 8)
    assert values.shape == (5, 8) and (values[:, 4:] == 0.25).all()
    same = adapm.table.initializers.initial_values(("normal", 1.0, 0), np.arange(5), np.full(5, 4),
                                             np.float64)
    np.testing.assert_array_equal(values[:, :4].reshape(-1), same)  # rows as the spec gives
    noisy = opt.init(lambda keys: np.random.default_rng(0).normal(size=(len(keys), 8)))
    with pytest.raises(ValueError, match="negative"):
        noisy(np.arange(5, dtype=np.uint64), 8)
    nan = opt.init(lambda keys: np.full((len(keys), 8), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        nan(np.arange(5, dtype=np.uint64), 8)
    with pytest.raises(ValueError, match="value_length 7"):
        opt.init()(np.arange(5, dtype=np.uint64), 7)


def test_layouts_and_hyper_parameters_are_checked():
    assert optim.SGD(1).value_length(8) == 8
    assert optim.Adagrad().value_length(8) == 16
    assert optim.RowWiseAdagrad().value_length(8) == 9
    assert optim.Adam().value_length(8) == 24
    assert optim.Adam().dim_of(24) == 8
    for bad in (lambda: optim.SGD(-1), lambda: optim.Adagrad(eps=float("nan")),
                lambda: optim.Adam(betas=(1.0, 0.9)), lambda: optim.SGD(0.1, weight_decay=-1)):
        with pytest.raises(ValueError):
            bad()


def bad_calls(w):
    opt = optim.Adagrad(0.1)
    errors = []
    for keys, grads, optimizer in [
            ([1, 2], np.ones((2, 3)), opt),                 # rows of 3, not 4
            ([1, 2], np.full((2, 4), np.nan), opt),         # NaN
            ([1, KEYS], np.ones((2, 4)), opt),              # key out of range
            ([1, 2], np.ones((2, 4)), optim.Adam()),        # another layout
            ([1, 2], np.ones((2, 4)), "adagrad")]:          # not an optimizer
        try:
            w.apply_gradients(keys, grads, optimizer)
        except (ValueError, TypeError) as exc:
            errors.append(type(exc).__name__)
    return errors, w.pull(np.arange(KEYS))


def test_bad_calls_raise_and_change_nothing():
    opt = optim.Adagrad(0.1)
    init = opt.init(("normal", 0.5, 3))
    (errors, values), = adapm.run(bad_calls, num_keys=KEYS, value_length=8, init=init)
    assert errors == ["ValueError"] * 4 + ["TypeError"]
    np.testing.assert_array_equal(values, init(np.arange(KEYS, dtype=np.uint64), 8)
                                  .astype(np.float32))


@pytest.mark.parametrize("params, why", [
    ([9, DIM, 0.1, 0, 0, 0, 0, 0.1], "kind"),
    ([1, 3, 0.1, 0, 0, 0, 0, 0.1], "do not fit"),
    ([1, DIM, -0.1, 0, 0, 0, 0, 0.1], ">= 0"),
    ([1, DIM, np.nan, 0, 0, 0, 0, 0.1], "finite"),
])
def test_a_malformed_apply_is_rejected_and_changes_nothing(params, why):
    """Raw APPLY messages with bad params (or a key twice) are answered FAILED, and the
    table is untouched."""
    spec, net, (node0, node1) = make_cluster(num_keys=8, nodes=2, length=2 * DIM)
    try:
        before = node1.view._arena_array().copy()
        keys = np.array([1, 3], dtype=np.uint64)
        worker_msg(node1, 0, MsgType.APPLY, keys=keys,
                   values=np.ones((2, DIM), np.float32),
                   params=np.array(params, dtype=np.float64))
        worker_msg(node1, 0, MsgType.APPLY, keys=np.array([1, 1], dtype=np.uint64),
                   values=np.ones((2, DIM), np.float32),
                   params=optim.Adagrad(0.1).params(DIM))
        replies = net.to_workers[worker_identity(0, TOKEN)]
        assert [m.type for m in replies] == [MsgType.FAILED, MsgType.FAILED]
        assert all(m.code == FAIL_REJECTED for m in replies)
        assert why in replies[0].text and "twice" in replies[1].text
        np.testing.assert_array_equal(node1.view._arena_array(), before)
    finally:
        close([node0, node1])


def test_an_apply_for_keys_owned_elsewhere_is_forwarded_with_its_params():
    spec, net, servers = make_cluster(num_keys=8, nodes=2, length=DIM)
    try:
        opt = optim.SGD(0.5)
        params = opt.params(DIM)
        keys = np.array([2, 3], dtype=np.uint64)  # 2 owned by node 0, 3 by node 1
        worker_msg(servers[0], 1, MsgType.APPLY, keys=keys,
                   values=np.ones((2, DIM), np.float32), params=params)
        fwd = net.deliver(0, 1, servers, only=MsgType.FWD_APPLY)
        assert fwd.keys.tolist() == [3] and fwd.requester == 1
        np.testing.assert_array_equal(fwd.params, params)
        acks = [m for m in net.to_workers[worker_identity(1, TOKEN)]
                if m.type == MsgType.UPDATE_ACK]
        assert sorted(m.applied for m in acks) == [1, 1]
        for server, key in ((servers[0], 2), (servers[1], 3)):
            out = np.empty(DIM, np.float32)
            server.view.pull(np.array([key], np.uint64), out, np.empty(1, np.uint64))
            assert out.tolist() == [-0.5] * DIM
    finally:
        close(servers)


def test_params_frames_of_the_wrong_size_are_malformed():
    msg = protocol.Apply(keys=np.arange(2, dtype=np.uint64), values=np.ones(8, np.float32),
                         params=np.ones(3))
    with pytest.raises(adapm.common.errors.ProtocolError, match="params frame"):
        protocol.decode([bytes(memoryview(f)) for f in msg.encode()])


# -- a table initialised for rows alone (issue 17, point 8) ---------------------------

def _pull_rows_of_every_key(w, kind):
    opt = optim.OPTIMIZERS[kind](lr=0.1)
    keys = np.arange(w.num_keys)
    rows = w.pull_rows(keys, opt)
    w.apply_gradients(keys, np.ones_like(rows), opt)
    return float(np.abs(w.pull_rows(keys, opt)).sum())


@pytest.mark.parametrize("kind", ["adagrad", "rowwise_adagrad", "adam"])
def test_state_filled_with_noise_is_refused_naming_what_to_pass(kind):
    """init=("normal", ...) fills the whole value, state included, with noise: before,
    a model trained on silently (a two-tower model to loss 2.8e11, AUC 0.50)."""
    opt = optim.OPTIMIZERS[kind](lr=0.1)
    with pytest.raises(adapm.WorkerError) as caught:
        adapm.run(_pull_rows_of_every_key, args=(kind,), num_keys=64,
                  value_length=opt.value_length(4), init=("normal", 0.1, 0), summary=False)
    text = str(caught.value)
    assert "negative values" in text and "keys 0..63" in text, text
    assert "init=opt.init(ROW_INIT)" in text and f"--optimizer {kind}" in text, text


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_state_initialised_by_the_optimizer_passes_the_check(kind):
    opt = optim.OPTIMIZERS[kind](lr=0.1)
    [total] = adapm.run(_pull_rows_of_every_key, args=(kind,), num_keys=64,
                        value_length=opt.value_length(4), init=opt.init(("normal", 0.1, 0)),
                        summary=False)
    assert np.isfinite(total) and total > 0


def test_the_first_touch_check_reads_each_key_once():
    check = optim.FirstTouchCheck(20)
    opt = optim.Adagrad()
    good = np.zeros((3, 8))
    check.check(np.array([1, 9, 17], dtype=np.uint64), good, 4, opt)
    bad = np.full((3, 8), -1.0)
    check.check(np.array([1, 9, 17], dtype=np.uint64), bad, 4, opt)  # checked before
    with pytest.raises(ValueError, match="keys 2..2"):
        check.check(np.array([1, 2, 9], dtype=np.uint64), bad, 4, opt)
    nan = np.zeros((1, 8))
    nan[0, 6] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        check.check(np.array([19], dtype=np.uint64), nan, 4, opt)
    check.check(np.array([3], dtype=np.uint64), np.full((1, 4), -5.0), 4, optim.SGD(0.1))


def _bag_step(w):
    torch = pytest.importorskip("torch")
    from adapm.torch import EmbeddingBag
    bag = EmbeddingBag(w, 50, 4, optimizer=optim.Adagrad(lr=0.1))
    out = bag(torch.tensor([[1, 2], [3, 4]]))
    out.sum().backward()
    return float(out.sum())


def test_an_embedding_bag_on_a_table_of_rows_alone_is_refused():
    pytest.importorskip("torch")
    with pytest.raises(adapm.WorkerError, match="init=opt.init"):
        adapm.run(_bag_step, num_keys=50, value_length=8, init=("normal", 0.05, 0),
                  summary=False)


# == Found by an adversarial review of the fused-optimizer path (TableView.apply_optimizer,
# APPLY/FWD_APPLY serving) and the owner's sync kernel: each failed before its fix. ==


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


def test_apply_optimizer_sorts_the_keys_itself_when_given_no_order():
    """order None (what Worker.apply_gradients passes): the keys are radix-sorted in the
    call; the steps equal those of numpy's stable argsort, key for key, bit for bit."""
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 5000, 3000).astype(np.uint64)   # duplicates: sums in order
    grads = rng.normal(0, 1, (3000, DIM)).astype(np.float32)
    params = optim.Adagrad(0.1).params(DIM)
    arenas = []
    for order in ("argsort", None):
        spec, net, servers = make_cluster(num_keys=5000, nodes=1, length=2 * DIM)
        try:
            view = servers[0].view
            given = np.argsort(keys, kind="stable") if order else None
            n = keys.shape[0]
            distinct, summed = np.empty(n, np.uint64), np.empty((n, DIM), np.float32)
            u, nmiss = view.apply_optimizer(keys, given, grads, params, distinct, summed,
                                            np.empty(n, np.uint64))
            assert (u, nmiss) == (np.unique(keys).shape[0], 0)
            np.testing.assert_array_equal(distinct[:u], np.unique(keys))
            arenas.append(view._arena_array().copy())
        finally:
            close(servers)
    np.testing.assert_array_equal(arenas[0], arenas[1])


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
