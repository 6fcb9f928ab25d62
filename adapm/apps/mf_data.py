"""The matrix factorisation app's data (adapm.apps.mf): a generated Zipf matrix, or
MatrixMarket and ratings files, split into training, validation and test cells."""

from typing import NamedTuple, Optional

import numpy as np

from adapm.apps import readers
from adapm.apps.common import zipf_ids

# The app's options, with their defaults: the loaders take options as scripts give them.
DEFAULTS = dict(rows=20_000, cols=2_000, train=400_000, test=40_000, rank=16, noise=0.1,
                mean=0.0, bias_std=0.0, epochs=4, batch=256, lr=0.1, reg=None, biases=None,
                valid_fraction=0.05, lookahead=None, seed=0, data=None, test_data=None,
                save_factors=None, worker_json=None)
# --reg when not given: the generated default matrix (low noise, many cells per row) wants
# little; real ratings (MovieLens) overfit with it and want about 0.1 (docs/app-mf.md).
REG_GENERATED, REG_RATINGS = 0.01, 0.1
TEST_FRACTION = 0.1      # held out of --data as test cells when there is no --test-data


def with_defaults(opts):
    """The options with DEFAULTS for what they leave out (scripts and benchmarks pass
    only some)."""
    return dict(DEFAULTS, **opts)


def synthetic(rows, cols, cells, rank, noise, seed, mean=0.0, bias_std=0.0):
    """(row ids, column ids, values) of `cells` cells of a noisy rank-`rank` matrix, plus
    a global `mean` and row and column biases ~ N(0, bias_std)."""
    rng = np.random.default_rng(seed)
    scale = rank ** -0.25  # products of two such factors have unit variance
    u = rng.normal(0.0, scale, size=(rows, rank))
    v = rng.normal(0.0, scale, size=(cols, rank))
    r = zipf_ids(rng, rows, cells)
    c = zipf_ids(rng, cols, cells)
    y = np.einsum("ij,ij->i", u[r], v[c]) + rng.normal(0.0, noise, size=cells)
    if mean or bias_std:
        # their own stream: cells and factors stay those of the matrix without biases
        extra = np.random.default_rng([seed, 1])
        y += mean + extra.normal(0.0, bias_std, rows)[r] + extra.normal(0.0, bias_std, cols)[c]
    return r.astype(np.int64), c.astype(np.int64), y.astype(np.float32)


def write_matrix_market(path, rows, cols, r, c, y):
    """A MatrixMarket coordinate file (1-based indices, real values)."""
    with open(path, "w") as f:
        f.write("%%MatrixMarket matrix coordinate real general\n")
        f.write(f"{rows} {cols} {len(y)}\n")
        data = np.column_stack([r + 1, c + 1, y.astype(np.float64)])
        np.savetxt(f, data, fmt=["%d", "%d", "%.9g"])


def read_matrix_market(path, cache=False):
    """(rows, cols, row ids, column ids, values) of a MatrixMarket coordinate file of real,
    integer or pattern values (0-based ids, float32 values; adapm.apps.readers, which names
    the line of a malformed entry). cache=True: parsed once per machine, memory-mapped
    by every later read (adapm.apps.readers' cache)."""
    r, c, y, (rows, cols) = readers.read_matrix_market(path, dtype=np.float32, cache=cache)
    return rows, cols, r, c, y


def is_matrix_market(path):
    """Whether the file starts with a MatrixMarket banner (else: a ratings file)."""
    with open(path, "rb") as f:
        return f.read(14).lower() == b"%%matrixmarket"


class Matrix(NamedTuple):
    """The data: a rows x cols matrix's training, validation and test cells, each (row
    ids, column ids, values), and the names of its rows and columns (a ratings file's
    user and item ids; None: 1-based numbers, the ids of a MatrixMarket file)."""
    rows: int
    cols: int
    train: tuple
    valid: tuple
    test: tuple
    row_names: Optional[np.ndarray] = None
    col_names: Optional[np.ndarray] = None

    def names(self):
        """(row names, column names) as string arrays indexed by id."""
        if self.row_names is not None:
            return self.row_names, self.col_names
        return (np.arange(1, self.rows + 1).astype(str),
                np.arange(1, self.cols + 1).astype(str))


def hold_out(cells, fraction, seed):
    """(kept, held): each cell held out with probability `fraction`, by seed."""
    held = np.random.default_rng(seed).random(len(cells[2])) < fraction
    return tuple(a[~held] for a in cells), tuple(a[held] for a in cells)


def read_files(opts):
    """Matrix of --data (and --test-data; without it, TEST_FRACTION of --data held out by
    seed), validation cells not yet held out. Both files MatrixMarket, or both ratings
    files (numbered together: a user of the test file only gets a row too). Files are
    parsed once per machine (the first process to read one, usually the launching
    process, caches it; the workers memory-map it and train() copies their shard)."""
    paths = [opts["data"], *([opts["test_data"]] if opts["test_data"] else [])]
    formats = {is_matrix_market(path) for path in paths}
    if len(formats) > 1:
        raise ValueError("--data and --test-data must both be MatrixMarket files or both "
                         "ratings files")
    names = (None, None)
    if formats == {True}:
        parts = [read_matrix_market(path, cache=True) for path in paths]
        rows, cols = max(p[0] for p in parts), max(p[1] for p in parts)
        cells = [p[2:] for p in parts]
    else:
        cells, *names = readers.merge_ratings(
            [readers.read_ratings(path, dtype=np.float32, cache=True) for path in paths])
        rows, cols = len(names[0]), len(names[1])
    train, test = cells if len(cells) == 2 else hold_out(cells[0], TEST_FRACTION, opts["seed"])
    return Matrix(rows, cols, train, (), test, *names)


def load_cells(opts):
    """Matrix of the options, read or generated, validation cells not yet held out."""
    opts = with_defaults(opts)
    if opts["data"]:
        return read_files(opts)
    rows, cols, n = opts["rows"], opts["cols"], opts["train"]
    r, c, y = synthetic(rows, cols, n + opts["test"], opts["rank"], opts["noise"],
                        opts["seed"], opts["mean"], opts["bias_std"])
    return Matrix(rows, cols, (r[:n], c[:n], y[:n]), (), (r[n:], c[n:], y[n:]))


def load_matrix(opts):
    """Matrix of the options, the same in every worker: --valid-fraction of the training
    cells held out (by seed) as validation cells."""
    matrix = load_cells(opts)
    train, valid = hold_out(matrix.train, with_defaults(opts)["valid_fraction"],
                            [with_defaults(opts)["seed"], 2])
    return matrix._replace(train=train, valid=valid)


def load_data(opts):
    """(rows, cols, train (r, c, y), test (r, c, y)) of the options, the training cells
    before the validation cells are held out of them (load_matrix)."""
    matrix = load_cells(opts)
    return matrix.rows, matrix.cols, matrix.train, matrix.test
