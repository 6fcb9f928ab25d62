"""Prometheus metrics of a node server (docs/configuration.md, "Metrics").

Enabled by `adapm-launch --metrics-port PORT`, `adapm.run(..., metrics_port=PORT)` or
ADAPM_METRICS_PORT; needs prometheus_client (`pip install 'adapm[metrics]'`). Each node
server serves http://HOST:PORT/metrics from a thread of its own process, on its node's
address only (`--host`; 127.0.0.1 for a local cluster), never on every interface. With
several nodes on one machine the i-th of them (by node id) listens on PORT + i; PORT 0
takes any free port, and the node logs the one it got.

Nothing is counted for the metrics: a scrape reads the counters the table already keeps
(the workers' and the node's, the same that w.stats() and the summary table read) and
a snapshot of the node server's queues (adapm.node.snapshot: plain numbers, taken under
the lock the node thread holds while it works), in the scraping thread. The only
addition to the node server's work is one call per completed sync round (an observer of
its rounds: `NodeCollector.observe_round`, two list increments) for the round-time
histograms."""

import bisect
import collections
import logging
import select
import socket
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np

from adapm.table.shared_table import NODE_SLOT, WORKER_SLOT
from adapm.table.stats import ACCESS_KINDS

log = logging.getLogger("adapm.metrics")

INSTALL_HINT = "pip install 'adapm[metrics]'"
# Upper bounds of the round-time histograms' buckets, in seconds: a round is a message
# round trip to the keys' owners, under a millisecond on one machine, tens of
# milliseconds across a busy network.
ROUND_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                 5.0)
RATE_WINDOW = 30.0      # seconds a worker's clock rate is measured over (at least)
POLL_INTERVAL = 0.25    # how often the HTTP thread looks whether it should stop
REQUEST_TIMEOUT = 10.0  # seconds a scraper may take to send its request
MAX_CONNECTIONS = 8     # connections with a thread of their own at once (a scrape: one)
KIND_LABEL = {"pulls": "pull", "pushes": "push", "sets": "set"}  # adapm_key_accesses' kind


def require():
    """Raise ImportError, saying what to install, when prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ImportError("metrics (--metrics-port, metrics_port, ADAPM_METRICS_PORT) need "
                          f"the prometheus_client package: {INSTALL_HINT}") from None


def node_port(base, index):
    """The metrics port of the `index`-th node on this machine: base + index (0: any
    free port, for every node)."""
    if base is None:
        return None
    base = int(base)
    if base == 0:
        return 0
    if not 0 < base + index <= 65535:
        raise ValueError(f"metrics port {base} + {index} (node {index} of this machine) "
                         "is not a port")
    return base + index


class Histogram:
    """Observations in ROUND_BUCKETS, counted by the node server's thread and read by the
    scraping one (a read may miss the observation being made: never a torn count)."""

    def __init__(self, bounds=ROUND_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds):
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def buckets(self):
        """[(upper bound as text, cumulative count)], the last one +Inf; and the sum."""
        counts, total = list(self.counts), self.sum
        cumulative = np.cumsum(counts).tolist()
        bounds = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        return list(zip(bounds, cumulative)), total


class NodeCollector:
    """A prometheus_client collector of one node server's metrics, read at scrape time."""

    def __init__(self, server, clock=time.monotonic):
        self.server = server
        self.node = str(server.node)
        self.clock = clock
        self.rounds = Histogram()
        self.reactions = Histogram()
        self._lock = threading.Lock()
        self._closed = False
        # (time, clocks) of earlier scrapes for the clock rates; the first: the start
        self._samples = collections.deque([(clock(), np.zeros(server.workers, np.int64))])

    def observe_round(self, seconds, asked):
        """A sync round completed after `seconds`; `asked`: it asked owners for keys (its
        time is what the reaction time is estimated from). An observer of the node's
        rounds (adapm.node.data.rounds), on the node thread."""
        self.rounds.observe(seconds)
        if asked:
            self.reactions.observe(seconds)

    def close(self):
        """No scrape reads the table after this returns (it may be unmapped then)."""
        with self._lock:
            self._closed = True

    def describe(self):
        return []  # registering must not read the table from the registering thread

    def collect(self):
        with self._lock:
            if self._closed:
                return []
            return self._families()

    # -- the metrics ---------------------------------------------------------------

    def _families(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        server, node = self.server, self.node
        view = server.view
        counters = view.counters()  # a copy: (local workers, slots)
        ranks = [str(server.first_rank + i) for i in range(server.workers)]

        def worker_slot(name):
            return counters[:, WORKER_SLOT[name]].astype(np.int64)

        def node_counter(name):
            return int(view.node_counter_get(NODE_SLOT[name]))

        families = []
        accesses = CounterMetricFamily(
            "adapm_key_accesses", "Keys accessed by a worker (pull, push and "
            "apply_gradients, set); where=local: served from the table of the worker's own "
            "node without a message, where=remote: by a message to a node server",
            labels=["node", "worker", "kind", "where"])
        for kind in ACCESS_KINDS:
            for where in ("local", "remote"):
                values = worker_slot(f"{kind}_{where}")
                for rank, value in zip(ranks, values.tolist()):
                    accesses.add_metric([node, rank, KIND_LABEL[kind], where], value)
        families.append(accesses)

        clocks = worker_slot("clock")
        clock = CounterMetricFamily(
            "adapm_worker_clock", "The worker's logical clock (advance_clock); its rate() "
            "is the worker's speed in clocks per second: the slowest worker has the lowest",
            labels=["node", "worker"])
        rate = GaugeMetricFamily(
            "adapm_worker_clock_rate", "Clocks per second of the worker, measured between "
            f"scrapes over at least the last {RATE_WINDOW:.0f} s (at the first scrape: since "
            "its node server started)", labels=["node", "worker"])
        rates = self._clock_rates(clocks)
        for rank, value, speed in zip(ranks, clocks.tolist(), rates.tolist()):
            clock.add_metric([node, rank], value)
            rate.add_metric([node, rank], speed)
        intents = CounterMetricFamily(
            "adapm_worker_intent_keys", "Keys the worker named in intents",
            labels=["node", "worker"])
        for rank, value in zip(ranks, worker_slot("intents").tolist()):
            intents.add_metric([node, rank], value)
        families += [clock, rate, intents]

        for name, what in (("sent", "sent: by the node's workers to other nodes, and by its "
                                    "node server to peers and to workers"),
                           ("received", "received: by the node's workers (replies), and by "
                                        "its node server (requests of workers of any node, "
                                        "messages of peers)")):
            family = CounterMetricFamily(f"adapm_bytes_{name}", f"Bytes of messages {what}",
                                         labels=["node", "by"])
            family.add_metric([node, "workers"], int(worker_slot(f"bytes_{name}").sum()))
            family.add_metric([node, "server"], node_counter(f"bytes_{name}"))
            families.append(family)
        families.append(CounterMetricFamily(
            "adapm_bytes_to_own_node", "Bytes of the messages the node's workers sent to "
            "their own node server (intents, control): they stay on the machine",
            labels=["node"]))
        families[-1].add_metric([node], int(worker_slot("bytes_to_node").sum()))

        for name, counter, text in NODE_COUNTER_METRICS:
            family = CounterMetricFamily(name, text, labels=["node"])
            family.add_metric([node], node_counter(counter))
            families.append(family)

        for name, histogram, text in (
                ("adapm_round_duration_seconds", self.rounds,
                 "Time from the start of a sync round of this node to its last answer"),
                ("adapm_reaction_round_seconds", self.reactions,
                 "Time of the sync rounds that asked owners for keys an intent wants (the "
                 "reaction time estimate is made of these)")):
            buckets, total = histogram.buckets()
            family = HistogramMetricFamily(name, text, labels=["node"])
            family.add_metric([node], buckets, total)
            families.append(family)

        reaction = GaugeMetricFamily(
            "adapm_reaction_time_seconds", "The node's estimate of the time from an intent "
            "to a usable key: two sync rounds at about the 90th percentile (w.reaction_time()"
            "; IntentLoader announces batches a few of these ahead)", labels=["node"])
        reaction.add_metric([node], node_counter("reaction_us") / 1e6)
        families.append(reaction)
        families += self._queues(GaugeMetricFamily)
        return families

    def _clock_rates(self, clocks):
        now = self.clock()
        samples = self._samples
        samples.append((now, clocks))
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW:
            samples.popleft()
        then, before = samples[0]
        if now <= then:
            return np.zeros(clocks.shape[0])
        return np.maximum(clocks - before, 0) / (now - then)

    def _queues(self, GaugeMetricFamily):
        """What waits in the node server, from a snapshot of its parts."""
        node = self.node
        snapshot = self.server.snapshots.take()
        waiting = GaugeMetricFamily(
            "adapm_requests_waiting", "Requests of this node's workers that the node server "
            "holds unanswered: wait_sync and refresh (for a sync round), barrier and save (for "
            "the other workers and nodes), set (for the sync round in flight), localize (for "
            "its keys to arrive)", labels=["node", "kind"])
        for kind, count in snapshot.waiting:
            waiting.add_metric([node, kind], count)
        intents = GaugeMetricFamily(
            "adapm_intents_queued", "Intents of this node's workers that the node server "
            "knows and that have not expired (waiting to come due, or in their window)",
            labels=["node"])
        intents.add_metric([node], snapshot.intents_queued)
        moving = GaugeMetricFamily(
            "adapm_keys_moving", "Keys on their way to this node: requested by a sync round "
            "and not answered yet (requested), or asked for by a localize and not arrived "
            "(localizing)", labels=["node", "kind"])
        moving.add_metric([node, "requested"], snapshot.keys_requested)
        moving.add_metric([node, "localizing"], snapshot.keys_localizing)
        held = GaugeMetricFamily(
            "adapm_replicas_held", "Replicas of other nodes' keys that this node holds now "
            "(answered; those requested and not answered are in adapm_keys_moving)",
            labels=["node"])
        held.add_metric([node], snapshot.replicas_held)
        return [waiting, intents, moving, held]


# Counters of the node itself (adapm.table.shared_table.NODE_COUNTERS): (metric, counter, HELP).
NODE_COUNTER_METRICS = (
    ("adapm_relocations", "relocations",
     "Keys relocated to this node (arrived with their value and ownership)"),
    ("adapm_replicas_made", "replicas_made", "Replicas this node granted as the keys' owner"),
    ("adapm_replicas_dropped", "replicas_dropped", "Replicas this node gave up"),
    ("adapm_replicas_retained", "replicas_retained",
     "Replicas that no intent named and that the learned retention kept, summed over rounds"),
    ("adapm_late_intents", "late_intents",
     "Keys that intents of this node's workers asked for only after the worker's clock had "
     "passed the intent's start"),
    ("adapm_intent_keys_received", "intents_received",
     "Keys named in the intents this node server received from its workers"),
    ("adapm_rounds_started", "rounds_started", "Sync rounds this node started"),
    ("adapm_rounds_done", "rounds_done", "Sync rounds this node completed"),
    ("adapm_malformed_messages", "malformed_messages",
     "Messages this node server dropped as malformed or not allowed"),
    ("adapm_plane_served", "plane_served",
     "Remote requests (pull, push, set, apply) that the node server's compiled data plane served"),
)


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per connection, for at most MAX_CONNECTIONS connections. One more makes
    room by closing the idle connection that has waited longest (idle: nothing of its
    request arrived; a scraper sends its request as it connects), or is closed itself
    when no connection is idle. So idle connections, however many, hold a bounded
    number of threads (those of the closed ones end at once), and a scrape finds one."""

    daemon_threads = True
    request_queue_size = 64  # listen backlog: a burst of connections is not refused

    def __init__(self, *args, **kwargs):
        self._lock = threading.Lock()
        self._waiting = {}  # connections without a request yet, oldest first (dict order)
        # Threads of connections, those of closed ones until they end (not `_threads`:
        # ThreadingMixIn's list of them).
        self._open = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        with self._lock:
            admitted = self._make_room()
            if admitted:
                self._waiting[request] = None
                self._open += 1
        if not admitted:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def _make_room(self):
        """(Under the lock) whether a new connection may have a thread: there is room, or
        an idle connection is closed for it. Threads of closed connections end at once
        but count until they did, so that there are never more than 2 x MAX_CONNECTIONS."""
        if self._open < MAX_CONNECTIONS:
            return True
        if not self._waiting or self._open >= 2 * MAX_CONNECTIONS:
            return False
        idle = next((c for c in self._waiting if not _request_arrived(c)), None)
        if idle is None:
            return False
        del self._waiting[idle]
        _interrupt(idle)
        return True

    def answering(self, request):
        """The connection sent its request: it is no longer idle."""
        with self._lock:
            self._waiting.pop(request, None)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._waiting.pop(request, None)
                self._open -= 1

    def handle_error(self, request, client_address):
        """A scraper that went away (or an idle connection closed) is not worth a line."""
        log.debug("metrics: connection from %s failed", client_address, exc_info=True)

    def server_close(self):
        with self._lock:  # else closing waits for each idle connection's read timeout
            for request in self._waiting:
                _interrupt(request)
        super().server_close()


def _request_arrived(request):
    """Whether the connection has something to read (its request, or its end), looked at
    without waiting. (Not recv(MSG_DONTWAIT): a socket with a timeout waits for it.)"""
    poller = select.poll()  # not select.select: it fails for descriptors past 1023
    try:
        poller.register(request, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False  # it failed (closed): closing it costs nothing


def _interrupt(request):
    """End a connection's blocked read at once (it returns no data): its thread ends."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT  # a connection that sends nothing does not hold a thread

    def parse_request(self):
        self.server.answering(self.request)  # its request line arrived
        return super().parse_request()

    def log_message(self, *args):
        pass  # a scrape is not worth a line


class MetricsExporter:
    """The HTTP endpoint of one node server's metrics, served from a thread of its own."""

    def __init__(self, server, host, port):
        require()
        from prometheus_client import CollectorRegistry, make_wsgi_app

        self.collector = NodeCollector(server)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        server_class = _Server6 if ":" in host else _Server
        try:
            self.httpd = make_server(host, port, make_wsgi_app(registry), server_class,
                                     _Handler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: "
                          f"{exc.strerror or exc}") from None
        self.host, self.port = host, self.httpd.server_port
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": POLL_INTERVAL},
                                       name="adapm-metrics", daemon=True)
        self.thread.start()
        # the port is news when it was chosen here (port 0): say it whatever the level
        (log.warning if port == 0 else log.info)("Prometheus metrics at %s", self.url)

    def stop(self):
        """Stop serving; no scrape reads the table after this returns."""
        self.collector.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(REQUEST_TIMEOUT)


def start(server, host, port):
    """Serve `server`'s (a NodeServer with its parts assembled) metrics on host:port and
    observe its rounds for the round-time histograms; returns the MetricsExporter."""
    exporter = MetricsExporter(server, host, port)
    server.rounds.add_observer(exporter.collector.observe_round)
    return exporter
