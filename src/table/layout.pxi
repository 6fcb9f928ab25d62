# Included by _table.pyx: the segment's layout as Python sees it (the numpy view of an
# entry, the regions' offsets), the bounds of a table's shape, and the checks a header
# must pass before attach() touches anything past it.

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# numpy view of one directory entry; must match adapm_entry_t.
ENTRY_DTYPE = np.dtype([
    ("seq", "<u4"), ("state", "u1"), ("flags", "u1"), ("owner", "<u2"),
    ("version", "<u4"), ("length", "<u4"), ("offset", "<u8"),
])
assert ENTRY_DTYPE.itemsize == sizeof(adapm_entry_t)

# The header must hold every field of adapm_header_t, also those added at its end.
if sizeof(adapm_header_t) > ADAPM_HEADER_BYTES:
    raise ImportError(f"adapm_header_t is {sizeof(adapm_header_t)} bytes, more than "
                      f"ADAPM_HEADER_BYTES = {ADAPM_HEADER_BYTES}")

# Bounds of a table's shape: create() refuses to make a table outside them and attach()
# refuses a header outside them (a corrupt one).
MAX_WORKERS = 1 << 16       # worker blocks (and 512 KB intent rings) per node
MAX_NODES = 0xFFFF          # a key's cached owner is a uint16, 0xFFFF means KEEP_OWNER
MAX_VALUE_LENGTH = 2**32 - 1  # a directory entry's length is a uint32
_MAX_TABLE_BYTES = 2**62    # far beyond any machine; keeps every offset sum in uint64


def _align64(x):
    return (x + 63) & ~63


def layout_sizes(num_keys, num_workers, arena_capacity, itemsize):
    """Byte offsets of the regions and the total size of a segment. Computed with Python
    integers, so a nonsensical shape (a corrupt header) cannot wrap around; one whose
    segment could not exist (over 2**62 bytes) raises ValueError."""
    num_keys, num_workers = int(num_keys), int(num_workers)
    arena_capacity, itemsize = int(arena_capacity), int(itemsize)
    if min(num_keys, num_workers, arena_capacity, itemsize) < 0:
        raise ValueError("a table's sizes cannot be negative")
    directory = ADAPM_HEADER_BYTES
    workers = _align64(directory + num_keys * sizeof(adapm_entry_t))
    rings = _align64(workers + num_workers * ADAPM_WORKER_BLOCK_SLOTS * 8)
    fresh = _align64(
        rings + num_workers * (ADAPM_RING_CONTROL_WORDS + ADAPM_RING_WORDS) * 8)
    arena = _align64(fresh + num_keys * 4)
    total = arena + arena_capacity * itemsize
    if total > _MAX_TABLE_BYTES:
        raise ValueError(f"a table of {num_keys} keys, {num_workers} workers and "
                         f"{arena_capacity} arena elements would take {total} bytes")
    return {
        "directory_offset": directory,
        "workers_offset": workers,
        "rings_offset": rings,
        "fresh_offset": fresh,
        "arena_offset": arena,
        "total_bytes": total,
    }


def _dtype_name(code):
    return str(DTYPES[code]) if code < len(DTYPES) else "?"


cdef object _header_problem(const adapm_header_t* h, uint64_t size):
    """Why a published header cannot describe a table in a segment of `size` bytes (a
    message naming the first bad field), or None. O(1): besides the header it reads at
    most 65 directory entries. Every value is copied into a Python int first, so no
    check can wrap around, and nothing outside the header is read before the offsets
    and sizes that locate it are known to be right."""
    cdef const adapm_entry_t* directory
    bad = "corrupt AdaPM table header: "
    if h.layout_version != ADAPM_LAYOUT_VERSION:
        return (f"AdaPM table layout_version = {h.layout_version}, expected "
                f"{ADAPM_LAYOUT_VERSION} (a table made by another version of adapm, or a "
                "corrupt header)")
    code = h.dtype
    if code >= len(DTYPES):
        return f"{bad}dtype = {code}, expected 0 (float32) or 1 (float64)"
    itemsize = DTYPES[code].itemsize
    num_nodes, node = h.num_nodes, h.node
    if not 1 <= num_nodes <= MAX_NODES:
        return f"{bad}num_nodes = {num_nodes}, expected 1 to {MAX_NODES}"
    if node >= num_nodes:
        return f"{bad}node = {node}, expected less than num_nodes = {num_nodes}"
    total = h.total_bytes
    if total != size:
        return f"{bad}total_bytes = {total}, expected the segment's size, {size} bytes"
    num_keys = h.num_keys
    most_keys = (size - ADAPM_HEADER_BYTES) // sizeof(adapm_entry_t)
    if not 1 <= num_keys <= most_keys:
        return (f"{bad}num_keys = {num_keys}, expected 1 to {most_keys} (the directory "
                f"must fit in the segment of {size} bytes)")
    num_workers = h.num_workers
    if not 1 <= num_workers <= MAX_WORKERS:
        return f"{bad}num_workers = {num_workers}, expected 1 to {MAX_WORKERS}"
    capacity = h.arena_capacity
    if capacity > size // itemsize:
        return (f"{bad}arena_capacity = {capacity}, expected at most {size // itemsize} "
                f"elements of dtype = {code} ({_dtype_name(code)}) in a segment of {size} "
                "bytes")
    # Every region where the creator put it: no offset misaligned, overlapping or past
    # the end. (Each bound above keeps these sums far below 2**64.)
    want = layout_sizes(num_keys, num_workers, capacity, itemsize)
    if h.directory_offset != want["directory_offset"]:
        return (f"{bad}directory_offset = {h.directory_offset}, expected "
                f"{want['directory_offset']}")
    if h.workers_offset != want["workers_offset"]:
        return (f"{bad}workers_offset = {h.workers_offset}, expected "
                f"{want['workers_offset']} after a directory of num_keys = {num_keys} "
                "entries")
    if h.rings_offset != want["rings_offset"]:
        return (f"{bad}rings_offset = {h.rings_offset}, expected {want['rings_offset']} "
                f"after num_workers = {num_workers} worker blocks")
    if h.fresh_offset != want["fresh_offset"]:
        return (f"{bad}fresh_offset = {h.fresh_offset}, expected {want['fresh_offset']} "
                f"after num_workers = {num_workers} intent rings")
    if h.arena_offset != want["arena_offset"]:
        return (f"{bad}arena_offset = {h.arena_offset}, expected {want['arena_offset']} "
                f"after num_keys = {num_keys} fresh rounds")
    if want["total_bytes"] != total:
        return (f"{bad}arena_capacity = {capacity} elements of dtype = {code} "
                f"({_dtype_name(code)}) end the table at byte {want['total_bytes']}, "
                f"expected total_bytes = {total}")
    # A uniform length sizes every pull's buffer while the kernels copy each entry's
    # length, and every key has a length of at least 1: check a sample of entries (all
    # of them up to 64 keys, and always the last, which a too large num_keys misses).
    uniform = h.uniform_length
    if uniform > MAX_VALUE_LENGTH:
        return f"{bad}uniform_length = {uniform}, expected at most {MAX_VALUE_LENGTH}"
    directory = <const adapm_entry_t*>(<const char*>h + ADAPM_HEADER_BYTES)
    for key in list(range(0, num_keys, max(1, num_keys // 64))) + [num_keys - 1]:
        length = directory[<uint64_t>key].length
        if length == 0 or (uniform and length != uniform):
            return (f"{bad}uniform_length = {uniform} and num_keys = {num_keys}, but key "
                    f"{key} has length {length} in the directory")
    return None
