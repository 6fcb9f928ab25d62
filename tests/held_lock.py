"""A key's seqlock held by the test itself, as a writer that stopped (or died) holding it
would: the table has no such method, so the sequence word (the first uint32 of the key's
24-byte directory entry, src/table_layout.h) is written through a view of the mapped
segment. Single-threaded test code: no CAS needed."""

import contextlib


@contextlib.contextmanager
def held_lock(view, key):
    """Hold `key`'s lock (its sequence word odd) for the block, then restore the word."""
    seq = view._directory_array()["seq"]
    before = int(seq[key])
    assert before % 2 == 0, f"key {key}'s lock is already held"
    seq[key] = before + 1
    try:
        yield
    finally:
        seq[key] = before
