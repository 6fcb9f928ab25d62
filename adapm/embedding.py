"""Embedding rows kept in the parameter server, without torch: the optimizers' update
rules and state layouts, and the rows' initial values.

adapm.torch builds its torch module on these; they live apart so that a node server that
unpickles an `embedding_init(...)` (it runs the init where the keys' home is) does not
import torch."""

import numpy as np

from adapm.initializers import initial_values


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
