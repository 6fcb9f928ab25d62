"""Failure injection for tests of the failure paths (ADAPM_FAILPOINTS; never set it in a
real run).

Some failures cannot be provoked from outside a node server: a bug in a handler, or a
value arena that runs full. The tests that show such a failure is loud (the cluster fails,
every worker gets a ClusterError naming the node and the keys) set this variable, a comma
separated list of NODE:POINT, for example "1:arena_full,0:raise_in=PUSH":

- arena_full: the node's value arena holds exactly what it holds at start, so the next
  slot it needs (a key relocated or replicated to it) raises the allocator's MemoryError;
- raise_in=TYPE: handling a message of type TYPE (a MsgType name) raises RuntimeError.
- stall_save=SAVE@SECONDS: the node's checkpoint writer (its worker 0) sleeps SECONDS
  after the first chunk of values of its SAVE-th Worker.save (a node to kill mid-write).
"""

import os

ENV_FAILPOINTS = "ADAPM_FAILPOINTS"


class InjectedFault(RuntimeError):
    """Raised where a failpoint says so."""


def active(node, text=None):
    """{point: argument} of the failpoints set for `node` (argument '' when none)."""
    text = os.environ.get(ENV_FAILPOINTS, "") if text is None else text
    points = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        where, _, point = item.partition(":")
        if not where.isdigit() or not point:
            raise ValueError(f"{ENV_FAILPOINTS}: {item!r} is not NODE:POINT")
        if int(where) == node:
            name, _, argument = point.partition("=")
            points[name] = argument
    return points
