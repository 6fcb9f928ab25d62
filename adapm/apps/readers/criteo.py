"""Criteo TSV click logs: a label, 13 integer fields and 26 categorical fields of hex
digits. Without pyarrow, a byte-level tokenizer cuts blocks of lines into fields and
adapm.apps.readers.digits converts them."""

import os
from typing import NamedTuple, Optional

import numpy as np

from adapm.apps.readers.cache import cached
from adapm.apps.readers.digits import HEX_DIGITS, MISSING, PAD, parse_decimal, parse_hex
from adapm.apps.readers.parsing import PARSES, InputError, arrow_options, pyarrow_csv, stack

CRITEO_DENSE, CRITEO_SPARSE = 13, 26
BLOCK_BYTES = 1 << 26         # the numpy Criteo tokenizer's block of lines


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
    cache=True: parsed once per machine (adapm.apps.readers)."""
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
    arrays = cached("criteo", path, params, parse)[0] if cache else parse()[0]
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
        table = csv.read_csv(path, **arrow_options(arrow, names, types, "\t"))
    except (pa.ArrowInvalid, ValueError):
        return None
    n = table.num_rows
    labels = None
    if has_label:
        if table.column("label").null_count:
            return None
        labels = table.column("label").to_numpy()
    dense = stack([table.column(f"I{k + 1}").fill_null(0).to_numpy()
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
        if bytes(data[offsets[0]:offsets[-1]]).translate(None, HEX_DIGITS):
            return None  # not only hex digits: the numpy path names the line
        values, bad = parse_hex(data, offsets[:-1].astype(np.int64), np.diff(offsets),
                           checked=True)
        if bad.any():
            return None
        sparse.append(values)
    return labels, dense, stack(sparse, np.int64, n)


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
        value, missing, bad = parse_decimal(buf, begin, end)
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
        value, missing, bad = parse_decimal(buf, *bounds(at + k))
        if bad.any():
            fail(at + k, bad, "must be an integer (at most 16 digits)")
        dense.append(np.where(missing, 0, value))
    for k in range(CRITEO_SPARSE):
        begin, end = bounds(at + CRITEO_DENSE + k)
        value, bad = parse_hex(buf, begin, end - begin)
        if bad.any():
            fail(at + CRITEO_DENSE + k, bad, "must be hexadecimal digits (at most 15)")
        sparse.append(value)
    n = starts.shape[0]
    return labels, stack(dense, np.int64, n), stack(sparse, np.int64, n)
