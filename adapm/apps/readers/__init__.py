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

from adapm.apps.readers.cache import CACHE_ENV, CACHE_FORMAT, CACHE_OFF, STALE_TMP_S, cache_dir
from adapm.apps.readers.criteo import (
    BLOCK_BYTES,
    CRITEO_DENSE,
    CRITEO_NAMES,
    CRITEO_SPARSE,
    Criteo,
    read_criteo,
)
from adapm.apps.readers.digits import MISSING, PAD
from adapm.apps.readers.matrix_market import (
    MM_FIELDS,
    MM_SYMMETRIES,
    MatrixMarket,
    read_matrix_market,
)
from adapm.apps.readers.parsing import PARSES, InputError, backend, pyarrow_csv
from adapm.apps.readers.ratings import RATING_DELIMITERS, Ratings, merge_ratings, read_ratings
from adapm.apps.readers.triples import Triples, merge_triples, read_triples

USE_PYARROW = True            # False: always the plain numpy path (tests force it)

__all__ = [
    "BLOCK_BYTES", "CACHE_ENV", "CACHE_FORMAT", "CACHE_OFF", "CRITEO_DENSE", "CRITEO_NAMES",
    "CRITEO_SPARSE", "MISSING", "MM_FIELDS", "MM_SYMMETRIES", "PAD", "PARSES",
    "RATING_DELIMITERS", "STALE_TMP_S", "USE_PYARROW", "Criteo", "InputError", "MatrixMarket",
    "Ratings", "Triples", "backend", "cache_dir", "merge_ratings", "merge_triples",
    "pyarrow_csv", "read_criteo", "read_matrix_market", "read_ratings", "read_triples",
]
