"""MatrixMarket coordinate files (real, integer or pattern; general, symmetric or
skew-symmetric) as 0-based (rows, cols, values, shape)."""

import os
import warnings
from typing import NamedTuple

import numpy as np

from adapm.apps.readers.cache import cached
from adapm.apps.readers.parsing import PARSES, InputError, arrow_options, pyarrow_csv


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
    and blank lines are skipped. cache=True: parsed once per machine (adapm.apps.readers)."""
    path, dtype = os.fspath(path), np.dtype(dtype)
    header = _mm_header(path)

    def parse():
        r, c, v = _mm_parse(path, header, dtype)
        return {"rows": r, "cols": c, "values": v}, {"shape": list(header.shape)}

    arrays, meta = cached("mtx", path, [dtype.str], parse) if cache else parse()
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
            table = csv.read_csv(source, **arrow_options(
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
