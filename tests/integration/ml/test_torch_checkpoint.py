"""adapm.torch modules' state_dict/load_state_dict carry their rows and optimizer state
across clusters of different shapes; a plain torch.nn module loads the exported rows;
adapm.run returns torch tensors."""
import numpy as np
import pytest

import adapm

torch = pytest.importorskip("torch")
import adapm.torch as at  # noqa: E402
from adapm.optim import Adam  # noqa: E402

pytestmark = pytest.mark.timeout(180)

ROWS, DIM = 30, 4


def _train_and_export(w, path):
    opt = Adam(lr=0.05)
    bag = at.EmbeddingBag(w, ROWS, DIM, mode="sum", optimizer=opt)
    torch.manual_seed(w.rank)
    for _ in range(5):
        ids = torch.randint(0, ROWS, (8, 3))
        bag(ids).pow(2).sum().backward()
    w.barrier()
    w.wait_sync()
    state = bag.state_dict()
    if w.rank == 0:
        torch.save(state, path)
    return state["weight"], opt.steps


def _import_and_read(w, path):
    opt = Adam(lr=0.05)
    emb = at.Embedding(w, ROWS, DIM, optimizer=opt)
    result = emb.load_state_dict(torch.load(path))
    w.barrier()
    values = w.pull(np.arange(ROWS))
    return values, opt.steps, result.missing_keys, result.unexpected_keys


def test_state_dict_carries_rows_and_optimizer_state_to_another_cluster(tmp_path):
    path = str(tmp_path / "bag.pt")
    length = Adam().value_length(DIM)
    exported = adapm.run(_train_and_export, args=(path,), nodes=2, workers_per_node=2,
                         num_keys=ROWS, value_length=length,
                         init=Adam().init(("normal", 0.1, 1)))
    weights = [weight for weight, _ in exported]
    assert isinstance(weights[0], torch.Tensor) and weights[0].shape == (ROWS, DIM)
    state = torch.load(path)
    assert set(state) == {"weight", "optimizer_state", "_extra_state"}
    assert state["optimizer_state"].shape == (ROWS, 2 * DIM)
    assert (state["optimizer_state"] != 0).any()      # Adam's moments are in it
    assert state["_extra_state"]["optimizer"]["steps"] == 5
    # three nodes of one worker: every worker loads the same state_dict
    restored = adapm.run(_import_and_read, args=(path,), nodes=3, num_keys=ROWS,
                         value_length=length)
    for values, steps, missing, unexpected in restored:
        assert values[:, :DIM].tobytes() == state["weight"].numpy().tobytes()
        assert values[:, DIM:].tobytes() == state["optimizer_state"].numpy().tobytes()
        assert steps == 5 and missing == [] and unexpected == []
    # a plain torch module takes the rows for inference
    plain = torch.nn.EmbeddingBag(ROWS, DIM, mode="sum")
    plain.load_state_dict({"weight": state["weight"]})
    assert torch.equal(plain.weight.detach(), state["weight"])


def _load_wrong(w):
    emb = at.Embedding(w, ROWS, DIM, optimizer=Adam())
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        emb.load_state_dict({"weight": torch.zeros(ROWS + 1, DIM),
                             "_extra_state": emb.get_extra_state()})
    with pytest.raises(RuntimeError, match="Missing key"):
        emb.load_state_dict({"_extra_state": emb.get_extra_state()})
    # only rows: the optimizer's state starts afresh, as a new optimizer's would
    result = emb.load_state_dict({"weight": torch.ones(ROWS, DIM)}, strict=False)
    return w.pull(np.arange(ROWS)), result.missing_keys


def test_load_state_dict_refuses_what_does_not_fit_and_takes_rows_alone():
    [(values, missing)] = adapm.run(_load_wrong, num_keys=ROWS,
                                    value_length=Adam().value_length(DIM),
                                    init=("normal", 1.0, 0))
    assert np.all(values[:, :DIM] == 1.0) and np.all(values[:, DIM:] == 0.0)
    assert missing == ["_extra_state"] or missing == []


def _tensor_of(w):
    return torch.full((3,), float(w.rank))


def test_adapm_run_returns_torch_tensors():
    results = adapm.run(_tensor_of, workers_per_node=2, num_keys=4)
    assert [r.tolist() for r in results] == [[0.0] * 3, [1.0] * 3]
