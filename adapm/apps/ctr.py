"""Click-through-rate prediction, DLRM-style, with its embedding tables in the parameter
server and its MLPs under torch.distributed (needs `pip install 'adapm[torch]'`).

    python -m adapm.apps.ctr                    # 2 nodes x 1 worker, generated clicks
    python -m adapm.apps.ctr --data train.tsv   # Criteo-format TSV
    python -m adapm.apps.ctr --plain            # one process, torch.nn.EmbeddingBag
    adapm-launch --nodes 2 --num-keys 1000000 --value-length 32 -m adapm.apps.ctr

Data: Criteo format (label, 13 integer features, 26 categorical hex features, tab
separated, empty fields allowed; `--data FILE [--test-data FILE]`), or generated clicks
with a planted signal (`--save-data DIR` writes them as DIR/train.tsv and DIR/test.tsv in
that format, so other systems can train on the same data): every field's ids are Zipf
distributed, some fields hold several ids per sample (multi-hot bags), and the click
probability is a logistic function of per-id weights and of the dense features.

Model: every (field, id) is hashed into one table of `--buckets` rows (feature hashing:
arbitrary ids, a fixed memory; collisions are documented in docs/torch.md); each sample's
ids of a field are pooled into one vector by adapm.torch.EmbeddingBag (mode sum), whose
rows and Adagrad state live in the parameter server (fused optimizer: backward applies
the step, no torch.optim for them). The dense features go through a bottom MLP; the
pooled fields and its output through a top MLP to one logit. The MLPs are ordinary torch
modules, wrapped in DistributedDataParallel over all the cluster's workers (the launcher
sets torch.distributed's environment), so every worker's copy stays identical.
IntentLoader announces each minibatch's rows ahead. The metrics are test AUC and log
loss, against the untrained model's."""

import json
import os
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
    zipf_ids,
)
from adapm.ml.data import IntentLoader
from adapm.table.initializers import _splitmix64
from adapm.table.optimizers import Adagrad

APP = "ctr"
DENSE = 13         # dense features per sample (Criteo's)
FIELDS = 26        # categorical fields per sample (Criteo's)
HIDDEN = 64


# -- data ------------------------------------------------------------------------------

class Clicks:
    """Samples as flat arrays: labels (n,), dense (n, 13) float32, and the categorical
    ids of each (sample, field) bag: ids (total,) int64 hashed into [0, buckets),
    lengths (n, fields) (ids per bag), starts (n + 1,) (where each sample's ids begin)."""

    def __init__(self, labels, dense, ids, lengths):
        self.labels = labels.astype(np.float32)
        self.dense = dense.astype(np.float32)
        self.ids = ids.astype(np.int64)
        self.lengths = lengths.astype(np.int64)
        per_sample = self.lengths.sum(axis=1)
        self.starts = np.concatenate([[0], np.cumsum(per_sample)])

    def __len__(self):
        return self.labels.shape[0]

    @property
    def fields(self):
        return self.lengths.shape[1]

    def batch(self, lo, hi):
        """Samples [lo, hi): (labels, dense, ids, offsets of the (sample, field) bags)."""
        lengths = self.lengths[lo:hi].reshape(-1)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if lengths.size else lengths
        return (self.labels[lo:hi], self.dense[lo:hi],
                self.ids[self.starts[lo]:self.starts[hi]], offsets)

    def part(self, lo, hi):
        return Clicks(self.labels[lo:hi], self.dense[lo:hi],
                      self.ids[self.starts[lo]:self.starts[hi]], self.lengths[lo:hi])


def hash_features(fields, raw, buckets):
    """(field, raw id) -> row in [0, buckets): one hash over both, so equal raw ids of
    different fields are different features."""
    mixed = (np.asarray(raw).astype(np.uint64) * np.uint64(FIELDS + 1)) + \
        np.asarray(fields).astype(np.uint64)
    return (_splitmix64(mixed) % np.uint64(buckets)).astype(np.int64)


def generate(n, fields, vocab, max_bag, buckets, seed):
    """Clicks with a planted signal: logit = sum over fields of the mean weight of the
    bag's ids (weights ~ N(0, 0.6)) + dense features . beta - 1, so about 30% click."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 0.6, size=(fields, vocab))
    beta = rng.normal(0.0, 0.3, size=DENSE)
    lengths = rng.integers(1, max_bag + 1, size=(n, fields))
    lengths[:, : fields // 2] = 1          # half the fields one-hot, as Criteo's
    field_of = np.repeat(np.tile(np.arange(fields), n), lengths.reshape(-1))
    raw = zipf_ids(rng, vocab, field_of.shape[0])
    bag_of = np.repeat(np.arange(n * fields), lengths.reshape(-1))
    bag_sum = np.bincount(bag_of, weights=weights[field_of, raw], minlength=n * fields)
    signal = (bag_sum / lengths.reshape(-1)).reshape(n, fields).sum(axis=1)
    dense = rng.exponential(1.0, size=(n, DENSE))
    logit = signal + np.log1p(dense) @ beta - 1.0
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return Clicks(labels, np.log1p(dense), hash_features(field_of, raw, buckets), lengths), \
        (field_of, raw)


def from_criteo(path, buckets):
    """A Criteo TSV (adapm.apps.readers.read_criteo) as Clicks: one id per (sample, field),
    dense features as log(1 + max(x, 0))."""
    from adapm.apps.readers import read_criteo
    labels, dense, sparse = read_criteo(path, cache=True)  # parsed once per machine
    n, fields = sparse.shape
    field_of = np.tile(np.arange(fields), n)
    ids = hash_features(field_of, sparse.reshape(-1), buckets)
    dense = np.log1p(np.maximum(dense.astype(np.float64), 0.0))
    return Clicks(labels, dense, ids, np.ones((n, fields), dtype=np.int64))


def save_criteo(path, clicks, raw):
    """Write generated clicks in Criteo's format (categorical ids as hex of field and
    raw id, so a reader hashes them back to the same features)."""
    field_of, raw_ids = raw
    one_hot = (clicks.lengths == 1).all(axis=0)
    with open(path, "w") as f:
        for i in range(len(clicks)):
            lo = clicks.starts[i]
            dense = "\t".join(str(int(round(np.expm1(x)))) for x in clicks.dense[i])
            cats, pos = [], lo
            for field in range(FIELDS):
                if field < clicks.fields and one_hot[field]:
                    cats.append(f"{int(raw_ids[pos]):x}")
                    pos += 1
                elif field < clicks.fields:  # a multi-hot bag: its first id only
                    cats.append(f"{int(raw_ids[pos]):x}")
                    pos += int(clicks.lengths[i, field])
                else:
                    cats.append("")
            f.write(f"{int(clicks.labels[i])}\t{dense}\t" + "\t".join(cats) + "\n")


def load_data(opts):
    """(train Clicks, test Clicks) from --data/--test-data or generated."""
    if opts.get("data"):
        clicks = from_criteo(opts["data"], opts["buckets"])
        if opts.get("test_data"):
            return clicks, from_criteo(opts["test_data"], opts["buckets"])
        cut = int(len(clicks) * 0.9)
        return clicks.part(0, cut), clicks.part(cut, len(clicks))
    clicks, _ = generate(opts["train"] + opts["test"], opts["fields"], opts["vocab"],
                         opts["max_bag"], opts["buckets"], opts["seed"])
    n = opts["train"]
    return clicks.part(0, n), clicks.part(n, len(clicks))


# -- the model -------------------------------------------------------------------------

class DenseTower(torch.nn.Module):
    """The dense part: a bottom MLP (dense features -> dim) and a top MLP (the pooled
    fields and the bottom's output -> one logit)."""

    def __init__(self, fields, dim):
        super().__init__()
        nn = torch.nn
        self.fields, self.dim = fields, dim
        self.bottom = nn.Sequential(nn.Linear(DENSE, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, dim))
        self.top = nn.Sequential(nn.Linear((fields + 1) * dim, HIDDEN), nn.ReLU(),
                                 nn.Linear(HIDDEN, 1))

    def forward(self, pooled, dense):
        """pooled: (n * fields, dim) bags; dense: (n, 13) -> (n,) logits."""
        n = dense.shape[0]
        features = torch.cat([pooled.reshape(n, self.fields * self.dim), self.bottom(dense)],
                             dim=1)
        return self.top(features).reshape(-1)


def dense_tower(fields, dim, seed):
    """The same seed in every worker: DDP then starts from identical copies (and checks)."""
    torch.manual_seed(seed)
    return DenseTower(fields, dim)


def auc(labels, scores):
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    labels = np.asarray(labels) > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = np.asarray(scores)[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for lo, hi in zip(starts, ends):  # average ranks of ties
        ranks[order[lo:hi]] = (lo + hi + 1) / 2.0
    return float((ranks[labels].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))


def log_loss(labels, probabilities):
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def evaluate(predict, test, batch=8192):
    """(AUC, log loss) of predict(dense, ids, offsets) -> probabilities."""
    probabilities = []
    with torch.no_grad():
        for lo in range(0, len(test), batch):
            _, dense, ids, offsets = test.batch(lo, min(lo + batch, len(test)))
            probabilities.append(predict(dense, ids, offsets))
    p = np.concatenate(probabilities) if probabilities else np.empty(0)
    return auc(test.labels, p), log_loss(test.labels, p)


# -- training --------------------------------------------------------------------------

def batch_starts(n, batch, rng):
    """Minibatch starts in a random order (samples were shuffled when generated)."""
    return rng.permutation(np.arange(0, n, batch))


def train(w, opts):
    """The task every worker runs. Returns a dict of results (see finish())."""
    import adapm.ml.torch
    torch.set_num_threads(1)
    train_set, test = load_data(opts)
    share = len(train_set) // w.num_workers
    mine = train_set.part(w.rank * share, (w.rank + 1) * share)
    dim, fields = opts["dim"], train_set.fields
    bag = adapm.ml.torch.EmbeddingBag(w, opts["buckets"], dim, mode="sum",
                                      optimizer=Adagrad(lr=opts["lr"]))
    tower = dense_tower(fields, dim, opts["seed"])
    distributed = w.num_workers > 1
    if distributed:  # the launcher set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
        torch.distributed.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(tower) if distributed else tower
    dense_opt = torch.optim.Adagrad(model.parameters(), lr=opts["lr"])
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def predict(dense, ids, offsets):  # evaluation: the tower itself, no DDP
        pooled = bag(torch.from_numpy(ids), offsets=torch.from_numpy(offsets))
        return torch.sigmoid(tower(pooled, torch.from_numpy(dense))).numpy()

    before = evaluate(predict, test) if w.rank == 0 else None
    w.barrier()
    rng = np.random.default_rng(opts["seed"] + 1 + w.rank)
    progress = Progress(APP, opts["epochs"] * len(mine), unit="samples", enabled=w.rank == 0)
    log, seconds, accesses = [], 0.0, AccessCounter()
    batch = opts["batch"]

    def batch_at(lo):
        return mine.batch(lo, min(lo + batch, len(mine)))

    for epoch in range(opts["epochs"]):
        loader = IntentLoader(w, batch_starts(len(mine), batch, rng),
                              keys_of=lambda lo: bag.keys_of(batch_at(lo)[2]),
                              lookahead=opts.get("lookahead"))
        accesses.begin(w)
        t0 = time.perf_counter()
        for lo in loader:
            labels, dense, ids, offsets = batch_at(lo)
            pooled = bag(torch.from_numpy(ids), offsets=torch.from_numpy(offsets))
            loss = loss_fn(model(pooled, torch.from_numpy(dense)), torch.from_numpy(labels))
            dense_opt.zero_grad()
            loss.backward()   # DDP averages the tower's gradients; the bag's rows step here
            dense_opt.step()
            progress.update(len(labels), prefix=f"epoch {epoch + 1}: ")
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        end_epoch(w, accesses)
        if w.rank == 0:
            score, loss_value = evaluate(predict, test)
            text = (f"epoch {epoch + 1}/{opts['epochs']}: {len(mine) / elapsed:,.0f} "
                    f"samples/s per worker, test AUC {score:.4f}, log loss {loss_value:.4f}")
            print(f"[{APP}] {text}", flush=True)
            log.append(text)
        w.barrier()
    after = evaluate(predict, test) if w.rank == 0 else None
    if distributed:
        torch.distributed.destroy_process_group()
    result = {"points": opts["epochs"] * len(mine), "seconds": seconds, "before": before,
              "after": after, "log": log, "node": w.node, "accesses": accesses.as_dict(),
              "tower": [p.detach().numpy().tolist() for p in tower.parameters()]
              if opts.get("return_tower") else None}
    return save_worker_result(opts, w, result)


def table_init(opts):
    """The table's initial values: rows N(0, 0.05), Adagrad accumulators 0."""
    return Adagrad(lr=opts["lr"]).init(("normal", 0.05, opts["seed"]))


def table_shape(opts):
    """(num_keys, value_length) the app's table needs."""
    return opts["buckets"], Adagrad(lr=opts["lr"]).value_length(opts["dim"])


def run(opts, nodes, workers_per_node, mode):
    num_keys, value_length = table_shape(opts)
    results = start_cluster(APP, train, opts, num_keys, value_length, table_init(opts),
                            nodes, workers_per_node, mode)
    return None if results is None else finish(results)


def train_plain(opts):
    """The same model in this process with torch.nn.EmbeddingBag (sparse gradients) and
    torch.optim.Adagrad, no parameter server: the reference of benchmark B11."""
    torch.set_num_threads(1)
    train_set, test = load_data(opts)
    dim, fields = opts["dim"], train_set.fields
    num_keys, value_length = table_shape(opts)
    start = table_init(opts)(np.arange(num_keys, dtype=np.uint64), value_length)
    bag = torch.nn.EmbeddingBag(num_keys, dim, mode="sum", sparse=True)
    bag.weight.data = torch.from_numpy(start[:, :dim].astype(np.float32))
    tower = dense_tower(fields, dim, opts["seed"])
    sparse_opt = torch.optim.Adagrad(bag.parameters(), lr=opts["lr"])
    dense_opt = torch.optim.Adagrad(tower.parameters(), lr=opts["lr"])
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def predict(dense, ids, offsets):
        pooled = bag(torch.from_numpy(ids), torch.from_numpy(offsets))
        return torch.sigmoid(tower(pooled, torch.from_numpy(dense))).numpy()

    before = evaluate(predict, test)
    rng = np.random.default_rng(opts["seed"] + 1)
    progress = Progress(APP, opts["epochs"] * len(train_set), unit="samples")
    seconds, batch, log = 0.0, opts["batch"], []
    for epoch in range(opts["epochs"]):
        t0 = time.perf_counter()
        for lo in batch_starts(len(train_set), batch, rng):
            labels, dense, ids, offsets = train_set.batch(lo, min(lo + batch, len(train_set)))
            pooled = bag(torch.from_numpy(ids), torch.from_numpy(offsets))
            loss = loss_fn(tower(pooled, torch.from_numpy(dense)), torch.from_numpy(labels))
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
            progress.update(len(labels), prefix=f"epoch {epoch + 1}: ")
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        score, loss_value = evaluate(predict, test)
        text = (f"plain epoch {epoch + 1}/{opts['epochs']}: {len(train_set) / elapsed:,.0f} "
                f"samples/s, test AUC {score:.4f}, log loss {loss_value:.4f}")
        print(f"[{APP}] {text}", flush=True)
        log.append(text)
    points = opts["epochs"] * len(train_set)
    after = evaluate(predict, test)
    return {"data_points_per_s": points / seconds, "points": points, "seconds": seconds,
            "auc_before": before[0], "logloss_before": before[1], "auc_after": after[0],
            "logloss_after": after[1], "log": log}


def finish(results):
    """Summary over the workers' results: throughput, local share and bytes
    (common.throughput_summary) and the test AUC and log loss before and after."""
    first = results[0]
    return {**throughput_summary(results), "auc_before": first["before"][0],
            "logloss_before": first["before"][1], "auc_after": first["after"][0],
            "logloss_after": first["after"][1], "log": first["log"],
            "towers": [res.get("tower") for res in results]}


def save(opts, directory):
    """Write the generated clicks as DIR/train.tsv and DIR/test.tsv (Criteo format)."""
    os.makedirs(directory, exist_ok=True)
    n = opts["train"]
    clicks, raw = generate(n + opts["test"], opts["fields"], opts["vocab"], opts["max_bag"],
                           opts["buckets"], opts["seed"])
    field_of, raw_ids = raw
    cut = clicks.starts[n]
    save_criteo(os.path.join(directory, "train.tsv"), clicks.part(0, n),
                (field_of[:cut], raw_ids[:cut]))
    save_criteo(os.path.join(directory, "test.tsv"), clicks.part(n, len(clicks)),
                (field_of[cut:], raw_ids[cut:]))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@app_options(APP)
@click.option("--train", "train_samples", default=300_000, show_default=True,
              help="generated training samples")
@click.option("--test", "test_samples", default=30_000, show_default=True,
              help="generated test samples")
@click.option("--fields", default=8, show_default=True, help="generated categorical fields")
@click.option("--vocab", default=50_000, show_default=True, help="generated ids per field")
@click.option("--max-bag", default=3, show_default=True,
              help="most ids per (sample, field) in the multi-hot half of the fields")
@click.option("--buckets", default=200_000, show_default=True,
              help="rows of the hashed embedding table")
@click.option("--dim", default=16, show_default=True, help="embedding dimension")
@click.option("--epochs", default=1, show_default=True,
              help="one pass: more overfits the rare ids' rows on generated data")
@click.option("--batch", default=2048, show_default=True)
@click.option("--lr", default=0.05, show_default=True, help="Adagrad's, sparse and dense")
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="training samples from a Criteo-format TSV")
@click.option("--test-data", type=click.Path(exists=True, dir_okay=False),
              help="test samples, Criteo format (default: the last 10% of --data)")
@click.option("--save-data", type=click.Path(file_okay=False),
              help="write the generated clicks to DIR/train.tsv and DIR/test.tsv")
@click.option("--plain", is_flag=True,
              help="the same model in this process with torch.nn.EmbeddingBag, no PS")
def main(nodes, workers_per_node, train_samples, test_samples, fields, vocab, max_bag,
         buckets, dim, epochs, batch, lr, lookahead, mode, seed, data, test_data, save_data,
         plain, json_path, worker_json):
    """Train a CTR model (hashed EmbeddingBag + MLPs under DDP); report test AUC."""
    opts = dict(train=train_samples, test=test_samples, fields=fields, vocab=vocab,
                max_bag=max_bag, buckets=buckets, dim=dim, epochs=epochs, batch=batch, lr=lr,
                lookahead=lookahead, seed=seed, data=data, test_data=test_data,
                worker_json=worker_json)
    if save_data and reports():
        save(opts, save_data)
    if plain:
        where = "one process, torch.nn.EmbeddingBag, no parameter server"
    elif launched():
        where = "the cluster adapm-launch started"
    else:
        where = f"{nodes} node(s) x {workers_per_node} worker(s), mode {mode}"
    if reports():
        source = data or f"{train_samples:,} generated samples, {fields} fields"
        print(f"[{APP}] {source}, {buckets:,} hashed rows of {dim}; {where}", flush=True)
    start = time.perf_counter()
    summary = train_plain(opts) if plain else run(opts, nodes, workers_per_node, mode)
    if summary is None:
        return  # a launched worker other than rank 0: rank 0 reports
    summary["wall_seconds"] = time.perf_counter() - start
    print(f"[{APP}] test AUC {summary['auc_before']:.4f} untrained -> "
          f"{summary['auc_after']:.4f} trained (log loss {summary['logloss_before']:.4f} -> "
          f"{summary['logloss_after']:.4f}); {summary['data_points_per_s']:,.0f} samples/s",
          flush=True)
    if json_path:
        summary.pop("towers", None)
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
    if not summary["auc_after"] > summary["auc_before"]:
        raise SystemExit(f"[{APP}] training did not improve the test AUC")


if __name__ == "__main__":
    main()
