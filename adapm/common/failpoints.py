"""Fail points: failures injected on purpose, for the tests of the failure paths, in the
manner of FreeBSD's fail points and etcd's gofail. Never set ADAPM_FAILPOINTS in a real run.

Some failures cannot be provoked from outside a node server: a bug in a handler, a value
arena that runs full, a node that stops in the middle of writing a checkpoint. The tests
that show such a failure is loud (the cluster fails, every worker gets a ClusterError
naming the node and the keys) set ADAPM_FAILPOINTS, a comma-separated list of NODE:POINT
or NODE:POINT=ARGUMENT, for example "1:arena_full,0:raise_in=PUSH".

Every point is in POINTS below, with what it does; a name that is not there is an error
(a typo must not pass silently as a test that injects nothing). The one place a process
reads the variable is `for_node`, once, when the part that has points starts; with the
variable unset it returns OFF, which is false, so a call site costs one truth test:

    self.failpoints = failpoints.for_node(node)
    ...
    if self.failpoints and self.failpoints.armed("arena_full"):
"""

import os

ENV_FAILPOINTS = "ADAPM_FAILPOINTS"

POINTS = {
    "arena_full": "the node's value arena holds exactly what it holds at start, so the next "
                  "slot it needs (a key relocated or replicated to it) raises the allocator's "
                  "MemoryError (adapm.node.server)",
    "raise_in": "=TYPE: handling a message of type TYPE (a MsgType name) raises "
                "InjectedFault (adapm.node.server)",
    "stall_save": "=SAVE@SECONDS: the node's checkpoint writer (its worker 0) sleeps SECONDS "
                  "after the first chunk of values of its SAVE-th Worker.save, a node to kill "
                  "in the middle of writing (adapm.client.saving)",
}


class InjectedFault(RuntimeError):
    """Raised where a fail point says so."""


class FailPoints:
    """The fail points armed in one node's processes; false when none is."""

    def __init__(self, points):
        self._points = dict(points)

    def __bool__(self):
        return bool(self._points)

    def armed(self, name):
        return name in self._points

    def argument(self, name):
        """The point's argument ('' when it has none), or None when it is not armed."""
        return self._points.get(name)


OFF = FailPoints({})


def for_node(node, text=None):
    """The fail points set for `node` in ADAPM_FAILPOINTS (or in `text`)."""
    text = os.environ.get(ENV_FAILPOINTS, "") if text is None else text
    if not text:
        return OFF
    points = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        where, _, point = item.partition(":")
        if not where.isdigit() or not point:
            raise ValueError(f"{ENV_FAILPOINTS}: {item!r} is not NODE:POINT")
        name, _, argument = point.partition("=")
        if name not in POINTS:
            raise ValueError(f"{ENV_FAILPOINTS}: no fail point {name!r} (there are "
                             f"{', '.join(sorted(POINTS))})")
        if int(where) == node:
            points[name] = argument
    return FailPoints(points) if points else OFF
