"""Node classification with GraphSAGE on sampled neighbourhoods, the node embeddings in
the parameter server and the dense layers under torch.distributed (needs
`pip install 'adapm[torch]'`).

    python -m adapm.apps.gnn                                   # 2 nodes x 1 worker, generated graph
    python -m adapm.apps.gnn --edges edges.csv --labels labels.csv
    python -m adapm.apps.gnn --plain                           # one process, torch.nn.Embedding
    adapm-launch --nodes 2 --num-keys 50000 --value-length 64 -m adapm.apps.gnn

Data: an undirected graph with one class label per node, OGB-style CSV files
(`--edges FILE`: one `src,dst` pair of node ids per line; `--labels FILE`: one integer
label per line, line i for node i; a header line of either is skipped), or generated: a
power-law graph with planted communities (Chung-Lu degrees from Pareto weights, most
edges inside a node's community; the label is the community). `--save-data DIR` writes
the generated graph as DIR/edges.csv and DIR/labels.csv. The labelled nodes are split
60/20/20 into train/valid/test by a permutation seeded by `--seed`.

Model: every node has a learnable embedding of `--dim` (its features), a row of
adapm.torch.Embedding whose Adagrad state lives beside it in the parameter server (fused
optimizer: backward applies the step). A two-layer GraphSAGE with mean aggregation maps a
node's sampled 2-hop neighbourhood (`--fanouts` 10,5 neighbours, drawn with replacement;
a node without neighbours stands in for itself) to class logits:
h = relu(W1 [x_v | mean x_u]), logits = W2 [h_v | mean h_u]. W1 and W2 are an ordinary
torch module, wrapped in DistributedDataParallel over all the cluster's workers. Each
minibatch's whole 2-hop sample is fetched by one Embedding call; the neighbourhoods are
sampled when IntentLoader reads the batch ahead, and that sample is used when the batch
is trained, so the intent names exactly the keys used. The metric is the accuracy on the
test (and valid) nodes, against the untrained model's."""

import functools
import json
import time

import click
import numpy as np
import torch

from adapm.apps.common import (
    AccessCounter,
    Progress,
    app_options,
    end_epoch,
    launched,
    reports,
    save_worker_result,
    start_cluster,
    throughput_summary,
)
from adapm.apps.gnn_graph import load_graph, write_csv
from adapm.apps.gnn_model import accuracy, sage_module, sample_batch
from adapm.ml.data import IntentLoader
from adapm.table.optimizers import Adagrad

APP = "gnn"


# -- training --------------------------------------------------------------------------

def epoch_batches(graph, nodes, batch, fanouts, rng):
    """The epoch's minibatches in a random order, each sampled when it is read (by the
    IntentLoader, ahead of its use)."""
    order = rng.permutation(nodes)
    for lo in range(0, len(order), batch):
        yield sample_batch(graph, order[lo:lo + batch], fanouts, rng)


class _Batches:
    """A sized iterable over a generator (IntentLoader's len())."""

    def __init__(self, count, make):
        self.count, self.make = count, make

    def __len__(self):
        return self.count

    def __iter__(self):
        return self.make()


def my_nodes(graph, rank, workers):
    """This worker's training nodes: equal shares of the (already shuffled) train split,
    so that every worker runs the same number of steps (DDP's all-reduce pairs them)."""
    share = len(graph.train) // workers
    return graph.train[rank * share:(rank + 1) * share]


def train(w, opts):
    """The task every worker runs. Returns a dict of results (see finish())."""
    import adapm.ml.torch
    torch.set_num_threads(1)
    graph = opts.get("graph") or load_graph(opts)
    dim, fanouts, batch = opts["dim"], tuple(opts["fanouts"]), opts["batch"]
    mine = my_nodes(graph, w.rank, w.num_workers)
    emb = adapm.ml.torch.Embedding(w, graph.num_nodes, dim, optimizer=Adagrad(lr=opts["lr"]))
    sage = sage_module(dim, opts["hidden"], graph.classes, opts["seed"])
    distributed = w.num_workers > 1
    if distributed:  # adapm.run and adapm-launch set MASTER_ADDR, RANK, WORLD_SIZE, ...
        torch.distributed.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(sage) if distributed else sage
    dense_opt = torch.optim.Adagrad(model.parameters(), lr=opts["lr"])
    loss_fn = torch.nn.CrossEntropyLoss()

    def predict(b):  # evaluation: the module itself, no DDP
        return sage(emb(torch.from_numpy(b.ids)), len(b), b.fanouts)

    def evaluate():
        return (accuracy(predict, graph, graph.test, fanouts),
                accuracy(predict, graph, graph.valid, fanouts))

    before = evaluate() if w.rank == 0 else None
    w.barrier()  # nobody trains before the untrained model is measured
    progress = Progress(APP, opts["epochs"] * len(mine), unit="samples", enabled=w.rank == 0)
    log, seconds, accesses = [], 0.0, AccessCounter()
    steps = -(-len(mine) // batch)
    for epoch in range(opts["epochs"]):
        rng = np.random.default_rng([opts["seed"], 3, w.rank, epoch])
        batches = _Batches(steps, functools.partial(epoch_batches, graph, mine, batch,
                                                    fanouts, rng))
        loader = IntentLoader(w, batches, keys_of=lambda b: emb.keys_of(b.ids),
                              lookahead=opts.get("lookahead"))
        accesses.begin(w)
        total_loss, t0 = 0.0, time.perf_counter()
        for b in loader:
            logits = model(emb(torch.from_numpy(b.ids)), len(b), b.fanouts)
            loss = loss_fn(logits, torch.from_numpy(b.labels))
            dense_opt.zero_grad()
            loss.backward()   # DDP averages W1, W2's gradients; the rows step in the table
            dense_opt.step()
            total_loss += loss.item() * len(b)
            progress.update(len(b), prefix=f"epoch {epoch + 1}: ")
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        end_epoch(w, accesses)
        if w.rank == 0:
            valid = accuracy(predict, graph, graph.valid, fanouts)
            text = (f"epoch {epoch + 1}/{opts['epochs']}: "
                    f"{len(mine) / max(elapsed, 1e-9):,.0f} samples (nodes)/s per worker, "
                    f"loss {total_loss / max(len(mine), 1):.4f}, valid accuracy {valid:.4f}")
            print(f"[{APP}] {text}", flush=True)
            log.append(text)
        w.barrier()
    after = evaluate() if w.rank == 0 else None
    if distributed:
        torch.distributed.destroy_process_group()
    result = {"points": opts["epochs"] * len(mine), "seconds": seconds, "before": before,
              "after": after, "log": log, "node": w.node, "num_workers": w.num_workers,
              "accesses": accesses.as_dict()}
    return save_worker_result(opts, w, result)


def table_init(opts):
    """The table's initial values: rows N(0, --init-std) seeded by --seed (the same on any
    number of nodes), Adagrad accumulators 0. The table's value_length is bound here, so
    that the same callable serves adapm.run and the launched workers' own writes."""
    opt = Adagrad(lr=opts["lr"])
    return functools.partial(opt.init(("normal", opts["init_std"], opts["seed"])),
                             value_length=opt.value_length(opts["dim"]))


def table_shape(graph, opts):
    """(num_keys, value_length) the app's table needs: a row per node, [row | accumulator]."""
    return graph.num_nodes, Adagrad(lr=opts["lr"]).value_length(opts["dim"])


def run(opts, nodes=2, workers_per_node=1, mode="adaptive", graph=None):
    """Train on a cluster (embedded, or the one adapm-launch started); returns the summary
    of finish() (None in launched workers other than rank 0)."""
    graph = graph if graph is not None else load_graph(opts)
    num_keys, value_length = table_shape(graph, opts)
    results = start_cluster(APP, train, dict(opts, graph=graph), num_keys, value_length,
                            table_init(opts), nodes, workers_per_node, mode)
    return None if results is None else finish(results)


def finish(results):
    """Summary over the workers' results: throughput, local share and bytes
    (common.throughput_summary) and the test and valid accuracy before and after."""
    first = results[0]
    (test_before, valid_before), (test_after, valid_after) = first["before"], first["after"]
    return {**throughput_summary(results), "accuracy_before": test_before,
            "accuracy_after": test_after, "valid_accuracy_before": valid_before,
            "valid_accuracy_after": valid_after, "cluster_workers": first["num_workers"],
            "log": first["log"]}


def train_plain(opts, graph=None):
    """The same model in this process with torch.nn.Embedding (sparse gradients) and
    torch.optim.Adagrad, no parameter server; the same initial values, and the samples of
    a one-worker run."""
    torch.set_num_threads(1)
    torch.sparse.check_sparse_tensor_invariants.disable()  # torch's default, said aloud
    graph = graph if graph is not None else load_graph(opts)
    dim, fanouts, batch = opts["dim"], tuple(opts["fanouts"]), opts["batch"]
    num_keys, value_length = table_shape(graph, opts)
    start = table_init(opts)(np.arange(num_keys, dtype=np.uint64))
    emb = torch.nn.Embedding(num_keys, dim, sparse=True)
    emb.weight.data = torch.from_numpy(np.ascontiguousarray(start[:, :dim], dtype=np.float32))
    sage = sage_module(dim, opts["hidden"], graph.classes, opts["seed"])
    sparse_opt = torch.optim.Adagrad(emb.parameters(), lr=opts["lr"])
    dense_opt = torch.optim.Adagrad(sage.parameters(), lr=opts["lr"])
    loss_fn = torch.nn.CrossEntropyLoss()

    def predict(b):
        return sage(emb(torch.from_numpy(b.ids)), len(b), b.fanouts)

    before = (accuracy(predict, graph, graph.test, fanouts),
              accuracy(predict, graph, graph.valid, fanouts))
    mine = my_nodes(graph, 0, 1)
    progress = Progress(APP, opts["epochs"] * len(mine), unit="samples")
    seconds, log = 0.0, []
    for epoch in range(opts["epochs"]):
        rng = np.random.default_rng([opts["seed"], 3, 0, epoch])
        total_loss, t0 = 0.0, time.perf_counter()
        for b in epoch_batches(graph, mine, batch, fanouts, rng):
            loss = loss_fn(sage(emb(torch.from_numpy(b.ids)), len(b), b.fanouts),
                           torch.from_numpy(b.labels))
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
            total_loss += loss.item() * len(b)
            progress.update(len(b), prefix=f"epoch {epoch + 1}: ")
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        valid = accuracy(predict, graph, graph.valid, fanouts)
        text = (f"plain epoch {epoch + 1}/{opts['epochs']}: "
                f"{len(mine) / max(elapsed, 1e-9):,.0f} samples (nodes)/s, "
                f"loss {total_loss / max(len(mine), 1):.4f}, valid accuracy {valid:.4f}")
        print(f"[{APP}] {text}", flush=True)
        log.append(text)
    after = (accuracy(predict, graph, graph.test, fanouts),
             accuracy(predict, graph, graph.valid, fanouts))
    points = opts["epochs"] * len(mine)
    return {"data_points_per_s": points / max(seconds, 1e-9), "points": points,
            "seconds": seconds, "workers": 1, "accuracy_before": before[0],
            "accuracy_after": after[0], "valid_accuracy_before": before[1],
            "valid_accuracy_after": after[1], "log": log}


def parse_fanouts(text):
    """'10,5' -> (10, 5): neighbours sampled per node at hop 1 and at hop 2."""
    try:
        fanouts = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        fanouts = ()
    if len(fanouts) != 2 or min(fanouts) < 1:
        raise ValueError(f"--fanouts must be two integers >= 1 like 10,5, got {text!r}")
    return fanouts


DEFAULTS = dict(graph_nodes=50_000, graph_edges=250_000, communities=16, p_in=0.7,
                exponent=2.5, dim=32, hidden=64, fanouts=(10, 5), epochs=2, batch=256,
                lr=0.05, init_std=0.1, lookahead=None, seed=0, edges=None, labels=None,
                worker_json=None)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@app_options(APP, seed_help="graph, split, initial values, samples")
@click.option("--graph-nodes", default=DEFAULTS["graph_nodes"], show_default=True,
              type=click.IntRange(min=2), help="nodes of the generated graph")
@click.option("--graph-edges", default=DEFAULTS["graph_edges"], show_default=True,
              type=click.IntRange(min=0), help="undirected edges of the generated graph")
@click.option("--communities", default=DEFAULTS["communities"], show_default=True,
              type=click.IntRange(min=1), help="planted communities (the classes)")
@click.option("--p-in", default=DEFAULTS["p_in"], show_default=True,
              type=click.FloatRange(0, 1),
              help="share of generated edges drawn inside a node's community")
@click.option("--exponent", default=DEFAULTS["exponent"], show_default=True,
              type=click.FloatRange(min=1, min_open=True),
              help="power-law exponent of the generated degrees")
@click.option("--dim", default=DEFAULTS["dim"], show_default=True, type=click.IntRange(min=1),
              help="node embedding dimension (value length 2 x dim: row and Adagrad state)")
@click.option("--hidden", default=DEFAULTS["hidden"], show_default=True,
              type=click.IntRange(min=1), help="width of the hidden GraphSAGE layer")
@click.option("--fanouts", default="10,5", show_default=True,
              help="neighbours sampled per node at hop 1 and hop 2")
@click.option("--epochs", default=DEFAULTS["epochs"], show_default=True,
              type=click.IntRange(min=0))
@click.option("--batch", default=DEFAULTS["batch"], show_default=True,
              type=click.IntRange(min=1), help="target nodes per minibatch")
@click.option("--lr", default=DEFAULTS["lr"], show_default=True,
              help="Adagrad's, embeddings and dense layers")
@click.option("--init-std", default=DEFAULTS["init_std"], show_default=True,
              help="standard deviation of the initial embeddings")
@click.option("--edges", type=click.Path(exists=True, dir_okay=False),
              help="edge list CSV: src,dst node ids per line (undirected)")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="labels CSV: one integer per line, line i for node i")
@click.option("--save-data", type=click.Path(file_okay=False),
              help="write the generated graph to DIR/edges.csv and DIR/labels.csv")
@click.option("--plain", is_flag=True,
              help="the same model in this process with torch.nn.Embedding, no PS")
def main(nodes, workers_per_node, mode, fanouts, save_data, plain, json_path, **options):
    """Train GraphSAGE node classification; report test accuracy."""
    if bool(options["edges"]) != bool(options["labels"]):
        raise click.UsageError("--edges and --labels go together")
    if options["communities"] > options["graph_nodes"]:
        raise click.UsageError("--communities cannot exceed --graph-nodes")
    try:
        opts = dict(DEFAULTS, **options, fanouts=parse_fanouts(fanouts))
        graph = load_graph(opts)
    except ValueError as exc:  # a malformed file or option
        raise click.UsageError(str(exc)) from None
    if len(graph.test) == 0 or len(graph.train) == 0:
        raise click.UsageError("too few labelled nodes to split into train/valid/test")
    reporting = reports()
    if save_data and reporting:
        write_csv(save_data, graph.edges, graph.labels)
        print(f"[{APP}] wrote {save_data}/edges.csv and labels.csv", flush=True)
    if plain:
        where = "one process, torch.nn.Embedding, no parameter server"
    elif launched():
        where = "the cluster adapm-launch started"
    else:
        where = f"{nodes} node(s) x {workers_per_node} worker(s), mode {mode}"
    if reporting:
        source = options["edges"] or "generated graph"
        print(f"[{APP}] {source}: {graph.summary()}; GraphSAGE dim {opts['dim']}, hidden "
              f"{opts['hidden']}, fanouts {opts['fanouts'][0]},{opts['fanouts'][1]}; {where}",
              flush=True)
    start = time.perf_counter()
    if plain:
        summary = train_plain(opts, graph)
    else:
        summary = run(opts, nodes, workers_per_node, mode, graph=graph)
    if summary is None:
        return  # a launched worker other than rank 0: rank 0 reports
    summary["wall_seconds"] = time.perf_counter() - start
    partial = "" if summary["workers"] == summary.get("cluster_workers", 1) else \
        " (worker 0's own figures; --worker-json collects every worker's)"
    traffic = "" if plain else (f"; {summary['local_share']:.1%} of key accesses local in "
                                f"training, {summary['bytes_sent'] / 1e6:.1f} MB sent "
                                "between nodes")
    print(f"[{APP}] done in {summary['wall_seconds']:.1f} s: "
          f"{summary['data_points_per_s']:,.0f} samples (nodes)/s{traffic}{partial}",
          flush=True)
    print(f"[{APP}] test accuracy {summary['accuracy_after']:.4f} (untrained: "
          f"{summary['accuracy_before']:.4f}), valid {summary['valid_accuracy_after']:.4f} "
          f"(untrained: {summary['valid_accuracy_before']:.4f})", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=1)
    if opts["epochs"] > 0 and not summary["accuracy_after"] > summary["accuracy_before"]:
        raise SystemExit(f"[{APP}] training did not improve the test accuracy")


if __name__ == "__main__":
    main()
