"""B5 and B6: matrix factorisation end to end (docs/design/BENCHMARKS.md).

B5: the MF app on its Zipf(1.1) synthetic matrix (100k x 10k, 1M training and 100k test
cells, true rank 16, noise 0.1; rank-16 factors, AdaGrad), 2 nodes x 1 worker on this
machine, in every mode; references in the same run: mode static, the plain single-process
numpy loop of the same minibatch SGD (`mf --plain`), and a 1-node run.
B6: as B5, each node in its own network namespace, joined by a veth pair shaped to
1 Gbit/s with `tc qdisc ... tbf` (needs root and iproute2; skipped otherwise); reference:
mode static on the same links.

Each writes bench/results/mf.json (or mf_shaped.json), a text table, and a PNG plot with
a panel per figure the benchmark has a target for (data points/s, share of local
accesses, bytes sent, test RMSE; per run), each with its target drawn in.
`--plot FILE.json` redraws the plot of an earlier run's results file."""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

from adapm.apps import mf

from common import RESULTS_DIR, line, save, verdict

B5 = dict(rows=100_000, cols=10_000, train=1_000_000, test=100_000, rank=16, noise=0.1,
          batch=256, lr=0.1, reg=0.01, lookahead=None, seed=0)
MODES = ("static", "adaptive", "relocate_only", "replicate_only", "replicate_all")
# The targets of docs/design/BENCHMARKS.md, for mode adaptive: data points/s against
# static's and the plain numpy loop's, share of key accesses local, bytes sent against
# static's, test RMSE against the 1-node run's (relative). B6 has a speed target only.
B5_TARGETS = dict(vs_static=3.0, vs_plain=1.5, local_share=0.99, bytes_vs_static=0.05,
                  rmse_vs_one_node=0.01)
B6_TARGETS = dict(vs_static=5.0)
TARGETS = {"mf": B5_TARGETS, "mf_shaped": B6_TARGETS}  # by results file


def b5(epochs, modes):
    opts = dict(B5, epochs=epochs)
    rows = {"plain": mf.train_plain(opts)}
    rows["1 node"] = mf.run(opts, nodes=1, workers_per_node=1)
    for mode in modes:
        rows[mode] = mf.run(opts, nodes=2, workers_per_node=1, mode=mode)
    report("B5", rows, plain=rows["plain"], one_node=rows["1 node"])
    write("mf", rows, opts, targets=B5_TARGETS)
    return rows


def report(tag, rows, plain=None, one_node=None, speed_target=3.0):
    for name, row in rows.items():
        where = "" if name == "plain" else (
            f", {row['local_share']:6.1%} local, {row['bytes_sent'] / 1e6:7.1f} MB sent")
        line(tag, f"{name:15s} {row['data_points_per_s'] / 1e3:8.0f}k data points/s, test "
                  f"RMSE {row['rmse_after']:.4f}{where}", "info")
    if "static" not in rows or "adaptive" not in rows:
        return
    static, adaptive = rows["static"], rows["adaptive"]
    speed = adaptive["data_points_per_s"] / static["data_points_per_s"]
    line(tag, f"adaptive vs static: {speed:.2f}x data points/s (target >= {speed_target:g}x)",
         verdict(speed, speed_target))
    if plain is not None:
        ratio = adaptive["data_points_per_s"] / plain["data_points_per_s"]
        target = B5_TARGETS["vs_plain"]
        line(tag, f"adaptive vs the plain numpy loop: {ratio:.2f}x (target >= {target:g}x)",
             verdict(ratio, target))
        line(tag, f"adaptive: {adaptive['local_share']:.2%} of key accesses local "
                  "(target >= 99%)", verdict(adaptive["local_share"], 0.99))
        share = adaptive["bytes_sent"] / max(static["bytes_sent"], 1)
        line(tag, f"adaptive: {share:.1%} of static's bytes (target <= 5%)",
             verdict(share, 0.05, higher_is_better=False))
    if one_node is not None:
        gap = adaptive["rmse_after"] / one_node["rmse_after"] - 1
        line(tag, f"adaptive test RMSE {adaptive['rmse_after']:.4f} vs 1 node "
                  f"{one_node['rmse_after']:.4f}: {gap:+.2%} (target within 1%)",
             verdict(abs(gap), 0.01, higher_is_better=False))


def write(name, rows, opts, extra=None, targets=None):
    data = {"opts": opts, "rows": {k: {f: v for f, v in r.items() if f != "log"}
                                   for k, r in rows.items()}, **(extra or {})}
    path = save(name, data)
    table = os.path.join(RESULTS_DIR, f"{name}.txt")
    with open(table, "w") as f:
        f.write(f"{'run':15s} {'data points/s':>14s} {'local':>7s} {'MB sent':>8s} "
                f"{'test RMSE':>9s}\n")
        for key, r in rows.items():
            local = f"{r['local_share']:.1%}" if "local_share" in r else "-"
            sent = f"{r['bytes_sent'] / 1e6:.1f}" if "bytes_sent" in r else "-"
            f.write(f"{key:15s} {r['data_points_per_s']:14,.0f} {local:>7s} {sent:>8s} "
                    f"{r['rmse_after']:9.4f}\n")
    png = plot(name, rows, targets)
    print(f"    results: {path}, {table}" + (f", {png}" if png else ""))


def plot(name, rows, targets=None, folder=RESULTS_DIR):
    """`name`.png in `folder`: one panel per figure with a target (throughput, local
    share, bytes sent, test RMSE), a bar per run, mode adaptive's bar (the one the targets
    are about) highlighted, and each target drawn where its reference run is in `rows`,
    with the ratio and its verdict in the panel's title. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("    (no plot: matplotlib is not installed; pip install 'adapm[bench]')")
        return None
    targets = targets or {}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    panels = (_speed_panel, _local_panel, _bytes_panel, _rmse_panel)
    for ax, panel in zip(axes.flat, panels):
        panel(ax, rows, targets)
        ax.tick_params(axis="x", rotation=30)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.suptitle(f"{name}: every run; targets for mode adaptive "
                 "(docs/design/BENCHMARKS.md)")
    fig.tight_layout()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bars(ax, names, values, fmt):
    colors = ["tab:orange" if n == "adaptive" else "tab:blue" for n in names]
    bars = ax.bar(names, values, color=colors)
    ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)


def _target_line(ax, y, label, color="tab:red"):
    ax.axhline(y, color=color, linestyle="--", linewidth=1.2, label=label)


def _titled(ax, what, ratio_text=None, status=None):
    if ratio_text is not None and status is not None:
        ratio_text = f"{ratio_text}  [{status}]"
    ax.set_title(what if ratio_text is None else f"{what}\n{ratio_text}", fontsize=10)


def _speed_panel(ax, rows, targets):
    names = list(rows)
    values = [rows[n]["data_points_per_s"] / 1e3 for n in names]
    _bars(ax, names, values, lambda v: f"{v:,.0f}k")
    ax.set_ylabel("data points/s (thousands)")
    adaptive, parts = rows.get("adaptive"), []
    for key, ref, label in (("vs_static", "static", "static"),
                            ("vs_plain", "plain", "the plain numpy loop")):
        if key in targets and ref in rows:
            goal = targets[key]
            _target_line(ax, goal * rows[ref]["data_points_per_s"] / 1e3,
                         f"target: {goal:g}x {label}",
                         color="tab:red" if ref == "static" else "tab:purple")
            if adaptive is not None:
                ratio = adaptive["data_points_per_s"] / rows[ref]["data_points_per_s"]
                parts.append((f"{ratio:.2f}x {ref} (>= {goal:g}x)",
                              verdict(ratio, goal)))
    if not any(key in targets for key in ("vs_static", "vs_plain")):
        return _titled(ax, "throughput (no target)")
    _titled(ax, "throughput", *_joined(parts))


def _local_panel(ax, rows, targets):
    names = [n for n in rows if "local_share" in rows[n]]
    values = [100 * rows[n]["local_share"] for n in names]
    _bars(ax, names, values, lambda v: f"{v:.1f}%")
    ax.set_ylabel("key accesses local (%)")
    ax.set_ylim(0, 109)
    goal = targets.get("local_share")
    if goal is None:
        return _titled(ax, "local accesses (no target)")
    _target_line(ax, 100 * goal, f"target: >= {goal:.0%} local")
    adaptive = rows.get("adaptive", {})
    if "local_share" not in adaptive:
        return _titled(ax, "local accesses")
    share = adaptive["local_share"]
    _titled(ax, "local accesses", f"adaptive {share:.2%} (>= {goal:.0%})",
            verdict(share, goal))


def _bytes_panel(ax, rows, targets):
    names = [n for n in rows if "bytes_sent" in rows[n]]
    values = [rows[n]["bytes_sent"] / 1e6 for n in names]
    _bars(ax, names, values, lambda v: f"{v:,.1f}")
    ax.set_ylabel("MB sent between nodes")
    goal, static = targets.get("bytes_vs_static"), rows.get("static", {})
    if goal is None:
        return _titled(ax, "bytes sent (no target)")
    if "bytes_sent" not in static:
        return _titled(ax, "bytes sent")
    _target_line(ax, goal * static["bytes_sent"] / 1e6, f"target: <= {goal:.0%} of static's")
    adaptive = rows.get("adaptive", {})
    if "bytes_sent" not in adaptive:
        return _titled(ax, "bytes sent")
    share = adaptive["bytes_sent"] / max(static["bytes_sent"], 1)
    _titled(ax, "bytes sent", f"adaptive {share:.1%} of static's (<= {goal:.0%})",
            verdict(share, goal, higher_is_better=False))


def _rmse_panel(ax, rows, targets):
    names = [n for n in rows if "rmse_after" in rows[n]]
    values = [rows[n]["rmse_after"] for n in names]
    _bars(ax, names, values, lambda v: f"{v:.4f}")
    ax.set_ylabel("test RMSE after training")
    goal, one = targets.get("rmse_vs_one_node"), rows.get("1 node")
    band = []
    if goal is not None and one is not None:
        low, high = one["rmse_after"] * (1 - goal), one["rmse_after"] * (1 + goal)
        ax.axhspan(low, high, color="tab:green", alpha=0.15,
                   label=f"target: within {goal:.0%} of 1 node")
        for y in (low, high):
            ax.axhline(y, color="tab:green", linestyle="--", linewidth=1.0)
        band = [low, high]
    if values:  # the differences are a few per cent: zoom in on them
        lo, hi = min(values + band), max(values + band)
        pad = max(hi - lo, 1e-3 * hi) * 0.6
        ax.set_ylim(lo - pad, hi + pad)
    adaptive = rows.get("adaptive")
    if goal is None:
        return _titled(ax, "test RMSE (no target)")
    if not band or adaptive is None:
        return _titled(ax, "test RMSE")
    gap = adaptive["rmse_after"] / one["rmse_after"] - 1
    _titled(ax, "test RMSE", f"adaptive {gap:+.2%} vs 1 node (within {goal:.0%})",
            verdict(abs(gap), goal, higher_is_better=False))


def _joined(parts):
    """Several (text, verdict) of one panel as one title line, each with its verdict."""
    if not parts:
        return None, None
    return "; ".join(f"{text} [{status}]" for text, status in parts), None


def replot(path, folder=None):
    """Redraw the plot of a results file (mf.json, mf_shaped.json) next to it, or into
    `folder`; returns the PNG's path (None without matplotlib)."""
    with open(path) as f:
        data = json.load(f)
    name = os.path.splitext(os.path.basename(path))[0]
    return plot(name, data["rows"], TARGETS.get(name),
                folder or os.path.dirname(os.path.abspath(path)))


# -- B6: two network namespaces, a veth pair shaped to 1 Gbit/s --------------------------

class ShapedPair:
    """Two network namespaces joined by a veth pair, each end shaped by tbf to `rate`;
    removed on exit. Addresses 10.78.0.1 and 10.78.0.2."""

    def __init__(self, rate="1gbit"):
        tag = uuid.uuid4().hex[:6]
        self.names = [f"adapm-b6a{tag}", f"adapm-b6b{tag}"]
        self.devices = [f"b6a{tag}", f"b6b{tag}"]
        self.addresses = ["10.78.0.1", "10.78.0.2"]
        self.rate = rate

    def __enter__(self):
        try:
            for name in self.names:
                _ip("netns", "add", name)
            _ip("link", "add", self.devices[0], "type", "veth", "peer", "name",
                self.devices[1])
            for name, dev, address in zip(self.names, self.devices, self.addresses):
                _ip("link", "set", dev, "netns", name)
                _ip("addr", "add", f"{address}/24", "dev", dev, ns=name)
                _ip("link", "set", dev, "up", ns=name)
                _ip("link", "set", "lo", "up", ns=name)
                # burst >= rate / HZ, so that the shaper can reach its rate
                _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", dev, "root",
                     "tbf", "rate", self.rate, "burst", "1mb", "latency", "50ms")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _ip(*args, ns=None):
    _run("ip", *(["netns", "exec", ns, "ip"] if ns else []), *args)


def _run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def can_shape():
    return os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_mf(pair, mode, opts, folder):
    """The MF app on 2 nodes (one per namespace) through adapm-launch; its summary."""
    prefix = os.path.join(folder, f"{mode}")
    coordinator = f"{pair.addresses[0]}:{free_port()}"
    args = ["--rows", str(opts["rows"]), "--cols", str(opts["cols"]),
            "--train", str(opts["train"]), "--test", str(opts["test"]),
            "--rank", str(opts["rank"]), "--epochs", str(opts["epochs"]),
            "--seed", str(opts["seed"]), "--worker-json", prefix]
    num_keys, value_length = mf.table_shape(opts)
    launcher = shutil.which("adapm-launch") or "adapm-launch"
    procs = []
    for rank, name in enumerate(pair.names):
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", name, launcher, "--nnodes", "2", "--node-rank", str(rank),
             "--coordinator", coordinator, "--workers-per-node", "1",
             "--num-keys", str(num_keys), "--value-length", str(value_length),
             "--mode", mode, "-m", "adapm.apps.mf", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        if proc.returncode != 0:
            raise RuntimeError(f"B6 {mode}: a launcher exited {proc.returncode}:\n{out}")
    results = []
    for rank in range(2):
        with open(f"{prefix}.rank{rank}.json") as f:
            results.append(json.load(f))
    return mf.finish(results)


def b6(epochs, modes):
    if not can_shape():
        line("B6", "skipped: network namespaces and tc need root, iproute2 and tc", "info")
        return None
    opts = dict(B5, epochs=epochs)
    rows = {}
    with ShapedPair() as pair, tempfile.TemporaryDirectory() as folder:
        for mode in modes:
            rows[mode] = launched_mf(pair, mode, opts, folder)
    report("B6", rows, speed_target=5.0)
    write("mf_shaped", rows, opts, extra={"link": "veth, tbf 1gbit"}, targets=B6_TARGETS)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--only", choices=("B5", "B6"), default=None)
    parser.add_argument("--plot", metavar="JSON",
                        help="only redraw the plot of this results file (e.g. "
                             "bench/results/mf.json)")
    args = parser.parse_args(argv)
    if args.plot:
        png = replot(args.plot)
        if png:
            print(f"    plot: {png}")
        return 0 if png else 1
    epochs = 3 if args.full else 1
    modes = args.modes.split(",")
    if args.only in (None, "B5"):
        b5(epochs, modes)
    if args.only in (None, "B6"):
        b6(epochs, [m for m in modes if m in ("static", "adaptive")] if not args.full
           else modes)


if __name__ == "__main__":
    sys.exit(main())
