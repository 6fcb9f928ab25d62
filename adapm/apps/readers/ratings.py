"""Ratings files (user, item, rating; TSV, CSV, MovieLens's u.data and ratings.dat), as
ids into the file's user and item names; merge_ratings puts several files into one
numbering."""

import os
from typing import NamedTuple

import numpy as np

from adapm.apps.readers.cache import cached
from adapm.apps.readers.parsing import PARSES, InputError, arrow_options, pyarrow_csv, str_array


class Ratings(NamedTuple):
    """(user, item, rating) cells: 0-based int64 row (user) and column (item) ids into
    `row_names` and `col_names`, the file's distinct user and item ids as strings (sorted
    as integers where every one is an integer, else as strings), and the ratings."""
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    row_names: np.ndarray
    col_names: np.ndarray


# Tried in this order on the first line: MovieLens-100k's u.data is tab-separated,
# MovieLens-1M's ratings.dat '::'-separated, ml-latest's ratings.csv comma-separated.
RATING_DELIMITERS = ("\t", "::", ",", ";")


def read_ratings(path, dtype=np.float64, cache=False):
    """A file of ratings, one `user item rating` per line, as Ratings. Fields are
    separated by a tab, '::', a comma or a semicolon (the first of these that the first
    line holds; none: runs of blanks); fields after the third (a timestamp) are ignored,
    blanks around a field too. A first line whose third field is not a number is a
    header and skipped; blank lines are skipped. User and item ids are any strings
    (MovieLens's 1-based numbers included): ids are their ranks among the file's
    distinct ids. cache=True: parsed once per machine (adapm.apps.readers)."""
    path, dtype = os.fspath(path), np.dtype(dtype)

    def parse():
        PARSES["ratings"] += 1
        delimiter, header = _ratings_format(path)
        arrow = pyarrow_csv()
        found = None
        if arrow is not None and delimiter is not None and len(delimiter) == 1:
            found = _ratings_arrow(arrow, path, delimiter, header)
        users, items, values = found if found is not None else _ratings_python(
            path, delimiter, header)
        row_ids, row_names = _numbered(users)
        col_ids, col_names = _numbered(items)
        return {"rows": row_ids, "cols": col_ids, "values": values.astype(dtype),
                "row_names": row_names, "col_names": col_names}, {}

    arrays = cached("ratings", path, [dtype.str], parse)[0] if cache else parse()[0]
    return Ratings(arrays["rows"], arrays["cols"], arrays["values"], arrays["row_names"],
                   arrays["col_names"])


def merge_ratings(parts):
    """Ids over several files (Ratings, e.g. a training and a test file): users and items
    numbered in the order of their names over all `parts`, as read_ratings numbers one
    file. Returns ([(row ids, column ids, values) per part], row names, column names)."""
    if not parts:
        raise ValueError("no ratings given")
    row_names = _name_order(np.concatenate([p.row_names for p in parts]))
    col_names = _name_order(np.concatenate([p.col_names for p in parts]))
    cells = []
    for p in parts:
        rows = _positions(row_names, p.row_names)[p.rows]
        cols = _positions(col_names, p.col_names)[p.cols]
        cells.append((rows, cols, p.values))
    return cells, row_names, col_names


def _ratings_format(path):
    """(delimiter or None for runs of blanks, whether the first line is a header), from
    the first non-blank line."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        line = next((line for line in f if line.strip()), None)
    if line is None:
        raise InputError(f"{path}: no ratings")
    delimiter = next((d for d in RATING_DELIMITERS if d in line), None)
    fields = _fields(line, delimiter)
    return delimiter, len(fields) >= 3 and not _is_number(fields[2])


def _fields(line, delimiter):
    return [x.strip() for x in (line.split(delimiter) if delimiter else line.split())]


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _ratings_arrow(arrow, path, delimiter, header):
    """(users, items, ratings), or None where the plain path must decide (a malformed
    line, blanks around fields, a byte-order mark, blank lines before a header)."""
    pa, csv, pc = arrow
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    first = head.split(b"\n", 1)[0]
    if head.startswith(b"\xef\xbb\xbf") or (header and not first.strip()):
        return None
    names = [f"f{k}" for k in range(len(first.split(delimiter.encode())))]
    if len(names) < 3:
        return None
    types = {"f0": pa.string(), "f1": pa.string(), "f2": pa.float64()}
    options = arrow_options(arrow, names, types, delimiter, names[:3])
    options["read_options"] = csv.ReadOptions(column_names=names, use_threads=True,
                                              skip_rows=int(header))
    try:
        table = csv.read_csv(path, **options)
    except (pa.ArrowInvalid, ValueError):
        return None
    if table.column("f2").null_count:
        return None  # an empty rating
    users, items = (table.column(name).to_numpy(zero_copy_only=False).astype(str)
                    for name in ("f0", "f1"))
    for column in (users, items):
        if column.shape[0] and (not np.char.str_len(column).min()
                                or (np.char.strip(column) != column).any()):
            return None  # an empty id or blanks around one: the plain path strips them
    return users, items, table.column("f2").to_numpy()


def _ratings_python(path, delimiter, header):
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        lines = f.read().split("\n")  # universal newlines: as iterating over f
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    users, items, values = [], [], []
    for number, line in numbered[int(header):]:
        fields = _fields(line, delimiter)
        if len(fields) < 3 or not fields[0] or not fields[1] or not _is_number(fields[2]):
            raise InputError(f"{path}:{number}: expected user, item, rating, got "
                             f"{line.strip()[:80]!r}")
        users.append(fields[0])
        items.append(fields[1])
        values.append(float(fields[2]))
    return str_array(users), str_array(items), np.array(values, dtype=np.float64)


def _numbered(names):
    """(ids, distinct names) of a column of names: ids are positions in _name_order."""
    order = _name_order(names)
    return _positions(order, names), order


def _name_order(names):
    """The distinct names, sorted as integers where every one is one, else as strings."""
    distinct = np.unique(np.asarray(names, dtype=str))
    try:
        numbers = distinct.astype(np.int64)
    except (ValueError, OverflowError):
        return distinct
    return distinct[np.argsort(numbers, kind="stable")]


def _positions(order, names):
    """The positions in `order` (distinct names) of each of `names`, int64."""
    lexical = np.argsort(order, kind="stable")
    return lexical[np.searchsorted(order[lexical], names)].astype(np.int64)
