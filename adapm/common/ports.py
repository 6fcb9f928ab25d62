"""Ports as people give them (options, environment variables, addresses), checked in one
place for every place that takes one.

Nothing unchecked may reach ZeroMQ: it takes a port modulo 65536, so tcp://HOST:70000
listens on 4464 and tcp://HOST:131073 on port 1, without an error."""

import re

MAX_PORT = 65535
_NUMBER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: str.isdigit() takes "²" too


def parse_port(text, lowest=0):
    """The port that `text` names, `lowest` .. 65535 (0: any free port, where the caller
    allows it); ValueError saying why not."""
    text = str(text).strip()
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{text!r} is not a port (a number {lowest} .. {MAX_PORT})")
    port = int(text)
    if not lowest <= port <= MAX_PORT:
        raise ValueError(f"{port} is not a port ({lowest} .. {MAX_PORT})")
    return port


def parse_listen_port(text):
    """(LOW, HIGH) of what a listening socket may take: a port N is (N, N), 0 (any free
    port) is (0, 0), a range LOW-HIGH needs 1 <= LOW <= HIGH <= 65535. ValueError saying
    why not."""
    text = str(text).strip()
    low, dash, high = text.partition("-")
    if not dash or not low:  # a number; "-1" has nothing before its dash
        port = parse_port(text)
        return port, port
    if not (_NUMBER.fullmatch(low) and _NUMBER.fullmatch(high)) or \
            not 1 <= int(low) <= int(high) <= MAX_PORT:
        raise ValueError(f"{text}: a range LOW-HIGH needs 1 <= LOW <= HIGH <= {MAX_PORT}")
    return int(low), int(high)
