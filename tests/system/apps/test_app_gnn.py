"""The GraphSAGE node-classification app at tiny scale: the generator's power-law degrees
and communities, the CSV files, neighbourhood sampling, that it learns on 2 nodes and in
the plain torch reference, the command line (embedded and under adapm-launch)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from adapm.apps import gnn, gnn_graph, gnn_model  # noqa: E402

pytestmark = pytest.mark.timeout(240)

# 2,000 nodes in 8 communities, 10,000 edges, 70% of them inside a community: 1,200
# training nodes, 2 epochs of batches of 64. Measured: test accuracy 0.14 untrained,
# 0.905 trained on 1 worker (and in the plain torch loop), 0.91-0.93 on 2 nodes x 1 worker.
TINY = dict(gnn.DEFAULTS, graph_nodes=2000, graph_edges=10_000, communities=8, dim=16,
            hidden=32, batch=64, epochs=2, seed=1)
LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))


def test_generator_has_power_law_degrees_and_planted_communities():
    n, m, c, p_in = 5000, 25_000, 10, 0.8
    edges, labels = gnn_graph.generate(n, m, c, p_in, 2.5, seed=0)
    assert edges.shape == (m, 2) and edges.dtype == np.int64
    assert (edges[:, 0] != edges[:, 1]).all()  # no self-loops
    pairs = np.sort(edges, axis=1)
    assert np.unique(pairs[:, 0] * n + pairs[:, 1]).shape[0] == m  # no duplicates
    assert edges.min() >= 0 and edges.max() < n
    # communities of equal size are the labels; most edges stay inside one (p_in, plus
    # the 1/c of the other draws that land in the same community by chance)
    assert np.bincount(labels).tolist() == [n // c] * c
    inside = (labels[edges[:, 0]] == labels[edges[:, 1]]).mean()
    assert abs(inside - (p_in + (1 - p_in) / c)) < 0.03, inside
    # power-law degrees: a heavy tail, a complementary CDF of slope about -(2.5 - 1)
    degree = gnn_graph.Graph(n, edges, labels).degrees()
    assert degree.mean() == pytest.approx(2 * m / n)
    assert degree.max() > 20 * np.median(degree)
    ks = np.arange(5, 100)
    ccdf = np.array([(degree >= k).mean() for k in ks])
    slope = np.polyfit(np.log(ks), np.log(ccdf), 1)[0]
    assert -2.0 < slope < -1.1, slope
    # the seed decides everything
    again = gnn_graph.generate(n, m, c, p_in, 2.5, seed=0)
    np.testing.assert_array_equal(again[0], edges)
    np.testing.assert_array_equal(again[1], labels)
    assert not np.array_equal(gnn_graph.generate(n, m, c, p_in, 2.5, seed=1)[0], edges)
    # the default graph: exactly its edges, quickly
    d = gnn.DEFAULTS
    big, _ = gnn_graph.generate(d["graph_nodes"], d["graph_edges"], d["communities"], d["p_in"],
                          d["exponent"], d["seed"])
    assert big.shape == (d["graph_edges"], 2)
    # a graph too small for the edges asked for: all its pairs
    few, _ = gnn_graph.generate(4, 100, 2, 0.5, 2.5, seed=0)
    assert few.shape == (6, 2)


def test_adjacency_and_sampling():
    # a triangle 0-1-2 (0-1 twice, once reversed), 3 with a self-loop only, 4 isolated
    edges = np.array([[0, 1], [1, 2], [2, 0], [1, 0], [3, 3]])
    graph = gnn_graph.Graph(5, edges, np.array([0, 0, 1, 1, -1]))
    assert graph.indptr.tolist() == [0, 2, 4, 6, 6, 6]
    assert graph.indices.tolist() == [1, 2, 0, 2, 0, 1]
    rng = np.random.default_rng(0)
    drawn = gnn_model.sample_neighbours(graph.indptr, graph.indices, np.array([0, 1, 2, 3, 4]),
                                  2000, rng)
    assert drawn.shape == (5, 2000)
    for v, allowed in enumerate([{1, 2}, {0, 2}, {0, 1}, {3}, {4}]):
        assert set(drawn[v].tolist()) == allowed  # real neighbours; none: itself
    assert 0.45 < (drawn[0] == 1).mean() < 0.55  # uniform, with replacement
    # no edges at all
    empty = gnn_graph.Graph(3, np.empty((0, 2), dtype=np.int64), np.array([0, 1, 0]))
    np.testing.assert_array_equal(
        gnn_model.sample_neighbours(empty.indptr, empty.indices, np.array([2, 0]), 3, rng),
        [[2, 2, 2], [0, 0, 0]])
    # a generated graph: every sampled neighbour is a neighbour
    g = gnn_graph.load_graph(TINY)
    adjacency = {(int(a), int(b)) for a, b in g.edges} | {(int(b), int(a)) for a, b in g.edges}
    targets = g.train[:50]
    b = gnn_model.sample_batch(g, targets, (4, 3), rng)
    n1 = len(targets) * 5
    assert b.ids.shape == (n1 * 4,) and len(b) == 50 and b.fanouts == (4, 3)
    np.testing.assert_array_equal(b.ids[:50], targets)
    np.testing.assert_array_equal(b.labels, g.labels[targets])
    hop1 = b.ids[50:n1].reshape(50, 4)
    hop2 = b.ids[n1:].reshape(n1, 3)
    degree = g.degrees()
    for parent, children in list(zip(targets, hop1)) + list(zip(b.ids[:n1], hop2)):
        for child in children:
            if degree[parent]:
                assert (int(parent), int(child)) in adjacency
            else:
                assert child == parent
    # the model maps a batch's rows to one row of logits per target
    import torch
    sage = gnn_model.sage_module(8, 16, g.classes, seed=0)
    out = sage(torch.zeros(b.ids.shape[0], 8), len(b), b.fanouts)
    assert tuple(out.shape) == (50, g.classes)


def test_csv_files_round_trip(tmp_path):
    graph = gnn_graph.load_graph(TINY)
    gnn_graph.write_csv(tmp_path, graph.edges, graph.labels)
    first = (tmp_path / "edges.csv").read_text().splitlines()[0]
    assert first == f"{graph.edges[0, 0]},{graph.edges[0, 1]}"
    read = gnn_graph.graph_from_files(tmp_path / "edges.csv", tmp_path / "labels.csv", TINY["seed"])
    assert read.num_nodes == graph.num_nodes and read.classes == graph.classes
    for name in ("edges", "labels", "indptr", "indices", "train", "valid", "test"):
        np.testing.assert_array_equal(getattr(read, name), getattr(graph, name))
    # headers are skipped; missing labels are -1 and in no split; nodes past the labels
    # file have none
    (tmp_path / "h_edges.csv").write_text("src,dst\n0,1\n1,2\n\n5,2\n")
    (tmp_path / "h_labels.csv").write_text("label\n3\n\n1\nnan\n2\n")
    small = gnn_graph.graph_from_files(tmp_path / "h_edges.csv", tmp_path / "h_labels.csv", 0)
    assert small.num_nodes == 6 and small.labels.tolist() == [3, -1, 1, -1, 2, -1]
    assert sorted(np.concatenate([small.train, small.valid, small.test]).tolist()) == [0, 2, 4]
    assert small.classes == 4
    assert small.indices[small.indptr[2]:small.indptr[3]].tolist() == [1, 5]
    (tmp_path / "bad.csv").write_text("0,1\n2\n")
    with pytest.raises(ValueError, match="bad.csv"):
        gnn_graph.read_edges(tmp_path / "bad.csv")
    (tmp_path / "neg.csv").write_text("0,1\n-2,1\n")
    with pytest.raises(ValueError, match="negative"):
        gnn_graph.read_edges(tmp_path / "neg.csv")
    (tmp_path / "bad_labels.csv").write_text("1\n1.5\n")
    with pytest.raises(ValueError, match="bad_labels.csv:2"):
        gnn_graph.read_labels(tmp_path / "bad_labels.csv")
    (tmp_path / "neg_labels.csv").write_text("1\n-1\n")
    with pytest.raises(ValueError, match="neg_labels.csv:2"):
        gnn_graph.read_labels(tmp_path / "neg_labels.csv")


def test_two_nodes_learn_and_plain_torch_is_the_same_model():
    two = gnn.run(TINY, nodes=2, workers_per_node=1)
    assert two["accuracy_before"] < 0.3 and two["valid_accuracy_before"] < 0.3  # ~1/8
    assert two["accuracy_after"] > 0.8, two
    assert two["accuracy_after"] > two["accuracy_before"] + 0.5
    assert two["valid_accuracy_after"] > 0.8, two
    assert two["workers"] == 2 and two["points"] == 2 * 1200
    assert len(two["log"]) == 2 and all("valid accuracy" in line for line in two["log"])
    assert two["local_share"] > 0.9, two  # intents made the batches' rows local
    # one worker and torch.nn.Embedding + torch.optim.Adagrad: the same initial model, the
    # same samples, the same updates (up to float rounding)
    one = gnn.run(TINY, nodes=1, workers_per_node=1)
    plain = gnn.train_plain(TINY)
    assert plain["accuracy_before"] == one["accuracy_before"] == two["accuracy_before"]
    assert abs(plain["accuracy_after"] - one["accuracy_after"]) <= 0.01, (plain, one)
    assert plain["accuracy_after"] > 0.8


def test_command_line_generates_saves_and_trains_from_files_launched(tmp_path):
    # (run outside the checkout, whose adapm/ folder would shadow the installed package)
    small = ["--graph-nodes", "1500", "--graph-edges", "8000", "--communities", "6",
             "--dim", "8", "--hidden", "16", "--epochs", "2", "--batch", "64"]
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "adapm.apps.gnn", *small, "--nodes", "1",
         "--workers-per-node", "2", "--save-data", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "samples (nodes)/s per worker" in proc.stdout
    assert "test accuracy" in proc.stdout and "(untrained: " in proc.stdout
    result = json.loads(out.read_text())
    assert result["accuracy_after"] > result["accuracy_before"] + 0.3, result
    assert result["workers"] == 2
    files = ["--edges", str(tmp_path / "edges.csv"), "--labels", str(tmp_path / "labels.csv"),
             "--dim", "8", "--hidden", "16", "--epochs", "2", "--batch", "64"]
    # the plain torch reference on the saved files
    proc = subprocess.run(
        [sys.executable, "-m", "adapm.apps.gnn", *files, "--plain", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plain = json.loads(out.read_text())
    assert plain["accuracy_before"] == result["accuracy_before"]  # same graph and model
    assert plain["accuracy_after"] > plain["accuracy_before"] + 0.3, plain
    # the saved files on a cluster started by adapm-launch (value length 2 x dim)
    proc = subprocess.run(
        [LAUNCHER, "--nodes", "2", "--num-keys", "1500", "--value-length", "16",
         "-m", "adapm.apps.gnn", *files],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the cluster adapm-launch started" in proc.stdout
    assert "test accuracy" in proc.stdout
    # a table of the wrong shape is refused with the shape the app needs
    proc = subprocess.run(
        [LAUNCHER, "--nodes", "1", "--num-keys", "100", "--value-length", "16",
         "-m", "adapm.apps.gnn", *files],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "--num-keys 1500 --value-length 16" in proc.stdout + proc.stderr
    # bad options are usage errors
    proc = subprocess.run(
        [sys.executable, "-m", "adapm.apps.gnn", "--edges", str(tmp_path / "edges.csv")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "--labels" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "adapm.apps.gnn", "--fanouts", "10"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "fanouts" in proc.stderr
