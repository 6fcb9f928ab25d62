"""The fused embedding-bag kernels (src/bags.pxd through TableView.bag_pool and
.apply_bag_gradients), the worker's pool_bags and apply_bag_gradients, and EmbeddingBag's
fused path: pooled straight from the table, stepped in the table, exactly what torch's
embedding_bag and the optimizer's update rules give; a key not held here falls back to the
rows path with the same result; bad arrays are refused before anything changes."""
import numpy as np
import pytest
from optimizer_rules import reference_step

import adapm
from adapm import optim

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import adapm.torch as at  # noqa: E402

pytestmark = pytest.mark.timeout(180)

KEYS, DIM = 40, 4
MODES = {"sum": 0, "mean": 1, "max": 2}


def random_bags(rng, num_bags, keys, weights=False):
    """(keys, bags, scale) of a batch: bags of 0 to 5 entries (some empty), duplicate keys,
    entries of a bag together, in order."""
    lengths = rng.integers(0, 6, num_bags)
    bags = np.repeat(np.arange(num_bags, dtype=np.int64), lengths)
    entries = rng.choice(keys, size=bags.shape[0]).astype(np.uint64)
    scale = rng.random(bags.shape[0]).astype(np.float32) if weights else None
    return entries, bags, scale


def pooled_reference(values, keys, bags, scale, mode, num_bags):
    """torch's embedding_bag on the rows (offsets from the bags)."""
    offsets = torch.from_numpy(np.searchsorted(bags, np.arange(num_bags)).astype(np.int64))
    weight = torch.from_numpy(values[:, :DIM].astype(np.float32))
    return F.embedding_bag(torch.from_numpy(keys.astype(np.int64)), weight, offsets,
                           mode=mode, per_sample_weights=None if scale is None
                           else torch.from_numpy(scale)).numpy()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_pool_is_torchs_embedding_bag_and_leaves_keys_not_held_out(make_table, mode,
                                                                        seed):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((KEYS, DIM + 2)).astype(np.float32)
    values[:, :DIM] = np.round(values[:, :DIM], 1)  # ties, for max's first-wins rule
    held = np.arange(0, KEYS - 8, dtype=np.uint64)  # the last 8 keys are not held here
    table = make_table(num_keys=KEYS, value_length=DIM + 2, owned=held,
                       values=values[:KEYS - 8].reshape(-1))
    view = table.view
    for step in range(20):
        num_bags = int(rng.integers(1, 9))
        keys, bags, scale = random_bags(rng, num_bags, held, weights=mode == "sum" and
                                        step % 2 == 0)
        out = np.empty((num_bags, DIM), np.float32)
        argmax = np.empty((num_bags, DIM), np.int64)
        misses = np.empty(keys.shape[0], np.uint64)
        assert view.bag_pool(keys, bags, scale, MODES[mode], out, argmax, misses) == 0
        np.testing.assert_allclose(out, pooled_reference(values, keys, bags, scale, mode,
                                                         num_bags), rtol=1e-6, atol=1e-6)
        if mode == "max":  # each element's winner: the first entry of its bag with the max
            for bag in range(num_bags):
                mine = np.flatnonzero(bags == bag)
                for j in range(DIM):
                    expect = mine[np.argmax(values[keys[mine].astype(np.intp), j])] \
                        if mine.shape[0] else -1
                    assert argmax[bag, j] == expect
    # entries of keys not held here: misses, in order, left out of the pool
    keys = np.array([3, 35, 4, 39, 3], np.uint64)
    bags = np.array([0, 0, 1, 1, 1], np.int64)
    out, argmax = np.empty((2, DIM), np.float32), np.empty((2, DIM), np.int64)
    misses = np.empty(5, np.uint64)
    assert view.bag_pool(keys, bags, None, MODES[mode], out, argmax, misses) == 2
    assert misses[:2].tolist() == [1, 3]
    np.testing.assert_allclose(out, pooled_reference(
        values, keys[[0, 2, 4]], bags[[0, 2, 4]], None, mode, 2), rtol=1e-6)


def reference_bag_step(values, keys, bags, scale, mode, argmax, grad, opt, t=1):
    """Each entry's gradient as torch's backward of embedding_bag gives it, then the
    optimizer's update rules (tests/optimizer_rules.py), in float64. Returns (values
    after, the distinct keys, their gradients with the weight decay added, as the step
    used them)."""
    entry_grads = np.empty((keys.shape[0], DIM))
    for i, bag in enumerate(bags):
        if mode == "max":
            entry_grads[i] = np.where(argmax[bag] == i, grad[bag], 0)
        else:
            entry_grads[i] = (1.0 if scale is None else scale[i]) * grad[bag]
    values = values.astype(np.float64).copy()
    distinct, used = reference_step(opt, values, keys, entry_grads, DIM, t)
    return values, distinct, used


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("make_opt", [lambda: optim.SGD(0.1, weight_decay=0.01),
                                      lambda: optim.Adagrad(0.2),
                                      lambda: optim.RowWiseAdagrad(0.1),
                                      lambda: optim.Adam(0.05, weight_decay=0.01)],
                         ids=["sgd", "adagrad", "rowwise", "adam"])
def test_apply_bag_gradients_scatters_sums_and_steps_in_one_call(make_table, make_opt, mode):
    opt = make_opt()   # a fresh one: Adam counts its steps
    rng = np.random.default_rng(5)
    width = opt.value_length(DIM)
    values = opt.init(("normal", 0.5, 1))(np.arange(KEYS), width).astype(np.float32)
    table = make_table(num_keys=KEYS, value_length=width, values=values.reshape(-1))
    view = table.view
    keys, bags, scale = random_bags(rng, 6, np.arange(KEYS), weights=mode == "sum")
    out, argmax = np.empty((6, DIM), np.float32), np.empty((6, DIM), np.int64)
    misses = np.empty(keys.shape[0], np.uint64)
    assert view.bag_pool(keys, bags, scale, MODES[mode], out, argmax, misses) == 0
    if mode == "mean":
        scale = (1.0 / np.maximum(np.bincount(bags, minlength=6), 1)).astype(np.float32)[bags]
    grad = rng.standard_normal((6, DIM)).astype(np.float32)
    params = np.asarray(opt.params(DIM), np.float64)
    distinct = np.empty(keys.shape[0], np.uint64)
    summed = np.empty((keys.shape[0], DIM), np.float32)
    u, nmiss = view.apply_bag_gradients(keys, np.argsort(keys, kind="stable"), bags, scale,
                                        MODES[mode], grad, argmax, params, distinct, summed,
                                        misses)
    expect, expect_keys, expect_grads = reference_bag_step(values, keys, bags, scale, mode,
                                                           argmax, grad, opt)
    assert nmiss == 0 and np.array_equal(distinct[:u], expect_keys)
    np.testing.assert_allclose(summed[:u], expect_grads, rtol=1e-5, atol=1e-6)
    got = view.read_slots(np.arange(KEYS, dtype=np.uint64) * width,
                          np.full(KEYS, width, np.uint64)).reshape(KEYS, width)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


def test_bad_arrays_are_refused_before_anything_changes(make_table):
    opt = optim.SGD(1.0)
    table = make_table(num_keys=KEYS, value_length=DIM,
                       values=np.ones(KEYS * DIM, np.float32))
    view = table.view
    keys, bags = np.array([1, 2], np.uint64), np.array([0, 1], np.int64)
    out, argmax = np.empty((2, DIM), np.float32), np.empty((2, DIM), np.int64)
    misses = np.empty(2, np.uint64)
    before = view.read_slots(np.zeros(1, np.uint64), np.full(1, KEYS * DIM, np.uint64))
    for bad_keys, bad_bags in ((np.array([1, KEYS], np.uint64), bags),
                               (keys, np.array([0, 2], np.int64)),
                               (keys, np.array([0, -1], np.int64)),
                               (keys.astype(np.int64), bags)):
        with pytest.raises((IndexError, ValueError)):
            view.bag_pool(bad_keys, bad_bags, None, 0, out, argmax, misses)
    with pytest.raises(ValueError, match="mode"):
        view.bag_pool(keys, bags, None, 3, out, argmax, misses)
    grad = np.ones((2, DIM), np.float32)
    params = np.asarray(opt.params(DIM), np.float64)
    distinct, summed = np.empty(2, np.uint64), np.empty((2, DIM), np.float32)
    with pytest.raises(ValueError, match="permutation"):
        view.apply_bag_gradients(keys, np.array([0, 0], np.int64), bags, None, 0, grad,
                                 None, params, distinct, summed, misses)
    with pytest.raises(ValueError):
        view.apply_bag_gradients(keys, np.array([0, 1], np.int64), bags, None, 0,
                                 np.ones((2, DIM + 1), np.float32), None, params, distinct,
                                 summed, misses)
    after = view.read_slots(np.zeros(1, np.uint64), np.full(1, KEYS * DIM, np.uint64))
    np.testing.assert_array_equal(after, before)


# -- the worker and the module, on real clusters ------------------------------------------

def weighted_bags_task(w, steps):
    """EmbeddingBag (sum, per-sample weights without their own gradient, padding, empty
    bags) against torch's, trained by Adagrad, on one node: every step fused."""
    torch.set_num_threads(1)
    opt = optim.Adagrad(0.3)
    bag = at.EmbeddingBag(w, KEYS, DIM, mode="sum", optimizer=opt, padding_idx=0)
    ref = torch.nn.EmbeddingBag(KEYS, DIM, mode="sum", padding_idx=0)
    with torch.no_grad():
        ref.weight[:] = torch.from_numpy(w.pull_rows(np.arange(KEYS), opt))
    ref_opt = torch.optim.Adagrad(ref.parameters(), lr=0.3)
    fused = []
    apply_bag_gradients = w.apply_bag_gradients
    w.apply_bag_gradients = lambda *a: (fused.append(1), apply_bag_gradients(*a))[1]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        ids = torch.from_numpy(rng.integers(0, KEYS, 20))
        offsets = torch.tensor([0, 4, 4, 9, 15])
        psw = torch.from_numpy(rng.random(20).astype(np.float32))
        target = torch.randn(5, DIM)
        out = bag(ids, offsets, per_sample_weights=psw)
        ref_out = ref(ids, offsets, per_sample_weights=psw)
        np.testing.assert_allclose(out.detach(), ref_out.detach(), rtol=1e-5, atol=1e-6)
        ((out - target) ** 2).sum().backward()
        ((ref_out - target) ** 2).sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    rows = w.pull_rows(np.arange(KEYS), opt)
    np.testing.assert_allclose(rows, ref.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():   # evaluation: fused, nothing sent
        bag(torch.tensor([[1, 2], [3, 0]]))
    w.apply_bag_gradients = apply_bag_gradients   # the steps are counted
    refused = []   # bad entries: ValueError, and nothing pooled or stepped
    before = w.pull(np.arange(KEYS))
    for keys, bags in (([1, KEYS], [0, 1]), ([1, -2], [0, 1]), ([1, 2], [0, 2]),
                       ([1, 2], [0, -1]), ([1, 2], [0])):
        for call, args in ((w.pool_bags, (keys, bags, 2, opt)),
                           (w.apply_bag_gradients, (keys, bags, np.ones((2, DIM)), opt))):
            try:
                call(*args)
            except ValueError as exc:
                refused.append(str(exc))
    np.testing.assert_array_equal(w.pull(np.arange(KEYS)), before)
    return len(fused), refused


def test_weighted_bags_train_as_torch_through_the_fused_path():
    opt = optim.Adagrad(0.3)
    [(fused, refused)] = adapm.run(weighted_bags_task, args=(6,), nodes=1, num_keys=KEYS,
                                   value_length=opt.value_length(DIM),
                                   init=opt.init(("normal", 0.5, 2)))
    assert fused == 6
    assert len(refused) == 10   # every bad call of both kinds
    assert "key 40 out of range [0, 40)" in refused[0]
    assert "key -2 out of range" in refused[2]
    assert "bag 2 of 2" in refused[4] and "in [0, 2)" in refused[4]
    assert "bag -1 of 2" in refused[6]
    assert "a bag" in refused[8]


def remote_rows_task(w):
    """Static placement on two nodes: half the rows live on the other node, so a batch
    with such a row is pooled from pulled rows (the fallback), one with only rows held here
    is fused; both train alike (SGD: each use of a row moves it by -lr)."""
    torch.set_num_threads(1)
    opt = optim.SGD(0.5)
    bag = at.EmbeddingBag(w, KEYS, DIM, mode="mean", optimizer=opt)
    mine = np.arange(w.node, KEYS, 2)   # the keys this node owns (static: home = key % 2)
    paths = []
    apply_bag_gradients, apply_gradients = w.apply_bag_gradients, w.apply_gradients
    w.apply_bag_gradients = lambda *a: (paths.append("fused"), apply_bag_gradients(*a))[1]
    w.apply_gradients = lambda *a: (paths.append("rows"), apply_gradients(*a))[1]
    if w.rank == 0:
        for ids in (mine[:6].reshape(2, 3), np.arange(6).reshape(2, 3)):
            before = w.pull_rows(np.arange(KEYS), opt)
            out = bag(torch.from_numpy(ids))
            np.testing.assert_allclose(out.detach().numpy(),
                                       before[ids].mean(axis=1), rtol=1e-6)
            out.sum().backward()
            w.wait_sync()
            after = w.pull_rows(np.arange(KEYS), opt)
            expect = before.copy()
            np.add.at(expect, ids.reshape(-1), -0.5 / 3)
            np.testing.assert_allclose(after, expect, rtol=1e-6, atol=1e-6)
    w.barrier()
    return paths


def test_a_batch_with_rows_held_elsewhere_falls_back_with_the_same_result():
    opt = optim.SGD(0.5)
    results = adapm.run(remote_rows_task, nodes=2, num_keys=KEYS, value_length=DIM,
                        mode="static", init=opt.init(("normal", 0.5, 4)))
    assert results[0] == ["fused", "rows"]
    assert results[1] == []



@pytest.mark.parametrize("num_keys", [40, 5000, 3_000_000])
def test_the_kernels_own_sort_groups_as_a_stable_argsort(make_table, num_keys):
    """order=None: the kernel's radix sort (one pass per 11 bits of the key range) gives
    the distinct keys, summed gradients and steps that numpy's stable argsort gives."""
    rng = np.random.default_rng(num_keys)
    opt = optim.Adagrad(0.1)
    width = opt.value_length(DIM)
    m = min(300, num_keys)
    used = np.sort(rng.choice(num_keys, m, replace=False)).astype(np.uint64)
    tables = [make_table(num_keys=num_keys, value_length=width, owned=used,
                         values=np.ones(m * width, np.float32), arena_capacity=m * width)
              for _ in range(2)]
    keys = rng.choice(used, 1000).astype(np.uint64)
    bags = np.sort(rng.integers(0, 50, 1000)).astype(np.int64)
    grad = rng.standard_normal((50, DIM)).astype(np.float32)
    params = np.asarray(opt.params(DIM), np.float64)
    results = []
    for table, order in zip(tables, (None, np.argsort(keys, kind="stable"))):
        distinct, summed = np.empty(1000, np.uint64), np.empty((1000, DIM), np.float32)
        misses = np.empty(1000, np.uint64)
        u, nmiss = table.view.apply_bag_gradients(keys, order, bags, None, 0, grad, None,
                                                  params, distinct, summed, misses)
        assert nmiss == 0
        values = np.empty(m * width, np.float32)
        assert table.view.pull(used, values, np.empty(m, np.uint64)) == 0
        results.append((distinct[:u], summed[:u], values))
    (d0, s0, v0), (d1, s1, v1) = results
    assert np.array_equal(d0, d1) and np.array_equal(d0, np.unique(keys))
    np.testing.assert_array_equal(s0, s1)   # the same additions in the same order
    np.testing.assert_array_equal(v0, v1)


def collection_task(w, steps):
    """Four tables (sum with per-sample weights, sum with padding, max, mean) in one
    EmbeddingBagCollection, against three torch EmbeddingBags trained by Adagrad: the
    outputs and rows equal torch's after every step; each (mode, optimizer) group (here:
    the two sum tables, the max one, the mean one) is one pool_bags and one
    apply_bag_gradients call. keys_of gives the batch's distinct keys, sorted, whatever
    the order of the tables' key ranges."""
    torch.set_num_threads(1)
    opt = optim.Adagrad(0.2)
    specs = [dict(n=10, offset=0, mode="sum"), dict(n=12, offset=10, mode="sum", pad=3),
             dict(n=8, offset=22, mode="max"), dict(n=6, offset=30, mode="mean")]
    ours = at.EmbeddingBagCollection([
        at.EmbeddingBag(w, s["n"], DIM, mode=s["mode"], optimizer=opt,
                        key_offset=s["offset"], padding_idx=s.get("pad")) for s in specs])
    descending = at.EmbeddingBagCollection(list(ours.bags)[::-1])  # for keys_of
    refs = [torch.nn.EmbeddingBag(s["n"], DIM, mode=s["mode"], padding_idx=s.get("pad"))
            for s in specs]
    for s, ref in zip(specs, refs):
        with torch.no_grad():
            ref.weight[:] = torch.from_numpy(
                w.pull_rows(np.arange(s["offset"], s["offset"] + s["n"]), opt))
    ref_opt = torch.optim.Adagrad([p for r in refs for p in r.parameters()], lr=0.2)
    calls = {"pool": 0, "apply": 0}
    pool_bags, apply_bag_gradients = w.pool_bags, w.apply_bag_gradients

    def pool(*a):
        calls["pool"] += 1
        return pool_bags(*a)

    def apply(*a):
        calls["apply"] += 1
        return apply_bag_gradients(*a)

    w.pool_bags, w.apply_bag_gradients = pool, apply
    rng = np.random.default_rng(3)
    for _ in range(steps):
        inputs = [(torch.from_numpy(rng.integers(0, 10, 9)), torch.tensor([0, 2, 2, 6]),
                   torch.from_numpy(rng.random(9).astype(np.float32))),
                  torch.from_numpy(rng.integers(0, 12, (4, 3))),
                  (torch.from_numpy(rng.integers(0, 8, 7)), torch.tensor([0, 3, 3])),
                  torch.from_numpy(rng.integers(0, 6, (4, 2)))]
        ids = [np.asarray(inp[0] if isinstance(inp, tuple) else inp).reshape(-1)
               for inp in inputs]
        expected = np.unique(np.concatenate([s["offset"] + i[i != s.get("pad", -1)]
                                             for s, i in zip(specs, ids)]))
        np.testing.assert_array_equal(ours.keys_of(inputs), expected)  # ranges ascend
        np.testing.assert_array_equal(descending.keys_of(inputs[::-1]), expected)
        outs = ours(inputs)
        ref_outs = [ref(*(inp if isinstance(inp, tuple) else (inp,)))
                    for ref, inp in zip(refs, inputs)]
        targets = [torch.randn(o.shape) for o in ref_outs]
        for out, ref_out in zip(outs, ref_outs):
            np.testing.assert_allclose(out.detach(), ref_out.detach(), rtol=1e-5, atol=1e-6)
        sum(((o - t) ** 2).sum() for o, t in zip(outs, targets)).backward()
        sum(((o - t) ** 2).sum() for o, t in zip(ref_outs, targets)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for s, ref in zip(specs, refs):
            np.testing.assert_allclose(
                w.pull_rows(np.arange(s["offset"], s["offset"] + s["n"]), opt),
                ref.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    return calls


def test_a_collection_pools_and_steps_each_mode_of_its_tables_in_one_call():
    opt = optim.Adagrad(0.2)
    [calls] = adapm.run(collection_task, args=(4,), nodes=1, num_keys=KEYS,
                        value_length=opt.value_length(DIM), init=opt.init(("normal", 0.5, 6)))
    assert calls == {"pool": 3 * 4, "apply": 3 * 4}   # sum, max and mean: three groups


def test_a_collection_refuses_what_is_not_its_tables():
    with pytest.raises(TypeError):
        at.EmbeddingBagCollection([])
    with pytest.raises(TypeError):
        at.EmbeddingBagCollection([torch.nn.EmbeddingBag(3, 2)])
