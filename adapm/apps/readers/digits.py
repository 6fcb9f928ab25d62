"""Decimal and hexadecimal fields of a byte buffer converted to integers, vectorised (the
numpy Criteo tokenizer's number parsing)."""

import numpy as np

MISSING = -1                  # a Criteo categorical field left empty (raw values)
PAD = 16                      # bytes before a block: 8-byte words of fields stay inside


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


def parse_decimal(buf, starts, ends):
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


HEX_DIGITS = b"0123456789abcdefABCDEF"
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


def parse_hex(buf, starts, lengths, checked=False):
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
