"""Log lines of AdaPM's processes: one level for all of them, each line prefixed with who
wrote it (docs/configuration.md, "Logs").

Every part logs to its own logger under `adapm` (`adapm.server`, `adapm.coordinator`,
`adapm.rounds`, `adapm.worker`, ...: named for the part, not for the module's path). Each
process AdaPM starts (node servers, workers) calls `configure` once: the `adapm` logger
gets the level and one handler that writes to stderr, every line prefixed `[node N]` (a
node server) or `[node N worker R]` (a worker). The level travels to every process:
`adapm.run(log_level=...)` or `adapm-launch --log-level` put it into ADAPM_LOG_LEVEL of
the workers (and hand it to the node servers they start); by default ADAPM_LOG_LEVEL of
the launching process, else INFO.

INFO says only what a cluster's life consists of (the cluster formed, what start-up waits
for, shutting down); WARNING and ERROR what went wrong; DEBUG the detail of each part."""

import logging
import os
import sys

from adapm.common.config import ENV_LOG_LEVEL, ENV_NODE, ENV_RANK

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LEVEL = "INFO"
ROOT = "adapm"


def parse_level(value):
    """A level name of LEVELS (any case), canonical; ValueError for anything else."""
    name = str(value).strip().upper()
    if name not in LEVELS:
        raise ValueError(f"log level {value!r}: use one of {', '.join(LEVELS)}")
    return name


def resolve_level(level=None, environ=None):
    """`level` when given, else ADAPM_LOG_LEVEL, else DEFAULT_LEVEL (a canonical name)."""
    if level is None:
        environ = os.environ if environ is None else environ
        level = environ.get(ENV_LOG_LEVEL) or DEFAULT_LEVEL
        try:
            return parse_level(level)
        except ValueError as exc:
            raise ValueError(f"{ENV_LOG_LEVEL}: {exc}") from None
    return parse_level(level)


def shows(level, at):
    """Whether a process configured with `level` writes lines of level `at` (a number)."""
    return logging.getLevelName(parse_level(level)) <= at


def node_prefix(node):
    return f"[node {node}]"


def worker_prefix(node, rank):
    return f"[node {node} worker {rank}]"


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is when a line is written (as logging's last
    resort does), so that a redirected sys.stderr gets the lines."""

    def emit(self, record):
        try:
            text = self.format(record)
            stream = sys.stderr
            if stream is not None:
                stream.write(text + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _Prefixed(logging.Formatter):
    """`PREFIX HH:MM:SS.mmm LEVEL logger: message`; every further line of a message (a
    traceback) carries the prefix too."""

    def __init__(self, prefix):
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                         datefmt="%H:%M:%S")
        self.prefix = prefix

    def format(self, record):
        text = super().format(record)
        if not self.prefix:
            return text
        return "\n".join(f"{self.prefix} {line}" for line in text.split("\n"))


def configure(level=None, prefix=""):
    """Configure this process's `adapm` loggers: `level` (resolve_level), one handler
    writing `prefix`ed lines to stderr. Replaces what an earlier call installed; lines do
    not propagate to the root logger (a user's handlers there would print them twice).
    Returns the level's name."""
    name = resolve_level(level)
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if getattr(h, "_adapm", False)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler._adapm = True
    handler.setFormatter(_Prefixed(prefix))
    logger.addHandler(handler)
    logger.setLevel(name)
    logger.propagate = False
    return name


def configure_worker(environ=None):
    """configure() for a worker process, from its environment (adapm.run, adapm-launch):
    ADAPM_LOG_LEVEL, and the prefix from ADAPM_NODE and ADAPM_RANK. A level that is not
    one falls back to the default rather than stopping the worker (its launcher checked
    it)."""
    environ = os.environ if environ is None else environ
    prefix = worker_prefix(environ.get(ENV_NODE, "?"), environ.get(ENV_RANK, "?"))
    try:
        return configure(resolve_level(environ=environ), prefix)
    except ValueError:
        return configure(DEFAULT_LEVEL, prefix)


SLOW_START = 2.0  # seconds: a process that took longer to start says why, at INFO


def process_age():
    """Seconds since this process was created (Linux /proc), None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def started(logger, what, slow_level=logging.INFO):
    """Say how long this process took to start: at DEBUG, or at `slow_level` when it took
    SLOW_START seconds or more. A process started by multiprocessing's spawn method
    (adapm.run's workers; its node servers only when their init is defined there) first
    runs the module level of the launching script (__main__), and with it what that
    imports (torch: seconds)."""
    age = process_age()
    if age is None:
        return
    level = slow_level if age >= SLOW_START else logging.DEBUG
    script = getattr(sys.modules.get("__mp_main__"), "__file__", None)
    if script and age >= SLOW_START:
        logger.log(level, "%s started in %.1f s, most of it running the module level of %s "
                   "(spawn does, in every worker adapm.run starts: heavy imports there, "
                   "torch for one, slow each down)", what, age, script)
    else:
        logger.log(level, "%s started in %.1f s", what, age)
