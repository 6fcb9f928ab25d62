"""Reading a small file that holds a secret (a CURVE key file, a cluster secret file):
only a regular file, only a few bytes, and never waiting. Opening a FIFO to read blocks
until someone writes to it, and a device may never end: the file is opened O_NONBLOCK
and its type checked on what was opened, before a byte is read. Knows no adapm module,
so that both adapm.wire.security and adapm.wire.cluster_secret can use it."""

import os
import stat


class TooLarge(ValueError):
    """The file holds more bytes than its kind can."""


def read_private_file(path, limit):
    """The bytes of file `path`, at most `limit` of them; ValueError when it is not a
    regular file ("not a regular file (a FIFO)"), TooLarge when it holds more."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        kind = _not_regular(os.fstat(fd).st_mode)
        if kind:
            raise ValueError(f"not a regular file ({kind})")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"more than {limit} bytes")
    return data


def readable_by_others(path):
    """The permission bits of `path` when its group or others may read it (its secrets
    are then not secret), else None."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return None
    return mode if mode & 0o044 else None


def _not_regular(mode):
    """What a file of `mode` is when it is not a regular file, else None."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a file"
