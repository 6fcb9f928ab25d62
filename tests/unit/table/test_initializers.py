import numpy as np
import pytest

from adapm.table.initializers import chunks, initial_values, parse_init


@pytest.mark.parametrize("init", [("uniform", -2.0, 3.0, 5), ("normal", 1.5, 5)])
def test_values_depend_only_on_seed_and_key_not_on_partition(init):
    keys = np.arange(1000, dtype=np.uint64)
    lengths = np.full(1000, 4, dtype=np.uint64)
    whole = initial_values(init, keys, lengths, "float64").reshape(1000, 4)
    for nodes in (2, 3, 7):
        for node in range(nodes):
            mine = keys[keys % nodes == node]
            part = initial_values(init, mine, lengths[: len(mine)], "float64")
            np.testing.assert_array_equal(part.reshape(-1, 4), whole[mine.astype(int)])


def test_per_key_lengths_and_chunks_agree():
    keys = np.arange(5000, dtype=np.uint64)
    lengths = (keys % 7 + 1).astype(np.uint64)
    whole = initial_values(("normal", 1.0, 9), keys, lengths, "float32")
    pieces = [initial_values(("normal", 1.0, 9), k, n, "float32") for k, n in chunks(keys, lengths)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_distributions():
    keys = np.arange(20000, dtype=np.uint64)
    lengths = np.full(20000, 8, dtype=np.uint64)
    u = initial_values(("uniform", -1.0, 1.0, 1), keys, lengths, "float64")
    assert u.min() >= -1 and u.max() < 1 and abs(u.mean()) < 0.01
    assert abs(u.var() - 1 / 3) < 0.01
    z = initial_values(("normal", 2.0, 1), keys, lengths, "float64")
    assert abs(z.mean()) < 0.02 and abs(z.std() - 2.0) < 0.02
    assert abs(np.mean(np.abs(z) < 2.0) - 0.6827) < 0.01  # one sigma
    other = initial_values(("normal", 2.0, 2), keys, lengths, "float64")
    assert abs(np.corrcoef(z, other)[0, 1]) < 0.02  # seeds are independent


@pytest.mark.parametrize("bad", ["ones", ("uniform", 1), ("uniform", 2, 1, 0),
                                 ("normal", -1, 0), ("gauss", 1, 1), 5])
def test_bad_specs(bad):
    with pytest.raises(ValueError):
        parse_init(bad)


def test_callable_must_return_the_right_size():
    keys = np.arange(3, dtype=np.uint64)
    lengths = np.full(3, 2, dtype=np.uint64)
    with pytest.raises(ValueError, match="expected 6"):
        initial_values(lambda k: np.ones(5), keys, lengths, "float32")
    np.testing.assert_array_equal(
        initial_values(lambda k: np.repeat(k, 2), keys, lengths, "float32"), [0, 0, 1, 1, 2, 2])
