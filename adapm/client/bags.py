"""Embedding bags on the worker's table (the worker side of FBGEMM's table-batched
embedding, TBE): a pooled lookup straight from the rows this node holds, and a backward
that scatters the pooled gradient into one summed gradient per distinct row and takes the
fused optimizer's step in the same call (TableView.bag_pool, .apply_bag_gradients; the
kernels in src/bags.pxd). No per-entry row and no per-row gradient tensor is built.

Entries are (key, bag) pairs, padding already left out, with an optional float32 scale
(a per-sample weight). A lookup that finds a key not held here returns None and changes
nothing: the caller pulls the rows (adapm.torch does) and pools them itself. Gradients of
keys not held here go to their owners through the worker's miss path, as
apply_gradients' do."""

import numpy as np

MODES = {"sum": 0, "mean": 1, "max": 2}


def check_entries(keys, bags, num_bags, scale, view):
    """keys (uint64, in the table), bags (int64 in [0, num_bags)), scale (float32 or None),
    one per entry, as the kernels take them; ValueError says what is wrong."""
    keys = np.ascontiguousarray(keys)
    if keys.ndim != 1 or keys.dtype.kind not in "iu":
        raise ValueError(f"keys must be a 1-D integer array, got {keys.dtype} {keys.shape}")
    keys = keys.astype(np.uint64, copy=False)
    bad = view.first_invalid_key(keys)
    if bad >= 0:
        raise ValueError(f"key {int(keys[bad])} out of range [0, {view.num_keys})")
    bags = np.ascontiguousarray(bags, dtype=np.int64)
    if bags.shape != keys.shape or (bags.size and (bags.min() < 0 or bags.max() >= num_bags)):
        raise ValueError(f"bags must give each of the {keys.shape[0]} entries a bag in "
                         f"[0, {num_bags})")
    if scale is not None:
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        if scale.shape != keys.shape or not np.isfinite(scale).all():
            raise ValueError("per-entry weights must be finite, one per entry")
    return keys, bags, scale


def mode_code(mode):
    try:
        return MODES[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}") from None
