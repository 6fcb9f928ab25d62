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

Only this module imports torch; the rest of adapm does not depend on it. Unpickling
`embedding_init(...)` in a node server imports this module, and with it torch."""

import numpy as np
import torch

from adapm.initializers import initial_values

__all__ = ["SGD", "Adagrad", "Embedding", "EmbeddingInit", "embedding_init", "value_length"]


def _number(name, value, low=0.0):
    value = float(value)
    if not value >= low:  # also refuses NaN
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


class SGD:
    """Plain SGD, as torch.optim.SGD without momentum or weight decay: row -= lr * g.
    Value layout per key: [row] (1 slot of embedding_dim)."""

    slots = 1

    def __init__(self, lr):
        self.lr = _number("lr", lr)

    def init_state(self, values, dim):
        """Fill the state slots of freshly initialised values (n, slots * dim): none."""

    def delta(self, state, grad):
        """The additive update of keys whose pulled values are `state` (n, slots * dim),
        given their summed gradient `grad` (n, dim); all float32."""
        return np.float32(-self.lr) * grad

    def __repr__(self):
        return f"adapm.torch.SGD(lr={self.lr})"


class Adagrad:
    """Adagrad, as torch.optim.Adagrad (no lr decay or weight decay), per element:
    sum += g * g; row -= lr * g / (sqrt(sum) + eps). Value layout per key: [row | sum]
    (2 slots of embedding_dim); sum starts at initial_accumulator_value."""

    slots = 2

    def __init__(self, lr=0.01, eps=1e-10, initial_accumulator_value=0.0):
        self.lr = _number("lr", lr)
        self.eps = _number("eps", eps)
        self.initial_accumulator_value = _number("initial_accumulator_value",
                                                 initial_accumulator_value)

    def init_state(self, values, dim):
        values[:, dim:] = self.initial_accumulator_value

    def delta(self, state, grad):
        # The row's step uses the accumulator as pulled in forward plus this batch's g * g
        # (exactly torch's order); the accumulator itself receives g * g as a delta, so
        # the squares of concurrent workers' gradients add up instead of overwriting.
        dim = grad.shape[1]
        squares = grad * grad
        std = np.sqrt(state[:, dim:] + squares) + np.float32(self.eps)
        delta = np.empty((grad.shape[0], 2 * dim), dtype=np.float32)
        delta[:, :dim] = np.float32(-self.lr) * grad / std
        delta[:, dim:] = squares
        return delta

    def __repr__(self):
        return (f"adapm.torch.Adagrad(lr={self.lr}, eps={self.eps}, "
                f"initial_accumulator_value={self.initial_accumulator_value})")


def _check_optimizer(optimizer):
    if not (hasattr(optimizer, "slots") and callable(getattr(optimizer, "delta", None))):
        raise TypeError(f"optimizer must be adapm.torch.SGD or adapm.torch.Adagrad (or "
                        f"provide slots, init_state and delta), got {optimizer!r}")
    return optimizer


def _check_dim(embedding_dim):
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, (int, np.integer)) \
            or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be an int >= 1, got {embedding_dim!r}")
    return int(embedding_dim)


def value_length(embedding_dim, optimizer):
    """The value_length a table needs for rows of `embedding_dim` with `optimizer`'s state."""
    return _check_optimizer(optimizer).slots * _check_dim(embedding_dim)


class EmbeddingInit:
    """init(keys) -> values (len(keys), value_length) float32 for adapm.run(init=...):
    row ~ N(0, std) exactly as init=("normal", std, seed) would give a table of
    embedding_dim (counter based: the same whatever the number of nodes), optimizer state
    at its initial value. A module-level class so that it pickles to the node servers."""

    def __init__(self, embedding_dim, optimizer, std=1.0, seed=0):
        self.dim = _check_dim(embedding_dim)
        self.optimizer = _check_optimizer(optimizer)
        self.std = _number("std", std)
        self.seed = int(seed)

    def __call__(self, keys):
        keys = np.asarray(keys, dtype=np.uint64)
        lengths = np.full(keys.shape[0], self.dim, dtype=np.uint64)
        rows = initial_values(("normal", self.std, self.seed), keys, lengths, "float32")
        values = np.empty((keys.shape[0], value_length(self.dim, self.optimizer)),
                          dtype=np.float32)
        values[:, : self.dim] = rows.reshape(-1, self.dim)
        self.optimizer.init_state(values, self.dim)
        return values


def embedding_init(embedding_dim, optimizer, std=1.0, seed=0):
    """A picklable init for adapm.run: rows N(0, std) (torch.nn.Embedding's default is
    std 1), optimizer state at its initial value."""
    return EmbeddingInit(embedding_dim, optimizer, std, seed)


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
