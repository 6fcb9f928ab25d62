"""Prometheus metrics of the node servers (adapm.node.control.metrics) and the statistics
table of every node at the end of a run (adapm.table.stats): real clusters on 127.0.0.1,
scraped over HTTP while their workers run."""
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import adapm
from adapm.apps.common import AccessCounter, throughput_summary
from adapm.table import stats as summary

pytestmark = pytest.mark.timeout(120)

LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))
KINDS = {"pulls": "pull", "pushes": "push", "sets": "set"}

# adapm-launch workers: access keys, advance the clock (rank + 2 times), say so, and wait
# for the test to scrape ("go") before leaving.
WAITING_SCRIPT = """
import os, sys, time
import numpy as np
import adapm

marker = sys.argv[1]
with adapm.worker() as w:
    keys = np.arange(w.num_keys)
    w.pull(keys)
    for _ in range(w.rank + 2):
        w.advance_clock()
    open(os.path.join(marker, f"ready{w.rank}"), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(marker, "go")) and time.monotonic() < deadline:
        time.sleep(0.05)
    w.barrier()
"""

# adapm-launch workers: local and remote pulls, pushes and sets, a localize; each writes
# what the apps count (AccessCounter) over its whole run.
ACCESS_SCRIPT = """
import json, os, sys
import numpy as np
import adapm
from adapm.apps.common import AccessCounter

out = sys.argv[1]
with adapm.worker() as w:
    counter = AccessCounter()
    counter.begin(w)
    keys = np.arange(w.num_keys)
    w.pull(keys)
    mine = keys[keys % w.num_nodes == w.node]
    w.push(mine, np.ones((mine.shape[0], 2)))
    w.set(keys[:6], np.zeros((6, 2)))
    if w.node == 1:
        w.localize(keys[:4])
        w.pull(keys[:4])
    w.wait_sync()
    w.barrier()
    w.pull(keys)
    counter.end(w)
    with open(os.path.join(out, f"accesses{w.rank}.json"), "w") as f:
        json.dump({"node": w.node, "accesses": counter.as_dict()}, f)
    w.barrier()
"""


# -- helpers ----------------------------------------------------------------------------

def fetch(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def parse(text):
    """({(sample name, ((label, value), ...)): value}, {family: HELP}) of the text format."""
    parser = pytest.importorskip("prometheus_client.parser")
    samples, helps = {}, {}
    for family in parser.text_string_to_metric_families(text):
        helps[family.name] = family.documentation
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, helps


def value(samples, name, **labels):
    return samples[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]


def accesses(samples, node, worker, kind, where):
    return value(samples, "adapm_key_accesses_total", node=node, worker=worker, kind=kind,
                 where=where)


def check_every_family(text, node):
    """Every metric is adapm_*, has a HELP text and the node's label."""
    samples, helps = parse(text)
    assert helps and all(name.startswith("adapm_") for name in helps), sorted(helps)
    assert all(len(doc) > 20 for doc in helps.values()), helps
    for (_, labels), _ in samples.items():
        assert dict(labels)["node"] == str(node)
    return samples


def summary_rows(text, marker):
    """{node: local % text} of the table after the line containing `marker`."""
    lines = text.split(marker, 1)[1].splitlines()
    assert lines[1].split()[:3] == ["node", "local", "%"], lines[:3]
    rows = {}
    for line in lines[2:]:
        cells = line.split()
        if not cells or not (cells[0].isdigit() or cells[0] == summary.TOTAL):
            break
        rows[cells[0]] = cells[1]
    return rows


def app_share(results):
    """The local share as the apps compute it (throughput_summary over AccessCounters)."""
    return throughput_summary([{"points": 0, "seconds": 1.0, "node": r["node"],
                                "accesses": dict(r["accesses"], node_bytes_sent=0)}
                               for r in results])["local_share"]


def listening_addresses(port):
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":
                found.append(address)
    return found


def launcher(*args, env=None, cwd=None):
    return subprocess.Popen([LAUNCHER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)


def wait_for_files(path, names, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not all((path / name).exists() for name in names):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "workers did not get ready"
        time.sleep(0.05)


def coordinator_port():
    """A free pair of ports (conftest's; imported here, not where the workers import
    this module)."""
    from conftest import coordinator_port as free_pair
    return free_pair()


def assert_clean():
    from conftest import wait_until_clean
    segments, processes = wait_until_clean(timeout=15)
    assert not segments and not processes, (segments, processes)


# -- adapm.run: scraped by the workers themselves, summary printed ------------------------

def scraping_task(w, base):
    """Rank 0 (node 0) accesses keys of both nodes and scrapes both nodes' metrics after
    each step; rank 1 (node 1) advances its clock 3 times."""
    counter = AccessCounter()
    counter.begin(w)
    remote = np.arange(1, w.num_keys, 2, dtype=np.uint64)  # home: node 1
    mine = np.arange(0, w.num_keys, 2, dtype=np.uint64)    # home: node 0
    out = {}
    w.barrier()
    if w.rank == 0:
        out["start"] = [fetch(base), fetch(base + 1)]
        w.pull(remote)
        out["pulled"] = [fetch(base), fetch(base + 1)]
        w.push(mine, np.ones((mine.shape[0], 2)))
        w.set(mine[:5], np.zeros((5, 2)))
        out["pushed"] = fetch(base)
        w.localize(remote[:10])
        out["localized"] = [fetch(base), fetch(base + 1)]
        w.pull(remote[:10])  # owned here now
        for _ in range(7):
            w.advance_clock()
        w.wait_sync()  # a sync round completes
        out["end"] = fetch(base)
    else:
        for _ in range(3):
            w.advance_clock()
    w.barrier()
    if w.rank == 1:
        out["end"] = fetch(base + 1)
    stats = w.stats()
    out["stats"] = {k: v for k, v in stats.items() if k != "node"}
    counter.end(w)
    out["accesses"] = counter.as_dict()
    out["node"] = w.node
    w.barrier()
    return out


def test_run_serves_metrics_that_follow_the_workers_and_prints_the_summary(capfd):
    pytest.importorskip("prometheus_client")
    base = coordinator_port()  # it and base + 1 are free
    zero, one = adapm.run(scraping_task, args=(base,), nodes=2, workers_per_node=1,
                          num_keys=40, value_length=2, mode="adaptive", metrics_port=base)

    start0, start1 = (check_every_family(text, node) for node, text in
                      enumerate(zero["start"]))
    pulled0, pulled1 = (check_every_family(text, node) for node, text in
                        enumerate(zero["pulled"]))
    # 20 remote pulls of worker 0, none local; node 1's server answered them
    assert accesses(pulled0, 0, 0, "pull", "remote") - \
        accesses(start0, 0, 0, "pull", "remote") == 20
    assert accesses(pulled0, 0, 0, "pull", "local") == accesses(start0, 0, 0, "pull", "local")
    for samples, node, by in ((pulled0, 0, "workers"), (pulled1, 1, "server")):
        before = start0 if node == 0 else start1
        assert value(samples, "adapm_bytes_sent_total", node=node, by=by) > \
            value(before, "adapm_bytes_sent_total", node=node, by=by)
    pushed = parse(zero["pushed"])[0]
    assert accesses(pushed, 0, 0, "push", "local") == 20
    assert accesses(pushed, 0, 0, "set", "local") == 5
    # localize moved 10 keys of node 1 here: relocations at node 0, none at node 1
    localized0, localized1 = (parse(text)[0] for text in zero["localized"])
    assert value(localized0, "adapm_relocations_total", node=0) - \
        value(start0, "adapm_relocations_total", node=0) == 10
    assert value(localized1, "adapm_relocations_total", node=1) == 0
    assert value(localized0, "adapm_keys_moving", node=0, kind="localizing") == 0
    end0, end1 = parse(zero["end"])[0], parse(one["end"])[0]
    assert accesses(end0, 0, 0, "pull", "local") == 10  # the localized keys
    # the per-worker counters are the workers' own (nothing counted twice)
    for name, kind in KINDS.items():
        for where in ("local", "remote"):
            assert accesses(end0, 0, 0, kind, where) == zero["stats"][f"{name}_{where}"]
            assert accesses(end1, 1, 1, kind, where) == one["stats"][f"{name}_{where}"]
    # the clock is the one each worker advanced to, labelled by its rank
    assert value(end0, "adapm_worker_clock_total", node=0, worker=0) == 7 == \
        zero["stats"]["clock"]
    assert value(end1, "adapm_worker_clock_total", node=1, worker=1) == 3 == \
        one["stats"]["clock"]
    assert value(end0, "adapm_worker_clock_rate", node=0, worker=0) > 0
    # wait_sync completed a round, observed by the histogram
    assert value(end0, "adapm_rounds_done_total", node=0) >= 1
    assert value(end0, "adapm_round_duration_seconds_count", node=0) == \
        value(end0, "adapm_rounds_done_total", node=0)
    assert value(end0, "adapm_round_duration_seconds_bucket", node=0, le="+Inf") == \
        value(end0, "adapm_round_duration_seconds_count", node=0)
    for kind in ("wait_sync", "refresh", "barrier", "save", "set", "localize"):
        assert value(end0, "adapm_requests_waiting", node=0, kind=kind) == 0
    assert value(end0, "adapm_intents_queued", node=0) == 0

    # the summary: both nodes and a total, local % as the apps define it
    err = capfd.readouterr().err
    rows = summary_rows(err, "adapm.run: statistics (keys) of node(s) 0, 1")
    assert set(rows) == {"0", "1", summary.TOTAL}, err
    assert rows["0"] == f"{100 * app_share([zero]):.1f}", err
    assert rows["1"] == f"{100 * app_share([one]):.1f}", err
    assert rows[summary.TOTAL] == f"{100 * app_share([zero, one]):.1f}", err
    assert rows["0"] != rows["1"]  # node 0 had remote accesses, node 1 none


def idle_task(w):
    w.pull(np.arange(w.num_keys))
    return w.rank


def test_run_prints_the_summary_unless_told_not_to(capfd):
    assert adapm.run(idle_task, num_keys=5, summary=False) == [0]
    assert "statistics (keys)" not in capfd.readouterr().err
    assert adapm.run(idle_task, num_keys=5) == [0]
    rows = summary_rows(capfd.readouterr().err, "statistics (keys) of node(s) 0")
    assert rows == {"0": "100.0"}  # one node: no total row


# -- adapm-launch ----------------------------------------------------------------------

def test_launch_env_var_serves_each_local_node_on_its_own_port(tmp_path):
    pytest.importorskip("prometheus_client")
    script = tmp_path / "script.py"
    script.write_text(WAITING_SCRIPT)
    base = coordinator_port()
    env = dict(os.environ, ADAPM_METRICS_PORT=str(base))
    proc = launcher("--nodes", "2", "--workers-per-node", "2", "--num-keys", "40",
                    "--value-length", "2", str(script), str(tmp_path), env=env, cwd=tmp_path)
    try:
        wait_for_files(tmp_path, [f"ready{rank}" for rank in range(4)], proc)
        for node in (0, 1):
            samples = check_every_family(fetch(base + node), node)
            for local in range(2):
                rank = 2 * node + local
                assert value(samples, "adapm_worker_clock_total", node=node,
                             worker=rank) == rank + 2
                # every worker pulled all 40 keys: its node's 20 here, 20 at the other
                assert accesses(samples, node, rank, "pull", "local") == 20
                assert accesses(samples, node, rank, "pull", "remote") == 20
            # the node's own address only, never every interface
            assert listening_addresses(base + node) == ["0100007F"]
    finally:
        (tmp_path / "go").touch()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    rows = summary_rows(out, "adapm-launch: statistics (keys) of node(s) 0, 1")
    assert rows == {"0": "50.0", "1": "50.0", summary.TOTAL: "50.0"}, out
    assert_clean()


def test_launch_port_zero_logs_the_port_it_got(tmp_path):
    pytest.importorskip("prometheus_client")
    script = tmp_path / "script.py"
    script.write_text(WAITING_SCRIPT)
    proc = launcher("--metrics-port", "0", "--num-keys", "10", "--value-length", "2",
                    str(script), str(tmp_path), cwd=tmp_path)
    lines, found = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "Prometheus metrics at" in line:
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert found.wait(60), "".join(lines)
        [port] = re.findall(r"Prometheus metrics at http://127\.0\.0\.1:(\d+)/metrics",
                            "".join(lines))
        wait_for_files(tmp_path, ["ready0"], proc)
        samples = check_every_family(fetch(int(port)), 0)
        assert value(samples, "adapm_worker_clock_total", node=0, worker=0) == 2
        assert accesses(samples, 0, 0, "pull", "local") == 10
    finally:
        (tmp_path / "go").touch()
    assert proc.wait(timeout=60) == 0, "".join(lines)
    reader.join(10)
    assert_clean()


def test_launch_without_prometheus_client_is_a_usage_error(tmp_path):
    blocked = tmp_path / "blocked"
    (blocked / "prometheus_client").mkdir(parents=True)
    (blocked / "prometheus_client" / "__init__.py").write_text(
        "raise ImportError('blocked by the test')\n")
    env = dict(os.environ, PYTHONPATH=str(blocked))
    proc = launcher("--metrics-port", "0", "--num-keys", "4", "x.py", env=env, cwd=tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "pip install 'adapm[metrics]'" in out, out


def test_node_zero_prints_every_machines_nodes_with_the_apps_local_share(tmp_path):
    """Two per-machine launchers: node 0's table has node 1's row too (sent to the
    coordinator as the cluster shut down), and its local % is the apps' definition."""
    script = tmp_path / "script.py"
    script.write_text(ACCESS_SCRIPT)
    coordinator = f"127.0.0.1:{coordinator_port()}"
    procs = [launcher("--nnodes", "2", "--node-rank", str(rank), "--coordinator", coordinator,
                      "--host", "127.0.0.1", "--workers-per-node", "2", "--num-keys", "30",
                      "--value-length", "2", "--cluster-id", f"m{os.getpid()}",
                      str(script), str(tmp_path), cwd=tmp_path) for rank in (0, 1)]
    outs = [proc.communicate(timeout=90)[0] for proc in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out
    results = [json.loads((tmp_path / f"accesses{rank}.json").read_text()) for rank in range(4)]
    by_node = {node: [r for r in results if r["node"] == node] for node in (0, 1)}
    rows = summary_rows(outs[0], "adapm-launch: statistics (keys) of node(s) 0, 1,")
    assert rows == {"0": f"{100 * app_share(by_node[0]):.1f}",
                    "1": f"{100 * app_share(by_node[1]):.1f}",
                    summary.TOTAL: f"{100 * app_share(results):.1f}"}, outs[0]
    assert 0 < app_share(results) < 1  # some accesses were remote
    # node 1's launcher has its own node only
    assert summary_rows(outs[1], "adapm-launch: statistics (keys) of node(s) 1,") == \
        {"1": rows["1"]}, outs[1]
    assert_clean()


# -- no processes ------------------------------------------------------------------------

def test_local_share_counts_pulls_pushes_and_sets_the_same_way_everywhere():
    stats = {"pulls_local": 6, "pulls_remote": 2, "pushes_local": 3, "pushes_remote": 1,
             "sets_local": 1, "sets_remote": 3, "clock": 9, "intents": 4}
    assert summary.access_counts(stats) == (10, 6)
    assert summary.local_share(10, 6) == 10 / 16
    assert summary.local_share(0, 0) == 1.0

    class FakeWorker:
        def __init__(self):
            self.now = dict.fromkeys(stats, 0)
            self.now["node"] = {"bytes_sent": 0}

        def stats(self):
            return dict(self.now)

    w = FakeWorker()
    counter = AccessCounter()
    counter.begin(w)
    w.now.update(stats)
    counter.end(w)
    assert (counter.local, counter.remote) == (10, 6)  # sets included, as in the table
    numbers = np.array([stats.get(name, 0) for name in summary.REPORTED], dtype=np.uint64)
    assert summary.from_numbers(numbers)["local_share"] == 10 / 16


def test_summary_table_has_a_total_row_over_every_node():
    def stats(pulls_local, pulls_remote, relocations):
        numbers = dict.fromkeys(summary.REPORTED, 0)
        numbers.update(pulls_local=pulls_local, pulls_remote=pulls_remote,
                       relocations=relocations, bytes_sent=2_000_000)
        return summary.from_numbers([numbers[name] for name in summary.REPORTED])

    per_node = {0: stats(9, 1, 3), 1: stats(1, 9, 4), 2: stats(10, 0, 0)}
    table = summary.format_summary(per_node, legend=False).splitlines()
    assert [line.split()[0] for line in table[1:]] == ["0", "1", "2", summary.TOTAL]
    total = table[-1].split()
    assert total[1] == f"{100 * 20 / 30:.1f}" and total[2] == "10"  # local %, pulls remote
    assert total[4] == "7" and total[8] == "6.0"                    # relocated, MB sent
    assert len(summary.format_summary({0: per_node[0]}, legend=False).splitlines()) == 2
    assert "no statistics from node(s) 2" in summary.title({0: 0, 1: 0}, "static", {2})


def test_summary_table_explains_its_columns_and_why_an_apps_line_differs():
    """Issue 17, point 11: `late` and `dropped` had no legend, and the table's local share
    and bytes differed from an app's final line without a word why."""
    numbers = dict.fromkeys(summary.REPORTED, 0)
    stats = summary.from_numbers([numbers[name] for name in summary.REPORTED])
    text = " ".join(summary.format_summary({0: stats, 1: stats}).split())
    for column in ("late:", "dropped:", "replicas:", "relocated:", "MB sent:", "local %:"):
        assert column in text, column
    assert "whole run" in text and "training loops only" in text


def test_metrics_need_prometheus_client(monkeypatch):
    from adapm.node.control import metrics

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'adapm\[metrics\]'"):
        metrics.require()
    assert metrics.node_port(None, 3) is None
    assert metrics.node_port(0, 3) == 0
    assert metrics.node_port(9100, 3) == 9103
    with pytest.raises(ValueError, match="not a port"):
        metrics.node_port(65535, 1)


def test_node_stats_survive_the_wire():
    from adapm.wire import protocol

    numbers = np.arange(len(summary.REPORTED), dtype=np.uint64) * np.uint64(2**40)
    frames = protocol.NodeStats(stats=numbers).encode()
    back = protocol.decode([bytes(memoryview(f)) for f in frames])
    assert back.type == protocol.MsgType.NODE_STATS == 56
    assert summary.from_numbers(back.stats) == summary.from_numbers(numbers)


@pytest.mark.parametrize("reports", [True, False])
def test_coordinator_stops_node_zero_last_with_every_nodes_stats(monkeypatch, reports):
    """Every node done: node 1 is told to shut down first; node 0 once node 1's
    statistics came (or, without them, after STATS_WAIT)."""
    import zmq

    from adapm.node.control import coordinator as coordination
    from adapm.wire import protocol

    monkeypatch.setattr(coordination, "STATS_WAIT", 10.0 if reports else 0.3)
    ctx = zmq.Context()
    from adapm.wire.cluster_secret import ClusterSecret
    secret = ClusterSecret.generate()
    coord = coordination.Coordinator(ctx, "tcp://127.0.0.1:0", 2, node_timeout=0.2,
                                     secret=secret)
    nodes = []
    try:
        for node in (0, 1):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, protocol.node_identity(node))
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(coord.address)
            nodes.append(sock)

        def send(node, msg):
            msg.src_node, msg.token = node, coord.token if coord.formed else 0
            protocol.send(nodes[node], msg.encode())
            assert coord.socket.poll(5000)
            coord.handle_ready()

        def received(node):
            types = []
            while nodes[node].poll(50):
                types.append(protocol.decode(nodes[node].recv_multipart()).type)
            return types

        for node in (0, 1):
            address = f"tcp://127.0.0.1:{node + 1}"
            send(node, protocol.Join(fingerprint=7, addresses=[address],
                                     proof=secret.join_proof(node, 7, address)))
        assert coord.formed
        for node in (0, 1):
            send(node, protocol.NodeDone())
        assert protocol.MsgType.SHUTDOWN in received(1)
        assert protocol.MsgType.SHUTDOWN not in received(0)
        time.sleep(0.4)  # past the node timeout: node 1's silence is expected now
        coord._last_beat = 0.0  # the next tick is due
        coord.tick()
        assert coord.failed is None
        if reports:
            assert protocol.MsgType.SHUTDOWN not in received(0)  # waits for node 1's
            numbers = np.full(len(summary.REPORTED), 3, dtype=np.uint64)
            send(1, protocol.NodeStats(stats=numbers))
            assert coord.stats == {1: summary.from_numbers(numbers)}
        else:  # STATS_WAIT passed without them
            assert coord.stats == {}
        assert protocol.MsgType.SHUTDOWN in received(0)
    finally:
        for sock in nodes:
            sock.close()
        coord.close()
        ctx.term()


# -- idle connections (issue 17, point 7) ----------------------------------------------

def thread_count(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def test_idle_connections_hold_a_bounded_number_of_threads_and_scrapes_still_work(tmp_path):
    """Each connection held a thread of the node server until it sent a request: 200 idle
    connections made 200 threads. Now a few connections have threads; one more makes room
    by closing the one that waited longest for its request."""
    import socket

    from conftest import session_processes
    pytest.importorskip("prometheus_client")
    script = tmp_path / "script.py"
    script.write_text(WAITING_SCRIPT)
    port = coordinator_port()
    proc = launcher("--metrics-port", str(port), "--num-keys", "10", "--value-length", "2",
                    str(script), str(tmp_path), cwd=tmp_path)
    idle = []
    try:
        wait_for_files(tmp_path, ["ready0"], proc)
        [server] = [pid for pid, name in session_processes() if name == "adapm-node0"]
        check_every_family(fetch(port), 0)
        before = thread_count(server)
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)  # every connection accepted by now
        assert thread_count(server) <= before + 20, (before, thread_count(server))
        samples = check_every_family(fetch(port), 0)  # while the idle ones are open
        assert value(samples, "adapm_worker_clock_total", node=0, worker=0) == 2
        assert thread_count(server) <= before + 20, (before, thread_count(server))
    finally:
        for sock in idle:
            sock.close()
        (tmp_path / "go").touch()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert_clean()
