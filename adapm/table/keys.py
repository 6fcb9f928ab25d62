"""Validation and conversion of user-supplied keys, values and output buffers.

Everything here runs before anything is applied, so that a bad call changes nothing.
Conversions avoid copies where the input already has the right layout."""

import numpy as np

EMPTY_KEYS = np.empty(0, dtype=np.uint64)
EMPTY_KEYS.setflags(write=False)


def as_keys(keys, table):
    """Keys as a contiguous uint64 array, checked against [0, table.num_keys)."""
    arr = keys if isinstance(keys, np.ndarray) else np.asarray(keys)
    if arr.ndim != 1:
        raise ValueError(f"keys must be a 1-D array of integers, got shape {arr.shape}")
    if arr.size == 0:
        return EMPTY_KEYS
    kind = arr.dtype.kind
    if kind not in "iu":
        raise ValueError(f"keys must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 or arr.dtype == np.int64:
        # A signed key < 0 reinterpreted as uint64 is >= 2**63, caught by the range check.
        ukeys = np.ascontiguousarray(arr).view(np.uint64)
    else:
        if kind == "i" and arr.min() < 0:
            raise ValueError(f"key {int(arr[np.argmin(arr)])} out of range [0, {table.num_keys})")
        ukeys = np.ascontiguousarray(arr, dtype=np.uint64)
    bad = table.first_invalid_key(ukeys)
    if bad >= 0:
        raise ValueError(f"key {arr[bad]} out of range [0, {table.num_keys})")
    return ukeys


def as_values(values, keys, total, table):
    """Values as a flat contiguous array of the table's dtype, `total` elements long.

    Uniform lengths accept shape (len(keys), D) or flat; per-key lengths accept flat."""
    arr = values if isinstance(values, np.ndarray) else np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"values must be numeric (integer or float), got dtype {arr.dtype}")
    n = keys.shape[0]
    length = table.uniform_length
    if arr.ndim == 2 and length and arr.shape == (n, length):
        pass
    elif arr.ndim == 1 and arr.shape[0] == total:
        pass
    else:
        expected = f"({n}, {length}) or ({total},)" if length else f"({total},)"
        raise ValueError(f"values have shape {arr.shape}, expected {expected} for {n} keys")
    return np.ascontiguousarray(arr, dtype=table.dtype).reshape(-1)


def as_gradients(grads, n, dim, table):
    """Gradients as a contiguous (n, dim) array of the table's dtype, finite."""
    if isinstance(grads, np.ndarray):
        arr = grads
    elif hasattr(grads, "detach"):  # a torch tensor, maybe requiring grad, maybe on a GPU
        arr = grads.detach().cpu().numpy()
    else:
        arr = np.asarray(grads)
    if n == 0 and arr.size == 0:
        return np.empty((0, dim), dtype=table.dtype)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"gradients must be numeric, got dtype {arr.dtype}")
    if arr.shape != (n, dim):
        raise ValueError(f"gradients have shape {arr.shape}, expected ({n}, {dim}) for "
                         f"{n} keys of rows of {dim}")
    arr = np.ascontiguousarray(arr, dtype=table.dtype)
    if not np.isfinite(arr).all():
        raise ValueError("gradients hold NaN or infinite values (the step would spoil the "
                         "rows and their optimizer state)")
    return arr


def pull_buffer(out, keys, total, table):
    """The array a pull writes into: `out` checked, or a new one."""
    n = keys.shape[0]
    length = table.uniform_length
    shape = (n, length) if length else (total,)
    if out is None:
        return np.empty(shape, dtype=table.dtype)
    if not isinstance(out, np.ndarray):
        raise ValueError("out must be a numpy array")
    if out.dtype != table.dtype:
        raise ValueError(f"out has dtype {out.dtype}, the table holds {table.dtype}")
    if out.shape != shape and not (out.ndim == 1 and out.shape[0] == total):
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writeable C-contiguous array")
    return out
