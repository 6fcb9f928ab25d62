"""Knowledge-graph embeddings (ComplEx) with negative sampling on a parameter server.

    python -m adapm.apps.kge --nodes 2 --workers-per-node 1
    adapm-launch --nodes 2 --num-keys 2016 --value-length 64 -m adapm.apps.kge
    python -m adapm.apps.kge --train-file train.tsv [--valid-file valid.tsv]
        [--test-file test.tsv] [--save-embeddings DIR]

Data: a knowledge graph of (head, relation, tail) triples, generated (entity degrees
follow a power law; each relation moves an entity's cluster by a fixed cyclic shift, with
some noise) or read from tab-separated files of `head<TAB>relation<TAB>tail` names
(train, valid and test files, as PyKEEN's datasets come; a split not given is held out of
the training file).
`--save-data DIR` writes the generated graph as DIR/train.tsv, DIR/valid.tsv and
DIR/test.tsv, so other systems can train on the same data.

Parameters: entities are keys [0, E), relations keys [E, E + R). A key's value is
[embedding (real | imaginary, 2 x dim) | AdaGrad accumulator (2 x dim)], so optimizer
state moves and replicates with its row. The score of a triple is ComplEx's
Re(<h, r, conj(t)>); the loss is the logistic loss of each training triple and of K
corrupted copies of it (its head or its tail replaced by a random entity), plus a small
L2 penalty. Each worker trains on its shard of the training triples by minibatch AdaGrad:
every batch pulls the rows it touches and hands every occurrence's gradient to the fused
AdaGrad of adapm.optim (the table sums duplicate keys' gradients and takes one step per
key in place, or at its owner; workers never overwrite each other). adapm.data's IntentLoader
announces each batch's keys ahead of its clock; the negatives come from
w.prepare_sample(..., key_range=(0, E)), drawn `--sample-ahead` clocks before the batch
that uses them, so that they are local when w.pull_sample reads them. The metric is the
filtered MRR and Hits@10 on the test triples (heads and tails ranked among all
entities; every known triple, of train, valid and test, filtered out, as PyKEEN does),
printed against the untrained model's; after each epoch the same on up to
--valid-sample validation triples. `--save-embeddings DIR` writes the trained
embeddings with their names (save_embeddings)."""

import json
import os
import time

import click
import numpy as np

from adapm.apps import readers
from adapm.apps.common import (
    AccessCounter,
    Progress,
    app_options,
    end_epoch,
    reports,
    save_worker_result,
    start_cluster,
    throughput_summary,
    zipf_ids,
)
from adapm.ml.data import IntentLoader
from adapm.table.initializers import initial_values
from adapm.table.optimizers import Adagrad

APP = "kge"
EVAL_CHUNK = 1024          # test triples scored against all entities at once
HITS_AT = 10
PULL_CHUNK = 65_536        # keys per pull when saving the embeddings


# -- data ------------------------------------------------------------------------------

class Graph:
    """Triples as int64 arrays of shape (n, 3): (head, relation, tail) with heads and
    tails in [0, entities), relations in [0, relations). Names: the strings of a file's
    ids (None for generated graphs, whose names are e0000, r00, ...)."""

    def __init__(self, entities, relations, train, valid, test, entity_names=None,
                 relation_names=None):
        self.entities, self.relations = int(entities), int(relations)
        self.train, self.valid, self.test = train, valid, test
        self.entity_names, self.relation_names = entity_names, relation_names

    def names(self):
        """(entity names, relation names) as string arrays indexed by id."""
        if self.entity_names is not None:
            return self.entity_names, self.relation_names
        return generated_names("e", self.entities), generated_names("r", self.relations)


def generated_names(prefix, n):
    """Zero-padded names, so that sorting the names sorts the ids."""
    width = len(str(max(n - 1, 0)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)])


def synthetic(entities, relations, triples, clusters, noise, seed, exponent=1.1):
    """About `triples` distinct triples (duplicates drawn are dropped) of a graph that
    ComplEx can learn:
    - every entity belongs to one of `clusters` clusters (of equal size);
    - relation r maps cluster c to cluster (c + shift_r) mod clusters: a permutation of
      the clusters that ComplEx represents exactly once dim >= clusters (cyclic shifts
      are diagonal in the Fourier basis), shifts drawn at random;
    - heads are drawn Zipf(exponent) by popularity, each entity at least once (so out-
      degrees follow a power law with minimum 1); the tail of (h, r, ?) is drawn by the
      same popularity among the entities of the cluster r maps h's cluster to (in-degrees
      follow a power law too), or, with probability `noise`, among all entities.
    Returns the triples, int64 (n, 3), in random order."""
    if not 1 <= clusters <= entities:
        raise ValueError(f"clusters must be in [1, entities], got {clusters}")
    rng = np.random.default_rng(seed)
    cluster = rng.permutation(entities) % clusters
    shift = rng.integers(1 if clusters > 1 else 0, max(clusters, 1), size=relations)
    popularity = np.empty(entities)
    popularity[rng.permutation(entities)] = 1.0 / np.arange(1, entities + 1) ** exponent
    # Entities sorted by cluster, with a cumulative popularity: a draw in cluster c is a
    # uniform number in c's span of the cumulative sum, looked up by searchsorted.
    by_cluster = np.argsort(cluster, kind="stable")
    cdf = np.cumsum(popularity[by_cluster])
    bounds = np.searchsorted(cluster[by_cluster], np.arange(clusters + 1))
    low = np.r_[0.0, cdf][bounds[:-1]]
    high = cdf[bounds[1:] - 1]
    extra = max(triples - entities, 0)
    heads = np.concatenate([rng.permutation(entities),
                            zipf_ids(rng, entities, extra, exponent)])[:max(triples, 0)]
    rels = rng.integers(0, relations, size=heads.shape[0])
    target = (cluster[heads] + shift[rels]) % clusters
    u = low[target] + rng.random(heads.shape[0]) * (high[target] - low[target])
    tails = by_cluster[np.minimum(np.searchsorted(cdf, u, side="right"), entities - 1)]
    noisy = rng.random(heads.shape[0]) < noise
    tails[noisy] = zipf_ids(rng, entities, int(noisy.sum()), exponent)
    found = np.unique(np.column_stack([heads, rels, tails]).astype(np.int64), axis=0)
    return found[rng.permutation(found.shape[0])]


def split(triples, valid_fraction, test_fraction, seed):
    """(train, valid, test): a random split by seed of the triples' rows."""
    order = np.random.default_rng([seed, 1]).permutation(triples.shape[0])
    n_test = int(round(test_fraction * triples.shape[0]))
    n_valid = int(round(valid_fraction * triples.shape[0]))
    return (triples[order[n_test + n_valid:]], triples[order[n_test:n_test + n_valid]],
            triples[order[:n_test]])


def read_tsv(path):
    """The (head, relation, tail) names of a tab-separated file, a string array (n, 3).
    Blank lines are skipped; any other line must have exactly three fields
    (adapm.apps.readers.read_triples)."""
    return readers.read_triples(path).names()


def write_tsv(path, triples, entity_names, relation_names):
    """Triples (ids) as a tab-separated file of names."""
    with open(path, "w", encoding="utf-8") as f:
        for h, r, t in zip(entity_names[triples[:, 0]], relation_names[triples[:, 1]],
                           entity_names[triples[:, 2]]):
            f.write(f"{h}\t{r}\t{t}\n")


def index_names(named):
    """Ids for a list of name arrays (n_i, 3): entities and relations numbered in the
    sorted order of their names, over all arrays. Returns (id arrays, entity names,
    relation names)."""
    if not named:
        raise ValueError("no triples given")
    entity_names = np.unique(np.concatenate([a[:, [0, 2]].reshape(-1) for a in named]))
    relation_names = np.unique(np.concatenate([a[:, 1] for a in named]))
    ids = []
    for a in named:
        ids.append(np.column_stack([np.searchsorted(entity_names, a[:, 0]),
                                    np.searchsorted(relation_names, a[:, 1]),
                                    np.searchsorted(entity_names, a[:, 2])]).astype(np.int64)
                   .reshape(-1, 3))
    return ids, entity_names, relation_names


def load_graph(opts):
    """The graph of the options: read from --train-file, --valid-file and --test-file
    (PyKEEN's and most benchmarks' layout: each file is its split; what is not given is
    held out of the training file at random by seed), or generated."""
    vf, tf = opts["valid_fraction"], opts["test_fraction"]
    if opts.get("train_file"):
        given = {part: opts.get(f"{part}_file") for part in ("train", "valid", "test")}
        files = {part: path for part, path in given.items() if path}
        # parsed once per machine: later reads (launched workers) memory-map the cache
        ids, entity_names, relation_names = readers.merge_triples(
            [readers.read_triples(path, cache=True) for path in files.values()])
        parts = dict(zip(files, ids))
        train, valid, test = split(parts["train"], 0.0 if "valid" in parts else vf,
                                   0.0 if "test" in parts else tf, opts["seed"])
        return Graph(len(entity_names), len(relation_names), train,
                     parts.get("valid", valid), parts.get("test", test), entity_names,
                     relation_names)
    triples = synthetic(opts["entities"], opts["relations"], opts["triples"],
                        opts["clusters"], opts["noise"], opts["seed"])
    return Graph(opts["entities"], opts["relations"], *split(triples, vf, tf, opts["seed"]))


# -- the model -------------------------------------------------------------------------

class ComplexInit:
    """Initial parameters: embedding ~ N(0, std) (seeded, as init=("normal", std, seed)),
    AdaGrad accumulator 0. Each key's value is [re (dim) | im (dim) | accumulator (2 dim)]."""

    def __init__(self, dim, std, seed):
        self.dim, self.std, self.seed = dim, std, seed

    def __call__(self, keys):
        width = 2 * self.dim
        lengths = np.full(len(keys), width, dtype=np.uint64)
        emb = initial_values(("normal", self.std, self.seed), keys, lengths, "float32")
        values = np.zeros((len(keys), 2 * width), dtype=np.float32)
        values[:, :width] = emb.reshape(-1, width)
        return values


def score_and_grads(h, r, t):
    """ComplEx: s = Re(<h, r, conj(t)>) over the last axis ([re | im] halves; arrays
    broadcast), and ds/dh, ds/dr, ds/dt in the same layout."""
    d = h.shape[-1] // 2
    hr, hi, rr, ri, tr, ti = h[..., :d], h[..., d:], r[..., :d], r[..., d:], t[..., :d], \
        t[..., d:]
    g_h = np.concatenate([rr * tr + ri * ti, rr * ti - ri * tr], axis=-1)
    g_t = np.concatenate([hr * rr - hi * ri, hr * ri + hi * rr], axis=-1)
    g_r = np.concatenate([hr * tr + hi * ti, hr * ti - hi * tr], axis=-1)
    s = (h * g_h).sum(axis=-1)
    return s, g_h, g_r, g_t


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def softplus(x):
    return np.logaddexp(0.0, x)


def batch_loss_and_grads(h, r, t, neg, corrupt_tail):
    """Logistic loss of B positives (rows of h, r, t: (B, 2 dim)) and of their K
    negatives each (neg: (B, K, 2 dim), replacing the tail where corrupt_tail (B, K), the
    head elsewhere), negatives weighted 1/K. Returns (loss, grad h, grad r, grad t,
    grad neg)."""
    k = neg.shape[1]
    tail = corrupt_tail[..., None]
    nh = np.where(tail, h[:, None], neg)
    nt = np.where(tail, neg, t[:, None])
    s_pos, gh, gr, gt = score_and_grads(h, r, t)
    s_neg, ngh, ngr, ngt = score_and_grads(nh, r[:, None], nt)
    loss = float(softplus(-s_pos).sum() + softplus(s_neg).sum() / k)
    c_pos = (-sigmoid(-s_pos))[:, None]
    c_neg = (sigmoid(s_neg) / k)[..., None]
    ngh, ngr, ngt = ngh * c_neg, ngr * c_neg, ngt * c_neg
    grad_h = c_pos * gh + np.where(tail, ngh, 0.0).sum(axis=1)
    grad_t = c_pos * gt + np.where(tail, 0.0, ngt).sum(axis=1)
    grad_r = c_pos * gr + ngr.sum(axis=1)
    grad_neg = np.where(tail, ngt, ngh)
    return loss, grad_h, grad_r, grad_t, grad_neg


ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's


def adagrad_step(w, triples, entities, handle, opts, rng, opt):
    """One minibatch of triples (ids): pull its rows and its negatives (pull_sample), hand
    every occurrence's gradient to the table's fused AdaGrad (`opt`, adapm.optim: one step
    per distinct key, duplicates summed there). The L2 penalty reg/2 |x|^2 counts once
    per key of the batch's triples, however often the key occurs in the batch (per
    occurrence, it would pull a relation, which occurs in a large share of every batch,
    to zero faster than the scattered early gradients of its triples move it). Returns the
    batch's loss."""
    b, k, dim = triples.shape[0], opts["negatives"], opts["dim"]
    width = 2 * dim
    pos_keys = batch_keys(triples, entities)
    neg_keys, neg_values = w.pull_sample(handle, b * k)
    pos_rows = w.pull_rows(pos_keys, opt)
    emb = np.concatenate([pos_rows, neg_values[:, :width]])
    corrupt_tail = rng.random((b, k)) < 0.5
    loss, gh, gr, gt, gn = batch_loss_and_grads(
        emb[:b], emb[b:2 * b], emb[2 * b:3 * b], emb[3 * b:].reshape(b, k, width),
        corrupt_tail)
    distinct, first = np.unique(pos_keys, return_index=True)
    penalised = pos_rows[first]
    loss += 0.5 * opts["reg"] * float((penalised * penalised).sum())
    w.apply_gradients(np.concatenate([pos_keys, neg_keys.astype(np.uint64), distinct]),
                      np.concatenate([gh, gr, gt, gn.reshape(b * k, width),
                                      opts["reg"] * penalised]), opt)
    return loss


def batch_keys(triples, entities):
    """[head keys | relation keys | tail keys] of a batch of triples."""
    return np.concatenate([triples[:, 0], entities + triples[:, 1],
                           triples[:, 2]]).astype(np.uint64)


# -- the metric ------------------------------------------------------------------------

class KnownTriples:
    """Every true triple (train, valid and test), for the filtered ranking: the tails
    known for each (head, relation) and the heads known for each (relation, tail)."""

    def __init__(self, graph):
        known = np.unique(np.concatenate([graph.train, graph.valid, graph.test]), axis=0)
        e, r = graph.entities, graph.relations
        self.tails = _Index(known[:, 0] * r + known[:, 1], known[:, 2])
        self.heads = _Index(known[:, 1] * e + known[:, 2], known[:, 0])
        self.entities, self.relations = e, r


class _Index:
    """Values grouped by integer code, for gathering all values of many codes at once."""

    def __init__(self, codes, values):
        order = np.argsort(codes, kind="stable")
        self.codes, self.values = codes[order], values[order]

    def pairs(self, queries):
        """(query positions, values): one pair per value known for each query's code."""
        lo = np.searchsorted(self.codes, queries, side="left")
        counts = np.searchsorted(self.codes, queries, side="right") - lo
        rows = np.repeat(np.arange(queries.shape[0]), counts)
        starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        return rows, self.values[starts + np.arange(rows.shape[0])]


def filtered_ranks(entity_emb, relation_emb, triples, known, chunk=EVAL_CHUNK):
    """Filtered ranks (1 = best) of the true tail of each (h, r, ?) and of the true head of
    each (?, r, t) among all entities, other known true triples left out. Ties count half
    (the mean of the optimistic and the pessimistic rank). Returns (tail ranks, head ranks)."""
    d = entity_emb.shape[1] // 2
    er, ei = entity_emb[:, :d], entity_emb[:, d:]
    tail_ranks, head_ranks = [], []
    for start in range(0, triples.shape[0], chunk):
        part = triples[start:start + chunk]
        h, rel, t = entity_emb[part[:, 0]], relation_emb[part[:, 1]], entity_emb[part[:, 2]]
        hr, hi, rr, ri = h[:, :d], h[:, d:], rel[:, :d], rel[:, d:]
        tr, ti = t[:, :d], t[:, d:]
        tail_scores = (hr * rr - hi * ri) @ er.T + (hr * ri + hi * rr) @ ei.T
        head_scores = (rr * tr + ri * ti) @ er.T + (rr * ti - ri * tr) @ ei.T
        tail_ranks.append(_ranks(tail_scores, part[:, 2], known.tails.pairs(
            part[:, 0] * known.relations + part[:, 1])))
        head_ranks.append(_ranks(head_scores, part[:, 0], known.heads.pairs(
            part[:, 1] * known.entities + part[:, 2])))
    empty = np.empty(0)
    return (np.concatenate(tail_ranks) if tail_ranks else empty,
            np.concatenate(head_ranks) if head_ranks else empty)


def _ranks(scores, truth, known_pairs):
    rows = np.arange(scores.shape[0])
    true = scores[rows, truth].copy()
    scores[known_pairs] = -np.inf   # the true entity is among them: only others count
    better = (scores > true[:, None]).sum(axis=1)
    ties = (scores == true[:, None]).sum(axis=1)
    return 1.0 + better + 0.5 * ties


def evaluate(table, graph, triples, known, dim):
    """(filtered MRR, Hits@10) over heads and tails of `triples`; `table` has pull()."""
    if triples.shape[0] == 0:
        return float("nan"), float("nan")
    values = table.pull(np.arange(graph.entities + graph.relations, dtype=np.uint64))
    emb = values[:, :2 * dim].astype(np.float64)
    ranks = np.concatenate(filtered_ranks(emb[:graph.entities], emb[graph.entities:],
                                          triples, known))
    return float((1.0 / ranks).mean()), float((ranks <= HITS_AT).mean())


# -- training --------------------------------------------------------------------------

def train(w, opts):
    """The task every worker runs. Returns a dict of results (see finish())."""
    graph = opts.get("graph") or load_graph(opts)
    e, dim, batch, k = graph.entities, opts["dim"], opts["batch"], opts["negatives"]
    mine = graph.train[w.rank::w.num_workers]
    known = KnownTriples(graph) if w.rank == 0 else None
    if w.rank == 0:
        print(f"[{APP}] {w.num_nodes} node(s) x {w.workers_per_node} worker(s), mode "
              f"{w.mode}", flush=True)
    valid = valid_sample(graph.valid, opts["valid_sample"], opts["seed"])
    before = evaluate(w, graph, graph.test, known, dim) if w.rank == 0 else None
    w.barrier()  # nobody trains before the untrained model is measured
    rng = np.random.default_rng([opts["seed"], 2, w.rank])
    opt = Adagrad(lr=opts["lr"], eps=ADAGRAD_EPS)  # [embedding | accumulators], fused
    steps_per_epoch = -(-mine.shape[0] // batch)
    first_clock = w.clock
    last_clock = first_clock + opts["epochs"] * steps_per_epoch  # exclusive
    ahead = opts["sample_ahead"]
    handles, prepared = {}, first_clock

    def prepare_until(clock):
        """Negatives for every clock before `clock` (and before the end of training)."""
        nonlocal prepared
        while prepared < min(clock, last_clock):
            handles[prepared] = w.prepare_sample(batch * k, prepared, key_range=(0, e))
            prepared += 1

    progress = Progress(APP, opts["epochs"] * mine.shape[0], unit="triples",
                        enabled=w.rank == 0)
    log, seconds, accesses = [], 0.0, AccessCounter()
    for epoch in range(opts["epochs"]):
        order = rng.permutation(mine.shape[0])
        batches = [mine[order[s:s + batch]] for s in range(0, mine.shape[0], batch)]
        loader = IntentLoader(w, batches, keys_of=lambda b: batch_keys(b, e),
                              lookahead=opts.get("lookahead"))
        accesses.begin(w)
        loss, t0 = 0.0, time.perf_counter()
        prepare_until(w.clock + ahead)
        for triples in loader:
            prepare_until(w.clock + ahead + 1)
            loss += adagrad_step(w, triples, e, handles.pop(w.clock), opts, rng, opt)
            progress.update(triples.shape[0], prefix=f"epoch {epoch + 1}: ")
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        end_epoch(w, accesses)
        if w.rank == 0:
            text = (f"epoch {epoch + 1}/{opts['epochs']}: "
                    f"{mine.shape[0] / max(elapsed, 1e-9):,.0f} data points (triples)/s per "
                    f"worker, loss {loss / max(mine.shape[0], 1):.4f}")
            if valid.shape[0]:
                mrr, hits = evaluate(w, graph, valid, known, dim)
                text += f", valid filtered MRR {mrr:.4f}, Hits@{HITS_AT} {hits:.4f}"
            print(f"[{APP}] {text}", flush=True)
            log.append(text)
        w.barrier()
    after = evaluate(w, graph, graph.test, known, dim) if w.rank == 0 else None
    if w.rank == 0 and opts.get("save_embeddings"):
        save_embeddings(opts["save_embeddings"], w, graph, dim)
    result = {"points": opts["epochs"] * mine.shape[0], "seconds": seconds, "before": before,
              "after": after, "log": log, "node": w.node, "num_workers": w.num_workers,
              "accesses": accesses.as_dict()}
    return save_worker_result(opts, w, result)


def valid_sample(valid, size, seed):
    """The validation triples ranked after every epoch: all of them, or a seeded choice
    of `size` (a file's first lines may be one relation's, or sorted)."""
    if valid.shape[0] <= size:
        return valid
    pick = np.random.default_rng([seed, 3]).choice(valid.shape[0], size, replace=False)
    return valid[np.sort(pick)]


def save_embeddings(folder, table, graph, dim):
    """The trained embeddings in `folder`: entities.npy (E, 2 dim) and relations.npy
    (R, 2 dim), float32, each row [real parts (dim) | imaginary parts (dim)];
    entities.tsv and relations.tsv, the names one per line in id order (row i of the
    .npy is the name on line i + 1); model.json: the model, dim, layout and score."""
    os.makedirs(folder, exist_ok=True)
    keys = np.arange(graph.entities + graph.relations, dtype=np.uint64)
    emb = np.concatenate([table.pull(keys[s:s + PULL_CHUNK])
                          for s in range(0, keys.shape[0], PULL_CHUNK)])[:, :2 * dim]
    entity_names, relation_names = graph.names()
    for part, rows, names in (("entities", emb[:graph.entities], entity_names),
                              ("relations", emb[graph.entities:], relation_names)):
        np.save(os.path.join(folder, f"{part}.npy"), np.ascontiguousarray(rows))
        with open(os.path.join(folder, f"{part}.tsv"), "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in names))
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump({"model": "ComplEx", "dim": dim, "entities": graph.entities,
                   "relations": graph.relations, "layout": "[real (dim) | imaginary (dim)]",
                   "score": "Re(sum(h * r * conj(t)))"}, f, indent=1)


def table_shape(graph, opts):
    """(num_keys, value_length) the app's table needs."""
    return graph.entities + graph.relations, 4 * opts["dim"]


def run(opts, nodes=1, workers_per_node=1, mode="adaptive", graph=None):
    """Train on a cluster (embedded, or the one adapm-launch started); returns the
    summary of finish() (None in launched workers other than rank 0). `graph`: the data,
    if already loaded (default: load_graph(opts))."""
    graph = graph if graph is not None else load_graph(opts)
    num_keys, value_length = table_shape(graph, opts)
    results = start_cluster(APP, train, dict(opts, graph=graph), num_keys, value_length,
                            ComplexInit(opts["dim"], opts["init_std"], opts["seed"]), nodes,
                            workers_per_node, mode)
    return None if results is None else finish(results)


def finish(results):
    """Summary over the workers' results: throughput, local share and bytes
    (common.throughput_summary) and filtered MRR and Hits@10 before and after training."""
    first = results[0]
    (mrr_before, hits_before), (mrr_after, hits_after) = first["before"], first["after"]
    return {**throughput_summary(results), "mrr_before": mrr_before,
            "hits10_before": hits_before, "mrr_after": mrr_after, "hits10_after": hits_after,
            "cluster_workers": first["num_workers"], "log": first["log"]}


DEFAULTS = dict(entities=2000, relations=16, triples=40_000, clusters=16, noise=0.05,
                dim=16, epochs=4, batch=256, negatives=8, lr=0.05, reg=0.02, init_std=0.1,
                sample_ahead=16, lookahead=None, valid_fraction=0.05, test_fraction=0.05,
                valid_sample=500, seed=0, save_embeddings=None)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@app_options(APP, seed_help="graph, split, initial values, shuffling")
@click.option("--entities", default=DEFAULTS["entities"], show_default=True,
              type=click.IntRange(min=1), help="entities of the generated graph")
@click.option("--relations", default=DEFAULTS["relations"], show_default=True,
              type=click.IntRange(min=1), help="relations of the generated graph")
@click.option("--triples", default=DEFAULTS["triples"], show_default=True,
              type=click.IntRange(min=1),
              help="triples drawn for the generated graph (duplicates are dropped)")
@click.option("--clusters", default=DEFAULTS["clusters"], show_default=True,
              type=click.IntRange(min=1), help="entity clusters of the generated graph")
@click.option("--noise", default=DEFAULTS["noise"], show_default=True,
              type=click.FloatRange(0, 1),
              help="share of generated triples whose tail ignores the pattern")
@click.option("--dim", default=DEFAULTS["dim"], show_default=True, type=click.IntRange(min=1),
              help="complex dimensions of an embedding (value length 4 x dim)")
@click.option("--epochs", default=DEFAULTS["epochs"], show_default=True,
              type=click.IntRange(min=0))
@click.option("--batch", default=DEFAULTS["batch"], show_default=True,
              type=click.IntRange(min=1), help="training triples per minibatch")
@click.option("--negatives", default=DEFAULTS["negatives"], show_default=True,
              type=click.IntRange(min=1), help="negatives per training triple")
@click.option("--lr", default=DEFAULTS["lr"], show_default=True, help="AdaGrad step size")
@click.option("--reg", default=DEFAULTS["reg"], show_default=True,
              help="L2 penalty (once per key of a batch)")
@click.option("--init-std", default=DEFAULTS["init_std"], show_default=True,
              help="standard deviation of the initial embeddings")
@click.option("--sample-ahead", default=DEFAULTS["sample_ahead"], show_default=True,
              type=click.IntRange(min=0),
              help="clocks before its batch at which a batch's negatives are drawn")
@click.option("--valid-fraction", default=DEFAULTS["valid_fraction"], show_default=True,
              type=click.FloatRange(0, 1),
              help="share held out for validation (not with --valid-file)")
@click.option("--test-fraction", default=DEFAULTS["test_fraction"], show_default=True,
              type=click.FloatRange(0, 1),
              help="share held out for testing (not with --test-file)")
@click.option("--valid-sample", default=DEFAULTS["valid_sample"], show_default=True,
              type=click.IntRange(min=0),
              help="validation triples ranked after each epoch, a seeded choice (0: none)")
@click.option("--train-file", type=click.Path(exists=True, dir_okay=False),
              help="training triples: head<TAB>relation<TAB>tail names per line")
@click.option("--valid-file", type=click.Path(exists=True, dir_okay=False),
              help="validation triples, same format (default: --valid-fraction of "
                   "--train-file)")
@click.option("--test-file", type=click.Path(exists=True, dir_okay=False),
              help="test triples, same format (default: --test-fraction of --train-file)")
@click.option("--save-data", type=click.Path(file_okay=False),
              help="write the graph to DIR/train.tsv, DIR/valid.tsv and DIR/test.tsv")
@click.option("--save-embeddings", type=click.Path(file_okay=False),
              help="write the trained embeddings to DIR: entities.npy and relations.npy "
                   "([real | imaginary] rows), their names in entities.tsv and "
                   "relations.tsv, model.json")
def main(nodes, workers_per_node, mode, save_data, json_path, **options):
    """Train ComplEx knowledge-graph embeddings; report filtered MRR and Hits@10."""
    for part in ("valid", "test"):
        if options[f"{part}_file"] and not options["train_file"]:
            raise click.UsageError(f"--{part}-file needs --train-file")
    if options["valid_fraction"] + options["test_fraction"] >= 1:
        raise click.UsageError("--valid-fraction plus --test-fraction must be below 1")
    if options["clusters"] > options["entities"]:
        raise click.UsageError("--clusters cannot exceed --entities")
    opts = dict(DEFAULTS, **options)
    try:
        graph = load_graph(opts)
    except ValueError as exc:  # a malformed file
        raise click.UsageError(str(exc)) from None
    if graph.test.shape[0] == 0:
        raise click.UsageError("no test triples: give --test-file or a --test-fraction "
                               "that holds some out")
    reporting = reports()
    if save_data and reporting:
        save(graph, save_data)
    source = opts["train_file"] or "generated graph"
    if reporting:
        print(f"[{APP}] {source}: {graph.entities:,} entities, {graph.relations:,} "
              f"relations, {graph.train.shape[0]:,} training / {graph.valid.shape[0]:,} "
              f"valid / {graph.test.shape[0]:,} test triples; ComplEx dim {opts['dim']}, "
              f"{opts['negatives']} negatives per triple", flush=True)
    start = time.perf_counter()
    summary = run(opts, nodes, workers_per_node, mode, graph=graph)
    if summary is None:
        return  # a launched worker other than rank 0: rank 0 reports
    partial = "" if summary["workers"] == summary["cluster_workers"] else \
        " (worker 0's own figures; --worker-json collects every worker's)"
    print(f"[{APP}] done in {time.perf_counter() - start:.1f} s: "
          f"{summary['data_points_per_s']:,.0f} data points (triples)/s; "
          f"{summary['local_share']:.1%} of key accesses local in training, "
          f"{summary['bytes_sent'] / 1e6:.1f} MB sent between nodes{partial}", flush=True)
    print(f"[{APP}] test filtered MRR {summary['mrr_after']:.4f}, Hits@{HITS_AT} "
          f"{summary['hits10_after']:.4f} (untrained: {summary['mrr_before']:.4f}, "
          f"{summary['hits10_before']:.4f})", flush=True)
    if opts["save_embeddings"]:
        print(f"[{APP}] wrote the embeddings to {opts['save_embeddings']}", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=1)
    if not summary["mrr_after"] > summary["mrr_before"]:
        raise SystemExit(f"[{APP}] training did not improve the test MRR")


def save(graph, folder):
    os.makedirs(folder, exist_ok=True)
    entity_names, relation_names = graph.names()
    for name in ("train", "valid", "test"):
        write_tsv(os.path.join(folder, f"{name}.tsv"), getattr(graph, name), entity_names,
                  relation_names)
    print(f"[{APP}] wrote {folder}/train.tsv, valid.tsv and test.tsv", flush=True)


if __name__ == "__main__":
    main()
