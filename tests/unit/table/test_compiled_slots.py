"""The compiled slot allocator (adapm.table._slots, the one tables use) against its
reference, adapm.table.shared_table.SlotAllocator: the same slots are fresh or reused, so
the bump pointer moves alike; no two live slots ever share an element; a call that fails
(arena full, bad arguments) changes nothing."""

import ast
from pathlib import Path

import numpy as np
import pytest

from adapm.table import _slots
from adapm.table._slots import CompiledSlotAllocator
from adapm.table.shared_table import SlotAllocator

pytestmark = pytest.mark.timeout(60)


def _cells(live, capacity):
    cells = np.zeros(capacity, dtype=int)
    for off, length in live.items():
        cells[off:off + length] += 1
    return cells


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lengths_from", [(4,), (2, 3, 5, 64)])
def test_it_moves_the_top_as_the_reference_and_never_overlaps(seed, lengths_from):
    capacity = 2000
    uniform = lengths_from[0] if len(lengths_from) == 1 else 0
    ours, reference = CompiledSlotAllocator(capacity, uniform), SlotAllocator(capacity, uniform)
    rng = np.random.default_rng(seed)
    live = {}  # offset -> length, ours
    errors = 0
    for _ in range(600):
        if live and rng.random() < 0.45:
            gone = rng.choice(list(live), size=min(len(live), int(rng.integers(1, 9))),
                              replace=False).astype(np.uint64)
            lengths = np.array([live.pop(int(g)) for g in gone], dtype=np.uint64)
            ours.free(gone, lengths)
            reference.free(gone, lengths)  # the reference only counts: any offsets do
            continue
        lengths = rng.choice(lengths_from, size=int(rng.integers(0, 14))).astype(np.uint64)
        top = ours.top
        try:
            got = ours.allocate(lengths)
        except MemoryError:
            errors += 1
            assert ours.top == top
            with pytest.raises(MemoryError):
                reference.allocate(lengths)
            break  # the reference's general path keeps what it popped: stop comparing
        reference.allocate(lengths)
        assert got.dtype == np.uint64 and got.shape == lengths.shape
        assert ours.top == reference.top
        live.update(zip(got.tolist(), lengths.tolist()))
        assert _cells(live, capacity).max() <= 1
        assert all(off + length <= capacity for off, length in live.items())
    assert len(live) > 0


def test_a_freed_slot_is_taken_first_and_a_failed_call_takes_none():
    alloc = CompiledSlotAllocator(12, uniform=4)
    first = alloc.allocate(np.full(2, 4, dtype=np.uint64))
    assert first.tolist() == [0, 4] and alloc.top == 8
    alloc.free(first[:1], np.full(1, 4, dtype=np.uint64))
    with pytest.raises(MemoryError, match="arena full"):
        alloc.allocate(np.full(3, 4, dtype=np.uint64))  # 1 freed + 1 fresh < 3
    assert alloc.top == 8
    assert alloc.allocate(np.full(2, 4, dtype=np.uint64)).tolist() == [0, 8]
    # slots of another length are not reused for this one
    alloc = CompiledSlotAllocator(100)
    a = alloc.allocate(np.array([3, 5], dtype=np.uint64))
    alloc.free(a[:1], np.array([3], dtype=np.uint64))
    assert alloc.allocate(np.array([5], dtype=np.uint64))[0] == 8
    assert alloc.allocate(np.array([3], dtype=np.uint64))[0] == a[0]
    assert alloc.allocate(np.empty(0, dtype=np.uint64)).shape == (0,)


def test_lowering_the_capacity_refuses_fresh_slots_but_not_freed_ones():
    alloc = CompiledSlotAllocator(100, uniform=2)
    got = alloc.allocate(np.full(3, 2, dtype=np.uint64))
    alloc.capacity = alloc.top  # as a node server does when it stops taking keys
    assert alloc.capacity == 6
    with pytest.raises(MemoryError):
        alloc.allocate(np.full(1, 2, dtype=np.uint64))
    alloc.free(got[1:2], np.full(1, 2, dtype=np.uint64))
    assert alloc.allocate(np.full(1, 2, dtype=np.uint64))[0] == got[1]


def test_bad_frees_are_refused_and_change_nothing():
    alloc = CompiledSlotAllocator(100, uniform=4)
    got = alloc.allocate(np.full(2, 4, dtype=np.uint64))
    with pytest.raises(ValueError, match="never handed out"):
        alloc.free(np.array([got[0], 96], dtype=np.uint64), np.full(2, 4, dtype=np.uint64))
    with pytest.raises(ValueError, match="never handed out"):
        alloc.free(got[:1], np.zeros(1, dtype=np.uint64))
    with pytest.raises(ValueError, match="one length"):
        alloc.free(got, np.full(1, 4, dtype=np.uint64))
    with pytest.raises(ValueError, match="1-D"):
        alloc.allocate(np.full((2, 2), 4, dtype=np.uint64))
    # nothing was listed as free by the refused calls: the next slot is a fresh one
    assert alloc.allocate(np.full(1, 4, dtype=np.uint64))[0] == 8


def test_the_type_stub_names_exactly_what_the_compiled_module_has():
    stub = ast.parse((Path(_slots.__file__).parent / "_slots.pyi").read_text())
    (cls,) = [node for node in stub.body if isinstance(node, ast.ClassDef)]
    names = {item.name if isinstance(item, ast.FunctionDef) else item.target.id
             for item in cls.body if isinstance(item, (ast.FunctionDef, ast.AnnAssign))}
    public = {n for n in dir(CompiledSlotAllocator) if not n.startswith("_")}
    assert names - {"__init__"} == public
    assert {n for n in dir(_slots) if not n.startswith("_") and n != "np"} == \
        {"CompiledSlotAllocator"}
