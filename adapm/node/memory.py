"""What a node server's own state costs: the bytes of the numpy arrays its parts allocated
(per-key arrays above all), found by walking the parts rather than by each part's own
account, so that a new per-key array is counted without anyone remembering to. The table's
segment is not counted here: its arrays are views of shared memory, not the node's own
(bench/bench_memory.py, M1, adds the two). A compiled part (a Cython class: no attributes
to walk) says what it holds in its `nbytes`."""

import numpy as np

_DEPTH = 6          # parts hold parts that hold arrays; deeper is not state
_ITEMS = 10_000     # a part's list or dict longer than this holds messages, not state


def private_bytes(root):
    """Bytes of the distinct numpy arrays that own their memory, and of compiled parts,
    reachable from `root` through attributes of AdaPM objects, lists, tuples and dicts."""
    seen, arrays = set(), {}
    _walk(root, seen, arrays, 0)
    return sum(a.nbytes for a in arrays.values())


def _walk(obj, seen, arrays, depth):
    if depth > _DEPTH or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        if obj.flags.owndata:
            arrays[id(obj)] = obj
    elif isinstance(obj, (list, tuple)):
        for item in obj[:_ITEMS]:
            _walk(item, seen, arrays, depth + 1)
    elif isinstance(obj, dict):
        for item in list(obj.values())[:_ITEMS]:
            _walk(item, seen, arrays, depth + 1)
    elif not type(obj).__module__.startswith("adapm."):
        return
    elif hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            _walk(item, seen, arrays, depth + 1)
    elif hasattr(obj, "nbytes"):  # compiled: counted as it says
        arrays[id(obj)] = obj
