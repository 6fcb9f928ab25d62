"""What every reader shares: InputError, the parse counter, the choice of parser (pyarrow's
CSV reader or numpy) and the helpers that turn parsed columns into arrays."""

import collections

import numpy as np

PARSES = collections.Counter()  # text parses in this process, by format


class InputError(ValueError):
    """A malformed input file; the message names the file (and the line, where known)."""


def pyarrow_csv():
    """(pyarrow, pyarrow.csv, pyarrow.compute), or None where pyarrow is not installed or
    USE_PYARROW is False."""
    # The switch is the package's attribute (adapm.apps.readers.USE_PYARROW = False), where
    # users and tests set it: read at each call, not copied at import.
    from adapm.apps import readers
    if not readers.USE_PYARROW:
        return None
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.csv
    except ImportError:
        return None
    return pyarrow, pyarrow.csv, pyarrow.compute


def backend():
    """The parser in use: "pyarrow" or "numpy"."""
    return "pyarrow" if pyarrow_csv() is not None else "numpy"


def arrow_options(arrow, names, types, delimiter, include=None):
    pa, csv, _ = arrow
    return dict(
        read_options=csv.ReadOptions(column_names=names, use_threads=True),
        parse_options=csv.ParseOptions(delimiter=delimiter, quote_char=False,
                                       double_quote=False, escape_char=False,
                                       newlines_in_values=False, ignore_empty_lines=True),
        convert_options=csv.ConvertOptions(column_types=types, null_values=[""],
                                           strings_can_be_null=False,
                                           include_columns=include))


def str_array(names):
    return np.array(names, dtype=str) if len(names) else np.empty(0, dtype="<U1")


def stack(columns, dtype, n, block=65536):
    """The columns (each of n values) side by side, an (n, len(columns)) array, written
    a block of rows at a time (writing a column of a row-major array touches a cache line
    per value: several times slower)."""
    out = np.empty((n, len(columns)), dtype=dtype)
    for start in range(0, n, block):
        rows = np.empty((len(columns), min(block, n - start)), dtype=dtype)
        for k, column in enumerate(columns):
            rows[k] = column[start:start + block]
        out[start:start + block] = rows.T
    return out
