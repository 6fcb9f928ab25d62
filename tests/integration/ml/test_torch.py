"""adapm.torch: Embedding and EmbeddingBag compute what torch's compute, and the rows they
train in the parameter server follow what torch.optim does to torch's own tables.

Most cases run twice: against FakeWorker (numpy, in this process: pull_rows and
apply_gradients with the update rules of adapm.optim), which checks the modules alone, and
against a real cluster (adapm.run), which checks them with the fused optimizers."""
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import adapm
from adapm.data import IntentLoader
from adapm.table.initializers import initial_values

torch = pytest.importorskip("torch")
import adapm.torch as at  # noqa: E402  (only once torch is known to be there)
from adapm.optim import (  # noqa: E402
    KIND_ADAGRAD,
    KIND_ROWWISE_ADAGRAD,
    KIND_SGD,
    SGD,
    Adagrad,
    Adam,
    RowWiseAdagrad,
)

pytestmark = pytest.mark.timeout(300)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VALUE_LENGTH = 12   # every optimizer below fits it: SGD dim 12, Adagrad 6, Adam 4, RowWise 11
INIT = ("normal", 0.5, 7)
HASH_POOL = np.array([-5, 3, 17, 2**40 + 1, -2**62, 123456789012, 9, 10**18], dtype=np.int64)
HASH_PADDING = -7

# name: (our optimizer, torch's for the same hyper-parameters or None, its row length)
OPTIMIZERS = {
    "sgd": (lambda: SGD(lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1), 12),
    "adagrad": (lambda: Adagrad(lr=0.5, eps=1e-6, initial_accumulator_value=0.1),
                lambda ps: torch.optim.Adagrad(ps, lr=0.5, eps=1e-6,
                                               initial_accumulator_value=0.1), 6),
    "adam": (lambda: Adam(lr=0.05, betas=(0.8, 0.9), eps=1e-6),
             lambda ps: torch.optim.SparseAdam(ps, lr=0.05, betas=(0.8, 0.9), eps=1e-6), 4),
    # TorchRec's row-wise Adagrad has no torch.optim counterpart: Pair steps it by hand.
    "rowwise": (lambda: RowWiseAdagrad(lr=0.5, eps=1e-6, initial_accumulator_value=0.1),
                None, 11),
}


def spec(kind, opt, n, offset, mode="sum", style="2d", psw=False, pad=None, hashed=False,
         int32=False):
    """One table of a test: kind "emb" (Embedding) or "bag" (EmbeddingBag); style of the
    input: "2d", "1d" (Embedding), "offsets" or "last" (include_last_offset=True)."""
    return dict(kind=kind, opt=opt, n=n, offset=offset, mode=mode, style=style, psw=psw,
                pad=pad, hashed=hashed, int32=int32)


class TableInit:
    """init for a cluster whose key ranges belong to tables with different optimizers (one
    value_length): each range by its optimizer's init, other keys plain normal values."""

    needs_value_length = True   # called init(keys, value_length), as adapm.optim's inits

    def __init__(self, specs, num_keys):
        self.specs, self.num_keys = specs, num_keys

    def __call__(self, keys, value_length=VALUE_LENGTH):
        keys = np.asarray(keys, dtype=np.uint64)
        values = initial_values(INIT, keys, np.full(len(keys), value_length, np.uint64),
                                np.float64).reshape(-1, value_length)
        for s in self.specs:
            inside = (keys >= s["offset"]) & (keys < s["offset"] + s["n"])
            if inside.any():
                opt = OPTIMIZERS[s["opt"]][0]()
                values[inside] = opt.init(INIT)(keys[inside], value_length)
        return values


class FakeWorker:
    """A one-worker table in numpy: pull_rows and apply_gradients as the API specifies
    them (update rules of adapm/optim.py's docstring), plus what IntentLoader uses.
    Records every call."""

    rank, num_workers = 0, 1

    def __init__(self, num_keys, init=None, value_length=VALUE_LENGTH, dtype=np.float32):
        self.num_keys, self.value_length, self.dtype = num_keys, value_length, np.dtype(dtype)
        init = init or TableInit([], num_keys)
        self.values = np.asarray(init(np.arange(num_keys), value_length), dtype=np.float32)
        self.pulls, self.applied, self.intents = [], [], []
        self.clock = 0
        self.refuse_pulls = False

    def pull(self, keys):
        return self.values[np.asarray(keys, dtype=np.int64)].copy()

    def pull_rows(self, keys, opt):
        assert not self.refuse_pulls, "nothing may be fetched for a bad batch"
        keys = np.asarray(keys)
        assert keys.ndim == 1 and np.unique(keys).size == keys.size, keys
        self.pulls.append(keys.copy())
        return self.values[keys.astype(np.int64), : opt.dim_of(self.value_length)].copy()

    def apply_gradients(self, keys, grads, opt):
        keys, grads = np.asarray(keys, dtype=np.int64), np.asarray(grads)
        dim = opt.dim_of(self.value_length)
        assert keys.ndim == 1 and grads.shape == (keys.size, dim), (keys.shape, grads.shape)
        self.applied.append((keys.copy(), grads.copy()))
        kind, _, lr, eps, decay, beta1, beta2, step = opt.params(dim)
        distinct, inverse = np.unique(keys, return_inverse=True)
        g = np.zeros((distinct.size, dim))
        np.add.at(g, inverse.reshape(-1), grads)
        v = self.values[distinct].astype(np.float64)
        w = v[:, :dim]
        g += decay * w
        if kind == KIND_SGD:
            w -= lr * g
        elif kind == KIND_ADAGRAD:
            v[:, dim:] += g * g
            w -= lr * g / (np.sqrt(v[:, dim:]) + eps)
        elif kind == KIND_ROWWISE_ADAGRAD:
            v[:, dim] += (g * g).mean(axis=1)
            w -= lr * g / (np.sqrt(v[:, dim:]) + eps)
        else:
            m, s = v[:, dim:2 * dim], v[:, 2 * dim:]
            m += (1 - beta1) * (g - m)
            s += (1 - beta2) * (g * g - s)
            w -= step * m / (np.sqrt(s) + eps)
        self.values[distinct] = v

    def intent(self, keys, start, end=None):
        self.intents.append((np.asarray(keys).copy(), start))

    def reaction_time(self):
        return 0.0

    def advance_clock(self):
        self.clock += 1

    def wait_sync(self):
        pass

    def barrier(self):
        pass


class Pair:
    """One of our tables and torch's equivalent (torch.nn.Embedding/EmbeddingBag with the
    same rows, the matching torch.optim optimizer), fed the same batches."""

    def __init__(self, w, s, device="cpu"):
        self.w, self.s, self.device = w, s, torch.device(device)
        make, make_torch, self.dim = OPTIMIZERS[s["opt"]]
        self.opt, n = make(), s["n"]
        kw = dict(optimizer=self.opt, key_offset=s["offset"], padding_idx=s["pad"],
                  hash_ids=s["hashed"])
        # torch's table: hashed ids are bucketed here; a hashed padding id goes to an
        # extra zero row (ours has no row for it)
        self.ref_n = n + (s["hashed"] and s["pad"] is not None)
        ref_pad = n if s["hashed"] and s["pad"] is not None else s["pad"]
        sparse = s["opt"] == "adam"
        if s["kind"] == "emb":
            self.ours = at.Embedding(w, n, self.dim, **kw)
            self.ref = torch.nn.Embedding(self.ref_n, self.dim, padding_idx=ref_pad,
                                          sparse=sparse)
        else:
            last = s["style"] == "last"
            self.ours = at.EmbeddingBag(w, n, self.dim, mode=s["mode"],
                                        include_last_offset=last, **kw)
            self.ref = torch.nn.EmbeddingBag(self.ref_n, self.dim, mode=s["mode"],
                                             padding_idx=ref_pad, sparse=sparse,
                                             include_last_offset=last)
        self.ours.to(self.device)
        rows = w.pull_rows(np.arange(s["offset"], s["offset"] + n), self.opt)
        with torch.no_grad():
            self.ref.weight.zero_()
            self.ref.weight[:n] = torch.from_numpy(np.asarray(rows, dtype=np.float32))
        self.ref.to(self.device)
        self.ref_opt = make_torch([self.ref.weight]) if make_torch else None
        self.rowwise_sum = np.full(self.ref_n, 0.1)
        assert list(self.ours.parameters()) == []   # nothing for a torch optimizer

    def batch(self, rng):
        """(raw ids, offsets or None, per_sample_weights or None) of one step."""
        s = self.s
        shape = {"2d": (3, 4) if s["kind"] == "emb" else (4, 3), "1d": (7,)}.get(s["style"],
                                                                                (12,))
        pool = HASH_POOL if s["hashed"] else np.arange(s["n"])
        raw = rng.choice(pool, size=shape)
        if s["pad"] is not None:
            pad = s["pad"] if s["hashed"] else s["pad"] % s["n"]
            raw[rng.random(shape) < 0.25] = pad
            raw.flat[0] = pad   # a padding entry in every batch (and the first bag's)
        offsets = {"offsets": [0, 3, 3, 7], "last": [0, 3, 3, 7, 12]}.get(s["style"])
        psw = rng.random(shape).astype(np.float32) if s["psw"] else None
        return raw, offsets, psw

    def ref_ids(self, raw):
        s = self.s
        if not s["hashed"]:
            return raw
        ids = at.hash_bucket(raw, s["n"])
        if s["pad"] is not None:
            ids[raw == s["pad"]] = s["n"]
        return ids

    def touched(self, raw):
        """The rows torch's sparse gradient holds: those of non-padding entries."""
        ids = self.ref_ids(raw)
        return np.unique(ids[ids != self.ref.padding_idx] if self.ref.padding_idx
                         is not None else ids)

    def forward(self, batch, step, active):
        """Our output and torch's for one batch; ours records a graph only if `active`
        (this worker's turn)."""
        raw, offsets, psw = batch
        ids = torch.from_numpy(raw.astype(np.int32 if self.s["int32"] else np.int64))
        if step % 2 == 0:   # ids on the device; on odd steps the module's device decides
            ids = ids.to(self.device)
        ref_ids = torch.from_numpy(self.ref_ids(raw)).to(self.device)
        kw, ref_kw = {}, {}
        if self.s["kind"] == "bag":
            if offsets is not None:
                kw["offsets"] = torch.tensor(offsets, device=ids.device)
                ref_kw["offsets"] = torch.tensor(offsets, device=self.device)
            if psw is not None:
                self.psw = kw["per_sample_weights"] = torch.tensor(
                    psw, device=self.device, requires_grad=True)
                self.ref_psw = ref_kw["per_sample_weights"] = torch.tensor(
                    psw, device=self.device, requires_grad=True)
        with torch.set_grad_enabled(active):
            out = self.ours(ids, **kw)
        assert out.device.type == self.device.type and out.dtype == torch.float32
        assert out.requires_grad == active
        return out, self.ref(ref_ids, **ref_kw)

    def ref_step(self, raw):
        """torch's optimizer step; the gradient of torch's table (dense)."""
        grad = self.ref.weight.grad
        grad = (grad.to_dense() if grad.is_sparse else grad).detach().cpu().numpy().copy()
        if self.ref_opt is not None:
            self.ref_opt.step()
            self.ref_opt.zero_grad()
        else:   # row-wise Adagrad, on the rows of the sparse gradient
            rows = self.touched(raw)
            g = grad[rows].astype(np.float64)
            self.rowwise_sum[rows] += (g * g).mean(axis=1)
            with torch.no_grad():
                step = 0.5 * g / (np.sqrt(self.rowwise_sum[rows])[:, None] + 1e-6)
                self.ref.weight[torch.from_numpy(rows).to(self.device)] -= \
                    torch.from_numpy(step).to(self.ref.weight)
            self.ref.weight.grad = None
        return grad

    def check_sent(self, raw, grad):
        """What our backward sent: the touched rows' keys, torch's gradient of them."""
        s = self.s
        keys, sent = self.ours.last_update
        expect = self.touched(raw) + s["offset"]
        np.testing.assert_array_equal(np.sort(keys), expect)
        np.testing.assert_allclose(sent, grad[keys - s["offset"]], rtol=1e-5, atol=1e-6)
        if s["psw"]:
            np.testing.assert_allclose(self.psw.grad.cpu(), self.ref_psw.grad.cpu(),
                                       rtol=1e-5, atol=1e-6)
        fetched = expect
        if s["kind"] == "emb" and s["pad"] is not None and not s["hashed"]:
            fetched = np.union1d(expect, [s["offset"] + s["pad"] % s["n"]])  # as stored
        np.testing.assert_array_equal(self.ours.keys_of(raw), fetched)

    def check_table(self):
        """Our rows and optimizer state in the table against torch's."""
        s, n, dim = self.s, self.s["n"], self.dim
        values = self.w.pull(np.arange(s["offset"], s["offset"] + n))
        weight = self.ref.weight.detach().cpu().numpy()[:n]
        np.testing.assert_allclose(
            self.w.pull_rows(np.arange(s["offset"], s["offset"] + n), self.opt), weight,
            rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values[:, :dim], weight, rtol=1e-5, atol=1e-6)
        if s["opt"] == "adagrad":
            state = self.ref_opt.state[self.ref.weight]["sum"].cpu().numpy()[:n]
        elif s["opt"] == "adam":
            st = self.ref_opt.state[self.ref.weight]
            state = np.hstack([st["exp_avg"].cpu().numpy(), st["exp_avg_sq"].cpu().numpy()])[:n] \
                if st else np.hstack([np.zeros((n, dim)), np.zeros((n, dim))])
        elif s["opt"] == "rowwise":
            state = self.rowwise_sum[:n, None]
        else:
            state = np.zeros((n, 0))
        np.testing.assert_allclose(values[:, dim:], state, rtol=1e-5, atol=1e-6)


def versus_torch_task(w, specs, steps, device="cpu"):
    """Train our tables and torch's on the same batches (one loss over all tables, one
    backward), checking outputs, the gradients sent and the tables after every step. With
    several workers they take turns: step i is worker i % num_workers's (the others look
    the batch up under no_grad and step torch's tables only). Returns the applied calls."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    pairs = [Pair(w, s, device) for s in specs]
    w.barrier()   # every worker read the initial rows
    rng = np.random.default_rng(1)   # the same batches in every worker
    batches = [[p.batch(rng) for p in pairs] for _ in range(steps)]
    gen = torch.Generator().manual_seed(2)
    calls = []   # (keys, "fused" or "rows") of each call that sent gradients
    apply_gradients = w.apply_gradients
    w.apply_gradients = lambda *a: (calls.append((a[0].copy(), "rows")), apply_gradients(*a))
    apply_bag_gradients = getattr(w, "apply_bag_gradients", None)
    if apply_bag_gradients is not None:   # a real worker: EmbeddingBag's fused path

        def counted(*args):
            sent = apply_bag_gradients(*args)
            calls.append((sent[0].copy(), "fused"))
            return sent

        w.apply_bag_gradients = counted
    loader = IntentLoader(w, batches, keys_of=lambda b: np.concatenate(
        [p.ours.keys_of(raw) for p, (raw, _, _) in zip(pairs, b)]))
    for step, batch in enumerate(loader):
        active = step % w.num_workers == w.rank
        outs = [p.forward(b, step, active) for p, b in zip(pairs, batch)]
        targets = [torch.randn(out.shape, generator=gen).to(device) for out, _ in outs]
        for out, ref_out in outs:
            np.testing.assert_allclose(out.detach().cpu(), ref_out.detach().cpu(),
                                       rtol=1e-5, atol=1e-6)
        w.barrier()   # every worker looked the batch up before this step's update
        before = len(calls)
        if active:
            sum(((out - t) ** 2).sum() for (out, _), t in zip(outs, targets)).backward()
            assert len(calls) - before == len(pairs)   # one apply_gradients per table
        sum(((ref_out - t) ** 2).sum() for (_, ref_out), t in zip(outs, targets)).backward()
        for p, (raw, _, _) in zip(pairs, batch):
            grad = p.ref_step(raw)
            if active:
                p.check_sent(raw, grad)
        w.wait_sync()
        w.barrier()
        for p in pairs:
            p.check_table()
        w.barrier()
    with torch.no_grad():   # evaluation: no graph, nothing sent
        for p, (raw, offsets, _) in zip(pairs, batches[0]):
            p.forward((raw, offsets, None), 0, False)
    w.apply_gradients = apply_gradients
    if apply_bag_gradients is not None:
        w.apply_bag_gradients = apply_bag_gradients
    return calls


# -- the modules alone, against FakeWorker ------------------------------------------------

def fake_specs():
    """Every input style, mode, padding and per_sample_weights, across the optimizers."""
    cases = [spec("emb", "sgd", 10, 3), spec("emb", "adagrad", 10, 0, style="1d", int32=True),
             spec("emb", "adam", 9, 2, pad=4), spec("emb", "rowwise", 9, 0, pad=-2),
             spec("emb", "adagrad", 5, 1, hashed=True),
             spec("emb", "adam", 5, 1, hashed=True, pad=HASH_PADDING, style="1d")]
    opts = ["sgd", "adagrad", "adam", "rowwise"]
    i = 0
    for mode in ("sum", "mean", "max"):
        for style in ("2d", "offsets", "last"):
            for pad in (None, 2):
                for psw in ((False, True) if mode == "sum" else (False,)):
                    opt = opts[i % 4] if mode != "max" else ("sgd", "adagrad", "rowwise")[i % 3]
                    cases.append(spec("bag", opt, 8, 4, mode, style, psw, pad, int32=i % 2))
                    i += 1
    cases.append(spec("bag", "adagrad", 5, 0, "mean", "offsets", pad=HASH_PADDING,
                      hashed=True))
    cases.append(spec("bag", "adam", 5, 0, "sum", "2d", psw=True, hashed=True))
    return cases


def case_id(s):
    return "-".join(str(v) for v in (s["kind"], s["opt"], s["mode"] if s["kind"] == "bag"
                                     else "", s["style"], "psw" if s["psw"] else "",
                                     f"pad{s['pad']}" if s["pad"] is not None else "",
                                     "hash" if s["hashed"] else "",
                                     "int32" if s["int32"] else "") if v)


@pytest.mark.parametrize("s", fake_specs(), ids=case_id)
def test_module_matches_torch_with_a_fake_table(s):
    w = FakeWorker(20, TableInit([s], 20))
    initial = w.values.copy()
    calls = versus_torch_task(w, [s], steps=4)
    assert len(calls) == 4 and len(w.applied) == 4
    assert all(np.unique(keys).size == keys.size for keys, _ in w.applied)  # summed here
    # one fetch per forward (4 + the no_grad one), besides Pair's (1 + 4 checks)
    assert len(w.pulls) == 5 + 5
    outside = np.r_[0:s["offset"], s["offset"] + s["n"]:20]
    np.testing.assert_array_equal(w.values[outside], initial[outside])
    assert len(w.intents) == 4


def test_several_tables_with_a_fake_table():
    specs = [spec("emb", "sgd", 10, 0, pad=3), spec("bag", "adagrad", 7, 10, psw=True,
                                                   style="offsets", pad=1),
             spec("bag", "adam", 6, 17, "mean"), spec("bag", "rowwise", 6, 23, "max", "last")]
    w = FakeWorker(31, TableInit(specs, 31))
    calls = versus_torch_task(w, specs, steps=3)
    assert len(calls) == 3 * len(specs)
    keys, _ = w.intents[0]
    assert keys.min() >= 0 and keys.max() < 29


def test_duplicate_ids_are_fetched_once_and_their_gradients_summed():
    w = FakeWorker(10, value_length=4)
    bag = at.EmbeddingBag(w, 10, 4, mode="sum", optimizer=SGD(lr=1.0))
    ids = torch.tensor([[1, 1, 2], [2, 1, 5]])
    before = w.values.copy()
    bag(ids).sum().backward()
    np.testing.assert_array_equal(w.pulls[-1], [1, 2, 5])
    keys, grads = w.applied[-1]
    np.testing.assert_array_equal(keys, [1, 2, 5])
    np.testing.assert_array_equal(grads, [[3] * 4, [2] * 4, [1] * 4])
    np.testing.assert_allclose(w.values, before - np.eye(10)[[1, 2, 5]].T @ grads, rtol=1e-6)


def test_no_grad_sends_nothing_and_bags_can_be_empty_or_all_padding():
    w = FakeWorker(10, value_length=4)
    bag = at.EmbeddingBag(w, 10, 4, mode="mean", optimizer=SGD(lr=1.0), padding_idx=0)
    with torch.no_grad():
        out = bag(torch.tensor([1, 2, 3]), torch.tensor([0, 3]))
    assert not out.requires_grad and w.applied == []
    np.testing.assert_array_equal(out[1], 0)
    out = bag(torch.tensor([0, 0]), torch.tensor([0, 1, 2, 2]))   # padding only, empty
    assert out.shape == (4, 4) and not out.any()
    out.sum().backward()
    assert w.applied == []   # no row got a gradient: no call at all
    emb = at.Embedding(w, 10, 4, optimizer=SGD(lr=1.0))
    out = emb(torch.zeros((2, 0), dtype=torch.long))
    assert out.shape == (2, 0, 4)
    out.sum().backward()
    assert w.applied == []


def test_ids_out_of_range_raise_index_error_before_anything_is_fetched():
    w = FakeWorker(30, value_length=4)
    w.refuse_pulls = True
    emb = at.Embedding(w, 10, 4, optimizer=SGD(0.1), key_offset=5)
    bag = at.EmbeddingBag(w, 10, 4, optimizer=SGD(0.1), key_offset=15)
    for ids, bad in [(torch.tensor([0, 10]), 10), (torch.tensor([[-1, 2]]), -1),
                     (np.array([3, 2**40]), 2**40)]:
        for module, keys in [(emb, "keys [5, 15)"), (bag, "keys [15, 25)")]:
            text = re.escape(f"id {bad} out of range [0, 10) of {type(module).__name__}"
                             f"(num_embeddings=10, key_offset={module.key_offset}) ({keys})")
            args = (torch.tensor([0]),) if module is bag and ids.ndim == 1 else ()
            with pytest.raises(IndexError, match=text):
                module(ids, *args)
            with pytest.raises(IndexError, match=text):
                module.keys_of(ids)
            with pytest.raises(ValueError):   # the older exception still catches it
                module.keys_of(ids)
    for ids in (torch.tensor([1.0]), torch.tensor([True]), np.array([0.5])):
        with pytest.raises(TypeError, match="integer"):
            emb(ids)


def test_bad_arguments_are_refused():
    w = FakeWorker(20, value_length=4)
    with pytest.raises(ValueError, match="need value_length 8"):
        at.Embedding(w, 10, 4, optimizer=Adagrad(0.1))
    with pytest.raises(ValueError, match="per key"):
        at.Embedding(FakeWorker(20, value_length=0, init=lambda k, v: np.zeros((len(k), 1))),
                     10, 4, optimizer=SGD(0.1))
    with pytest.raises(ValueError, match=r"keys \[15, 25\) do not fit a table of 20 keys"):
        at.Embedding(w, 10, 4, optimizer=SGD(0.1), key_offset=15)
    with pytest.raises(ValueError, match="dim"):
        at.Embedding(w, 10, 0, optimizer=SGD(0.1))
    with pytest.raises(ValueError, match="key_offset"):
        at.Embedding(w, 10, 4, optimizer=SGD(0.1), key_offset=-1)
    with pytest.raises(TypeError, match="optimizer"):
        at.Embedding(w, 10, 4)
    with pytest.raises(TypeError, match="adapm.optim"):
        at.EmbeddingBag(w, 10, 4, optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="mode"):
        at.EmbeddingBag(w, 10, 4, mode="min", optimizer=SGD(0.1))
    with pytest.raises(ValueError, match="padding_idx"):
        at.Embedding(w, 10, 4, optimizer=SGD(0.1), padding_idx=10)
    bag = at.EmbeddingBag(w, 10, 4, mode="mean", optimizer=SGD(0.1))
    w.refuse_pulls = True
    with pytest.raises(NotImplementedError, match="per_sample_weights"):
        bag(torch.tensor([[1, 2]]), per_sample_weights=torch.ones(1, 2))
    with pytest.raises(ValueError, match="offsets has to be None"):
        bag(torch.tensor([[1, 2]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="offsets has to be a 1D"):
        bag(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1D or 2D"):
        bag(torch.zeros((1, 1, 1), dtype=torch.long))


def test_reprs_and_properties():
    w = FakeWorker(20, value_length=4)
    bag = at.EmbeddingBag(w, 10, 4, mode="max", optimizer=SGD(0.1), key_offset=3,
                          padding_idx=-1, hash_ids=False)
    assert bag.padding_idx == 9 and bag.key_range == (3, 13) and bag.dim == 4
    assert "mode='max'" in repr(bag) and "padding_idx=9" in repr(bag)
    state = bag.state_dict()        # the rows, gathered from the table (SGD: no state)
    assert sorted(state) == ["_extra_state", "optimizer_state", "weight"]
    assert torch.equal(state["weight"], torch.from_numpy(w.values[3:13]))
    assert state["optimizer_state"].shape == (10, 0)


# -- hashing ---------------------------------------------------------------------------------

def test_hash_is_splitmix64_and_fixed():
    ids = np.array([0, 1, 2, -1, 2**62, -2**63, 123456789], dtype=np.int64)
    assert at.hash_bucket(ids, 1000).tolist() == [535, 465, 110, 936, 75, 915, 897]
    assert at.hash_bucket(ids, 2**40).tolist() == [
        246878686639, 1015910915265, 953962419918, 511560723488, 1007405738475,
        696097829851, 933046744697]
    # SplitMix64's first output for seed 0 is 0xE220A8397B1DCDAF
    assert at.hash_bucket([0], 2**63)[0] == 0xE220A8397B1DCDAF % 2**63
    assert at.hash_bucket(np.array([[5, 6]]), 7).shape == (1, 2)


def test_hash_is_the_same_in_another_process():
    ids = np.random.default_rng(0).integers(-2**63, 2**63 - 1, 1000, dtype=np.int64)
    code = ("import sys, numpy as np, adapm.torch as at; "
            "ids = np.frombuffer(sys.stdin.buffer.read(), dtype=np.int64); "
            "sys.stdout.buffer.write(at.hash_bucket(ids, 4099).tobytes())")
    other = subprocess.run([sys.executable, "-c", code], input=ids.tobytes(), check=True,
                           capture_output=True, timeout=120,
                           cwd=Path(__file__).parent).stdout  # not the checkout's root
    np.testing.assert_array_equal(np.frombuffer(other, dtype=np.int64),
                                  at.hash_bucket(ids, 4099))


def empty_buckets_variance(n, m):
    """Variance of the number of empty buckets after n uniform throws into m buckets."""
    q1, q2 = (1 - 1 / m) ** n, (1 - 2 / m) ** n
    return m * q1 + m * (m - 1) * q2 - m * m * q1 * q1


@pytest.mark.parametrize("n,m", [(100_000, 100_000), (10_000, 100_000), (300_000, 100_000),
                                 (5_000, 1_000_000), (1_000, 10)])
def test_hash_collision_rate_is_that_of_a_uniform_hash(n, m):
    """Measured collisions (ids without a row of their own) of sequential, strided and
    random ids: within 5 standard deviations of n - m(1 - (1 - 1/m)^n)."""
    rng = np.random.default_rng(n + m)
    random = np.unique(rng.integers(-2**63, 2**63 - 1, 2 * n, dtype=np.int64))
    expected = at.expected_collisions(n, m)
    assert expected == pytest.approx(n - m * (1 - (1 - 1 / m) ** n), rel=1e-9, abs=1e-6)
    tolerance = 5 * np.sqrt(empty_buckets_variance(n, m)) + 1
    for ids in (np.arange(n), np.arange(n) * 4096 + 7, rng.permutation(random)[:n]):
        measured = n - np.unique(at.hash_bucket(ids, m)).size
        assert abs(measured - expected) <= tolerance, (measured, expected, tolerance)


def test_hashed_ids_and_their_keys():
    w = FakeWorker(40, value_length=4)
    emb = at.Embedding(w, 16, 4, optimizer=SGD(0.1), key_offset=20, hash_ids=True,
                       padding_idx=-1)
    raw = np.array([[2**50, -3, 7], [-1, 2**50, 123]])
    keys = emb.keys_of(raw)
    expected = np.unique(at.hash_bucket(raw[raw != -1], 16)) + 20
    np.testing.assert_array_equal(keys, expected)
    out = emb(torch.from_numpy(raw)).detach()
    np.testing.assert_array_equal(out[1, 0], 0)   # a hashed padding id: zeros
    np.testing.assert_array_equal(
        out[0, 0], w.values[20 + at.hash_bucket([2**50], 16)[0]])


# -- the aliases of the older API -----------------------------------------------------------

def test_older_names_are_aliases_of_adapm_optim():
    assert at.SGD is SGD and at.Adagrad is Adagrad and at.Adam is Adam
    opt = Adagrad(0.1, initial_accumulator_value=0.25)
    assert at.value_length(4, opt) == opt.value_length(4) == 8
    keys = np.array([5, 0, 99], dtype=np.uint64)
    init = pickle.loads(pickle.dumps(at.embedding_init(4, opt, std=0.3, seed=4)))
    np.testing.assert_array_equal(init(keys, 8), opt.init(("normal", 0.3, 4))(keys, 8))
    np.testing.assert_array_equal(init(keys, 8)[:, 4:], 0.25)
    w = FakeWorker(10, value_length=8)
    emb = at.Embedding(w, 10, 4, opt)   # optimizer as the 4th positional argument
    np.testing.assert_array_equal(emb.keys(torch.tensor([[3, 1], [3, 9]])), [1, 3, 9])
    with pytest.raises(TypeError, match="optimizer"):
        at.value_length(4, torch.optim.SGD)


def test_the_init_that_node_servers_unpickle_needs_no_torch(tmp_path):
    """Node servers unpickle opt.init(...): it must not drag torch in. (Run outside the
    checkout, whose adapm/ folder would shadow the installed package.)"""
    blob = pickle.dumps(at.embedding_init(4, at.Adagrad(0.1)))
    code = ("import pickle, sys; init = pickle.loads(sys.stdin.buffer.read()); "
            "v = init(__import__('numpy').arange(3), 8); "
            "assert v.shape == (3, 8), v.shape; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], input=blob, check=True, timeout=60,
                   cwd=tmp_path)


# -- a real cluster ---------------------------------------------------------------------------

ONE_NODE = [spec("emb", "sgd", 10, 0, pad=3, int32=True),
            spec("bag", "adagrad", 7, 10, "sum", "offsets", psw=True, pad=2),
            spec("bag", "adam", 8, 17, "mean", "2d", pad=0),
            spec("bag", "rowwise", 6, 25, "max", "last"),
            spec("emb", "adam", 5, 31, hashed=True, pad=HASH_PADDING),
            spec("bag", "adagrad", 5, 36, "sum", "offsets", hashed=True)]


def test_one_node_every_optimizer_and_table_kind_matches_torch():
    num_keys = 43   # tables end at key 41: two keys belong to no table
    init = TableInit(ONE_NODE, num_keys)
    [calls] = adapm.run(versus_torch_task, args=(ONE_NODE, 4), nodes=1, num_keys=num_keys,
                        value_length=VALUE_LENGTH, init=init)
    assert len(calls) == 4 * len(ONE_NODE)
    # every key is held on the one node: each bag's step went through the fused path,
    # except where per-sample weights want their own gradient
    fused_bags = sum(s["kind"] == "bag" and not s["psw"] for s in ONE_NODE)
    assert sum(path == "fused" for _, path in calls) == 4 * fused_bags


TWO_NODES = [spec("bag", "adagrad", 7, 0, "sum", "offsets", psw=True, pad=2),
             spec("emb", "sgd", 6, 7, hashed=True)]


def turns_task(w, specs, steps):
    calls = versus_torch_task(w, specs, steps)
    w.wait_sync()
    w.barrier()
    return calls, w.pull(np.arange(w.num_keys)), at.hash_bucket(HASH_POOL, 1 << 40)


def test_two_nodes_taking_turns_match_torch():
    """Two workers on two nodes update the same rows in turns (a row's home is one node or
    the other: the steps go to the owner or to a replica); each checks the tables against
    torch after every step."""
    num_keys = 16
    results = adapm.run(turns_task, args=(TWO_NODES, 6), nodes=2, workers_per_node=1,
                        num_keys=num_keys, value_length=VALUE_LENGTH,
                        init=TableInit(TWO_NODES, num_keys))
    (calls0, table0, hash0), (calls1, table1, hash1) = results
    assert len(calls0) == len(calls1) == 3 * len(TWO_NODES)
    np.testing.assert_array_equal(table0, table1)
    np.testing.assert_array_equal(hash0, at.hash_bucket(HASH_POOL, 1 << 40))
    np.testing.assert_array_equal(hash1, hash0)   # the same in every process
    initial = TableInit(TWO_NODES, num_keys)(np.arange(num_keys))
    np.testing.assert_array_equal(table0[13:], initial[13:].astype(np.float32))


def intent_loader_task(w, lr, batches, batch_size):
    """Both workers train at once through IntentLoader on ids that overlap; loss = sum of
    the looked-up rows, so each use of a row moves it by -lr (SGD)."""
    torch.set_num_threads(1)
    emb = at.Embedding(w, 40, 4, optimizer=SGD(lr), key_offset=0)
    bag = at.EmbeddingBag(w, 20, 4, optimizer=SGD(lr), key_offset=40, mode="sum")
    gen = torch.Generator().manual_seed(w.rank)
    ids = torch.randint(0, 20, (batches * batch_size, 3), generator=gen) + 10 * w.rank
    ids[::5, 0] = 0  # a row both workers update often
    sparse = torch.randint(0, 20, (batches * batch_size, 2), generator=gen)
    data = torch.utils.data.TensorDataset(ids, sparse)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=gen)
    counts = np.zeros(60, dtype=np.int64)
    warm = None
    for step, (b, s) in enumerate(IntentLoader(w, loader, keys_of=lambda b: np.concatenate(
            [emb.keys_of(b[0]), bag.keys_of(b[1])]))):
        if step == batches // 4:
            warm = w.stats()
        (emb(b).sum() + bag(s).sum()).backward()
        np.add.at(counts, b.numpy().reshape(-1), 1)
        np.add.at(counts, 40 + s.numpy().reshape(-1), 1)
        time.sleep(0.003)   # a model's compute: lets the manager act on the intents
    end = w.stats()
    w.wait_sync()
    w.barrier()
    local = sum(end[k] - warm[k] for k in ("pulls_local", "pushes_local"))
    remote = sum(end[k] - warm[k] for k in ("pulls_remote", "pushes_remote"))
    return counts, w.pull(np.arange(60)), local / max(local + remote, 1)


def test_two_nodes_at_once_lose_no_update_and_stay_local():
    """keys_of tells IntentLoader the rows of both tables: after a warm-up, the fetches
    and the optimizer steps are local (relocated or replicated rows)."""
    lr = 0.25
    opt = SGD(lr)
    results = adapm.run(intent_loader_task, args=(lr, 80, 8), nodes=2, workers_per_node=1,
                        num_keys=60, value_length=4, init=opt.init(("normal", 0.5, 3)))
    total = sum(counts for counts, _, _ in results)
    assert total[10:20].min() > 0   # rows both workers use
    initial = opt.init(("normal", 0.5, 3))(np.arange(60), 4)
    expected = initial - lr * total[:, None]
    for _, table, share in results:
        # a lost (or doubled) update would be off by at least lr = 0.25
        np.testing.assert_allclose(table, expected, rtol=0, atol=1e-4)
        assert share >= 0.8, f"only {share:.0%} of accesses local"


def errors_task(w):
    """Bad ids raise in the worker, which catches them and goes on training."""
    errors = []
    try:
        at.Embedding(w, 10, 4, optimizer=Adagrad(0.1))
    except ValueError as exc:
        errors.append(str(exc))
    emb = at.Embedding(w, 10, 4, optimizer=SGD(1.0), key_offset=5)
    for ids in (torch.tensor([10]), torch.tensor([[3, -1]])):
        try:
            emb(ids).sum().backward()
        except IndexError as exc:
            errors.append(str(exc))
    emb(torch.tensor([2])).sum().backward()   # the job goes on
    return errors, w.pull(np.array([7]))


def test_bad_input_with_a_real_worker():
    [(errors, row)] = adapm.run(errors_task, nodes=1, num_keys=16, value_length=4)
    assert len(errors) == 3
    assert "need value_length 8" in errors[0] and "table has value_length 4" in errors[0]
    assert "id 10 out of range [0, 10)" in errors[1] and "keys [5, 15)" in errors[1]
    assert "id -1 out of range" in errors[2]
    np.testing.assert_array_equal(row, -1.0)   # zeros init, one SGD step of lr 1


# -- CUDA (skipped without a GPU) ------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("s", [spec("emb", "adagrad", 10, 3, pad=2),
                               spec("bag", "adam", 8, 4, "mean", "offsets", pad=2),
                               spec("bag", "sgd", 8, 4, "sum", "2d", psw=True, hashed=True),
                               spec("bag", "rowwise", 8, 4, "max", "last")], ids=case_id)
def test_cuda_matches_torch_with_a_fake_table(s):
    w = FakeWorker(20, TableInit([s], 20))
    assert len(versus_torch_task(w, [s], steps=4, device="cuda")) == 4


@needs_cuda
def test_cuda_rows_come_through_pinned_memory():
    w = FakeWorker(20, value_length=4)
    bag = at.EmbeddingBag(w, 10, 4, optimizer=SGD(1.0))
    rows = bag._fetch(np.array([1, 2]), None, torch.device("cuda"))
    assert rows.device.type == "cuda"
    np.testing.assert_array_equal(rows.cpu(), w.values[[1, 2]])
    out = bag(torch.tensor([[1, 2]], device="cuda"))   # ids on the GPU
    assert out.device.type == "cuda"
    out.sum().backward()
    assert isinstance(w.applied[-1][1], np.ndarray)   # gradients back on the host
    bag.cuda()
    assert bag(torch.tensor([[1, 2]])).device.type == "cuda"   # follows module.to()
    np.testing.assert_array_equal(bag.keys_of(torch.tensor([3, 1], device="cuda")), [1, 3])


@needs_cuda
def test_cuda_one_node_matches_torch():
    specs = ONE_NODE[:4]
    [calls] = adapm.run(versus_torch_task, args=(specs, 4, "cuda"), nodes=1, num_keys=43,
                        value_length=VALUE_LENGTH, init=TableInit(specs, 43))
    assert len(calls) == 4 * len(specs)
