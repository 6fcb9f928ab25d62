"""The fused path of adapm.torch's embedding bags (docs/torch.md): the autograd function
whose forward is a pooled lookup straight from the table (Worker.pool_bags) and whose
backward scatters the pooled gradient and steps the rows in one call
(Worker.apply_bag_gradients), and EmbeddingBagCollection, which does that for several
tables at once. adapm.torch re-exports the collection; EmbeddingBag calls pool_fused."""

import numpy as np
import torch

from adapm.table._keyset import distinct_keys

__all__ = ["EmbeddingBagCollection", "pool_fused"]


class _FusedBag(torch.autograd.Function):
    """An EmbeddingBag's fused path (Worker.pool_bags, .apply_bag_gradients): forward
    returns the bags pooled straight from the table; backward sends the pooled gradient,
    which the table scatters to its rows and steps the optimizer with, in one call."""

    @staticmethod
    def forward(ctx, anchor, module, entries, pooled):
        ctx.module, ctx.entries = module, entries
        return torch.from_numpy(pooled)

    @staticmethod
    def backward(ctx, grad):
        ctx.module._send_bags(ctx.entries, grad)
        return None, None, None, None


def pool_fused(owner, worker, optimizer, mode, keys, bags, num_bags, weights):
    """Worker.pool_bags of the entries as a (num_bags, dim) tensor whose backward
    (_FusedBag) steps the rows through Worker.apply_bag_gradients; `owner` (a module)
    gets the step's (keys, summed gradients) as its last_update. None: a key is not held
    here (nothing changed)."""
    pooled = worker.pool_bags(keys, bags, num_bags, optimizer, mode, weights)
    if pooled is None:
        return None
    out, argmax = pooled
    if not torch.is_grad_enabled():
        return torch.from_numpy(out)
    scale = weights
    if mode == "mean":
        counts = np.maximum(np.bincount(bags, minlength=num_bags), 1)  # empty: unused
        scale = (1.0 / counts).astype(np.float32)[bags]
    return _FusedBag.apply(owner._anchor, _BagStep(owner, worker, optimizer, mode),
                           (keys, bags, scale, argmax), out)


class _BagStep:
    """What a fused backward sends, and where its record goes."""

    def __init__(self, owner, worker, optimizer, mode):
        self.owner, self.worker, self.optimizer, self.mode = owner, worker, optimizer, mode

    def _send_bags(self, entries, grad):
        keys, bags, scale, argmax = entries
        grads = np.ascontiguousarray(grad.detach().to("cpu", torch.float32).numpy())
        distinct, summed = self.worker.apply_bag_gradients(
            keys, bags, grads, self.optimizer, self.mode, scale, argmax)
        if distinct.shape[0]:
            self.owner.last_update = (distinct.astype(np.int64), summed)


class EmbeddingBagCollection(torch.nn.Module):
    """Several EmbeddingBags of one model, looked up in one call each way (as TBE batches
    a model's tables): forward(inputs) takes one input per table, in the order given (a
    2-D tensor of bags of equal length, or a tuple (input, offsets) or (input, offsets,
    per_sample_weights)), and returns one output per table, each exactly what that
    table's own forward returns. On the fused path (docs/torch.md) the tables that share
    a mode and an optimizer object are pooled in one pass over all their entries
    (Worker.pool_bags) and stepped in one call at backward (one optimizer step per row,
    as each table's own forward and backward would give); a table whose batch the fused
    path cannot take goes through its own forward. The tables keep their own key ranges,
    hashing, padding and include_last_offset; last_update is the collection's."""

    def __init__(self, bags):
        super().__init__()
        bags = list(bags)
        if not bags or not all(hasattr(b, "_fused_entries") for b in bags):
            raise TypeError("EmbeddingBagCollection takes a non-empty list of "
                            "adapm.torch.EmbeddingBag")
        if any(b.worker is not bags[0].worker for b in bags):
            raise ValueError("the tables of a collection belong to one worker")
        self.bags = torch.nn.ModuleList(bags)
        ranges = [b.key_range for b in bags]
        self._ranges_ascend = all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
        self.last_update = None
        self._anchor = torch.empty(0, requires_grad=True)

    def keys_of(self, inputs):
        """The distinct keys a forward of `inputs` fetches (for IntentLoader)."""
        keys = np.concatenate([bag.keys_of(_unpack(inp)[0])
                               for bag, inp in zip(self.bags, inputs)])
        if self._ranges_ascend:  # each table's keys sorted and distinct, and below the next's
            return keys
        return distinct_keys(keys, self.bags[0].worker.num_keys).astype(np.int64)

    def forward(self, inputs):
        inputs = list(inputs)
        if len(inputs) != len(self.bags):
            raise ValueError(f"{len(inputs)} inputs for {len(self.bags)} tables")
        outputs = [None] * len(self.bags)
        groups = {}
        for t, (bag, inp) in enumerate(zip(self.bags, inputs)):
            input, offsets, weights = _unpack(inp)
            bag._check_forward(input, offsets, weights)
            entries = bag._fused_entries(input, offsets, weights)
            if entries is None:
                outputs[t] = bag(input, offsets, weights)
            else:
                groups.setdefault((bag.mode, id(bag.optimizer)), []).append((t, entries))
        for members in groups.values():
            pooled = self._pool_group(members)
            for (t, _), out in zip(members, pooled or [None] * len(members)):
                outputs[t] = out if pooled is not None else self.bags[t](*_unpack(inputs[t]))
        return outputs

    def _pool_group(self, members):
        """One pool_bags call for tables of one mode and optimizer: their entries with
        bags numbered on, split back into one output per table (views of one tensor, so
        autograd sends one backward)."""
        first = self.bags[members[0][0]]
        keys = np.concatenate([e[0] for _, e in members])
        sizes = [e[2] for _, e in members]
        bases = np.cumsum([0] + sizes[:-1])
        bags = np.concatenate([e[1] + base for (_, e), base in zip(members, bases)])
        weights = None
        if any(e[3] is not None for _, e in members):
            weights = np.concatenate([e[3] if e[3] is not None else
                                      np.ones(e[0].shape[0], np.float32) for _, e in members])
        out = pool_fused(self, first.worker, first.optimizer, first.mode, keys, bags,
                          int(sum(sizes)), weights)
        return None if out is None else list(torch.split(out, sizes))


def _unpack(inp):
    """(input, offsets, per_sample_weights) of one table's input to a collection."""
    if isinstance(inp, (tuple, list)):
        if not 1 <= len(inp) <= 3:
            raise ValueError("a table's input is a tensor or (input, offsets[, "
                             "per_sample_weights])")
        inp = tuple(inp) + (None,) * (3 - len(inp))
        return inp
    return inp, None, None
