"""Fused sparse optimizers (adapm.optim): one step per distinct key, in the table or at
the key's owner, equal to torch.optim's arithmetic; their inits, params and bad input."""
import numpy as np
import pytest

import adapm
from adapm import optim
from adapm.common.errors import FAIL_REJECTED
from adapm.wire import protocol
from adapm.wire.protocol import MsgType, worker_identity

from interleave import TOKEN, close, make_cluster, worker_msg

pytestmark = pytest.mark.timeout(120)

DIM, KEYS = 4, 30


def reference_steps(optimizer, values, batches):
    """What the optimizer's rules give, in float64 numpy, one step per distinct key of
    each batch (gradients summed; weight decay on the rows that get a step)."""
    values = values.astype(np.float64).copy()
    t = 0
    for keys, grads in batches:
        t += 1
        distinct = np.unique(keys)
        summed = np.zeros((distinct.shape[0], DIM))
        np.add.at(summed, np.searchsorted(distinct, keys), grads)
        for key, g in zip(distinct, summed):
            w = values[key]
            g = g + optimizer.weight_decay * w[:DIM]
            if isinstance(optimizer, optim.RowWiseAdagrad):
                w[DIM] += np.mean(g * g)
                w[:DIM] -= optimizer.lr * g / (np.sqrt(w[DIM]) + optimizer.eps)
            elif isinstance(optimizer, optim.Adagrad):
                w[DIM:] += g * g
                w[:DIM] -= optimizer.lr * g / (np.sqrt(w[DIM:]) + optimizer.eps)
            elif isinstance(optimizer, optim.Adam):
                m, v = w[DIM:2 * DIM], w[2 * DIM:]
                m += (1 - optimizer.beta1) * (g - m)
                v += (1 - optimizer.beta2) * (g * g - v)
                size = optimizer.lr * np.sqrt(1 - optimizer.beta2 ** t) / \
                    (1 - optimizer.beta1 ** t)
                w[:DIM] -= size * m / (np.sqrt(v) + optimizer.eps)
            else:
                w[:DIM] -= optimizer.lr * g
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
