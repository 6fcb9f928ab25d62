"""PyTorch embeddings whose rows live in the parameter server (the `adapm[torch]` extra).

    opt = adapm.optim.Adagrad(lr=0.1)
    adapm.run(task, nodes=2, num_keys=n, value_length=opt.value_length(dim),
              init=opt.init(("normal", 0.1, 0)))
    # in task(w):
    bag = adapm.torch.EmbeddingBag(w, n, dim, mode="sum", optimizer=opt)
    loss = model(bag(ids, offsets)).sum()
    loss.backward()          # one w.apply_gradients(keys, grads, opt) for bag's rows

`Embedding` and `EmbeddingBag` compute exactly what torch.nn.Embedding and
torch.nn.EmbeddingBag compute (torch's own functional kernels run on the batch's rows),
but their rows are keys of the parameter server: forward fetches the batch's distinct
rows once (`w.pull_rows`), backward sends the gradient of those rows in one
`w.apply_gradients` call, and the optimizer step happens in the table, where the row and
its optimizer state are held (adapm.optim). No torch.optim step is needed for these rows;
the modules have no torch parameters.

Only this module imports torch; the rest of adapm does not depend on it. See docs/torch.md.
"""

import numpy as np
import torch
import torch.nn.functional as F

from adapm.ml.fused_bags import EmbeddingBagCollection, pool_fused
from adapm.table._keyset import distinct_keys
from adapm.table.optimizers import SGD, Adagrad, Adam, RowWiseAdagrad, SparseOptimizer

__all__ = ["Embedding", "EmbeddingBag", "EmbeddingBagCollection", "IdOutOfRangeError",
           "hash_bucket", "expected_collisions", "SGD", "Adagrad", "RowWiseAdagrad", "Adam",
           "value_length", "embedding_init", "init_distributed"]


# -- older names (before adapm.optim): thin aliases --------------------------------------

def value_length(embedding_dim, optimizer):
    """Older name of `optimizer.value_length(embedding_dim)`."""
    return _check_optimizer(optimizer).value_length(embedding_dim)


def embedding_init(embedding_dim, optimizer, std=1.0, seed=0):
    """Older name of `optimizer.init(("normal", std, seed))`: rows N(0, std) (what
    init=("normal", std, seed) gives a table of embedding_dim), state at its start."""
    _check_optimizer(optimizer).value_length(embedding_dim)  # checks embedding_dim
    return optimizer.init(("normal", std, seed))


# -- hashing -----------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def hash_bucket(ids, num_buckets):
    """Bucket in [0, num_buckets) of each int64 id (numpy int64 array, ids' shape):
    splitmix64(id) % num_buckets, where splitmix64 is SplitMix64's finaliser applied to
    id + 0x9E3779B97F4A7C15 (the id's two's-complement bits as uint64). A pure function of
    the id: the same in every process, on every machine, in every version of adapm."""
    num_buckets = int(num_buckets)
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    x = np.ascontiguousarray(np.asarray(ids).astype(np.int64, copy=False)).view(np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(num_buckets)).astype(np.int64)


def expected_collisions(n, m):
    """Expected number of ids that do not get a row of their own when n distinct ids are
    hashed uniformly into m rows: n - m * (1 - (1 - 1/m) ** n) (n minus the expected
    number of rows used)."""
    return n - m * -np.expm1(n * np.log1p(-1.0 / m)) if m > 1 else max(n - 1, 0)


# -- the modules -------------------------------------------------------------------------

class IdOutOfRangeError(IndexError, ValueError):
    """An id outside [0, num_embeddings) of a table (an IndexError, as torch's; also a
    ValueError, as adapm.torch raised before)."""


def _check_optimizer(optimizer):
    if not isinstance(optimizer, SparseOptimizer):
        raise TypeError(f"optimizer must be an adapm.optim optimizer (SGD, Adagrad, "
                        f"RowWiseAdagrad, Adam), got {optimizer!r}")
    return optimizer


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _host_ids(ids):
    """ids (tensor on any device, numpy array or list) as a numpy int64 array."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        return ids.detach().to("cpu", torch.int64).numpy()
    array = np.asarray(ids)
    if array.dtype.kind not in "iu":
        if array.size == 0:
            return array.astype(np.int64)
        raise TypeError(f"ids must be integers, got an array of {array.dtype}")
    return array.astype(np.int64, copy=False)


class _Rows(torch.autograd.Function):
    """Forward: the batch's rows (fetched by the module) as one tensor on the output
    device. Backward: the gradient of the first `n` rows, summed by autograd over all uses,
    goes back to the table in one apply_gradients call. `anchor` requires grad only so
    that autograd records the call (the rows are no torch parameter)."""

    @staticmethod
    def forward(ctx, anchor, module, keys, extra_key, device):
        ctx.module, ctx.keys = module, keys
        return module._fetch(keys, extra_key, device)

    @staticmethod
    def backward(ctx, grad):
        ctx.module._send(ctx.keys, grad[: ctx.keys.shape[0]])
        return None, None, None, None, None


_ZERO_ROW = -1   # extra_key: an extra row of zeros (padding entries point at it)


class _Table(torch.nn.Module):
    """What Embedding and EmbeddingBag share: the key range, ids to keys, fetching rows
    and sending gradients."""

    def __init__(self, worker, num_embeddings, dim, optimizer, key_offset, padding_idx,
                 hash_ids):
        super().__init__()
        if optimizer is None:
            raise TypeError(f"{type(self).__name__} needs an optimizer: optimizer="
                            f"adapm.optim.Adagrad(lr=0.1), for instance")
        self.optimizer = _check_optimizer(optimizer)
        self.num_embeddings = _check_int("num_embeddings", num_embeddings, 1)
        self.embedding_dim = _check_int("dim", dim, 1)
        self.key_offset = _check_int("key_offset", key_offset, 0)
        self.hash_ids = bool(hash_ids)
        end = self.key_offset + self.num_embeddings
        if end > worker.num_keys:
            raise ValueError(f"keys [{self.key_offset}, {end}) do not fit a table of "
                             f"{worker.num_keys} keys")
        need = self.optimizer.value_length(self.embedding_dim)
        if worker.value_length != need:
            have = worker.value_length or "per key"
            raise ValueError(
                f"rows of {self.embedding_dim} with {self.optimizer!r} need value_length "
                f"{need} (optimizer.value_length(dim)), the table has value_length {have}")
        if padding_idx is not None:
            padding_idx = _check_int("padding_idx", padding_idx, -(1 << 63))
            if not self.hash_ids:
                if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                    raise ValueError(f"padding_idx must be within [-{self.num_embeddings}, "
                                     f"{self.num_embeddings}), got {padding_idx}")
                padding_idx %= self.num_embeddings
        self.padding_idx = padding_idx
        self.worker = worker
        self.last_update = None   # (keys, grads) of the last apply_gradients
        self._anchor = torch.empty(0, requires_grad=True)
        # Where outputs go when the ids are on the CPU: follows module.to(device).
        self.register_buffer("_device_marker", torch.empty(0), persistent=False)

    @property
    def dim(self):
        return self.embedding_dim

    @property
    def key_range(self):
        """(first key, end key) of this table in the parameter server."""
        return self.key_offset, self.key_offset + self.num_embeddings

    # -- ids to keys -------------------------------------------------------------------

    def _rows_of(self, ids):
        """Row numbers in [0, num_embeddings) of flat int64 ids: hashed, or checked."""
        if self.hash_ids:
            return hash_bucket(ids, self.num_embeddings)
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.num_embeddings:
                bad = low if low < 0 else high
                start, end = self.key_range
                raise IdOutOfRangeError(
                    f"id {bad} out of range [0, {self.num_embeddings}) of "
                    f"{type(self).__name__}(num_embeddings={self.num_embeddings}, "
                    f"key_offset={self.key_offset}) (keys [{start}, {end}))")
        return ids

    def _fetches_padding_row(self):
        """Embedding returns the stored padding row (when ids are not hashed)."""
        return False

    def _plan(self, ids):
        """For flat int64 ids: (distinct keys that get gradients, the extra row's key or
        _ZERO_ROW or None, index of each id into the fetched rows)."""
        padding = None
        if self.padding_idx is not None:
            padding = ids == self.padding_idx
            if not padding.any():
                padding = None
        rows = self._rows_of(ids)
        if padding is None:
            unique, inverse = self._distinct(rows, inverse=True)
            return unique, None, inverse
        used = ~padding
        unique, inverse = self._distinct(rows[used], inverse=True)
        local = np.empty(ids.shape[0], dtype=np.int64)
        local[used] = inverse
        local[padding] = unique.shape[0]
        extra = self.key_offset + self.padding_idx if self._fetches_padding_row() \
            else _ZERO_ROW
        return unique, extra, local

    def _distinct(self, rows, inverse=False):
        """The distinct keys (int64, sorted) of row numbers, and with `inverse` each row's
        index into them: np.unique's, by a radix sort (distinct_keys: O(rows) per 11 bits
        of num_embeddings, where np.unique sorts by comparison)."""
        found = distinct_keys(rows, self.num_embeddings, inverse)
        unique = (found[0] if inverse else found).astype(np.int64) + self.key_offset
        return (unique, found[1]) if inverse else unique

    def keys_of(self, ids):
        """The distinct parameter-server keys that a forward of `ids` fetches (int64
        array): what adapm.data.IntentLoader's keys_of returns for this table's part of a
        batch. Applies hashing, key_offset and padding; raises IdOutOfRangeError as
        forward does."""
        ids = _host_ids(ids).reshape(-1)
        if self.padding_idx is None:  # the common case: no inverse index to build
            return self._distinct(self._rows_of(ids))
        keys, extra, _ = self._plan(ids)
        if extra is not None and extra != _ZERO_ROW:
            keys = np.union1d(keys, [extra])
        return keys

    keys = keys_of   # older name

    # -- rows in, gradients out ----------------------------------------------------------

    def _output_device(self, ids):
        if isinstance(ids, torch.Tensor) and ids.device.type != "cpu":
            return ids.device
        return self._device_marker.device

    def _fetch(self, keys, extra_key, device):
        """The rows of `keys` (plus the extra row) as a float32 (n, dim) tensor on
        `device`; for a CUDA device through pinned host memory, copied asynchronously."""
        n, dim = keys.shape[0], self.embedding_dim
        fetch = keys
        if extra_key is not None and extra_key != _ZERO_ROW:
            fetch = np.append(keys, np.int64(extra_key))
        total = n + (extra_key is not None)
        pinned = device.type == "cuda"
        if not pinned and total == n and n:   # the rows as they come, no copy
            rows = np.asarray(self.worker.pull_rows(keys, self.optimizer), dtype=np.float32)
            return torch.from_numpy(rows.reshape(n, dim)).to(device)
        host = torch.empty((total, dim), dtype=torch.float32, pin_memory=pinned)
        if fetch.shape[0]:
            rows = self.worker.pull_rows(fetch, self.optimizer)
            host[: fetch.shape[0]] = torch.from_numpy(
                np.asarray(rows, dtype=np.float32).reshape(fetch.shape[0], dim))
        if extra_key == _ZERO_ROW:
            host[n:] = 0.0
        return host.to(device, non_blocking=True) if pinned else host.to(device)

    def _send(self, keys, grad):
        if not keys.shape[0]:
            return
        grads = np.ascontiguousarray(grad.detach().to("cpu", torch.float32).numpy())
        self.worker.apply_gradients(keys, grads, self.optimizer)
        self.last_update = (keys, grads)

    def _lookup(self, ids):
        """(rows tensor, index of each id into it (on the output device), local padding
        index or None) for a forward over `ids`."""
        host = _host_ids(ids)
        device = self._output_device(ids)
        keys, extra, local = self._plan(host.reshape(-1))
        rows = _Rows.apply(self._anchor, self, keys, extra, device)
        index = torch.from_numpy(local.reshape(host.shape))
        if device.type == "cuda":
            index = index.pin_memory().to(device, non_blocking=True)
        return rows, index, (keys.shape[0] if extra is not None else None)

    # -- state_dict: the rows themselves, gathered ------------------------------------

    def _all_keys(self):
        start, end = self.key_range
        return np.arange(start, end, dtype=np.int64)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """`weight` (num_embeddings, dim), as torch.nn.Embedding's, so that a plain torch
        module loads it for inference; `optimizer_state` (num_embeddings, state_length)
        beside it. Every row is pulled into this process: for tables larger than memory
        allows, save a checkpoint (w.save) instead (docs/torch.md)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        values = np.asarray(self.worker.pull(self._all_keys()))
        dim = self.embedding_dim
        destination[prefix + "weight"] = torch.from_numpy(
            np.ascontiguousarray(values[:, :dim], dtype=np.float32))
        destination[prefix + "optimizer_state"] = torch.from_numpy(
            np.ascontiguousarray(values[:, dim:]))

    def get_extra_state(self):
        return {"optimizer": self.optimizer.state_dict(), "key_offset": self.key_offset,
                "num_embeddings": self.num_embeddings}

    def set_extra_state(self, state):
        self.optimizer.load_state_dict(state["optimizer"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        """Write `weight` (and `optimizer_state`, else the optimizer's initial state) into
        this table's keys with w.set. Every worker may load the same state_dict (the
        same values are set); then barrier() before training."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        ours = (prefix + "weight", prefix + "optimizer_state")
        unexpected_keys[:] = [key for key in unexpected_keys if key not in ours]
        weight, state = state_dict.get(ours[0]), state_dict.get(ours[1])
        if weight is None:
            missing_keys.append(ours[0])
            return
        expected = (self.num_embeddings, self.embedding_dim)
        if tuple(weight.shape) != expected:
            error_msgs.append(f"size mismatch for {ours[0]}: {tuple(weight.shape)} in the "
                              f"state_dict, {expected} in {type(self).__name__}")
            return
        length = self.optimizer.state_length(self.embedding_dim)
        values = np.empty((expected[0], self.embedding_dim + length),
                          dtype=self.worker.dtype)
        values[:, :self.embedding_dim] = weight.detach().to("cpu").numpy()
        if state is None:
            self.optimizer.initial_state(values[:, self.embedding_dim:], self.embedding_dim)
        elif tuple(state.shape) != (expected[0], length):
            error_msgs.append(f"size mismatch for {ours[1]}: {tuple(state.shape)} in the "
                              f"state_dict, {(expected[0], length)} for {self.optimizer!r}")
            return
        else:
            values[:, self.embedding_dim:] = state.detach().to("cpu").numpy()
        self.worker.set(self._all_keys(), values)

    def extra_repr(self):
        text = (f"{self.num_embeddings}, {self.embedding_dim}, optimizer={self.optimizer!r}, "
                f"key_offset={self.key_offset}")
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        if self.hash_ids:
            text += ", hash_ids=True"
        return text


class Embedding(_Table):
    """torch.nn.Embedding whose `num_embeddings` rows of `dim` are the parameter server's
    keys [key_offset, key_offset + num_embeddings), trained by `optimizer` (adapm.optim)
    in the table.

    forward(ids) -> float32 tensor of shape ids.shape + (dim,), on ids' device (or, for
    CPU ids, on the device the module was moved to). ids: integers in
    [0, num_embeddings) (else IdOutOfRangeError, an IndexError, before anything is
    fetched), or any int64 with hash_ids=True (hashed into [0, num_embeddings), see
    hash_bucket). padding_idx: ids equal to it return the stored padding row and get no
    gradient (with hash_ids, padding_idx is compared with the ids before hashing, and
    those entries return zeros). Backward sends the batch's gradients, one
    `w.apply_gradients` call per forward."""

    def __init__(self, w, num_embeddings, dim, optimizer=None, key_offset=0,
                 padding_idx=None, hash_ids=False):
        super().__init__(w, num_embeddings, dim, optimizer, key_offset, padding_idx, hash_ids)

    def _fetches_padding_row(self):
        return not self.hash_ids

    def forward(self, input):
        rows, index, padding = self._lookup(input)
        return F.embedding(index, rows, padding_idx=padding)


class EmbeddingBag(_Table):
    """torch.nn.EmbeddingBag whose rows are the parameter server's keys
    [key_offset, key_offset + num_embeddings), trained by `optimizer` in the table.

    forward(input, offsets=None, per_sample_weights=None) as torch.nn.EmbeddingBag:
    input 2-D (bags of equal length) without offsets, or 1-D with 1-D offsets (bag i is
    input[offsets[i]:offsets[i + 1]]; with include_last_offset=True the last offset is the
    end); mode "sum", "mean" or "max"; per_sample_weights (mode "sum" only) weight each
    entry. Entries equal to padding_idx are left out of their bag (an empty bag gives
    zeros) and get no gradient. Output on input's device (or, for CPU input, on the
    device the module was moved to). Backward sends the gradient of every row that a
    non-padding entry used, one `w.apply_gradients` call per forward."""

    def __init__(self, w, num_embeddings, dim, mode="sum", optimizer=None, key_offset=0,
                 padding_idx=None, hash_ids=False, include_last_offset=False):
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"mode has to be one of sum, mean or max, got {mode!r}")
        super().__init__(w, num_embeddings, dim, optimizer, key_offset, padding_idx, hash_ids)
        self.mode = mode
        self.include_last_offset = bool(include_last_offset)

    def _check_forward(self, input, offsets, per_sample_weights):
        """torch's checks of an embedding_bag call's arguments, with torch's messages."""
        shape = tuple(input.shape) if hasattr(input, "shape") else np.shape(input)
        if len(shape) == 2 and offsets is not None:
            raise ValueError("if input is 2D, then offsets has to be None, as input is "
                             "treated as a mini-batch of fixed length sequences")
        if len(shape) == 1 and offsets is None:
            raise ValueError("offsets has to be a 1D Tensor but got None")
        if len(shape) not in (1, 2):
            raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension "
                             f"{len(shape)}")
        if per_sample_weights is not None and self.mode != "sum":
            raise NotImplementedError(
                f"embedding_bag: per_sample_weights is only supported for mode='sum' "
                f"(got mode='{self.mode}')")

    def forward(self, input, offsets=None, per_sample_weights=None):
        self._check_forward(input, offsets, per_sample_weights)
        fused = self._fused(input, offsets, per_sample_weights)
        if fused is not None:
            return fused
        rows, index, padding = self._lookup(input)
        device = rows.device
        if offsets is not None:
            offsets = torch.as_tensor(offsets).to(device, torch.int64)
        if per_sample_weights is not None:
            per_sample_weights = torch.as_tensor(per_sample_weights).to(device)
        return F.embedding_bag(index, rows, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset,
                               padding_idx=padding)

    # -- the fused path: pooled straight from the table -------------------------------

    def _fused(self, input, offsets, per_sample_weights):
        """The bags pooled straight from the rows held here (Worker.pool_bags: one pass
        over the entries, no fetched rows, no torch kernel), with a backward that steps
        the rows in the table in the same pass (Worker.apply_bag_gradients). None where
        it does not apply (see _fused_entries), or where a key of the batch is not held
        on this node: the rows are pulled and pooled by torch instead."""
        entries = self._fused_entries(input, offsets, per_sample_weights)
        if entries is None:
            return None
        return pool_fused(self, self.worker, self.optimizer, self.mode, *entries)

    def _fused_entries(self, input, offsets, per_sample_weights):
        """(keys, bags, number of bags, weights or None) of a forward on the fused path,
        padding left out; None where it does not apply: a worker without it, a float64
        table, outputs on a GPU, per-sample weights whose own gradient is wanted, offsets
        torch itself would have to judge. Raises IdOutOfRangeError as forward does."""
        if not hasattr(self.worker, "pool_bags") or self.worker.dtype != np.float32 or \
                self._output_device(input).type != "cpu":
            return None
        if isinstance(per_sample_weights, torch.Tensor) and \
                per_sample_weights.requires_grad and torch.is_grad_enabled():
            return None
        host = _host_ids(input)
        entries = self._entries(host, offsets)
        if entries is None:
            return None
        flat, bags, num_bags = entries
        weights = None
        if per_sample_weights is not None:
            weights = torch.as_tensor(per_sample_weights).detach().to(
                "cpu", torch.float32).numpy().reshape(-1)
            if weights.shape[0] != flat.shape[0]:
                return None  # torch's error
        if self.padding_idx is not None:
            kept = flat != self.padding_idx
            flat, bags = flat[kept], bags[kept]
            weights = None if weights is None else weights[kept]
        return self._rows_of(flat) + self.key_offset, bags, num_bags, weights

    def _entries(self, host, offsets):
        """(flat ids, each entry's bag, number of bags) of an input, or None for offsets
        that torch should judge (not starting at 0, decreasing, past the input's end)."""
        if host.ndim == 2:
            num_bags, length = host.shape
            return host.reshape(-1), np.repeat(np.arange(num_bags, dtype=np.int64),
                                               length), num_bags
        offs = _host_ids(offsets).reshape(-1)
        n = host.shape[0]
        starts = offs[:-1] if self.include_last_offset else offs
        ends = offs[1:] if self.include_last_offset else np.append(offs[1:], n)
        if starts.shape[0] == 0 or starts[0] != 0 or ends[-1] != n or \
                (np.diff(offs) < 0).any() or offs[-1] > n:
            return None
        return host, np.repeat(np.arange(starts.shape[0], dtype=np.int64),
                               ends - starts), starts.shape[0]


    def extra_repr(self):
        text = super().extra_repr() + f", mode={self.mode!r}"
        if self.include_last_offset:
            text += ", include_last_offset=True"
        return text


def init_distributed(backend=None, **kwargs):
    """Join the torch.distributed group of all the cluster's workers and return its
    backend. adapm.run and adapm-launch set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
    LOCAL_RANK and LOCAL_WORLD_SIZE in every worker, so this is
    torch.distributed.init_process_group(backend, **kwargs) with backend None meaning
    "nccl" where CUDA is available and "gloo" otherwise. Choose the GPU first
    (torch.cuda.set_device). Already joined: returns the group's backend."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_backend()
    if backend is None:
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, **kwargs)
    return backend
