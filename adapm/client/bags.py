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

from adapm.table.keys import as_keys

MODES = {"sum": 0, "mean": 1, "max": 2}


def check_entries(keys, bags, scale, view):
    """keys (uint64, in the table: adapm.table.keys.as_keys), bags (int64), scale
    (float32 or None), one per entry, as the kernels take them; ValueError says what is
    wrong. Each bag's range is the kernel's to check (it must, and does so before
    anything changes): bag_error turns its IndexError into this module's ValueError."""
    keys = as_keys(keys, view)
    bags = np.ascontiguousarray(bags, dtype=np.int64)
    if bags.shape != keys.shape:
        raise ValueError(f"bags must give each of the {keys.shape[0]} entries a bag, got "
                         f"shape {bags.shape}")
    if scale is not None:
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        if scale.shape != keys.shape or not np.isfinite(scale).all():
            raise ValueError("per-entry weights must be finite, one per entry")
    return keys, bags, scale


def bag_error(exc, num_bags):
    """The kernels' refusal of an entry (IndexError: a bag out of range) as ValueError."""
    return ValueError(f"{exc}: each entry's bag must be in [0, {num_bags})")


def mode_code(mode):
    try:
        return MODES[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}") from None
