"""KeySet and its compiled twin CompiledKeySet: the node server's sets of keys, as arrays
(no processes). Every behaviour below holds for both; the last tests run them side by
side."""
import numpy as np
import pytest

from adapm.table._keyset import CompiledKeySet
from adapm.table.keyset import KeyFlags, KeySet

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=[KeySet, CompiledKeySet], ids=["reference", "compiled"])
def make(request):
    return request.param


def k(*keys):
    return np.array(keys, dtype=np.uint64)


def test_add_discard_contains_and_sorted_members(make):
    s = make(100)
    assert not s and len(s) == 0
    assert s.add(k(5, 3, 5, 9)).tolist() == [3, 5, 9]
    assert s.add(k(9, 1)).tolist() == [1]
    assert len(s) == 4 and s
    assert s.contains(k(1, 2, 3)).tolist() == [True, False, True]
    assert s.discard(k(3, 4)).tolist() == [3]
    assert s.keys().tolist() == [1, 5, 9]
    assert s.keys().dtype == np.uint64


def test_a_key_removed_and_added_again_is_listed_once(make):
    s = make(10)
    s.add(k(1, 2))
    s.discard(k(1))
    s.add(k(1))
    s.discard(k(2))
    s.add(k(2))
    assert s.keys().tolist() == [1, 2]
    assert len(s) == 2


def test_take_empties_the_set(make):
    s = make(10)
    s.add(k(4, 7))
    assert s.take().tolist() == [4, 7]
    assert not s and s.keys().tolist() == []
    assert s.contains(k(4, 7)).tolist() == [False, False]
    assert s.take().tolist() == []


def test_against_a_python_set_under_random_batches(make):
    rng = np.random.default_rng(3)
    s, ref = make(500), set()
    for _ in range(300):
        batch = rng.integers(0, 500, rng.integers(0, 40)).astype(np.uint64)
        op = rng.integers(0, 4)
        if op == 0:
            assert sorted(s.add(batch).tolist()) == sorted(set(batch.tolist()) - ref)
            ref |= set(batch.tolist())
        elif op == 1:
            assert sorted(s.discard(batch).tolist()) == sorted(set(batch.tolist()) & ref)
            ref -= set(batch.tolist())
        elif op == 2:
            assert s.keys().tolist() == sorted(ref)
        else:
            assert s.contains(batch).tolist() == [x in ref for x in batch.tolist()]
        assert len(s) == len(ref)
    assert s.keys().tolist() == sorted(ref)


def test_sets_sharing_one_byte_per_key_do_not_see_each_other():
    flags = KeyFlags(100)
    sets = [flags.new_set() for _ in range(KeyFlags.BITS)]
    refs = [set() for _ in sets]
    rng = np.random.default_rng(5)
    for _ in range(300):
        i = int(rng.integers(len(sets)))
        keys = rng.integers(0, 100, size=int(rng.integers(0, 12))).astype(np.uint64)
        if rng.random() < 0.6:
            sets[i].add(keys)
            refs[i].update(keys.tolist())
        else:
            sets[i].discard(keys)
            refs[i].difference_update(keys.tolist())
        if rng.random() < 0.05:
            sets[i].clear()
            refs[i].clear()
    for s, ref in zip(sets, refs):
        assert s.keys().tolist() == sorted(ref) and len(s) == len(ref)
        assert s.contains(np.arange(100, dtype=np.uint64)).tolist() == \
            [k in ref for k in range(100)]
    with pytest.raises(RuntimeError, match="at most 8"):
        flags.new_set()


@pytest.mark.parametrize("seed", range(8))
def test_compiled_sets_answer_as_the_reference(seed):
    """Random batches on both (each with its own flags, sharing them with a second set of
    the same kind): every answer and the members after every call agree."""
    rng = np.random.default_rng(seed)
    ref_flags, comp_flags = KeyFlags(300), KeyFlags(300)
    ref, comp = ref_flags.new_set(compiled=False), comp_flags.new_set()
    ref_other, comp_other = ref_flags.new_set(compiled=False), comp_flags.new_set()
    assert isinstance(comp, CompiledKeySet) and isinstance(ref, KeySet)
    for _ in range(2000):
        op = rng.random()
        keys = rng.integers(0, 300, int(rng.integers(0, 30))).astype(np.uint64)
        if op < 0.4:
            assert np.array_equal(comp.add(keys), ref.add(keys))
            comp_other.add(keys[::2])
            ref_other.add(keys[::2])
        elif op < 0.7:
            assert np.array_equal(comp.discard(keys), ref.discard(keys))
        elif op < 0.85:
            assert np.array_equal(comp.contains(keys), ref.contains(keys))
        elif op < 0.95:
            assert np.array_equal(comp.keys(), ref.keys())
        else:
            assert np.array_equal(comp.take(), ref.take())
        assert len(comp) == len(ref) and bool(comp) == bool(ref)
        assert np.array_equal(comp_other.keys(), ref_other.keys())
    assert np.array_equal(comp_flags._flags, ref_flags._flags)


def test_compiled_set_refuses_keys_out_of_range():
    s = CompiledKeySet(10)
    with pytest.raises(IndexError):
        s.add(np.array([3, 10], dtype=np.uint64))
    assert len(s) == 0 and not s.contains(np.array([3], dtype=np.uint64))[0]


@pytest.mark.parametrize("seed", range(6))
def test_sorted_key_array_algebra_is_numpys(seed):
    """union_sorted / intersect_sorted / difference_sorted on sorted distinct keys give
    what numpy's union1d / intersect1d / setdiff1d give (the sync rounds' set algebra)."""
    from adapm.table._keyset import difference_sorted, intersect_sorted, union_sorted
    rng = np.random.default_rng(seed)
    for _ in range(300):
        a = np.unique(rng.integers(0, int(rng.choice([5, 50, 1 << 62])),
                                   int(rng.integers(0, 40))).astype(np.uint64))
        b = np.unique(rng.integers(0, int(rng.choice([5, 50, 1 << 62])),
                                   int(rng.integers(0, 40))).astype(np.uint64))
        for ours, theirs in ((union_sorted(a, b), np.union1d(a, b)),
                             (intersect_sorted(a, b), np.intersect1d(a, b, assume_unique=True)),
                             (difference_sorted(a, b), np.setdiff1d(a, b, assume_unique=True))):
            assert ours.dtype == np.uint64
            assert np.array_equal(ours, theirs.astype(np.uint64))
    # keys as other integer arrays (a Python list, a strided view) are taken as uint64
    assert union_sorted([1, 4], np.arange(0, 10, 3, dtype=np.uint64)[::1]).tolist() == \
        [0, 1, 3, 4, 6, 9]


@pytest.mark.parametrize("seed", range(4))
def test_distinct_keys_is_numpys_unique_with_its_inverse(seed):
    """distinct_keys (a radix sort, O(keys) per 11 bits of the bound) gives what np.unique
    gives, and its inverse what return_inverse gives, for bounds of one, two and six
    radix passes, int64 and uint64 keys, empty and repeated batches."""
    from adapm.table._keyset import distinct_keys
    rng = np.random.default_rng(seed)
    cases = [(bound, rng.integers(0, bound, size, dtype=np.int64).astype(dtype))
             for bound in (1, 7, 2048, 2049, 5_000, 3_000_000, 1 << 62)
             for size in (0, 1, 50, 5_000) for dtype in (np.int64, np.uint64)]
    high = (1 << 64) - 1  # uint64 keys above 2**63, up to the largest bound there is
    cases.append((high, rng.integers(1 << 63, high, 3000, dtype=np.uint64)))
    for bound, keys in cases:
        unique, inverse = np.unique(keys, return_inverse=True)
        ours, where = distinct_keys(keys, bound, inverse=True)
        assert ours.dtype == np.uint64 and where.dtype == np.int64
        np.testing.assert_array_equal(ours, unique.astype(np.uint64))
        np.testing.assert_array_equal(where, inverse.reshape(-1))
        np.testing.assert_array_equal(distinct_keys(keys, bound), ours)
    # 2-D input is taken flat, as np.unique takes it
    np.testing.assert_array_equal(distinct_keys(np.array([[3, 1], [3, 0]]), 4), [0, 1, 3])
    for bad, match in ((np.array([1, 4, 2]), "key 4 at position 1"),
                       (np.array([1, -1]), "key -1 at position 1"),
                       (np.array([1.0]), "integers")):
        with pytest.raises(ValueError, match=match):
            distinct_keys(bad, 4)
