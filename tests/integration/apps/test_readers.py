"""adapm.apps.readers: MatrixMarket, triples and Criteo files read exactly, on the pyarrow path
(skipped where pyarrow is not installed) and on the plain numpy path; malformed files
refused with the file and the line; the per-machine cache parses a file once."""
import json
import os
import string
import subprocess
import sys

import numpy as np
import pytest

from adapm.apps import kge, mf, readers

pytestmark = pytest.mark.timeout(120)

HAVE_PYARROW = readers.USE_PYARROW and readers.pyarrow_csv() is not None


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test caches into its own folder (and the module flag is restored)."""
    monkeypatch.setenv(readers.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(readers, "USE_PYARROW", readers.USE_PYARROW)
    return tmp_path / "cache"


@pytest.fixture(params=["pyarrow", "numpy"])
def backend(request, monkeypatch):
    """Each test on both paths. On the pyarrow path a well-formed file must not need the
    numpy path: `backend.fast_only()` makes the numpy parsers fail."""
    if request.param == "pyarrow" and not HAVE_PYARROW:
        pytest.skip("pyarrow is not installed")
    monkeypatch.setattr(readers, "USE_PYARROW", request.param == "pyarrow")
    assert readers.backend() == request.param

    class Backend:
        name = request.param

        @staticmethod
        def fast_only():
            if request.param != "pyarrow":
                return

            def refuse(*args, **kwargs):
                raise AssertionError("the numpy path read a well-formed file")

            for module, name in ((readers.matrix_market, "_mm_numpy"),
                                 (readers.triples, "_triples_python"),
                                 (readers.criteo, "_criteo_numpy")):
                monkeypatch.setattr(module, name, refuse)

    return Backend


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# -- MatrixMarket -----------------------------------------------------------------------

def test_matrix_market_values_comments_and_0_based_ids(tmp_path, backend):
    backend.fast_only()
    path = write(tmp_path, "m.mtx", "%%MatrixMarket matrix coordinate real general\n"
                                    "% a comment\n%another\n\n"
                                    "3 4 4\n1 1 2.5\n3 4 -1e-3\n2 2 7\n1 3 0.1\n")
    r, c, v, shape = readers.read_matrix_market(path)
    assert shape == (3, 4)
    np.testing.assert_array_equal(r, [0, 2, 1, 0])
    np.testing.assert_array_equal(c, [0, 3, 1, 2])
    np.testing.assert_array_equal(v, [2.5, -1e-3, 7.0, 0.1])
    assert r.dtype == c.dtype == np.int64 and v.dtype == np.float64
    values = readers.read_matrix_market(path, dtype=np.float32).values
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, np.array([2.5, -1e-3, 7.0, 0.1]).astype(np.float32))


def test_matrix_market_integer_pattern_and_symmetric(tmp_path, backend):
    backend.fast_only()
    path = write(tmp_path, "i.mtx", "%%MatrixMarket matrix coordinate integer general\n"
                                    "2 2 2\n1 2 -7\n2 1 9\n")
    assert readers.read_matrix_market(path).values.tolist() == [-7.0, 9.0]
    path = write(tmp_path, "p.mtx", "%%MatrixMarket matrix coordinate pattern general\n"
                                    "2 5 3\n1 5\n2 1\n1 1\n")
    r, c, v, shape = readers.read_matrix_market(path)
    assert shape == (2, 5) and r.tolist() == [0, 1, 0] and c.tolist() == [4, 0, 0]
    assert v.tolist() == [1.0, 1.0, 1.0]
    # symmetric: the stored triangle and its mirror (the diagonal once)
    path = write(tmp_path, "s.mtx", "%%MatrixMarket matrix coordinate real symmetric\n"
                                    "3 3 3\n1 1 1.5\n3 1 2\n3 2 -4\n")
    m = readers.read_matrix_market(path)
    assert sorted(zip(m.rows.tolist(), m.cols.tolist(), m.values.tolist())) == [
        (0, 0, 1.5), (0, 2, 2.0), (1, 2, -4.0), (2, 0, 2.0), (2, 1, -4.0)]
    path = write(tmp_path, "k.mtx", "%%MatrixMarket matrix coordinate real skew-symmetric\n"
                                    "2 2 1\n2 1 3\n")
    m = readers.read_matrix_market(path)
    assert sorted(zip(m.rows.tolist(), m.cols.tolist(), m.values.tolist())) == [
        (0, 1, -3.0), (1, 0, 3.0)]


def test_matrix_market_layouts_both_paths_take(tmp_path, backend):
    """Trailing blanks, tabs, CRLF, runs of blanks, leading blanks, an empty matrix."""
    expected = ([0, 1], [1, 0], [0.5, -2.0])
    for body in ("1 2 0.5 \n2 1 -2 \n", "1\t2\t0.5\n2\t1\t-2\n", "1 2 0.5\r\n2 1 -2\r\n",
                 "1  2   0.5\n2 1 -2\n", "  1 2 0.5\n 2 1 -2\n", "1 2 0.5\n\n2 1 -2"):
        path = write(tmp_path, "m.mtx", ("%%MatrixMarket matrix coordinate real general\n"
                                         "2 2 2\n" + body).encode(), mode="wb")
        r, c, v, _ = readers.read_matrix_market(path)
        assert (r.tolist(), c.tolist(), v.tolist()) == expected, repr(body)
    path = write(tmp_path, "e.mtx", "%%MatrixMarket matrix coordinate real general\n4 5 0\n")
    r, c, v, shape = readers.read_matrix_market(path)
    assert shape == (4, 5) and r.shape == c.shape == v.shape == (0,)


def test_matrix_market_matches_np_loadtxt(tmp_path, backend):
    backend.fast_only()
    rng = np.random.default_rng(0)
    rows, cols, n = 300, 200, 5000
    r, c = rng.integers(0, rows, n), rng.integers(0, cols, n)
    y = rng.normal(size=n).astype(np.float32)
    path = tmp_path / "big.mtx"
    mf.write_matrix_market(path, rows, cols, r, c, y)
    data = np.loadtxt(path, skiprows=2)
    m = readers.read_matrix_market(path)
    np.testing.assert_array_equal(m.rows, r)
    np.testing.assert_array_equal(m.cols, c)
    np.testing.assert_array_equal(m.values, data[:, 2])  # the same decimal -> float64
    assert m.shape == (rows, cols)


@pytest.mark.parametrize("text, message", [
    ("%%MatrixMarket matrix array real general\n2 2\n1\n2\n3\n4\n", "m.mtx:1: .*coordinate"),
    ("hello\n", "m.mtx:1: not a MatrixMarket"),
    ("%%MatrixMarket matrix coordinate complex general\n1 1 1\n1 1 1 0\n", "not supported"),
    ("%%MatrixMarket matrix coordinate real hermitian\n1 1 1\n1 1 1\n", "not supported"),
    ("%%MatrixMarket matrix coordinate real general\n% c\n2 2\n", "m.mtx:3: expected the size"),
    ("%%MatrixMarket matrix coordinate real general\n", "no size line"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 2\n1 1 1\n2 2\n", "m.mtx:4: expected 3"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 2\n1 1 1\n2 2 x\n",
     "m.mtx:4: the value must be real"),
    ("%%MatrixMarket matrix coordinate integer general\n2 2 1\n1 1 1.5\n",
     "m.mtx:3: the value must be integer"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 2\n1 1 1\n1.5 2 1\n",
     "m.mtx:4: the indices must be integers"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 2\n1 1 1\n\n3 1 0.5\n",
     r"m.mtx:5: entry \(3, 1\) lies outside the 2 x 2 matrix"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 2\n0 1 0.5\n", "m.mtx:3: .*outside"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 3\n1 1 1\n2 2 2\n",
     "declares 3 entries, the file has 2"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 1\n1 1 1\n2 2 2\n",
     "m.mtx:4: more entries than the 1"),
])
def test_malformed_matrix_market_names_the_line(tmp_path, backend, text, message):
    path = write(tmp_path, "m.mtx", text)
    with pytest.raises(readers.InputError, match=message):
        readers.read_matrix_market(path)
    assert issubclass(readers.InputError, ValueError)


# -- triples ----------------------------------------------------------------------------

def legacy_read_tsv(path):
    """kge.read_tsv as it was: the semantics the readers keep."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3 or not all(fields):
                raise ValueError(f"{path}:{number}: expected head<TAB>relation<TAB>tail, "
                                 f"got {line!r}")
            rows.append(fields)
    return np.array(rows, dtype=str).reshape(-1, 3)


TRIPLE_FILES = [
    "paris\tcapital_of\tfrance\n\nberlin\tcapital_of\tgermany\n",
    "a\tr\tb\r\nb\tr\ta\r\n  \n\t\t\n \t \t \nc\tr 2\td e\n",   # blank-only lines skipped
    "\ufeffbom\tr\tx\nx\tr\tbom\n",                            # the BOM stays in the name
    "Zürich\tliegt_in\tSchweiz\nÅland\tr\tzz\nzz\tr\tÅland",   # no final newline
    "x\t \ty\ny\t\"q\"\tx\n",                                  # a blank name, quotes as is
    "",
]


@pytest.mark.parametrize("text", TRIPLE_FILES)
def test_triples_as_the_app_read_them(tmp_path, backend, text):
    path = write(tmp_path, "t.tsv", text.encode(), mode="wb")
    triples = readers.read_triples(path)
    named = legacy_read_tsv(path)
    np.testing.assert_array_equal(triples.names(), named)
    (ids,), entities, relations = kge.index_names([named])
    np.testing.assert_array_equal(triples.ids, ids)
    np.testing.assert_array_equal(triples.entities, entities)
    np.testing.assert_array_equal(triples.relations, relations)
    assert triples.ids.dtype == np.int64 and triples.ids.shape == (len(named), 3)


def test_triples_fast_path_and_merge(tmp_path, backend):
    backend.fast_only()
    rng = np.random.default_rng(2)
    parts = []
    for name, n in (("train.tsv", 3000), ("test.tsv", 300)):
        heads, tails = rng.integers(0, 500, n), rng.integers(0, 500, n)
        rels = rng.integers(0, 20, n)
        lines = [f"ent {h}\trel/{r}\tent {t}" for h, r, t in zip(heads, rels, tails)]
        parts.append(write(tmp_path, name, "\n".join(lines) + "\n"))
    read = [readers.read_triples(p) for p in parts]
    ids, entities, relations = readers.merge_triples(read)
    want_ids, want_entities, want_relations = kge.index_names([legacy_read_tsv(p)
                                                                for p in parts])
    np.testing.assert_array_equal(entities, want_entities)
    np.testing.assert_array_equal(relations, want_relations)
    for got, want in zip(ids, want_ids):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError):
        readers.merge_triples([])


@pytest.mark.parametrize("text, line", [("a\tr\tb\na\tr\n", 2), ("a\tr\tb\n\na\t\tb\n", 3),
                                        ("a\tr\tb\tc\n", 1), ("a\tr\tb\n \n\ta\tb\n", 3)])
def test_malformed_triples_name_the_line(tmp_path, backend, text, line):
    path = write(tmp_path, "bad.tsv", text)
    with pytest.raises(readers.InputError, match=f"bad.tsv:{line}: expected head"):
        readers.read_triples(path)


# -- Criteo -----------------------------------------------------------------------------

def criteo_line(label, dense, sparse):
    return "\t".join([label, *dense, *sparse])


def python_criteo(path, has_label=True):
    labels, dense, sparse = [], [], []
    with open(path, newline="") as f:
        for line in f.read().splitlines():
            if not line:
                continue
            fields = line.split("\t")
            if has_label:
                labels.append(float(fields.pop(0)))
            dense.append([int(x) if x else 0 for x in fields[:13]])
            sparse.append([int(x, 16) if x else readers.MISSING for x in fields[13:]])
    return (np.array(labels, dtype=np.float32), np.array(dense).reshape(-1, 13),
            np.array(sparse, dtype=np.int64).reshape(-1, 26))


def test_criteo_exact_values_and_empty_fields(tmp_path, backend):
    backend.fast_only()
    hexes = ["68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "7e0ccccf",
             "de7995b8", "1f89b562", "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164",
             "2824a5f6", "1adce6ef", "8ba8b39a", "891b62e7", "e5ba7672", "f54016b9",
             "21ddcdc9", "b1252a9d", "07b5194c", "", "3a171ecb", "c5c50484", "e8b83407",
             "9727dd16"]
    lines = [criteo_line("1", ["1", "1", "5", "0", "1382", "4", "15", "2", "181", "1", "2",
                               "", "2"], hexes),
             criteo_line("0", ["", "-1", "", "", "", "", "", "", "", "", "", "", ""],
                         [""] * 26),
             criteo_line("0", ["2", "0", "44", "1", "102", "8", "2", "2", "4", "1", "1", "",
                               "4"], ["FFFFFFFF", "00000000", *hexes[2:]])]
    path = write(tmp_path, "c.tsv", "\n".join(lines) + "\n")
    labels, dense, sparse = readers.read_criteo(path)
    assert labels.dtype == np.float32 and labels.tolist() == [1.0, 0.0, 0.0]
    assert dense.dtype == np.float32 and dense.shape == (3, 13)
    assert dense[0].tolist() == [1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]
    assert dense[1].tolist() == [0, -1] + [0] * 11
    assert sparse.dtype == np.int64 and sparse.shape == (3, 26)
    assert sparse[0].tolist() == [int(h, 16) if h else readers.MISSING for h in hexes]
    assert sparse[1].tolist() == [readers.MISSING] * 26
    assert sparse[2, :2].tolist() == [0xFFFFFFFF, 0]
    dense64 = readers.read_criteo(path, dense_dtype=np.int64).dense
    assert dense64.dtype == np.int64 and dense64[0, 4] == 1382
    hashed = readers.read_criteo(path, hash_buckets=1000).sparse
    assert hashed[1].tolist() == [0] * 26  # an empty field: id 0
    assert hashed[0, 0] == 1 + 0x68FD1E64 % 999 and hashed.max() < 1000 and hashed.min() >= 0
    no_label = write(tmp_path, "t.tsv", "\n".join(line.split("\t", 1)[1] for line in lines))
    found = readers.read_criteo(no_label, has_label=False)
    assert found.labels is None
    np.testing.assert_array_equal(found.sparse, sparse)
    with pytest.raises(ValueError, match="hash_buckets"):
        readers.read_criteo(path, hash_buckets=1)


def test_criteo_layouts_and_blocks(tmp_path, backend, monkeypatch):
    """A generated file with every kind of field, read whole and in small blocks (the
    numpy tokenizer), with CRLF line ends and blank lines, against a Python parse."""
    rng = np.random.default_rng(3)

    def field(text):
        return "" if rng.random() < 0.3 else text

    lines = [criteo_line(str(rng.integers(0, 2)),
                         [field(str(x)) for x in rng.integers(-10, 10**7, 13)],
                         [field(f"{x:08x}") for x in rng.integers(0, 2**32, 26)])
             for _ in range(2000)]
    path = write(tmp_path, "gen.tsv", "\n".join(lines) + "\n")
    want = python_criteo(path)
    for variant in ("plain", "blocks", "crlf"):
        if variant == "blocks":
            monkeypatch.setattr(readers.criteo, "BLOCK_BYTES", 777)
        if variant == "crlf":  # and blank lines, first and in the middle
            text = path.read_bytes().replace(b"\n", b"\r\n")
            middle = text.index(b"\r\n", len(text) // 2) + 2
            path.write_bytes(b"\r\n" + text[:middle] + b"\r\n" + text[middle:])
        got = readers.read_criteo(path)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("line, message", [
    (criteo_line("1", ["1"] * 13, ["68fd1e64"] * 25), "c.tsv:3: expected 40 tab-separated"),
    (criteo_line("1", ["1"] * 13, ["68fd1e64"] * 25 + ["68fd1e6g"]),
     r"c.tsv:3: field 40 \(C26\) must be hexadecimal"),
    (criteo_line("1", ["1"] * 13, ["68fd1e64"] * 25 + ["0x12"]), r"field 40 \(C26\)"),
    (criteo_line("1", ["1.5"] + ["1"] * 12, ["68fd1e64"] * 26),
     r"c.tsv:3: field 2 \(I1\) must be an integer"),
    (criteo_line("", ["1"] * 13, ["68fd1e64"] * 26), r"c.tsv:3: field 1 \(label\) must be"),
    (criteo_line("1", ["1"] * 12 + ["--3"], ["68fd1e64"] * 26), r"field 14 \(I13\)"),
])
def test_malformed_criteo_names_the_line_and_field(tmp_path, backend, line, message,
                                                   monkeypatch):
    good = criteo_line("0", ["7"] * 13, ["0000abcd"] * 26)
    path = write(tmp_path, "c.tsv", f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(readers.InputError, match=message):
        readers.read_criteo(path)
    monkeypatch.setattr(readers.criteo, "BLOCK_BYTES", 100)  # the line number across blocks
    with pytest.raises(readers.InputError, match=message):
        readers.read_criteo(path)


def test_swar_parsers_match_python():
    rng = np.random.default_rng(4)
    numbers = [b"0", b"7", b"-1", b"+12", b"12345678", b"-99999999", b"123456789",
               b"1234567890123456", b"-1234567890123456", b"", b"-", b"+", b"1a",
               b"12345678901234567", b" 1", b"1.5", b"00000001", b"1-2"]
    numbers += [str(x).encode() for x in rng.integers(-10**15, 10**15, 500)]
    numbers += [str(x).encode() for x in rng.integers(-999, 999, 500)]
    data = b" " * readers.PAD + b"\t".join(numbers) + b"\n"
    starts = np.cumsum([readers.PAD] + [len(x) + 1 for x in numbers[:-1]])
    ends = starts + np.array([len(x) for x in numbers])
    values, empty, bad = readers.digits.parse_decimal(np.frombuffer(data, np.uint8), starts, ends)
    for text, value, is_empty, is_bad in zip(numbers, values, empty, bad):
        digits = text.lstrip(b"+-")
        valid = (text != b"" and digits.isdigit() and len(digits) <= 16 and
                 len(text) - len(digits) <= 1)
        assert is_empty == (text == b"") and is_bad == (text != b"" and not valid), text
        if valid:
            assert value == int(text), text
    hexes = [b"68fd1e64", b"FFFFFFFF", b"aBcDeF01", b"", b"abc", b"123456789abcdef",
             b"123456789abcdef0", b"6gfd1e64", b"68fd1e6\x14", b"\x10\x11\x12\x13\x14\x15\x16"
             b"\x17", b"68fd:e64", b"0x12"]
    hexes += [b"%08x" % x for x in rng.integers(0, 2**32, 500)]
    hexes += [bytes(rng.integers(0, 256, 8).astype(np.uint8)) for _ in range(2000)]
    data = b"".join(hexes)
    starts = np.cumsum([0] + [len(x) for x in hexes[:-1]])
    values, bad = readers.digits.parse_hex(np.frombuffer(data, np.uint8), starts,
                               np.array([len(x) for x in hexes]))
    for text, value, is_bad in zip(hexes, values, bad):
        valid = len(text) <= 15 and all(chr(c) in string.hexdigits for c in text)
        assert is_bad == (not valid), text
        if valid:
            assert value == (int(text, 16) if text else readers.MISSING), text


# -- the per-machine cache ----------------------------------------------------------------

def mtx(tmp_path, name="m.mtx", values=(0.5, -2.0)):
    return write(tmp_path, name, "%%MatrixMarket matrix coordinate real general\n2 2 2\n"
                                 f"1 2 {values[0]}\n2 1 {values[1]}\n")


def entries(cache):
    return sorted(n for n in os.listdir(cache) if not n.endswith(".lock")) \
        if os.path.isdir(cache) else []


def test_cache_parses_once_and_maps_the_arrays(tmp_path, private_cache):
    path = mtx(tmp_path)
    before = readers.PARSES["matrix_market"]
    first = readers.read_matrix_market(path, cache=True)
    second = readers.read_matrix_market(path, cache=True)
    assert readers.PARSES["matrix_market"] == before + 1
    for a, b in zip(first[:3], second[:3]):
        np.testing.assert_array_equal(a, b)
        assert not b.flags.writeable and isinstance(b.base, np.memmap)
    assert second.shape == (2, 2) and len(entries(private_cache)) == 1
    # other options are another entry of the same file
    assert readers.read_matrix_market(path, dtype=np.float32, cache=True).values.dtype \
        == np.float32
    assert readers.read_matrix_market(path, cache=True).values.dtype == np.float64
    assert readers.PARSES["matrix_market"] == before + 2 and len(entries(private_cache)) == 2


def test_a_changed_file_is_parsed_again_and_stale_entries_go(tmp_path, private_cache):
    path = mtx(tmp_path)
    readers.read_matrix_market(path, cache=True)
    old = entries(private_cache)
    mtx(tmp_path, values=(1.25, 3.0))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    before = readers.PARSES["matrix_market"]
    assert readers.read_matrix_market(path, cache=True).values.tolist() == [1.25, 3.0]
    assert readers.PARSES["matrix_market"] == before + 1
    new = entries(private_cache)
    assert len(new) == 1 and new != old  # the stale entry was removed
    # the entries of a file that is gone are removed when another entry is written
    other = mtx(tmp_path, "other.mtx")
    os.unlink(path)
    readers.read_matrix_market(other, cache=True)
    assert len(entries(private_cache)) == 1
    assert not [n for n in os.listdir(private_cache) if n.endswith(".lock") and
                n.startswith(new[0].rsplit("-", 1)[0])]


def test_damaged_entry_is_parsed_again(tmp_path, private_cache):
    path = mtx(tmp_path)
    readers.read_matrix_market(path, cache=True)
    (entry,) = entries(private_cache)
    os.unlink(private_cache / entry / "values.npy")
    before = readers.PARSES["matrix_market"]
    assert readers.read_matrix_market(path, cache=True).values.tolist() == [0.5, -2.0]
    assert readers.PARSES["matrix_market"] == before + 1
    assert readers.read_matrix_market(path, cache=True).values.tolist() == [0.5, -2.0]
    assert readers.PARSES["matrix_market"] == before + 1


def test_cache_off_and_unusable(tmp_path, monkeypatch, private_cache):
    path = mtx(tmp_path)
    monkeypatch.setenv(readers.CACHE_ENV, "off")
    before = readers.PARSES["matrix_market"]
    readers.read_matrix_market(path, cache=True)
    readers.read_matrix_market(path, cache=True)
    assert readers.PARSES["matrix_market"] == before + 2 and not private_cache.exists()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(readers.CACHE_ENV, str(blocked))
    with pytest.warns(RuntimeWarning, match="no cache"):
        assert readers.read_matrix_market(path, cache=True).values.tolist() == [0.5, -2.0]
    shared = tmp_path / "shared"  # a folder others can write to is not used
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv(readers.CACHE_ENV, str(shared))
    with pytest.warns(RuntimeWarning, match="only it can write"):
        assert readers.read_matrix_market(path, cache=True).values.tolist() == [0.5, -2.0]
    assert os.listdir(shared) == []


def test_malformed_files_are_not_cached(tmp_path, private_cache):
    path = write(tmp_path, "bad.tsv", "a\tr\n")
    for _ in range(2):
        with pytest.raises(readers.InputError, match="bad.tsv:1"):
            readers.read_triples(path, cache=True)
    assert entries(private_cache) == []


RUN = """
import json, sys
import numpy as np
from adapm.apps import readers
from adapm.apps import kge, mf
opts = json.loads(sys.argv[1])
if "data" in opts:
    rows, cols, train, test = mf.load_data(opts)
    total = float(sum(np.asarray(a, dtype=np.float64).sum() for a in (*train, *test)))
else:
    graph = kge.load_graph(opts)
    total = float(graph.train.sum() + graph.test.sum() + graph.valid.sum())
print(json.dumps({"parses": sum(readers.PARSES.values()), "total": total}))
"""


def run_worker(opts):
    """A process as a worker of a run on this machine loads the data (it inherits the
    cache folder): how many text parses it made and a checksum of what it loaded."""
    # not from the checkout's root: `-c` puts the working folder first on sys.path, and
    # there `adapm` is the source tree, without the compiled table of an installed copy
    return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(opts)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)))


def result(proc):
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_workers_do_not_parse_what_the_launching_process_read(tmp_path):
    rng = np.random.default_rng(5)
    r, c = rng.integers(0, 50, 400), rng.integers(0, 40, 400)
    mf.write_matrix_market(tmp_path / "train.mtx", 50, 40, r, c, rng.normal(size=400))
    opts = dict(data=str(tmp_path / "train.mtx"), seed=1)
    before = readers.PARSES["matrix_market"]
    rows, cols, train, test = mf.load_data(opts)  # the launching process (table_shape)
    assert mf.table_shape(dict(opts, rank=4, biases=False)) == (rows + cols, 8)
    assert readers.PARSES["matrix_market"] == before + 1
    total = float(sum(np.asarray(a, dtype=np.float64).sum() for a in (*train, *test)))
    for found in [result(run_worker(opts)) for _ in range(2)]:
        assert found == {"parses": 0, "total": pytest.approx(total)}
    # kge: train and test files
    graph = kge.load_graph(dict(kge.DEFAULTS, entities=60, triples=500, clusters=4))
    kge.save(graph, tmp_path)
    kopts = dict(kge.DEFAULTS, train_file=str(tmp_path / "train.tsv"),
                 test_file=str(tmp_path / "test.tsv"))
    loaded = kge.load_graph(kopts)
    found = result(run_worker(kopts))
    assert found["parses"] == 0
    assert found["total"] == loaded.train.sum() + loaded.test.sum() + loaded.valid.sum()


def test_concurrent_first_reads_parse_once(tmp_path):
    """Workers that start together on an uncached file: one parses, the others wait for
    its entry (the file's lock) and map it."""
    rng = np.random.default_rng(6)
    n = 200_000  # big enough that the parse takes a while
    mf.write_matrix_market(tmp_path / "train.mtx", 1000, 1000, rng.integers(0, 1000, n),
                           rng.integers(0, 1000, n), rng.normal(size=n))
    opts = dict(data=str(tmp_path / "train.mtx"), seed=1)
    found = [result(proc) for proc in [run_worker(opts) for _ in range(3)]]
    assert sum(f["parses"] for f in found) == 1
    assert len({f["total"] for f in found}) == 1
