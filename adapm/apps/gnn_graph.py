"""The GNN app's data (adapm.apps.gnn): a labelled undirected graph in CSR form, read from
OGB-style CSV files or generated with planted communities, and its train/valid/test
split."""

import os

import numpy as np

SPLIT = (0.6, 0.2, 0.2)    # train, valid, test shares of the labelled nodes


class Graph:
    """An undirected graph with node labels.

    edges: (m, 2) int64 node pairs as given (each undirected edge once); labels: (n,)
    int64, -1 for a node without a label; indptr/indices: the adjacency in CSR form,
    both directions, duplicates and self-loops dropped (node v's neighbours are
    indices[indptr[v]:indptr[v + 1]], sorted); train/valid/test: node ids."""

    def __init__(self, num_nodes, edges, labels, seed=0):
        self.num_nodes = int(num_nodes)
        self.edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.shape != (self.num_nodes,):
            raise ValueError(f"{self.labels.shape[0]} labels for {self.num_nodes} nodes")
        if self.edges.size and (self.edges.min() < 0 or self.edges.max() >= self.num_nodes):
            raise ValueError(f"edge ids outside [0, {self.num_nodes})")
        labelled = self.labels >= 0
        self.classes = int(self.labels.max()) + 1 if labelled.any() else 0
        self.indptr, self.indices = csr(self.num_nodes, self.edges)
        self.train, self.valid, self.test = split(np.flatnonzero(labelled), seed)

    def degrees(self):
        return np.diff(self.indptr)

    def summary(self):
        return (f"{self.num_nodes:,} nodes, {self.edges.shape[0]:,} edges, {self.classes} "
                f"classes; {len(self.train):,} train / {len(self.valid):,} valid / "
                f"{len(self.test):,} test nodes")


def csr(num_nodes, edges):
    """(indptr, indices) of the undirected graph: both directions of every edge, each
    neighbour once, no self-loops, neighbours sorted."""
    src = np.concatenate([edges[:, 0], edges[:, 1]])
    dst = np.concatenate([edges[:, 1], edges[:, 0]])
    keep = src != dst
    codes = np.unique(src[keep] * np.int64(num_nodes) + dst[keep])
    src, dst = codes // num_nodes, codes % num_nodes
    indptr = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=num_nodes), out=indptr[1:])
    return indptr, dst.astype(np.int64)


def split(labelled, seed, shares=SPLIT):
    """(train, valid, test) node ids: a permutation of `labelled` seeded by `seed`, cut
    by `shares`."""
    order = np.random.default_rng([seed, 7]).permutation(labelled)
    n_train = int(round(shares[0] * len(order)))
    n_valid = int(round(shares[1] * len(order)))
    return order[:n_train], order[n_train:n_train + n_valid], order[n_train + n_valid:]


def generate(nodes, edges, communities, p_in, exponent, seed):
    """(edges (m, 2) int64, labels (nodes,) int64) of a power-law graph with planted
    communities: node i's label is its community (communities of equal size, dealt at
    random); node weights are Pareto with tail index exponent - 1 (so degrees follow a
    power law of that exponent, Chung-Lu); an edge's first end is drawn by weight among
    all nodes, its second by weight among the first's community with probability p_in,
    else among all nodes. Self-loops and duplicates are dropped and more pairs drawn
    until there are `edges` distinct undirected edges (fewer only if the graph is too
    small to hold them)."""
    if not 1 <= communities <= nodes:
        raise ValueError(f"communities must be in [1, nodes], got {communities}")
    if not exponent > 1:
        raise ValueError(f"the degree exponent must be > 1, got {exponent}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(nodes) % communities
    weight = 1.0 + rng.pareto(exponent - 1.0, size=nodes)
    cdf = np.cumsum(weight)
    # Nodes sorted by community, with a cumulative weight: a draw in community c is a
    # uniform number in c's span of that cumulative sum, looked up by searchsorted.
    by_label = np.argsort(labels, kind="stable")
    by_cdf = np.cumsum(weight[by_label])
    bounds = np.searchsorted(labels[by_label], np.arange(communities + 1))
    low = np.r_[0.0, by_cdf][bounds[:-1]]
    high = by_cdf[bounds[1:] - 1]

    def draw_pairs(m):
        src = np.minimum(np.searchsorted(cdf, rng.random(m) * cdf[-1], side="right"),
                         nodes - 1)
        dst = np.minimum(np.searchsorted(cdf, rng.random(m) * cdf[-1], side="right"),
                         nodes - 1)
        inside = rng.random(m) < p_in
        c = labels[src[inside]]
        u = low[c] + rng.random(c.shape[0]) * (high[c] - low[c])
        dst[inside] = by_label[np.minimum(np.searchsorted(by_cdf, u, side="right"),
                                          nodes - 1)]
        return np.minimum(src, dst), np.maximum(src, dst)

    most = nodes * (nodes - 1) // 2
    target = min(int(edges), most)
    codes = np.empty(0, dtype=np.int64)
    for _ in range(20):
        if codes.shape[0] >= target:
            break
        a, b = draw_pairs(int(1.2 * (target - codes.shape[0])) + 16)
        keep = a != b
        codes = np.unique(np.concatenate([codes, a[keep] * np.int64(nodes) + b[keep]]))
    codes = rng.permutation(codes)[:target]
    pairs = np.column_stack([codes // nodes, codes % nodes])
    swap = rng.random(pairs.shape[0]) < 0.5   # no order within a pair
    pairs[swap] = pairs[swap][:, ::-1]
    return pairs.astype(np.int64), labels.astype(np.int64)


def _has_header(path):
    """Whether the file's first line is not numbers (a header to skip)."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    try:
        [float(x) for x in first.split(",") if x.strip()]
    except ValueError:
        return True
    return False


def read_edges(path):
    """The (m, 2) int64 node pairs of an edge-list CSV (`src,dst` per line; a header line
    is skipped; blank lines are ignored)."""
    skip = 1 if _has_header(path) else 0
    try:
        pairs = np.loadtxt(path, delimiter=",", dtype=np.int64, skiprows=skip, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: expected src,dst node ids per line ({exc})") from None
    if pairs.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if pairs.shape[1] != 2:
        raise ValueError(f"{path}: expected 2 columns (src,dst), found {pairs.shape[1]}")
    if pairs.min() < 0:
        raise ValueError(f"{path}: negative node id {pairs.min()}")
    return pairs


def read_labels(path):
    """The labels of a one-column CSV (line i: node i's integer label; a header line is
    skipped; an empty field or nan: no label, -1)."""
    skip = 1 if _has_header(path) else 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()[skip:]
    try:  # the usual case, fast: every line an integer
        labels = np.asarray(lines, dtype=str).astype(np.int64)
        if labels.size == 0 or labels.min() >= 0:
            return labels.reshape(-1)
    except ValueError:
        pass
    labels = np.empty(len(lines), dtype=np.int64)
    for number, line in enumerate(lines, 1 + skip):
        text = line.strip()
        if text == "" or text.lower() == "nan":
            labels[number - 1 - skip] = -1
            continue
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{path}:{number}: expected an integer label, got {line!r}") \
                from None
        if value != int(value) or value < 0:
            raise ValueError(f"{path}:{number}: expected an integer label >= 0, got {line!r}")
        labels[number - 1 - skip] = int(value)
    return labels


def write_csv(directory, edges, labels):
    """DIR/edges.csv (src,dst per line) and DIR/labels.csv (one label per line), no
    headers, as OGB's raw files."""
    os.makedirs(directory, exist_ok=True)
    np.savetxt(os.path.join(directory, "edges.csv"), edges, fmt="%d", delimiter=",")
    np.savetxt(os.path.join(directory, "labels.csv"), labels.reshape(-1, 1), fmt="%d")


def graph_from_files(edges_path, labels_path, seed):
    """The Graph of an edge-list CSV and a labels CSV: nodes are 0 .. max(id, label
    lines - 1); nodes past the labels file have no label."""
    edges = read_edges(edges_path)
    labels = read_labels(labels_path)
    n = max(len(labels), int(edges.max()) + 1 if edges.size else 0)
    if n > len(labels):
        labels = np.concatenate([labels, np.full(n - len(labels), -1, dtype=np.int64)])
    return Graph(n, edges, labels, seed)


def load_graph(opts):
    """The graph of the options: read from --edges/--labels, or generated."""
    if opts.get("edges"):
        return graph_from_files(opts["edges"], opts["labels"], opts["seed"])
    edges, labels = generate(opts["graph_nodes"], opts["graph_edges"], opts["communities"],
                             opts["p_in"], opts["exponent"], opts["seed"])
    return Graph(opts["graph_nodes"], edges, labels, opts["seed"])
