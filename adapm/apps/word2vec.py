"""Word embeddings by skip-gram with negative sampling (word2vec) on a parameter server.

    python -m adapm.apps.word2vec --nodes 1 --workers-per-node 2 --epochs 3
    python -m adapm.apps.word2vec --text book.txt --min-count 5 --dim 64
    python -m adapm.apps.word2vec --text lines.txt --one-sentence-per-line \
        --save-vectors vectors.txt
    adapm-launch --nodes 2 --num-keys K --value-length L -m adapm.apps.word2vec ...
      (the app says which K and L when they do not match its options)

Keys: the input vector of word i is key i, its output (context) vector key V + i, for a
vocabulary of V words; key 2V is a metrics slot (each worker adds its epoch's loss and
throughput to it, so that rank 0 reports the whole cluster's). A word key's value is its
vector (dim) and its row-wise AdaGrad accumulator (--optimizer sgd, word2vec's own with the
rate falling linearly: the vector alone), so that the optimizer state travels with the key.

Each worker trains on its shard of the corpus' sentences: every (centre, context) pair
within a word's window (drawn from 1 .. `window` per word, as word2vec and gensim draw it;
--fixed-window: `window`) of one sentence is a positive example, and `negatives` output
vectors drawn with w.prepare_sample(..., key_range=(V, 2V), distribution=noise) for the
clock of the batch that uses them are the negative examples: word i with probability
proportional to count_i^0.75 (`--ns-exponent`), as the original word2vec draws them (0:
uniform; see docs/app-word2vec.md). A minibatch pulls its distinct rows once, trains its
pairs one after another on them in one compiled call (word2vec_model.SkipGramStep: the
update of word2vec.c and gensim) and pushes what changed as an additive update (in place
where the node holds the key, else at its owner). adapm.data.IntentLoader announces each
batch's centre and context keys ahead of their use; the negatives are announced by
prepare_sample itself, as far ahead as the loader announces batches.

Data: a generated corpus (Zipf word frequencies, words in planted topics, each sentence
drawn from one topic) or any plain-text file (sentences split at . ! ? and blank lines, or
one sentence per line with --one-sentence-per-line). `--save-vectors FILE` writes the
word vectors in word2vec's text format (gensim: KeyedVectors.load_word2vec_format(FILE,
binary=False)). Metrics: the training loss per epoch, the
loss of held-out sentences' pairs with fixed negatives (trained against untrained; with
`--heldout 0` every sentence is trained on and the loss is that of training pairs), the
nearest neighbours (cosine of input vectors) of the words named by `--probe` (default: the
most frequent words that are not stop words) and, for the generated corpus, the share of
the most frequent words' neighbours in the word's own topic."""

import json
import os
import time

import click
import numpy as np

from adapm.apps.common import (
    AccessCounter,
    Progress,
    app_options,
    launched,
    reports,
    save_worker_result,
    start_cluster,
    throughput_summary,
)
from adapm.apps.word2vec_corpus import (
    heldout_pairs,
    loss_pairs,
    noise_distribution,
    read_text,
    skipgram_pairs,
    split_sentences,
    subsample,
    synthetic,
)
from adapm.apps.word2vec_model import (
    TOP_K,
    EmbeddingInit,
    SkipGramStep,
    neighbour_report,
    pair_loss,
    shown_ids,
    word_vectors,
    write_vectors,
)
from adapm.ml.data import IntentLoader

APP = "word2vec"
STATS_SLOTS = 7           # metrics slot: sums over workers of [loss, pairs, pairs/s, 1,
                          # local key accesses, remote key accesses, words/s] of their
                          # training


# -- training -----------------------------------------------------------------------


def epoch_batches(rng, corpus, sentences, opts):
    """(This epoch's minibatches, its words): (centres, contexts) of the shard's sentences
    (frequent words subsampled and windows reduced anew each epoch, unless
    opts["shrink_windows"] is off), shuffled; the words left after subsampling, the
    words trained as gensim counts its "effective words"."""
    tokens, labels = corpus.sentences(sentences)
    tokens, labels = subsample(rng, corpus, tokens, labels, opts["subsample"])
    centres, contexts = skipgram_pairs(tokens, labels, opts["window"],
                                       rng if opts["shrink_windows"] else None)
    order = rng.permutation(centres.shape[0])
    size = opts["batch"]
    return [(centres[order[s:s + size]], contexts[order[s:s + size]])
            for s in range(0, order.shape[0], size)], tokens.shape[0]


OPTIMIZERS = {"rowwise-adagrad": 0.1, "sgd": 0.025}   # each one's default learning rate


def start_rate(opts):
    """The learning rate at the start: opts["lr"], or the optimizer's default."""
    return OPTIMIZERS[opts["optimizer"]] if opts["lr"] is None else opts["lr"]


def learning_rate(opts, epoch, done):
    """The learning rate after `done` (a share) of epoch `epoch` (from 0): for sgd,
    word2vec's, falling linearly from the start rate at the start of training to
    opts["min_lr"] at its end; row-wise AdaGrad's is constant (its accumulators make the
    steps smaller)."""
    lr = start_rate(opts)
    if opts["optimizer"] != "sgd":
        return lr
    progress = (epoch + done) / opts["epochs"]
    return lr - (lr - opts["min_lr"]) * progress


class Negatives:
    """The negatives of an epoch's batches (batch i used at clock first + i, as
    IntentLoader numbers them): `sizes[i]` output keys drawn with w.prepare_sample from
    `noise` (a Distribution over key_range, or None: uniform) for that clock, so they are
    announced as an intent the moment they are drawn."""

    def __init__(self, w, sizes, key_range, noise=None):
        self.w, self.sizes, self.key_range, self.noise = w, sizes, key_range, noise
        self.first = self.next = w.clock
        self.handles = {}  # clock -> handle

    def prepare(self, until):
        """Draw the negatives of every clock up to `until` not drawn yet."""
        until = min(until, self.first + len(self.sizes) - 1)
        while self.next <= until:
            self.handles[self.next] = self.w.prepare_sample(
                self.sizes[self.next - self.first], self.next, key_range=self.key_range,
                distribution=self.noise)
            self.next += 1

    def take(self, clock):
        self.prepare(clock)
        return self.handles.pop(clock)


def loss_label(opts):
    """The evaluation loss's name in the printed lines."""
    return "held-out loss" if loss_pairs(opts) == "held-out" else "training-sample loss"


def train(w, opts):
    """The task every worker runs. Returns this worker's figures (points: pairs, seconds
    of training, node, accesses: see common.throughput_summary); rank 0's also hold the
    metrics of the run (under "metrics"; see finish())."""
    corpus = opts["corpus"]
    v, dim, k = corpus.vocab_size, opts["dim"], opts["negatives"]
    stats_key = np.array([2 * v])
    adagrad = opts["optimizer"] == "rowwise-adagrad"
    step = SkipGramStep(2 * v + 1, v, k, adagrad)
    noise = noise_distribution(corpus, opts["ns_exponent"])  # built once, drawn every batch
    train_ids, _ = split_sentences(corpus, opts["heldout"])
    shard = train_ids[w.rank::w.num_workers]
    held = heldout_pairs(corpus, opts) if w.rank == 0 else None
    before = pair_loss(w, v, dim, *held) if w.rank == 0 else None
    w.barrier()  # nobody trains before the untrained model is measured
    rng = np.random.default_rng([opts["seed"], 1, w.rank])
    progress = None
    totals = np.zeros(STATS_SLOTS)
    log, train_losses, heldout_losses, rates, word_rates, shares = [], [], [], [], [], []
    accesses, points, seconds, trained_words = AccessCounter(), 0, 0.0, 0
    for epoch in range(opts["epochs"]):
        batches, words = epoch_batches(rng, corpus, shard, opts)
        pairs = sum(c.shape[0] for c, _ in batches)
        if progress is None:
            progress = Progress(APP, pairs * opts["epochs"], unit="pairs",
                                enabled=w.rank == 0)
        loader = IntentLoader(w, batches, keys_of=lambda b: np.concatenate([b[0], v + b[1]]),
                              lookahead=opts["lookahead"])
        negatives = Negatives(w, [c.shape[0] * k for c, _ in batches], (v, 2 * v), noise)
        local_before, remote_before = accesses.local, accesses.remote
        accesses.begin(w)
        loss_sum, t0 = 0.0, time.perf_counter()
        for i, (centres, contexts) in enumerate(loader):
            negatives.prepare(w.clock + loader.ahead())
            alpha = learning_rate(opts, epoch, i / len(batches))
            alpha_end = learning_rate(opts, epoch, (i + 1) / len(batches))
            loss_sum += step(w, centres, contexts, w.sample_keys(negatives.take(w.clock)),
                             alpha, alpha_end)
            progress.update(centres.shape[0], prefix=f"epoch {epoch + 1}: ")
        elapsed = time.perf_counter() - t0
        accesses.end(w)
        points, seconds = points + pairs, seconds + elapsed
        trained_words += words
        mine = np.zeros((1, w.value_length), dtype=np.float32)
        mine[0, :STATS_SLOTS] = [loss_sum, pairs, pairs / max(elapsed, 1e-9), 1.0,
                                 accesses.local - local_before,
                                 accesses.remote - remote_before,
                                 words / max(elapsed, 1e-9)]
        w.push(stats_key, mine)
        w.wait_sync()
        w.barrier()
        if w.rank == 0:
            now = w.pull(stats_key)[0, :STATS_SLOTS].astype(np.float64)
            loss, done, rate, workers, local, remote, word_rate = now - totals
            totals = now
            train_losses.append(loss / max(done, 1))
            rates.append(rate / workers)
            word_rates.append(word_rate / workers)
            shares.append(local / max(local + remote, 1))
            heldout_losses.append(pair_loss(w, v, dim, *held))
            text = (f"epoch {epoch + 1}/{opts['epochs']}: training loss "
                    f"{train_losses[-1]:.4f}, {loss_label(opts)} {heldout_losses[-1]:.4f}, "
                    f"{word_rates[-1]:,.0f} words/s ({rates[-1]:,.0f} pairs/s) per worker, "
                    f"{shares[-1]:.1%} of key accesses local")
            print(f"[{APP}] {text}", flush=True)
            log.append(text)
        w.barrier()
    result = {"rank": w.rank, "node": w.node, "points": points, "seconds": seconds,
              "words": trained_words, "accesses": accesses.as_dict()}
    if w.rank == 0:
        vectors = word_vectors(w, corpus, dim)
        if opts.get("save_vectors"):
            write_vectors(opts["save_vectors"], corpus.words, vectors)
        neighbours, precision, chance, probed = neighbour_report(vectors, corpus, opts)
        result["metrics"] = dict(
            log=log, loss_pairs=loss_pairs(opts), heldout_before=before,
            heldout_after=heldout_losses[-1] if heldout_losses else before,
            train_losses=train_losses, heldout_losses=heldout_losses, pairs_per_s=rates,
            words_per_s=word_rates,
            local_share=shares, neighbours=neighbours, precision=precision, chance=chance,
            probes=probed, vocab=v, stats=w.stats())
    return save_worker_result(opts, w, result)


def finish(results):
    """The run's metrics from the workers' results by rank (rank 0's first; all of them
    embedded, or every worker's --worker-json files): rank 0's metrics, plus "throughput",
    the cluster's pairs/s, local share and bytes over the results given
    (common.throughput_summary; one worker's own under adapm-launch), and
    "words_per_s_cluster", their words trained (left after subsampling, as gensim counts
    "effective words") over the slowest one's training time."""
    seconds = max(max(res["seconds"] for res in results), 1e-9)
    return dict(results[0]["metrics"], throughput=throughput_summary(results),
                words_per_s_cluster=sum(res["words"] for res in results) / seconds)


# -- running ------------------------------------------------------------------------


DEFAULTS = dict(text=None, one_sentence_per_line=False, min_count=5, max_vocab=0, vocab=2000,
                topics=20, sentences=20_000, sentence_length=10, noise=0.1, zipf=1.0,
                heldout=0.05, heldout_pairs=20_000, dim=32, window=2, shrink_windows=True,
                negatives=5, ns_exponent=0.75, subsample=0.0, epochs=3, batch=1024,
                min_lr=0.0001, optimizer="rowwise-adagrad", lr=None, lookahead=None,
                probes=100, show=5, probe=None, seed=0, save_vectors=None,
                worker_json=None)


def build_corpus(opts):
    if opts["text"]:
        return read_text(opts["text"], opts["min_count"], opts["max_vocab"],
                         lines=opts["one_sentence_per_line"])
    return synthetic(opts["vocab"], opts["topics"], opts["sentences"],
                     opts["sentence_length"], opts["noise"], opts["zipf"], opts["seed"])


MIN_DIM = STATS_SLOTS  # the metrics slot must fit in a value


def check(opts):
    """ValueError for options the app cannot train with."""
    for name, low in (("dim", MIN_DIM), ("window", 1), ("negatives", 1), ("epochs", 1),
                      ("batch", 1), ("heldout_pairs", 1)):
        if opts[name] < low:
            raise ValueError(f"{name} must be >= {low}, got {opts[name]}")
    if not 0 <= opts["heldout"] < 1:
        raise ValueError(f"heldout must be in [0, 1), got {opts['heldout']}")
    if opts["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                         f"{opts['optimizer']!r}")
    if not 0 <= start_rate(opts) < float("inf"):
        raise ValueError(f"lr must be a number >= 0, got {start_rate(opts)}")
    if opts["optimizer"] == "sgd" and not 0 <= opts["min_lr"] <= start_rate(opts):
        raise ValueError(f"need 0 <= min_lr <= lr, got lr {start_rate(opts)}, min_lr "
                         f"{opts['min_lr']}")  # sgd's schedule; row-wise AdaGrad has none
    if not 0 <= opts["ns_exponent"] < float("inf"):
        raise ValueError(f"ns_exponent must be a number >= 0, got {opts['ns_exponent']}")


def check_corpus(corpus, opts):
    """ValueError for a corpus the options cannot train and evaluate on."""
    shown_ids(corpus, opts)  # the --probe words are in the vocabulary
    if heldout_pairs(corpus, opts)[0].shape[0] == 0 and opts["heldout"] > 0:
        raise ValueError("the held-out sentences have no pairs: raise --heldout or give a "
                         "larger corpus")


def state_length(opts):
    """Optimizer state per key: row-wise AdaGrad's accumulator, or none for SGD."""
    return 1 if opts["optimizer"] == "rowwise-adagrad" else 0


def table_shape(vocab, dim, state=0):
    """(num_keys, value_length) of the table for a vocabulary of `vocab` words, vectors of
    `dim` and `state` elements of optimizer state per key."""
    return 2 * vocab + 1, dim + state


def run(opts=None, nodes=1, workers_per_node=1, mode="adaptive", corpus=None, **changes):
    """Train with `opts` (DEFAULTS updated by `changes`) on `corpus` (default: built from
    opts). Returns the run's metrics, finish() of the workers' results (under adapm-launch:
    rank 0's; None in the other workers)."""
    opts = dict(DEFAULTS, **(opts or {}), **changes)
    check(opts)
    corpus = corpus if corpus is not None else build_corpus(opts)
    check_corpus(corpus, opts)
    num_keys, value_length = table_shape(corpus.vocab_size, opts["dim"], state_length(opts))
    results = start_cluster(APP, train, dict(opts, corpus=corpus), num_keys, value_length,
                            EmbeddingInit(corpus.vocab_size, opts["dim"], opts["seed"],
                                          state_length(opts)),
                            nodes, workers_per_node, mode)
    return finish(results) if results else None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@app_options(APP, seed_help="corpus, initial values, held-out negatives, shuffling",
             lookahead_help="batches announced ahead (intents and negatives); default: "
                            "adapted")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="train on this plain-text file instead of a generated corpus")
@click.option("--one-sentence-per-line", is_flag=True,
              help="--text: every line is one sentence (split at line ends only, not at "
                   ". ! ? and blank lines)")
@click.option("--min-count", default=DEFAULTS["min_count"], show_default=True,
              help="--text: words seen fewer times are dropped")
@click.option("--max-vocab", default=DEFAULTS["max_vocab"], show_default=True,
              help="--text: keep at most this many words, most frequent first (0: all)")
@click.option("--vocab", default=DEFAULTS["vocab"], show_default=True,
              help="generated corpus: words")
@click.option("--topics", default=DEFAULTS["topics"], show_default=True,
              help="generated corpus: planted topics")
@click.option("--sentences", default=DEFAULTS["sentences"], show_default=True,
              help="generated corpus: sentences")
@click.option("--sentence-length", default=DEFAULTS["sentence_length"], show_default=True,
              help="generated corpus: words per sentence")
@click.option("--noise", default=DEFAULTS["noise"], show_default=True,
              help="generated corpus: share of words drawn from the whole vocabulary")
@click.option("--zipf", default=DEFAULTS["zipf"], show_default=True,
              help="generated corpus: Zipf exponent of the word frequencies")
@click.option("--heldout", default=DEFAULTS["heldout"], show_default=True,
              type=click.FloatRange(0, 1, max_open=True),
              help="share of the sentences held out for the held-out loss (0: train on "
                   "every sentence; the loss is then measured on training pairs)")
@click.option("--heldout-pairs", default=DEFAULTS["heldout_pairs"],
              type=click.IntRange(min=1), show_default=True,
              help="at most this many held-out pairs are scored")
@click.option("--dim", default=DEFAULTS["dim"],
              type=click.IntRange(min=MIN_DIM), show_default=True, help="vector dimension")
@click.option("--window", default=DEFAULTS["window"],
              type=click.IntRange(min=1), show_default=True,
              help="context words on each side")
@click.option("--shrink-windows/--fixed-window", default=DEFAULTS["shrink_windows"],
              show_default=True,
              help="each word draws its window from 1 .. --window, as word2vec and gensim "
                   "(--fixed-window: every word pairs with all words within --window)")
@click.option("--negatives", default=DEFAULTS["negatives"],
              type=click.IntRange(min=1), show_default=True,
              help="negative samples per pair")
@click.option("--ns-exponent", default=DEFAULTS["ns_exponent"], show_default=True,
              type=click.FloatRange(min=0),
              help="negatives drawn with probability ~ count^x (word2vec's 0.75; 0: uniform)")
@click.option("--subsample", default=DEFAULTS["subsample"], show_default=True,
              help="subsampling threshold of frequent words (word2vec's -sample; 0: off)")
@click.option("--epochs", default=DEFAULTS["epochs"],
              type=click.IntRange(min=1), show_default=True)
@click.option("--batch", default=DEFAULTS["batch"],
              type=click.IntRange(min=1), show_default=True, help="pairs per batch")
@click.option("--lr", default=None, type=click.FloatRange(min=0),
              help="learning rate (sgd: at the start, word2vec's -alpha, gensim's alpha) "
                   "[default: rowwise-adagrad 0.1, sgd 0.025]")
@click.option("--optimizer", type=click.Choice(["sgd", "rowwise-adagrad"]),
              default=DEFAULTS["optimizer"], show_default=True,
              help="rowwise-adagrad: word2vec's update, each row's rate divided by the root "
                   "of its mean squared steps; sgd: word2vec's own (the rate falls from "
                   "--lr to --min-lr)")
@click.option("--min-lr", default=DEFAULTS["min_lr"], type=click.FloatRange(min=0),
              show_default=True,
              help="sgd: the learning rate at the end, falling linearly from --lr (gensim's "
                   "min_alpha)")
@click.option("--probes", default=DEFAULTS["probes"], type=click.IntRange(min=1),
              show_default=True,
              help="generated corpus: the neighbour precision is measured on this many of "
                   "the most frequent words")
@click.option("--show", default=DEFAULTS["show"], type=click.IntRange(min=0),
              show_default=True,
              help="without --probe: the neighbours of this many of the most frequent words "
                   "are printed, stop words (the, of, ...) left out")
@click.option("--probe", metavar="WORDS", default=None,
              help="comma-separated words whose nearest neighbours are printed, e.g. "
                   "--probe king,paris,music")
@click.option("--save-vectors", type=click.Path(dir_okay=False, resolve_path=True),
              help="write the word vectors to FILE in word2vec's text format (rank 0)")
def main(nodes, workers_per_node, mode, json_path, **opts):
    """Train word vectors (skip-gram, negative sampling) and report the held-out loss and
    nearest neighbours."""
    opts = dict(DEFAULTS, **opts)
    try:
        check(opts)
        if opts["one_sentence_per_line"] and not opts["text"]:
            raise ValueError("--one-sentence-per-line needs --text")
        for path in (opts["save_vectors"], json_path):
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise ValueError(f"{path}: no such directory")
        corpus = build_corpus(opts)
        check_corpus(corpus, opts)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    source = opts["text"] or (f"generated corpus ({opts['topics']} topics, Zipf "
                              f"{opts['zipf']}, noise {opts['noise']})")
    num_keys, value_length = table_shape(corpus.vocab_size, opts["dim"], state_length(opts))
    if reports():
        shape = "" if launched() else f"; {nodes} node(s) x {workers_per_node} worker(s)"
        print(f"[{APP}] {source}: {corpus.vocab_size:,} words, {corpus.tokens.shape[0]:,} "
              f"tokens, {corpus.num_sentences:,} sentences; table of {num_keys:,} keys x "
              f"{value_length}{shape}, mode {mode}", flush=True)
    start = time.perf_counter()
    result = run(opts, nodes, workers_per_node, mode, corpus=corpus)
    if result is None:
        return  # a worker other than rank 0 under adapm-launch: rank 0 reports
    print(f"[{APP}] done in {time.perf_counter() - start:.1f} s: {loss_label(opts)} "
          f"{result['heldout_before']:.4f} untrained -> {result['heldout_after']:.4f} "
          f"trained; in training {result['local_share'][-1]:.1%} of key accesses were "
          "local (last epoch, all workers)", flush=True)
    print(f"[{APP}] nearest neighbours (cosine):", flush=True)
    for line in result["neighbours"]:
        print(f"[{APP}]   {line}", flush=True)
    if result["precision"] is not None:
        print(f"[{APP}] neighbour precision: {result['precision']:.1%} of the {TOP_K} nearest "
              f"neighbours of the {result['probes']} most frequent words are in their topic "
              f"(chance {result['chance']:.1%})", flush=True)
    if opts["save_vectors"]:
        print(f"[{APP}] wrote {corpus.vocab_size:,} vectors of {opts['dim']} to "
              f"{opts['save_vectors']} (word2vec text format)", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    if not result["heldout_after"] < result["heldout_before"]:
        raise SystemExit(f"[{APP}] training did not improve the {loss_label(opts)}")


if __name__ == "__main__":
    main()
