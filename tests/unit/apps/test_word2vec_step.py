"""The word2vec app's compiled step (adapm.apps._word2vec) without processes: train_pairs is
word2vec's update pair after pair, as a float64 reference written out from word2vec.c's
and gensim's skip-gram with negative sampling says, including the learning rate falling
over the batch and a negative that is the pair's context skipped; KeyIndex numbers keys
as np.unique would in order of first sight; bad input is refused with nothing changed."""
import ast
from pathlib import Path

import numpy as np
import pytest
from word2vec_rules import reference_train

from adapm.apps import _word2vec
from adapm.apps._word2vec import KeyIndex, train_pairs

pytestmark = pytest.mark.timeout(60)


def batch(seed, inputs=12, outputs=15, pairs=300, k=5, dim=19):
    """Rows of `inputs` input and `outputs` output keys (numbers [0, inputs) and
    [inputs, inputs + outputs)), pairs with repeated keys and negatives, a few of them the
    pair's context."""
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.uniform(-0.5, 0.5, (inputs, dim)),
                           rng.normal(0, 0.3, (outputs, dim))]).astype(np.float32)
    centres = rng.integers(0, inputs, pairs)
    contexts = rng.integers(inputs, inputs + outputs, pairs)
    negatives = rng.integers(inputs, inputs + outputs, (pairs, k))
    negatives[::7, 1] = contexts[::7]
    return rows, centres, contexts, negatives


def inverse_of(centres, contexts, negatives):
    return np.concatenate([centres, contexts, negatives.reshape(-1)]).astype(np.int64)


@pytest.mark.parametrize("seed", range(4))
def test_train_pairs_is_word2vecs_update_pair_after_pair(seed):
    rows, centres, contexts, negatives = batch(seed, dim=19 + seed * 8)  # tails of 8-blocks
    expected, expected_loss = reference_train(rows, centres, contexts, negatives, 0.05, 0.01)
    loss = train_pairs(rows, inverse_of(centres, contexts, negatives), len(centres), 5,
                       0.05, 0.01)
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-6)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert np.abs(rows - batch(seed, dim=19 + seed * 8)[0]).max() > 1e-3  # it did train


@pytest.mark.parametrize("seed", range(3))
def test_row_wise_adagrad_divides_each_rows_rate_by_its_accumulated_squares(seed):
    rows, centres, contexts, negatives = batch(seed, dim=21)
    rows = np.concatenate([rows, np.zeros((rows.shape[0], 1), np.float32)], axis=1)
    rows[::3, -1] = 0.5  # some rows have accumulated before
    start = rows.copy()
    expected, expected_loss = reference_train(rows, centres, contexts, negatives, 0.1, 0.1,
                                              adagrad=True)
    loss = train_pairs(rows, inverse_of(centres, contexts, negatives), len(centres), 5,
                       0.1, 0.1, True, 1e-8)
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-6)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    used = np.unique(np.concatenate([centres, contexts, negatives.reshape(-1)]))
    assert (rows[used, -1] > start[used, -1]).all()  # every row used accumulated
    # the rate shrinks as squares accumulate: a second pass moves the rows less
    moved = np.abs(rows[:, :-1] - start[:, :-1]).sum()
    again = rows.copy()
    train_pairs(again, inverse_of(centres, contexts, negatives), len(centres), 5, 0.1, 0.1,
                True, 1e-8)
    assert np.abs(again[:, :-1] - rows[:, :-1]).sum() < moved
    with pytest.raises(ValueError, match="accumulator"):
        train_pairs(np.zeros((4, 1), np.float32), np.zeros(2, np.int64), 1, 0, 0.1, 0.1,
                    True)


def test_a_negative_that_is_the_context_is_skipped():
    rows, centres, contexts, negatives = batch(0, pairs=1, k=3)
    negatives[0] = [contexts[0]] * 3
    before = rows.copy()
    loss = train_pairs(rows, inverse_of(centres, contexts, negatives), 1, 3, 0.1, 0.1)
    score = float(before[centres[0]].astype(np.float64) @ before[contexts[0]])
    assert loss == pytest.approx(np.logaddexp(0.0, -score), rel=1e-6)  # the positive only
    changed = np.flatnonzero(np.abs(rows - before).max(axis=1) > 0)
    assert changed.tolist() == sorted([centres[0], contexts[0]])


def test_no_pairs_and_a_zero_rate_change_nothing():
    rows, centres, contexts, negatives = batch(1)
    before = rows.copy()
    assert train_pairs(rows, np.empty(0, np.int64), 0, 5, 0.1, 0.1) == 0.0
    loss = train_pairs(rows, inverse_of(centres, contexts, negatives), len(centres), 5, 0, 0)
    np.testing.assert_array_equal(rows, before)
    assert loss == pytest.approx(reference_train(before, centres, contexts, negatives, 0,
                                                 0)[1], rel=1e-5)


def test_bad_batches_are_refused_with_the_rows_unchanged():
    rows, centres, contexts, negatives = batch(2)
    before = rows.copy()
    inverse = inverse_of(centres, contexts, negatives)
    n = len(centres)
    out_of_range = inverse.copy()
    out_of_range[-1] = rows.shape[0]
    negative = inverse.copy()
    negative[3] = -1
    for args, match in (((rows, out_of_range, n, 5, 0.1, 0.1), "not in"),
                        ((rows, negative, n, 5, 0.1, 0.1), "not in"),
                        ((rows, inverse[:-1], n, 5, 0.1, 0.1), "row numbers"),
                        ((rows, inverse, n, 4, 0.1, 0.1), "row numbers"),
                        ((rows, inverse.astype(np.int32), n, 5, 0.1, 0.1), "int64"),
                        ((rows, inverse, n, 5, -0.1, 0.1), "learning rates"),
                        ((rows, inverse, n, 5, 0.1, float("nan")), "learning rates"),
                        ((rows, inverse, n, 5, 0.1, 0.1, True, 0.0), "eps")):
        with pytest.raises(ValueError, match=match):
            train_pairs(*args)
    with pytest.raises((ValueError, TypeError)):
        train_pairs(rows.astype(np.float64), inverse, n, 5, 0.1, 0.1)
    with pytest.raises(ValueError, match="row numbers"):  # a count whose product wraps
        train_pairs(rows, np.zeros(0, np.int64), 2 ** 62, 2, 0.1, 0.1)
    with pytest.raises(TypeError):
        train_pairs(rows, None, 0, 0, 0.1, 0.1)
    shared = inverse.copy()
    shared[n + 3] = shared[0]   # a context row that is also a centre's
    with pytest.raises(ValueError, match="both a centre"):
        train_pairs(rows, shared, n, 5, 0.1, 0.1)
    np.testing.assert_array_equal(rows, before)


def test_a_negative_accumulator_is_taken_as_zero_not_rooted():
    """Merged replicas' deltas may leave an accumulator a little below zero: the rate is
    then taken from zero, as the table's RowWiseAdagrad takes it, never a NaN."""
    rows, centres, contexts, negatives = batch(5, dim=8)
    rows = np.concatenate([rows, np.full((rows.shape[0], 1), -1e-6, np.float32)], axis=1)
    train_pairs(rows, inverse_of(centres, contexts, negatives), len(centres), 5, 0.1, 0.1,
                True)
    assert np.isfinite(rows).all() and (rows[:, -1] >= 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_key_index_numbers_keys_in_order_of_first_sight(seed):
    rng = np.random.default_rng(seed)
    index = KeyIndex(5000)
    for size in (0, 1, 70_000, 333):
        keys = rng.zipf(1.3, size) % 5000
        distinct, inverse = index.index(keys)
        firsts = np.sort(np.unique(keys, return_index=True)[1])
        np.testing.assert_array_equal(distinct, keys[firsts])
        np.testing.assert_array_equal(distinct[inverse], keys)
        assert distinct.dtype == np.uint64 and inverse.dtype == np.int64


def test_key_index_refuses_keys_out_of_range_and_keeps_working():
    index = KeyIndex(10)
    with pytest.raises(ValueError, match="key 10 at position 2"):
        index.index(np.array([1, 2, 10, 3]))
    with pytest.raises(ValueError, match="1-D"):
        index.index(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        index.index(np.array([1.7, 2.2]))   # never truncated
    with pytest.raises(ValueError, match="key -1 at position 1"):
        index.index(np.array([1, -1]))
    distinct, inverse = index.index(np.array([3, 1, 3, 9]))
    assert distinct.tolist() == [3, 1, 9] and inverse.tolist() == [0, 1, 0, 2]
    for bad in (0, 2 ** 31):
        with pytest.raises(ValueError, match="num_keys"):
            KeyIndex(bad)


def test_the_stub_names_what_the_module_has():
    stub = ast.parse((Path(_word2vec.__file__).parent / "_word2vec.pyi").read_text())
    named = {node.name for node in stub.body
             if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    assert {n for n in dir(_word2vec) if not n.startswith("_") and n != "np"} == named
