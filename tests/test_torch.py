"""adapm.torch: embeddings in the parameter server, trained like torch's own."""
import pickle
import time

import numpy as np
import pytest

import adapm
from adapm.data import IntentLoader
from adapm.initializers import initial_values

torch = pytest.importorskip("torch")
import adapm.torch as at  # noqa: E402  (only once torch is known to be there)

pytestmark = pytest.mark.timeout(120)

N, DIM, OFFSET = 10, 4, 3


def make(name):
    """(our optimizer, a function making torch's equivalent for some parameters)."""
    if name == "sgd":
        return at.SGD(0.1), lambda params: torch.optim.SGD(params, lr=0.1)
    return (at.Adagrad(0.5, eps=1e-6, initial_accumulator_value=0.1),
            lambda params: torch.optim.Adagrad(params, lr=0.5, eps=1e-6,
                                               initial_accumulator_value=0.1))


def versus_torch_task(w, name, steps):
    """Train our Embedding and a torch.nn.Embedding with the same initial weights on the
    same batches (with duplicate ids); record both after every step."""
    torch.manual_seed(0)
    opt, torch_opt = make(name)
    emb = at.Embedding(w, N, DIM, opt, key_offset=OFFSET)
    ref = torch.nn.Embedding(N, DIM)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w.pull(np.arange(OFFSET, OFFSET + N))[:, :DIM]))
    ref_opt = torch_opt(ref.parameters())
    rng = np.random.default_rng(1)
    records = []
    for _ in range(steps):
        ids = torch.from_numpy(rng.integers(0, N, size=(3, 5)))
        target = torch.randn(3, 5, DIM)
        out = emb(ids)
        ((out - target) ** 2).sum().backward()
        ref_opt.zero_grad()
        ref_out = ref(ids)
        ((ref_out - target) ** 2).sum().backward()
        ref_grad = ref.weight.grad.numpy().copy()
        ref_opt.step()
        keys, grad = emb.last_update
        state = ref_opt.state[ref.weight]
        records.append(dict(
            ids=ids.numpy(), out=out.detach().numpy(), ref_out=ref_out.detach().numpy(),
            keys=keys, grad=grad, ref_grad=ref_grad, table=w.pull(np.arange(w.num_keys)),
            ref_weight=ref.weight.detach().numpy().copy(),
            ref_sum=state["sum"].numpy().copy() if "sum" in state else None))
    with torch.no_grad():  # evaluation: no graph, hence no push
        emb(torch.arange(N))
    return records, w.pull(np.arange(w.num_keys)), list(emb.parameters())


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_one_node_matches_torch_embedding_and_optimizer(name):
    opt, _ = make(name)
    init = at.embedding_init(DIM, opt, std=0.5, seed=7)
    num_keys = N + OFFSET + 2
    [(records, final, params)] = adapm.run(
        versus_torch_task, args=(name, 6), nodes=1, num_keys=num_keys,
        value_length=at.value_length(DIM, opt), init=init)
    assert params == []  # nothing for a torch optimizer to touch
    initial = init(np.arange(num_keys, dtype=np.uint64))
    assert any(len(r["keys"]) < r["ids"].size for r in records)  # duplicates were summed
    for r in records:
        np.testing.assert_allclose(r["out"], r["ref_out"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(r["keys"], np.unique(r["ids"]) + OFFSET)
        np.testing.assert_allclose(r["grad"], r["ref_grad"][r["keys"] - OFFSET],
                                   rtol=1e-5, atol=1e-6)
        untouched = np.setdiff1d(np.arange(N), r["keys"] - OFFSET)
        assert not r["ref_grad"][untouched].any()
        rows = r["table"][OFFSET:OFFSET + N]
        np.testing.assert_allclose(rows[:, :DIM], r["ref_weight"], rtol=1e-5, atol=1e-6)
        if name == "adagrad":
            np.testing.assert_allclose(rows[:, DIM:], r["ref_sum"], rtol=1e-5, atol=1e-6)
    # keys outside the table's range are never written; the no_grad forward pushed nothing
    outside = np.r_[0:OFFSET, OFFSET + N:num_keys]
    np.testing.assert_array_equal(final[outside], initial[outside])
    np.testing.assert_array_equal(final, records[-1]["table"])


def init_rows(keys, std, seed):
    lengths = np.full(len(keys), DIM, dtype=np.uint64)
    flat = initial_values(("normal", std, seed), np.asarray(keys, dtype=np.uint64), lengths,
                          "float32")
    return flat.reshape(-1, DIM)


def test_value_length_and_init_layout():
    assert at.value_length(DIM, at.SGD(0.1)) == DIM
    assert at.value_length(DIM, at.Adagrad(0.1)) == 2 * DIM
    keys = np.array([5, 0, 99], dtype=np.uint64)
    adagrad = at.Adagrad(0.1, eps=1e-8, initial_accumulator_value=0.25)
    init = pickle.loads(pickle.dumps(at.embedding_init(DIM, adagrad, std=0.3, seed=4)))
    values = init(keys)
    assert values.shape == (3, 2 * DIM) and values.dtype == np.float32
    np.testing.assert_array_equal(values[:, :DIM], init_rows(keys, 0.3, 4))
    np.testing.assert_array_equal(values[:, DIM:], 0.25)
    sgd = at.embedding_init(DIM, at.SGD(0.1), std=0.3, seed=4)(keys)
    np.testing.assert_array_equal(sgd, values[:, :DIM])  # the row does not depend on layout


def intent_loader_task(w, lr, batches, batch_size):
    """Each worker trains through IntentLoader over a torch DataLoader on ids that overlap
    the other worker's; loss = sum of the looked-up rows, so each use of a row adds -lr."""
    torch.set_num_threads(1)
    emb = at.Embedding(w, 60, DIM, at.SGD(lr))
    gen = torch.Generator().manual_seed(w.rank)
    ids = torch.randint(0, 40, (batches * batch_size, 3), generator=gen) + 20 * w.rank
    ids[::5, 0] = 0  # a row both workers update often
    data = torch.utils.data.TensorDataset(ids)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=gen)
    counts = np.zeros(60, dtype=np.int64)
    warm = None
    for step, (batch,) in enumerate(IntentLoader(w, loader, keys_of=lambda b: emb.keys(b[0]))):
        if step == batches // 4:
            warm = w.stats()
        emb(batch).sum().backward()
        np.add.at(counts, batch.numpy().reshape(-1), 1)
        time.sleep(0.003)  # a model's compute: lets the manager act on the intents
    end = w.stats()
    w.wait_sync()
    w.barrier()
    local = sum(end[k] - warm[k] for k in ("pulls_local", "pushes_local"))
    remote = sum(end[k] - warm[k] for k in ("pulls_remote", "pushes_remote"))
    return counts, w.pull(np.arange(60)), local / max(local + remote, 1)


def test_two_nodes_intent_loader_loses_no_update_and_stays_local():
    lr, std, seed = 0.25, 0.5, 3
    results = adapm.run(intent_loader_task, args=(lr, 80, 8), nodes=2, workers_per_node=1,
                        num_keys=60, value_length=DIM, mode="adaptive",
                        init=at.embedding_init(DIM, at.SGD(lr), std=std, seed=seed))
    total = sum(counts for counts, _, _ in results)
    assert total.sum() == 2 * 80 * 8 * 3 and total[20:40].min() > 0  # rows both workers use
    expected = init_rows(np.arange(60), std, seed) - lr * total[:, None].astype(np.float32)
    for _, table, share in results:
        # a lost (or doubled) update would be off by at least lr = 0.25
        np.testing.assert_allclose(table, expected, rtol=0, atol=1e-4)
        assert share >= 0.8, f"only {share:.0%} of accesses local"


class FakeWorker:
    """The attributes Embedding checks, without a cluster (ids are checked before any pull)."""

    def __init__(self, value_length=DIM, dtype=np.float32, num_keys=N):
        self.value_length, self.dtype, self.num_keys = value_length, np.dtype(dtype), num_keys

    def pull(self, keys):
        raise AssertionError("bad ids must be refused before anything is pulled")


def test_bad_ids_are_refused():
    emb = at.Embedding(FakeWorker(), N, DIM, at.SGD(0.1))
    for ids, match in [(torch.tensor([0, N]), f"id {N} out of range"),
                       (torch.tensor([[-1, 2]]), "id -1 out of range"),
                       (torch.tensor([1.0, 2.0]), "integers"),
                       (torch.tensor([True]), "integers"),
                       (np.array([0.5]), "integers")]:
        with pytest.raises(ValueError, match=match):
            emb(ids)
        with pytest.raises(ValueError, match=match):
            emb.keys(ids)
    np.testing.assert_array_equal(emb.keys(torch.tensor([[3, 1], [3, 9]])), [1, 3, 9])


def test_bad_tables_and_arguments_are_refused():
    with pytest.raises(ValueError, match="need value_length 8"):
        at.Embedding(FakeWorker(value_length=DIM), N, DIM, at.Adagrad(0.1))
    with pytest.raises(ValueError, match="per key"):
        at.Embedding(FakeWorker(value_length=0), N, DIM, at.SGD(0.1))
    with pytest.raises(ValueError, match="float32"):
        at.Embedding(FakeWorker(dtype=np.float64), N, DIM, at.SGD(0.1))
    with pytest.raises(ValueError, match="do not fit"):
        at.Embedding(FakeWorker(), N, DIM, at.SGD(0.1), key_offset=1)
    with pytest.raises(ValueError, match="embedding_dim"):
        at.Embedding(FakeWorker(), N, 0, at.SGD(0.1))
    with pytest.raises(ValueError, match="lr"):
        at.SGD(-1.0)
    with pytest.raises(TypeError, match="optimizer"):
        at.value_length(DIM, torch.optim.SGD)


def wrong_table_task(w):
    errors = []
    try:
        at.Embedding(w, N, DIM, at.Adagrad(0.1))
    except ValueError as exc:
        errors.append(str(exc))
    emb = at.Embedding(w, N, DIM, at.SGD(0.1))
    try:
        emb(torch.tensor([N]))
    except ValueError as exc:
        errors.append(str(exc))
    return errors


def test_bad_input_with_a_real_worker():
    [errors] = adapm.run(wrong_table_task, nodes=1, num_keys=N, value_length=DIM)
    assert len(errors) == 2
    assert "need value_length 8" in errors[0] and "table has value_length 4" in errors[0]
    assert f"id {N} out of range" in errors[1]


def test_the_init_that_node_servers_unpickle_needs_no_torch(tmp_path):
    """Node servers unpickle embedding_init(...): it must not drag torch in. (Run outside
    the checkout, whose adapm/ folder would shadow the installed package.)"""
    import pickle
    import subprocess
    import sys

    from adapm import torch as adapm_torch
    blob = pickle.dumps(adapm_torch.embedding_init(4, adapm_torch.Adagrad(0.1)))
    code = ("import pickle, sys; init = pickle.loads(sys.stdin.buffer.read()); "
            "v = init(__import__('numpy').arange(3)); "
            "assert v.shape == (3, 8), v.shape; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], input=blob, check=True, timeout=60,
                   cwd=tmp_path)
