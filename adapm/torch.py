"""PyTorch embeddings whose rows live in the parameter server (the `adapm[torch]` extra).

    opt = adapm.torch.Adagrad(lr=0.1)
    results = adapm.run(task, nodes=2, num_keys=n, value_length=adapm.torch.value_length(dim, opt),
                        init=adapm.torch.embedding_init(dim, opt, std=0.1, seed=0))
    # in task(w):
    emb = adapm.torch.Embedding(w, n, dim, opt)
    loss = model(emb(ids)).sum()
    loss.backward()          # pushes this batch's update of emb's rows

Forward pulls the batch's distinct rows once; backward sums the gradient of duplicate ids
per row and pushes the optimizer's update as an additive delta, so concurrent workers
never overwrite each other's updates. Optimizer state (Adagrad's accumulator) is stored in
the same key as its row, [row | state], so it relocates and replicates with the row. There
is no separate optimizer.step() for these rows: each backward is one step.

Only this module imports torch; the rest of adapm does not depend on it. The optimizers
and `embedding_init` live in adapm.embedding (no torch), so node servers that unpickle
the init do not import torch."""

import numpy as np
import torch

# The optimizers and initial values need no torch (a node server unpickles the init).
from adapm.embedding import (  # noqa: F401 - part of this module's API
    SGD,
    Adagrad,
    EmbeddingInit,
    _check_dim,
    _check_optimizer,
    embedding_init,
    value_length,
)

__all__ = ["SGD", "Adagrad", "Embedding", "EmbeddingInit", "embedding_init", "value_length"]


class _Lookup(torch.autograd.Function):
    """Forward: pull the distinct rows, gather them per id. Backward: sum the gradient per
    distinct row and push the optimizer's delta. `anchor` is a tensor that requires grad,
    only so that autograd records the lookup (the rows are no torch parameter)."""

    @staticmethod
    def forward(ctx, anchor, ids, emb):
        unique, inverse = torch.unique(ids.detach().cpu().reshape(-1), return_inverse=True)
        keys = unique.numpy().astype(np.int64) + emb.key_offset
        state = emb.worker.pull(keys)
        rows = torch.from_numpy(state[:, : emb.embedding_dim])
        ctx.emb, ctx.keys, ctx.state, ctx.inverse = emb, keys, state, inverse
        return rows[inverse].reshape(*ids.shape, emb.embedding_dim).to(ids.device)

    @staticmethod
    def backward(ctx, grad_out):
        emb = ctx.emb
        grad = grad_out.detach().to("cpu", torch.float32).reshape(-1, emb.embedding_dim)
        summed = torch.zeros((ctx.keys.shape[0], emb.embedding_dim), dtype=torch.float32)
        summed.index_add_(0, ctx.inverse, grad)
        emb._push(ctx.keys, ctx.state, summed.numpy())
        return None, None, None


class Embedding(torch.nn.Module):
    """An embedding table of `num_embeddings` rows of `embedding_dim`, stored in the
    parameter server as keys [key_offset, key_offset + num_embeddings).

    forward(ids) -> float32 tensor of shape ids.shape + (embedding_dim,), on ids' device,
    requiring grad. Backward pushes one `optimizer` step for the rows the batch used,
    computed from the rows and state pulled in that forward. Look a table up once per
    step (concatenate the ids): two lookups of one row in one step are two Adagrad steps
    from the same state, not one step with the summed gradient.

    The module has no torch parameters: the rest of the model keeps its own torch
    optimizer, and these rows are updated by backward alone. `last_update` is
    (keys, summed gradient rows) of the last push, for inspection."""

    def __init__(self, worker, num_embeddings, embedding_dim, optimizer, key_offset=0):
        super().__init__()
        self.embedding_dim = _check_dim(embedding_dim)
        self.optimizer = _check_optimizer(optimizer)
        if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, (int, np.integer)) \
                or num_embeddings < 1:
            raise ValueError(f"num_embeddings must be an int >= 1, got {num_embeddings!r}")
        if isinstance(key_offset, bool) or not isinstance(key_offset, (int, np.integer)) \
                or key_offset < 0:
            raise ValueError(f"key_offset must be an int >= 0, got {key_offset!r}")
        self.num_embeddings, self.key_offset = int(num_embeddings), int(key_offset)
        if self.key_offset + self.num_embeddings > worker.num_keys:
            raise ValueError(
                f"keys [{self.key_offset}, {self.key_offset + self.num_embeddings}) do not fit "
                f"a table of {worker.num_keys} keys")
        if np.dtype(worker.dtype) != np.float32:
            raise ValueError(f"adapm.torch.Embedding needs a float32 table, this one is "
                             f"{np.dtype(worker.dtype)} (adapm.run(..., dtype='float32'))")
        need = value_length(self.embedding_dim, self.optimizer)
        if worker.value_length != need:
            have = worker.value_length or "per key"
            raise ValueError(
                f"rows of {self.embedding_dim} with {self.optimizer!r} need value_length "
                f"{need} (adapm.torch.value_length), the table has value_length {have}")
        self.worker = worker
        self.last_update = None
        self._anchor = torch.empty(0, requires_grad=True)

    def _check_ids(self, ids):
        """ids as a tensor of integers in [0, num_embeddings); ValueError otherwise."""
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(np.asarray(ids))
        if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise ValueError(f"ids must be integers, got a {ids.dtype} tensor")
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.num_embeddings:
                bad = low if low < 0 else high
                raise ValueError(f"id {bad} out of range [0, {self.num_embeddings})")
        return ids

    def keys(self, ids):
        """The distinct parameter-server keys of `ids` (int64 array): what
        adapm.data.IntentLoader's keys_of should return for a batch of these ids."""
        ids = self._check_ids(ids).detach().cpu().reshape(-1)
        return torch.unique(ids).numpy().astype(np.int64) + self.key_offset

    def forward(self, ids):
        return _Lookup.apply(self._anchor, self._check_ids(ids), self)

    def _push(self, keys, state, grad):
        if keys.shape[0]:
            self.worker.push(keys, self.optimizer.delta(state, grad))
        self.last_update = (keys, grad)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, optimizer={self.optimizer!r}, "
                f"key_offset={self.key_offset}")
