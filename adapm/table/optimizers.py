"""Sparse optimizers fused into the table (docs/design/API.md, "Sparse optimizers").

    opt = adapm.optim.Adagrad(lr=0.1)
    adapm.run(task, num_keys=n, value_length=opt.value_length(dim),
              init=opt.init(("normal", 0.1, 0)), ...)
    # in task(w):
    rows = w.pull_rows(keys, opt)              # (len(keys), dim), without the state
    w.apply_gradients(keys, grads, opt)        # one step per distinct key

A key's value is its row followed by the optimizer's state, [row | state], so the state
relocates and replicates with the row. `apply_gradients` sums the gradients of duplicate
keys and applies the step in place, under the key's lock, in one compiled kernel: where
the node holds the key (owned, or a replica, whose change reaches the owner as a delta
like any update) or else at its owner, to which the summed gradients travel with the
optimizer's kind and hyper-parameters as numbers (nothing is unpickled).

Update rules, per distinct key with summed gradient g and row w (as torch.optim, with
L2 weight decay g += weight_decay * w first):
- SGD:            w -= lr * g
- Adagrad:        s += g*g;  w -= lr * g / (sqrt(s) + eps)                  [row | s]
- RowWiseAdagrad: s += mean(g*g);  w -= lr * g / (sqrt(s) + eps)            [row | s], s one float
- Adam (torch.optim.SparseAdam: moments change only for rows with a gradient):
                  m += (1-b1)(g - m);  v += (1-b2)(g*g - v);
                  w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)  [row | m | v]
  t counts this optimizer object's apply_gradients calls (torch's per-parameter step).

This module needs no torch: node servers unpickle an optimizer's init."""

import math

import numpy as np

from adapm.table.initializers import initial_values, parse_init

# Kinds as they travel in APPLY messages (and as the kernel knows them).
KIND_SGD, KIND_ADAGRAD, KIND_ROWWISE_ADAGRAD, KIND_ADAM = 0, 1, 2, 3
# The APPLY message's params frame: float64 values in this order.
PARAMS = ("kind", "dim", "lr", "eps", "weight_decay", "beta1", "beta2", "step_size")


def _number(name, value, low=0.0, high=math.inf, open_low=False):
    value = float(value)
    ok = (value > low if open_low else value >= low) and value <= high
    if not ok:  # also refuses NaN
        bound = f"> {low}" if open_low else f">= {low}"
        raise ValueError(f"{name} must be {bound}" + (f" and <= {high}" if high < math.inf
                                                      else "") + f", got {value}")
    return value


def _dim(dim):
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    return int(dim)


class SparseOptimizer:
    """Base of the fused optimizers: the layout [row | state] and the message params."""

    kind = None
    name = ""

    def __init__(self, lr, weight_decay):
        self.lr = _number("lr", lr)
        self.weight_decay = _number("weight_decay", weight_decay)
        self.steps = 0   # apply_gradients calls made with this object (Adam's t)

    # -- layout --------------------------------------------------------------------

    def state_length(self, dim):
        """Floats of optimizer state per key."""
        raise NotImplementedError

    def value_length(self, dim):
        """Floats per key: the row and the optimizer's state beside it."""
        dim = _dim(dim)
        return dim + self.state_length(dim)

    def dim_of(self, value_length):
        """The row length of a table whose keys hold `value_length` floats."""
        for dim in self._dims(int(value_length)):
            if dim >= 1 and self.value_length(dim) == value_length:
                return dim
        raise ValueError(f"a table with value_length {value_length} does not hold rows "
                         f"for {self!r} (value_length(dim) is {self._layout_text()})")

    def _dims(self, value_length):
        raise NotImplementedError

    def _layout_text(self):
        raise NotImplementedError

    def init(self, init=None):
        """Initial values for this optimizer's layout, for adapm.run/adapm-launch: rows
        by `init` (any init spec of docs/design/API.md: None, ("uniform", low, high, seed),
        ("normal", std, seed) or a callable for the rows), state at its start."""
        return OptimizerInit(self, init)

    def initial_state(self, state, dim):
        """Fill the state columns (n, state_length) of fresh values."""
        state[:] = 0.0

    def check_state(self, state, dim):
        """Raise ValueError when state values (n, state_length) cannot be this
        optimizer's (NaN, infinite, or negative where it sums squares)."""
        if state.size and not np.isfinite(state).all():
            raise ValueError(f"{self.name} state holds NaN or infinite values")

    # -- saving ----------------------------------------------------------------------

    def state_dict(self):
        """This object's own state (the keys' state lives in the table): its kind and
        hyperparameters, for checking, and its step count (Adam's bias correction), as
        JSON-serialisable values, like torch.optim's state_dict."""
        return {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay,
                "steps": self.steps}

    def load_state_dict(self, state):
        """Take the step count of `state` (a state_dict of the same kind of optimizer);
        hyperparameters stay as this object was made (they may change on a restart)."""
        if not isinstance(state, dict) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, dict) else state
            raise ValueError(f"{self.name} cannot load the state of a {got!r} optimizer")
        steps = state.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{self.name}: step count {steps!r} is not a count")
        self.steps = steps

    # -- steps ---------------------------------------------------------------------

    def params(self, dim):
        """The float64 params of one apply_gradients call (advances the step count)."""
        self.steps += 1
        return np.array([self.kind, dim, self.lr, self._eps(), self.weight_decay,
                         *self._betas(), self._step_size()], dtype=np.float64)

    def _eps(self):
        return 0.0

    def _betas(self):
        return 0.0, 0.0

    def _step_size(self):
        return self.lr


class SGD(SparseOptimizer):
    """SGD as torch.optim.SGD without momentum: w -= lr * (g + weight_decay * w)."""

    kind, name = KIND_SGD, "SGD"

    def __init__(self, lr, weight_decay=0.0):
        super().__init__(lr, weight_decay)

    def state_length(self, dim):
        return 0

    def _dims(self, value_length):
        return (value_length,)

    def _layout_text(self):
        return "dim"

    def __repr__(self):
        return f"adapm.optim.SGD(lr={self.lr}, weight_decay={self.weight_decay})"


class Adagrad(SparseOptimizer):
    """Adagrad as torch.optim.Adagrad (no lr decay): one accumulator per element."""

    kind, name = KIND_ADAGRAD, "Adagrad"

    def __init__(self, lr=0.01, eps=1e-10, weight_decay=0.0, initial_accumulator_value=0.0):
        super().__init__(lr, weight_decay)
        self.eps = _number("eps", eps)
        self.initial_accumulator_value = _number("initial_accumulator_value",
                                                 initial_accumulator_value)

    def state_length(self, dim):
        return dim

    def _dims(self, value_length):
        return (value_length // 2,)

    def _layout_text(self):
        return "2 * dim"

    def initial_state(self, state, dim):
        state[:] = self.initial_accumulator_value

    def check_state(self, state, dim):
        super().check_state(state, dim)
        if state.size and (state < 0).any():
            raise ValueError(f"{self.name} accumulator holds negative values: it sums "
                             "squares (an init that fills the whole value with noise?)")

    def _eps(self):
        return self.eps

    def __repr__(self):
        return (f"adapm.optim.Adagrad(lr={self.lr}, eps={self.eps}, weight_decay="
                f"{self.weight_decay}, initial_accumulator_value="
                f"{self.initial_accumulator_value})")


class RowWiseAdagrad(Adagrad):
    """Adagrad with one accumulator per row (the mean of the squared gradient), as
    TorchRec/FBGEMM's row-wise Adagrad: a quarter of Adagrad's memory at dim 4, far less
    beyond."""

    kind, name = KIND_ROWWISE_ADAGRAD, "RowWiseAdagrad"

    def state_length(self, dim):
        return 1

    def _dims(self, value_length):
        return (value_length - 1,)

    def _layout_text(self):
        return "dim + 1"

    def __repr__(self):
        return (f"adapm.optim.RowWiseAdagrad(lr={self.lr}, eps={self.eps}, weight_decay="
                f"{self.weight_decay}, initial_accumulator_value="
                f"{self.initial_accumulator_value})")


class Adam(SparseOptimizer):
    """Adam with torch.optim.SparseAdam's semantics: moments move only for rows that got
    a gradient; bias correction by this object's step count."""

    kind, name = KIND_ADAM, "Adam"

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr, weight_decay)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        self.beta1 = _number("betas[0]", betas[0], high=1.0)
        self.beta2 = _number("betas[1]", betas[1], high=1.0)
        if self.beta1 >= 1.0 or self.beta2 >= 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        self.eps = _number("eps", eps)

    def state_length(self, dim):
        return 2 * dim

    def _dims(self, value_length):
        return (value_length // 3,)

    def _layout_text(self):
        return "3 * dim"

    def check_state(self, state, dim):
        super().check_state(state, dim)
        if state.size and (state[:, dim:] < 0).any():
            raise ValueError("Adam's second moment holds negative values")

    def _eps(self):
        return self.eps

    def _betas(self):
        return self.beta1, self.beta2

    def _step_size(self):
        t = self.steps
        return self.lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)

    def __repr__(self):
        return (f"adapm.optim.Adam(lr={self.lr}, betas=({self.beta1}, {self.beta2}), "
                f"eps={self.eps}, weight_decay={self.weight_decay})")


OPTIMIZERS = {"sgd": SGD, "adagrad": Adagrad, "rowwise_adagrad": RowWiseAdagrad,
              "adam": Adam}
KINDS = {cls.kind: cls for cls in OPTIMIZERS.values()}


class OptimizerInit:
    """init(keys) -> values (len(keys), value_length) for adapm.run(init=...): rows by the
    row init spec (as that spec would give a table of `dim`, whatever the number of
    nodes), state at the optimizer's start. A callable row init returns (n, dim) rows, or
    whole values (n, value_length) whose state is then checked (no NaN; no negative
    accumulator). Module level, so that it pickles to the node servers."""

    needs_value_length = True  # adapm.table.initializers calls it with the table's value_length

    def __init__(self, optimizer, rows=None):
        if not isinstance(optimizer, SparseOptimizer):
            raise TypeError(f"optimizer must be an adapm.optim optimizer, got {optimizer!r}")
        self.optimizer = optimizer
        self.rows = parse_init(rows)

    def __call__(self, keys, value_length=None):
        keys = np.asarray(keys, dtype=np.uint64)
        if value_length is None:
            raise ValueError("OptimizerInit needs the table's value_length")
        dim = self.optimizer.dim_of(value_length)
        values = np.empty((keys.shape[0], value_length), dtype=np.float64)
        if callable(self.rows):
            given = np.asarray(self.rows(keys.copy()), dtype=np.float64)
            if given.shape == (keys.shape[0], value_length):
                values[:] = given
                self.optimizer.check_state(values[:, dim:], dim)
                return values
            if given.size != keys.shape[0] * dim:
                raise ValueError(f"row init returned {given.shape} for {keys.shape[0]} keys, "
                                 f"expected ({keys.shape[0]}, {dim}) rows or "
                                 f"({keys.shape[0]}, {value_length}) whole values")
            values[:, :dim] = given.reshape(-1, dim)
        else:
            lengths = np.full(keys.shape[0], dim, dtype=np.uint64)
            values[:, :dim] = initial_values(self.rows, keys, lengths,
                                             np.float64).reshape(-1, dim)
        self.optimizer.initial_state(values[:, dim:], dim)
        return values

    def __repr__(self):
        return f"{self.optimizer!r}.init({self.rows!r})"


class FirstTouchCheck:
    """Checks the optimizer state of each key the first time a worker reads it with that
    optimizer (check_state: no NaN, no negative accumulator or second moment), so that a
    table initialised for rows alone (init=("normal", ...) instead of opt.init(...), or
    adapm-launch --init without --optimizer: noise in the state) fails at once with what
    to pass instead, rather than training to garbage. A bit per key: a key's state is
    checked once, so later reads cost a bit test."""

    def __init__(self, num_keys):
        self.checked = np.zeros((int(num_keys) + 7) // 8, dtype=np.uint8)

    def unchecked(self, keys):
        """The distinct keys of `keys` (uint64) not checked yet."""
        byte, bit = (keys >> np.uint64(3)).astype(np.intp), (keys & np.uint64(7)).astype(
            np.uint8)
        new = ((self.checked[byte] >> bit) & 1) == 0
        return np.unique(keys[new]) if new.any() else keys[:0]

    def check(self, keys, values, dim, optimizer):
        """`values`: the keys' whole values (n, dim + state_length), as pulled."""
        byte, bit = (keys >> np.uint64(3)).astype(np.intp), (keys & np.uint64(7)).astype(
            np.uint8)
        new = ((self.checked[byte] >> bit) & 1) == 0
        if not new.any() or optimizer.state_length(dim) == 0:
            return
        try:
            optimizer.check_state(np.asarray(values[new, dim:], dtype=np.float64), dim)
        except ValueError as exc:
            touched = keys[new]
            raise ValueError(
                f"keys {int(touched.min())}..{int(touched.max())}: {exc}. The table holds "
                f"[row | state] for {optimizer!r}, and its state was not initialised for "
                f"it: start the cluster with init=opt.init(ROW_INIT) where opt is that "
                f"optimizer (adapm.run), or --optimizer {_cli_name(optimizer)} --init "
                f"ROW_INIT (adapm-launch), not an init of the whole value") from None
        np.bitwise_or.at(self.checked, byte[new], np.left_shift(1, bit[new]).astype(np.uint8))


def _cli_name(optimizer):
    return next(name for name, cls in OPTIMIZERS.items() if type(optimizer) is cls)


def read_params(params, value_length):
    """The params of an APPLY from the wire, checked: a known kind, a row length that
    fits the table's value length, finite non-negative hyper-parameters, betas below 1.
    Returns (params as float64, dim); ValueError says what is wrong."""
    params = np.asarray(params, dtype=np.float64)
    if params.shape != (len(PARAMS),) or not np.isfinite(params).all():
        raise ValueError(f"optimizer params must be {len(PARAMS)} finite numbers")
    kind, dim = params[0], params[1]
    if kind not in KINDS or dim != int(dim) or dim < 1:
        raise ValueError(f"optimizer kind {kind} with dim {dim}")
    dim = int(dim)
    optimizer = KINDS[int(kind)].__new__(KINDS[int(kind)])
    if optimizer.state_length(dim) + dim != value_length:
        raise ValueError(f"{optimizer.name} rows of dim {dim} do not fit values of "
                         f"length {value_length}")
    if (params[2:] < 0).any() or params[5] >= 1 or params[6] >= 1:
        raise ValueError("optimizer hyper-parameters must be >= 0 (betas < 1)")
    return params, dim
