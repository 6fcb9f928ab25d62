"""Reading training data files fast: MatrixMarket coordinate files, tab-separated
triples, ratings (user, item, rating; TSV, CSV, MovieLens) and Criteo TSV, parsed once per
machine.

Parsers. Every reader parses with pyarrow's multithreaded CSV reader when pyarrow is
installed (`pip install 'adapm[fast]'`) and with numpy otherwise (np.loadtxt for
MatrixMarket, one pass of Python string methods for triples, a vectorised byte-level
tokenizer for Criteo). Both give the same arrays, and the same errors: when the fast path
meets anything it does not take (a malformed line, extra blanks, a byte-order mark), the
plain path reads the file, and a malformed file is refused with an InputError (a
ValueError) naming the file and the line. `USE_PYARROW = False` forces the plain path.

Read once per machine. With cache=True a reader keeps what it parsed as .npy files in a
per-user cache folder (ADAPM_INPUT_CACHE; default $TMPDIR/adapm-input-UID; `off` turns
the cache off), one entry per file, keyed by the file's real path, size, mtime and inode
and the reader's options. Every later read of the same file on the machine, by the same
process or by the other processes of a run, memory-maps those arrays instead of parsing
the text again (the page cache holds one copy; each worker copies only the part it takes).
Processes that read an uncached file at the same time wait for the first one's parse (an
flock per file and options). The folder must be this user's and writable by it alone. An
entry is written to a temporary folder and renamed into place, so it
is complete or absent; writing a new entry removes the stale entries of the same file and
the entries of files that no longer exist. `PARSES` counts the text parses of this
process by format."""

import collections
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import warnings
from typing import NamedTuple, Optional

import numpy as np

USE_PYARROW = True            # False: always the plain numpy path (tests force it)
CACHE_ENV = "ADAPM_INPUT_CACHE"
CACHE_OFF = ("off", "0", "no", "false", "none")
CACHE_FORMAT = 1              # bump when what an entry holds changes
STALE_TMP_S = 3600            # a writer's temporary folder older than this was abandoned
MISSING = -1                  # a Criteo categorical field left empty (raw values)
CRITEO_DENSE, CRITEO_SPARSE = 13, 26
BLOCK_BYTES = 1 << 26         # the numpy Criteo tokenizer's block of lines
PAD = 16                      # bytes before a block: 8-byte words of fields stay inside

PARSES = collections.Counter()  # text parses in this process, by format


class InputError(ValueError):
    """A malformed input file; the message names the file (and the line, where known)."""


def pyarrow_csv():
    """(pyarrow, pyarrow.csv, pyarrow.compute), or None where pyarrow is not installed or
    USE_PYARROW is False."""
    if not USE_PYARROW:
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


def _arrow_options(arrow, names, types, delimiter, include=None):
    pa, csv, _ = arrow
    return dict(
        read_options=csv.ReadOptions(column_names=names, use_threads=True),
        parse_options=csv.ParseOptions(delimiter=delimiter, quote_char=False,
                                       double_quote=False, escape_char=False,
                                       newlines_in_values=False, ignore_empty_lines=True),
        convert_options=csv.ConvertOptions(column_types=types, null_values=[""],
                                           strings_can_be_null=False,
                                           include_columns=include))


# -- MatrixMarket -----------------------------------------------------------------------

class MatrixMarket(NamedTuple):
    """A coordinate matrix: 0-based row and column ids (int64), values, (rows, cols)."""
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    shape: tuple


class _Header(NamedTuple):
    field: str          # real, integer or pattern
    symmetry: str       # general, symmetric or skew-symmetric
    shape: tuple
    nnz: int
    offset: int         # byte offset of the first entry line
    line: int           # its line number (1-based)


MM_FIELDS = {"real": "real", "double": "real", "integer": "integer", "pattern": "pattern"}
MM_SYMMETRIES = ("general", "symmetric", "skew-symmetric")


def read_matrix_market(path, dtype=np.float64, cache=False):
    """A MatrixMarket coordinate file (real, integer or pattern values; general, symmetric
    or skew-symmetric: the mirrored entries are added) as MatrixMarket(rows, cols, values,
    shape): 0-based int64 ids, values of `dtype` (1 for pattern files). Comment lines (%)
    and blank lines are skipped. cache=True: parsed once per machine (module docstring)."""
    path, dtype = os.fspath(path), np.dtype(dtype)
    header = _mm_header(path)

    def parse():
        r, c, v = _mm_parse(path, header, dtype)
        return {"rows": r, "cols": c, "values": v}, {"shape": list(header.shape)}

    arrays, meta = _cached("mtx", path, [dtype.str], parse) if cache else parse()
    return MatrixMarket(arrays["rows"], arrays["cols"], arrays["values"],
                        tuple(meta["shape"]))


def _mm_header(path):
    with open(path, "rb") as f:
        raw = f.readline()
        banner = raw.decode("utf-8", "replace").lower().split()
        if banner[:3] != ["%%matrixmarket", "matrix", "coordinate"]:
            raise InputError(f"{path}:1: not a MatrixMarket coordinate file (banner "
                             f"{raw.strip()[:80]!r})")
        field = MM_FIELDS.get(banner[3] if len(banner) > 3 else "real")
        symmetry = banner[4] if len(banner) > 4 else "general"
        if field is None or symmetry not in MM_SYMMETRIES:
            raise InputError(f"{path}:1: MatrixMarket coordinate {' '.join(banner[3:])!r} "
                             "not supported (real, integer or pattern values; general, "
                             "symmetric or skew-symmetric)")
        number = 1
        while True:
            raw, number = f.readline(), number + 1
            if not raw:
                raise InputError(f"{path}: no size line (rows columns entries)")
            text = raw.strip()
            if text and not text.startswith(b"%"):
                break
        try:
            rows, cols, nnz = (int(x) for x in text.split())
        except ValueError:
            raise InputError(f"{path}:{number}: expected the size line 'rows columns "
                             f"entries', got {text[:80]!r}") from None
        if min(rows, cols, nnz) < 0:
            raise InputError(f"{path}:{number}: negative size {text[:80]!r}")
        return _Header(field, symmetry, (rows, cols), nnz, f.tell(), number + 1)


def _mm_parse(path, header, dtype):
    PARSES["matrix_market"] += 1
    arrow = pyarrow_csv()
    parsed = _mm_arrow(arrow, path, header) if arrow is not None else None
    if parsed is None:
        parsed = _mm_numpy(path, header)
    rows, cols = header.shape
    if parsed is None or parsed[0].shape[0] != header.nnz or (header.nnz and (
            parsed[0].min() < 0 or parsed[0].max() >= rows or
            parsed[1].min() < 0 or parsed[1].max() >= cols)):
        _mm_locate(path, header)  # raises, naming the line
        raise InputError(f"{path}: malformed entries")  # (the check found nothing)
    r, c, v = parsed
    v = np.ones(r.shape[0], dtype=dtype) if v is None else v.astype(dtype, copy=False)
    if header.symmetry != "general":
        off = r != c
        mirrored = v[off] if header.symmetry == "symmetric" else -v[off]
        r, c, v = (np.concatenate([r, c[off]]), np.concatenate([c, r[off]]),
                   np.concatenate([v, mirrored]))
    return r, c, v


def _mm_arrow(arrow, path, header):
    """(rows, cols, values or None) 0-based, or None where the body is not a plain
    space- or tab-separated table of the expected fields (the numpy path decides)."""
    pa, csv, _ = arrow
    fields = 2 if header.field == "pattern" else 3
    with open(path, "rb") as f:
        f.seek(header.offset)
        first = b""
        for raw in f:
            first = raw.rstrip(b"\r\n")
            if first.strip():
                break
    if not first.strip():
        return None
    delimiter = "\t" if b"\t" in first and b" " not in first else " "
    parts = first.split(delimiter.encode())
    names = ["r", "c", "v"][:fields]
    if len(parts) == fields + 1 and parts[-1] == b"":
        names = [*names, "_"]  # a trailing blank on every line
    elif len(parts) != fields:
        return None
    types = {"r": pa.int64(), "c": pa.int64(),
             "v": pa.int64() if header.field == "integer" else pa.float64(), "_": pa.string()}
    try:
        with pa.memory_map(path) as source:
            source.seek(header.offset)
            table = csv.read_csv(source, **_arrow_options(
                arrow, names, {k: types[k] for k in names}, delimiter, names[:fields]))
    except (pa.ArrowInvalid, ValueError):
        return None
    if any(column.null_count for column in table.columns):
        return None
    r = table.column("r").to_numpy() - 1
    c = table.column("c").to_numpy() - 1
    return r, c, table.column("v").to_numpy() if fields == 3 else None


def _mm_numpy(path, header):
    fields = 2 if header.field == "pattern" else 3
    try:
        with open(path, encoding="utf-8", errors="replace", newline="\n") as f, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data"
            for _ in range(header.line - 1):
                f.readline()
            data = np.loadtxt(f, dtype=np.float64, comments="%", ndmin=2)
    except ValueError:
        return None
    if data.shape[0] == 0:
        data = data.reshape(0, fields)
    if data.shape[1] != fields:
        return None
    r, c = data[:, 0].astype(np.int64), data[:, 1].astype(np.int64)
    if not (np.array_equal(r, data[:, 0]) and np.array_equal(c, data[:, 1])) or (
            header.field == "integer" and not np.array_equal(np.floor(data[:, 2]),
                                                             data[:, 2])):
        return None  # an index (or an integer value) that is not an integer
    return r - 1, c - 1, data[:, 2] if fields == 3 else None


def _mm_locate(path, header):
    """Raise an InputError naming the first malformed entry line, if there is one."""
    fields = 2 if header.field == "pattern" else 3
    what = "row column" + ("" if fields == 2 else " value")
    rows, cols = header.shape
    count = 0
    with open(path, "rb") as f:
        f.seek(header.offset)
        for number, raw in enumerate(f, header.line):
            text = raw.decode("utf-8", "replace").strip()
            if not text or text.startswith("%"):
                continue
            where, parts = f"{path}:{number}", text.split()
            if len(parts) != fields:
                raise InputError(f"{where}: expected {fields} fields ({what}), got {text!r}")
            try:
                i, j = _integer(parts[0]), _integer(parts[1])
            except ValueError:
                raise InputError(f"{where}: the indices must be integers, got {text!r}") \
                    from None
            if fields == 3:
                try:
                    _integer(parts[2]) if header.field == "integer" else float(parts[2])
                except ValueError:
                    raise InputError(f"{where}: the value must be {header.field}, got "
                                     f"{text!r}") from None
            if not (1 <= i <= rows and 1 <= j <= cols):
                raise InputError(f"{where}: entry ({i}, {j}) lies outside the {rows} x "
                                 f"{cols} matrix")
            count += 1
            if count > header.nnz:
                raise InputError(f"{where}: more entries than the {header.nnz} of the "
                                 "size line")
    if count != header.nnz:
        raise InputError(f"{path}: the size line declares {header.nnz} entries, the file "
                         f"has {count}")


def _integer(text):
    try:
        return int(text)
    except ValueError:
        value = float(text)  # "3.0" and "3e0" are integers too
        if not value.is_integer():
            raise
        return int(value)


# -- triples ----------------------------------------------------------------------------

class Triples(NamedTuple):
    """(head, relation, tail) triples: ids (n, 3) int64 into `entities` (heads and tails)
    and `relations`, the sorted distinct names (str arrays) of the file."""
    ids: np.ndarray
    entities: np.ndarray
    relations: np.ndarray

    def names(self):
        """The triples as names, a str array (n, 3)."""
        e, r, ids = self.entities, self.relations, self.ids
        return np.column_stack([e[ids[:, 0]], r[ids[:, 1]], e[ids[:, 2]]]).reshape(-1, 3)


def read_triples(path, cache=False):
    """A tab-separated file of `head<TAB>relation<TAB>tail` names (UTF-8) as Triples.
    Blank lines (empty or whitespace only) are skipped; any other line must have exactly
    three non-empty fields. cache=True: parsed once per machine (module docstring)."""
    path = os.fspath(path)

    def parse():
        PARSES["triples"] += 1
        arrow = pyarrow_csv()
        found = _triples_arrow(arrow, path) if arrow is not None else None
        return (found if found is not None else _triples_python(path)), {}

    arrays = _cached("triples", path, [], parse)[0] if cache else parse()[0]
    return Triples(arrays["ids"], arrays["entities"], arrays["relations"])


def merge_triples(parts):
    """Ids over several files: entities and relations numbered in the sorted order of
    their names over all `parts` (Triples). Returns (id arrays, entity names, relation
    names)."""
    if not parts:
        raise ValueError("no triples given")
    if len(parts) == 1:
        return [parts[0].ids], parts[0].entities, parts[0].relations
    entities = np.unique(np.concatenate([p.entities for p in parts]))
    relations = np.unique(np.concatenate([p.relations for p in parts]))
    ids = []
    for p in parts:
        e = np.searchsorted(entities, p.entities)
        r = np.searchsorted(relations, p.relations)
        ids.append(np.column_stack([e[p.ids[:, 0]], r[p.ids[:, 1]], e[p.ids[:, 2]]])
                   .astype(np.int64).reshape(-1, 3))
    return ids, entities, relations


def _triples_arrow(arrow, path):
    """The triples' arrays, or None where the plain path must decide (a malformed or
    blank-only line, an empty field, a byte-order mark)."""
    pa, csv, pc = arrow
    with open(path, "rb") as f:
        if f.read(3) == b"\xef\xbb\xbf":  # Python keeps it in the first name; pyarrow not
            return None
    names = ["h", "r", "t"]
    try:
        table = csv.read_csv(path, **_arrow_options(arrow, names, dict.fromkeys(
            names, pa.string()), "\t"))
    except (pa.ArrowInvalid, ValueError):
        return None
    h, r, t = (table.column(name) for name in names)
    entities = pc.unique(pa.chunked_array(h.chunks + t.chunks, type=pa.string()))
    relations = pc.unique(r)
    entities = entities.take(pc.array_sort_indices(entities))
    relations = relations.take(pc.array_sort_indices(relations))
    entity_names, relation_names = entities.to_pylist(), relations.to_pylist()
    for names in (entity_names, relation_names):
        # an empty or blank field (maybe a blank line): the plain path decides
        if any(not name or name.isspace() for name in names):
            return None
    ids = _stack([pc.index_in(column, value_set=vocabulary).to_numpy() for column, vocabulary
                  in ((h, entities), (r, relations), (t, entities))], np.int64, table.num_rows)
    return {"ids": ids, "entities": _str_array(entity_names),
            "relations": _str_array(relation_names)}


def _triples_python(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")  # universal newlines: as iterating over f
    kept = [line for line in lines if line and not line.isspace()]
    if any(line.count("\t") != 2 for line in kept):
        _triples_locate(path, lines)
    flat = "\t".join(kept).split("\t") if kept else []
    heads, relations, tails = flat[0::3], flat[1::3], flat[2::3]
    entity_set, relation_set = set(heads), set(relations)
    entity_set.update(tails)
    if "" in entity_set or "" in relation_set:
        _triples_locate(path, lines)
    entities, relations_sorted = sorted(entity_set), sorted(relation_set)
    e_index = {name: i for i, name in enumerate(entities)}
    r_index = {name: i for i, name in enumerate(relations_sorted)}
    ids = _stack([np.fromiter(map(index.__getitem__, column), dtype=np.int64, count=len(kept))
                  for column, index in ((heads, e_index), (relations, r_index),
                                        (tails, e_index))], np.int64, len(kept))
    return {"ids": ids, "entities": _str_array(entities),
            "relations": _str_array(relations_sorted)}


def _triples_locate(path, lines):
    """Raise an InputError naming the first malformed line."""
    for number, line in enumerate(lines, 1):
        if not line or line.isspace():
            continue
        fields = line.split("\t")
        if len(fields) != 3 or not all(fields):
            raise InputError(f"{path}:{number}: expected head<TAB>relation<TAB>tail, got "
                             f"{line!r}")
    raise InputError(f"{path}: malformed triples")  # (not reached)


def _str_array(names):
    return np.array(names, dtype=str) if len(names) else np.empty(0, dtype="<U1")


def _stack(columns, dtype, n, block=65536):
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


# -- ratings ----------------------------------------------------------------------------

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
    distinct ids. cache=True: parsed once per machine (module docstring)."""
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

    arrays = _cached("ratings", path, [dtype.str], parse)[0] if cache else parse()[0]
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
    options = _arrow_options(arrow, names, types, delimiter, names[:3])
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
    return _str_array(users), _str_array(items), np.array(values, dtype=np.float64)


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


# -- Criteo -----------------------------------------------------------------------------

class Criteo(NamedTuple):
    """Criteo click logs: labels float32 (n,), dense features (n, 13), categorical
    features int64 (n, 26)."""
    labels: Optional[np.ndarray]
    dense: np.ndarray
    sparse: np.ndarray


CRITEO_NAMES = ("label", *(f"I{i}" for i in range(1, CRITEO_DENSE + 1)),
                *(f"C{i}" for i in range(1, CRITEO_SPARSE + 1)))


def read_criteo(path, hash_buckets=None, dense_dtype=np.float32, has_label=True,
                cache=False):
    """A Criteo TSV file: per line the label, 13 integer fields and 26 categorical fields
    of hexadecimal digits (the Kaggle/Terabyte logs; has_label=False: the label column is
    absent, as in the Kaggle test set, and labels is None), tab-separated; any field but
    the label may be empty.
    - dense (n, 13) of dense_dtype: the integers, empty fields 0;
    - sparse (n, 26) int64: hash_buckets=None: the hexadecimal values as integers, empty
      fields MISSING (-1); hash_buckets=B (>= 2): each field's ids in [0, B), 0 for an
      empty field and 1 + value % (B - 1) otherwise.
    cache=True: parsed once per machine (module docstring)."""
    path, dense_dtype = os.fspath(path), np.dtype(dense_dtype)
    if hash_buckets is not None and int(hash_buckets) < 2:
        raise ValueError(f"hash_buckets must be at least 2, got {hash_buckets}")

    def parse():
        PARSES["criteo"] += 1
        arrow = pyarrow_csv()
        found = _criteo_arrow(arrow, path, has_label) if arrow is not None else None
        labels, dense, sparse = found if found is not None else _criteo_numpy(path,
                                                                              has_label)
        arrays = {"dense": dense.astype(dense_dtype, copy=False), "sparse": sparse}
        if has_label:
            arrays["labels"] = labels
        return arrays, {}

    params = [dense_dtype.str, has_label]
    arrays = _cached("criteo", path, params, parse)[0] if cache else parse()[0]
    sparse = arrays["sparse"]
    if hash_buckets is not None:
        sparse = np.where(sparse == MISSING, 0, 1 + sparse % (int(hash_buckets) - 1))
    return Criteo(arrays.get("labels"), arrays["dense"], sparse)


def _criteo_arrow(arrow, path, has_label):
    pa, csv, _ = arrow
    names = list(CRITEO_NAMES if has_label else CRITEO_NAMES[1:])
    types = {name: pa.float32() if name == "label" else
             pa.int64() if name.startswith("I") else pa.string() for name in names}
    try:
        table = csv.read_csv(path, **_arrow_options(arrow, names, types, "\t"))
    except (pa.ArrowInvalid, ValueError):
        return None
    n = table.num_rows
    labels = None
    if has_label:
        if table.column("label").null_count:
            return None
        labels = table.column("label").to_numpy()
    dense = _stack([table.column(f"I{k + 1}").fill_null(0).to_numpy()
                    for k in range(CRITEO_DENSE)], np.int64, n)
    sparse = []
    for k in range(CRITEO_SPARSE):
        column = table.column(f"C{k + 1}")
        strings = column.combine_chunks() if column.num_chunks else pa.array([], pa.string())
        buffers = strings.buffers()  # validity, int32 offsets, characters
        offsets = np.frombuffer(buffers[1], dtype=np.int32)[strings.offset:
                                                            strings.offset + n + 1]
        data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None \
            else np.empty(0, dtype=np.uint8)
        if bytes(data[offsets[0]:offsets[-1]]).translate(None, _HEX_DIGITS):
            return None  # not only hex digits: the numpy path names the line
        values, bad = _hex(data, offsets[:-1].astype(np.int64), np.diff(offsets),
                           checked=True)
        if bad.any():
            return None
        sparse.append(values)
    return labels, dense, _stack(sparse, np.int64, n)


def _criteo_numpy(path, has_label):
    """The vectorised tokenizer: blocks of whole lines, fields found by their tabs."""
    fields = CRITEO_DENSE + CRITEO_SPARSE + (1 if has_label else 0)
    parts, line = [], 1
    with open(path, "rb") as f:
        rest = b""
        while True:
            chunk = f.read(BLOCK_BYTES)
            block = bytearray(b" " * PAD)  # PAD bytes, then whole lines
            block += rest
            block += chunk
            if not chunk:
                if len(block) > PAD:
                    block += b"\n"
                    parts.append(_criteo_block(path, block, line, fields, has_label))
                break
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest = bytes(block[PAD:])
                continue
            rest = bytes(block[cut:])
            del block[cut:]
            parts.append(_criteo_block(path, block, line, fields, has_label))
            line += block.count(b"\n", PAD)
    if not parts:
        parts = [(np.empty(0, np.float32), np.empty((0, CRITEO_DENSE), np.int64),
                  np.empty((0, CRITEO_SPARSE), np.int64))]
    labels = np.concatenate([p[0] for p in parts]) if has_label else None
    return (labels, np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


def _criteo_block(path, block, first_line, fields, has_label):
    """(labels, dense, sparse) of `block`: PAD bytes, then whole lines ending in a
    newline."""
    buf = np.frombuffer(block, dtype=np.uint8)
    seps = np.flatnonzero(buf[PAD:] <= 10) + PAD  # tabs, newlines (and control bytes)
    kinds = buf[seps]
    ends, starts, numbers = None, None, None
    if seps.shape[0] % fields == 0:  # the common case: every line has its tabs, no \r
        grid = kinds.reshape(-1, fields)
        if (grid[:, :-1] == 9).all() and (grid[:, -1] == 10).all():
            ends = seps.reshape(-1, fields).T.copy()  # (fields, lines): where fields end
            if not (buf[ends[-1] - 1] == 13).any():
                starts = np.r_[PAD, ends[-1, :-1] + 1]
                numbers = first_line + np.arange(starts.shape[0])
    if numbers is None:  # blank lines, \r\n, or a malformed line
        newlines = seps[kinds == 10]
        tabs = seps[kinds == 9]
        starts = np.r_[PAD, newlines[:-1] + 1]
        line_ends = newlines - ((newlines > starts) & (buf[newlines - 1] == 13))
        numbers = np.flatnonzero(line_ends > starts)  # blank lines are skipped
        starts, line_ends = starts[numbers], line_ends[numbers]
        numbers += first_line
        counts = np.searchsorted(tabs, line_ends) - np.searchsorted(tabs, starts)
        wrong = np.flatnonzero(counts != fields - 1)
        if wrong.size:
            i = wrong[0]
            raise InputError(f"{path}:{numbers[i]}: expected {fields} tab-separated "
                             f"fields, got {counts[i] + 1}")
        # every tab lies in a kept line, fields - 1 of them each
        ends = np.vstack([tabs.reshape(-1, fields - 1).T, line_ends])
    names = CRITEO_NAMES if has_label else CRITEO_NAMES[1:]

    def bounds(column):
        return (starts if column == 0 else ends[column - 1] + 1), ends[column]

    def fail(column, bad, what):
        i = np.flatnonzero(bad)[0]
        begin, end = bounds(column)
        raise InputError(f"{path}:{numbers[i]}: field {column + 1} ({names[column]}) "
                         f"{what}, got {bytes(buf[begin[i]:end[i]])!r}")

    labels, at = None, 0
    if has_label:
        begin, end = bounds(0)
        value, missing, bad = _decimal(buf, begin, end)
        labels = value.astype(np.float32)
        for i in np.flatnonzero(bad):  # not an integer: a float, or nothing
            try:
                labels[i] = float(bytes(buf[begin[i]:end[i]]))
                bad[i] = False
            except ValueError:
                pass
        if (missing | bad).any():
            fail(0, missing | bad, "must be a number")
        at = 1
    dense, sparse = [], []
    for k in range(CRITEO_DENSE):
        value, missing, bad = _decimal(buf, *bounds(at + k))
        if bad.any():
            fail(at + k, bad, "must be an integer (at most 16 digits)")
        dense.append(np.where(missing, 0, value))
    for k in range(CRITEO_SPARSE):
        begin, end = bounds(at + CRITEO_DENSE + k)
        value, bad = _hex(buf, begin, end - begin)
        if bad.any():
            fail(at + CRITEO_DENSE + k, bad, "must be hexadecimal digits (at most 15)")
        sparse.append(value)
    n = starts.shape[0]
    return labels, _stack(dense, np.int64, n), _stack(sparse, np.int64, n)


# SWAR ("SIMD within a register"): 8 ASCII characters of a field read as one little-endian
# uint64 (its first character in the lowest byte) and converted with a few integer
# operations on whole numpy arrays of such words.
_ONES = 0x0101010101010101
_ZEROS = 0x3030303030303030  # "00000000"
_KEEP = np.array([0] + [~((1 << (8 * (8 - d))) - 1) & 0xFFFFFFFFFFFFFFFF for d in range(1, 9)],
                 dtype=np.uint64)  # _KEEP[d]: the top d bytes of a word


def _windows(buf):
    """The 8 bytes of buf at every offset, as little-endian uint64 (unaligned view)."""
    return np.lib.stride_tricks.as_strided(buf[:8].view("<u8"), shape=(buf.shape[0] - 7,),
                                           strides=(1,), writeable=False)


def _eight_digits(x):
    """(value, valid) of words of 8 ASCII decimal digits, the first the most significant
    (x is overwritten)."""
    t = x & 0xF0F0F0F0F0F0F0F0
    valid = t == _ZEROS
    x &= 0x0F0F0F0F0F0F0F0F                       # each digit's value
    np.add(x, 6 * _ONES, out=t)
    t &= 0x10 * _ONES
    valid &= t == 0                               # no byte above 9
    x *= 2561                                     # pairs of digits: 10 a + b
    x >>= 8
    x &= 0x00FF00FF00FF00FF
    x *= 6553601                                  # quadruples: 100 ab + cd
    x >>= 16
    x &= 0x0000FFFF0000FFFF
    x *= 42949672960001                           # 10000 abcd + efgh
    x >>= 32
    return x.view(np.int64), valid


def _decimal(buf, starts, ends):
    """(values, empty, malformed): the decimal integers buf[starts:ends] (an optional sign,
    at most 16 digits), vectorised. Every field needs PAD bytes before its end in buf and
    a byte after it (its separator)."""
    lengths = ends - starts
    present = lengths > 0
    first = buf[starts]
    negative = present & (first == 45)                  # -
    digits = lengths - (negative | (present & (first == 43)))  # +
    windows = _windows(buf)
    keep = _KEEP[np.minimum(digits, 8)]  # the last 8 digits; the bytes before them "0"
    word = windows[ends - 8]
    word &= keep
    np.invert(keep, out=keep)
    keep &= _ZEROS
    word |= keep
    value, ok = _eight_digits(word)
    bad = present & ((digits == 0) | (digits > 16) | ~ok)
    longer = np.flatnonzero(present & (digits > 8) & (digits <= 16))
    if longer.size:
        keep = _KEEP[digits[longer] - 8]
        high, ok = _eight_digits((windows[ends[longer] - 16] & keep) | (_ZEROS & ~keep))
        value[longer] += high * 100_000_000
        bad[longer] |= ~ok
    return np.where(negative, -value, value), ~present, bad


_HEX_DIGITS = b"0123456789abcdefABCDEF"
_HEX_OK = np.zeros(256, dtype=bool)
_HEX_VALUE = np.zeros(256, dtype=np.int64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_OK[_c] = _HEX_OK[ord(chr(_c).upper())] = True
    _HEX_VALUE[_c] = _HEX_VALUE[ord(chr(_c).upper())] = _i


def _eight_hex(x, checked=False):
    """(value, valid) of words of 8 ASCII hex digits (either case), the first the most
    significant. Valid: the value written back as lowercase digits is the word with its
    letters lowercased, and no byte is a control byte that lowercasing made a digit
    (checked: known to be hex digits; valid is None). In place where it can: every
    temporary array is fresh memory to fault in."""
    v = x >> 6                                    # a digit's value per byte:
    v &= _ONES                                    # its low nibble, + 9 for a letter
    v *= 9
    t = x & 0x0F0F0F0F0F0F0F0F
    v += t
    t[...] = v                                    # pairs of bytes: 16 a + b
    t >>= 8
    t &= 0x00FF00FF00FF00FF
    v &= 0x00FF00FF00FF00FF
    v <<= 4
    v |= t
    np.right_shift(v, 16, out=t)                  # pairs of those: 256 ab + cd
    t &= 0x0000FFFF0000FFFF
    v &= 0x0000FFFF0000FFFF
    v <<= 8
    v |= t
    np.right_shift(v, 32, out=t)                  # and the two halves
    v &= 0xFFFFFFFF
    v <<= 16
    v |= t
    if checked:
        return v.view(np.int64), None
    # and back: v's 8 nibbles, one per byte, first the most significant, as characters
    back = ((v >> 16) & 0xFFFF) | ((v & 0xFFFF) << 32)
    back = ((back >> 8) & 0x000000FF000000FF) | ((back & 0x000000FF000000FF) << 16)
    back = ((back >> 4) & 0x000F000F000F000F) | ((back & 0x000F000F000F000F) << 8)
    back = back + _ZEROS + (((back + 6 * _ONES) >> 4) & _ONES) * 39  # 0-9 a-f
    letters_or_digits = (((x & (0x60 * _ONES)) + 0x60 * _ONES) & (0x80 * _ONES)) == 0x80 * _ONES
    return v.view(np.int64), (back == (x | (0x20 * _ONES))) & letters_or_digits


def _hex(buf, starts, lengths, checked=False):
    """(values, malformed) of the hexadecimal fields buf[starts:starts + lengths]
    (MISSING for an empty field), vectorised; fields of 8 digits (all of Criteo's) are
    read 8 bytes at a time. checked: every byte of the fields is known to be a hex digit."""
    if buf.shape[0] < 8:
        buf = np.concatenate([buf, np.zeros(8, dtype=np.uint8)])
    n = starts.shape[0]
    eight = lengths == 8
    values, ok = _eight_hex(_windows(buf)[np.minimum(starts, buf.shape[0] - 8)], checked)
    not_eight = ~eight
    np.putmask(values, not_eight, MISSING)
    bad = np.zeros(n, dtype=bool) if checked else eight & ~ok
    if np.count_nonzero(eight) + (n - np.count_nonzero(lengths)) < n:
        other = np.flatnonzero(not_eight & (lengths != 0))  # other lengths: digit by digit
        begin, length = starts[other], lengths[other]
        value = np.zeros(other.size, dtype=np.int64)
        wrong = length > 15
        for j in range(min(int(length.max()), 15)):
            active = length > j
            c = buf[np.where(active, begin + j, 0)]
            wrong |= active & ~_HEX_OK[c]
            value = np.where(active, (value << 4) | _HEX_VALUE[c], value)
        values[other], bad[other] = value, wrong
    return values, bad


# -- the per-machine cache ---------------------------------------------------------------

def cache_dir():
    """The cache folder (ADAPM_INPUT_CACHE, default $TMPDIR/adapm-input-UID), or None
    where ADAPM_INPUT_CACHE turns it off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in CACHE_OFF:
        return None
    return value or os.path.join(tempfile.gettempdir(), f"adapm-input-{os.getuid()}")


def _digest(value):
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:20]


def _stat_key(st):
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _cached(kind, path, params, parse):
    """parse() -> (arrays, meta) once per machine: the cached arrays (memory-mapped) where
    an entry for this file exists, else parse() under the file's lock, kept as an entry."""
    root = cache_dir()
    if root is None:
        return parse()
    if not _private(root):
        warnings.warn(f"adapm.apps.readers: no cache for {path}: {root} is not a folder of this "
                      "user's that only it can write to", RuntimeWarning, stacklevel=3)
        return parse()
    st = os.stat(path)
    real = os.path.realpath(path)
    ident = _digest([kind, real, params])  # the file read with these options
    entry = os.path.join(root, f"{kind}-{ident}-{_digest([CACHE_FORMAT, _stat_key(st)])}")
    found = _load_entry(entry)
    if found is not None:
        return found
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        lock = open(os.path.join(root, f"{kind}-{ident}.lock"), "a")
    except OSError as exc:
        warnings.warn(f"adapm.apps.readers: no cache for {path} ({exc}); every process parses "
                      "it", RuntimeWarning, stacklevel=3)
        return parse()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        found = _load_entry(entry)  # the process we waited for may have written it
        if found is not None:
            return found
        arrays, meta = parse()
        if _stat_key(os.stat(path)) != _stat_key(st):
            return arrays, meta  # changed while we read it: not kept
        try:
            _write_entry(root, entry, arrays, meta, real, st)
        except OSError as exc:
            warnings.warn(f"adapm.apps.readers: could not cache {path} in {root} ({exc})",
                          RuntimeWarning, stacklevel=3)
            return arrays, meta
        _prune(root, keep=entry)
        found = _load_entry(entry)
        return found if found is not None else (arrays, meta)


def _private(root):
    """Whether root is absent (to be made) or a folder of this user's that nobody else
    can write to (entries planted by others would be read as training data)."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return True
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _load_entry(entry):
    """(arrays memory-mapped read-only, meta) of a cache entry, or None."""
    try:
        with open(os.path.join(entry, "meta.json")) as f:
            info = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        info = None
    try:
        arrays = {}
        for name in info["arrays"]:
            array = np.load(os.path.join(entry, f"{name}.npy"), mmap_mode="r",
                            allow_pickle=False)
            arrays[name] = array.view(np.ndarray)  # a plain array; the map lives on
        return arrays, info["meta"]
    except (OSError, ValueError, KeyError, TypeError):  # damaged: drop it, parse again
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _write_entry(root, entry, arrays, meta, source, st):
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        for name, array in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), np.ascontiguousarray(array),
                    allow_pickle=False)
        with open(os.path.join(tmp, "meta.json"), "w") as f:  # last: marks it complete
            json.dump({"source": source, "stat": _stat_key(st), "arrays": list(arrays),
                       "meta": meta}, f)
        os.rename(tmp, entry)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and os.path.isdir(entry):
            return
        raise


def _prune(root, keep):
    """Remove the other entries of `keep`'s file and options, entries whose file changed or
    is gone, and temporary folders of writers that died. (Processes that still map a removed
    entry keep their maps.)"""
    prefix = keep.rsplit("-", 1)[0]
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        try:
            if name.startswith(".tmp-"):
                if now - os.stat(path).st_mtime > STALE_TMP_S:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            if name.endswith(".lock") or path == keep:
                continue
            if path.rsplit("-", 1)[0] == prefix:
                shutil.rmtree(path, ignore_errors=True)
                continue
            with open(os.path.join(path, "meta.json")) as f:
                info = json.load(f)
            try:
                current = _stat_key(os.stat(info["source"]))
            except FileNotFoundError:
                current = None
            if current != info["stat"]:
                shutil.rmtree(path, ignore_errors=True)
                if current is None:  # the file is gone: nobody will wait on its lock
                    lock = path.rsplit("-", 1)[0] + ".lock"
                    if os.path.exists(lock):
                        os.unlink(lock)
        except (OSError, ValueError, KeyError):
            continue
