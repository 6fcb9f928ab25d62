"""The word2vec app: the data (sentences of a text, one per line too; windows within a
sentence), the negatives (unigram^0.75), the gradient, learning on 1 node, the same quality
on 2 nodes, the vectors in word2vec's text format, and the command line (embedded, on a
text file, and under adapm-launch).

Tolerance of the N-node check (test_two_nodes_reach_the_one_node_quality): with the same
seed, a run on 2 nodes x 1 worker must reach a held-out loss at most 5% above the 1-node
run's (and a neighbour precision at most 0.05 below it), on NODES_CHECK (TINY with 15,000
sentences). Measured with the default row-wise AdaGrad: over seeds 0-7, two runs each, the
2-node held-out loss was between 0.7% below and 0.7% above the 1-node one (with --optimizer
sgd: 0.7% below to 3.1% above), the precision 1.0 in every run. On TINY itself (training
of 0.1 s, so the first sync rounds are a large share of it) 3 of 24 runs were 17-25% above:
hence the larger corpus (docs/app-word2vec.md)."""
import json
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from word2vec_rules import reference_train

import adapm
from adapm.apps import word2vec
from adapm.client.sampling import Distribution

pytestmark = pytest.mark.timeout(180)

# About a second of training: 300 words in 10 topics, 3,000 sentences of 10 words.
TINY = dict(vocab=300, topics=10, sentences=3000, sentence_length=10, dim=16, epochs=2,
            batch=256, heldout=0.1, probes=50, show=3, seed=0)
# The N-node check's corpus: 5 times TINY's sentences, so that training outlasts the
# first sync rounds (about a second of training; see the docstring).
NODES_CHECK = dict(TINY, sentences=15_000)
TOLERANCE = 0.05          # relative, on the held-out loss of an N-node run
PRECISION_TOLERANCE = 0.05
LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))
TINY_ARGS = ["--vocab", "300", "--topics", "10", "--sentences", "3000", "--dim", "16",
             "--epochs", "2", "--batch", "256", "--heldout", "0.1", "--show", "3"]


# -- data -----------------------------------------------------------------------------


def test_text_reader_builds_the_vocabulary_most_frequent_first(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("The cat sat. The cat ran! A dog ran?\n\n"
                    "the DOG barked 42 times; the end.\n"
                    "Café café naïve. x1y\n", encoding="utf-8")
    corpus = word2vec.read_text(path, min_count=2)
    # the 4, then the words seen twice in alphabetical order; seen once: dropped
    assert corpus.words == ["the", "café", "cat", "dog", "ran"]
    np.testing.assert_array_equal(corpus.counts, [4, 2, 2, 2, 2])
    sentences = [corpus.tokens[a:b].tolist() for a, b in zip(corpus.starts[:-1],
                                                               corpus.starts[1:])]
    # split at . ! ? and the blank line; "a", "sat", "barked", ... dropped; "x1y" is two
    # one-letter words; sentences left with fewer than two words are dropped
    assert sentences == [[0, 2], [0, 2, 4], [3, 4], [0, 3, 0], [1, 1]]
    assert corpus.topics is None
    assert word2vec.read_text(path, min_count=2, max_vocab=2).words == ["the", "café"]
    with pytest.raises(ValueError, match="min-count"):
        word2vec.read_text(path, min_count=5)


def test_skipgram_pairs_stay_within_a_sentence_and_the_window():
    tokens = np.array([1, 2, 3, 4, 5])
    labels = np.array([0, 0, 0, 1, 1])
    centres, contexts = word2vec.skipgram_pairs(tokens, labels, window=2)
    assert sorted(zip(centres.tolist(), contexts.tolist())) == sorted(
        [(1, 2), (2, 1), (2, 3), (3, 2), (1, 3), (3, 1), (4, 5), (5, 4)])
    centres, _ = word2vec.skipgram_pairs(tokens, labels, window=1)
    assert centres.shape[0] == 6


# Five groups of five words; line i is a shuffle of group i % 5's words, so consecutive
# lines never share a word: a window across a line end would pair words of two groups.
GROUPS = [["alpha", "bravo", "charlie", "delta", "echo"],
          ["fox", "golf", "hotel", "india", "juliet"],
          ["kilo", "lima", "mike", "november", "oscar"],
          ["papa", "quebec", "romeo", "sierra", "tango"],
          ["uniform", "victor", "whiskey", "xray", "yankee"]]


def write_lines(path, lines=200, seed=0):
    """A one-sentence-per-line corpus without sentence punctuation at the line ends (one
    line has a full stop inside, one is blank, one ends in CR LF)."""
    rng = np.random.default_rng(seed)
    text = []
    for i in range(lines):
        words = list(rng.permutation(GROUPS[i % 5]))
        if i == 7:
            words[2] += "."  # not a sentence end in a one-sentence-per-line file
        text.append(" ".join(words) + ("\r" if i == 11 else ""))
    text.insert(20, "")
    path.write_text("\n".join(text) + "\n", encoding="utf-8")


def group_of(corpus):
    return np.array([next(g for g, ws in enumerate(GROUPS) if w in ws) for w in corpus.words])


def test_one_sentence_per_line_splits_at_line_ends_only(tmp_path):
    path = tmp_path / "lines.txt"
    write_lines(path)
    corpus = word2vec.read_text(path, min_count=1, lines=True)
    assert corpus.num_sentences == 200  # the blank line is no sentence
    lengths = np.diff(corpus.starts)
    assert (lengths == 5).all()  # the full stop inside line 7 did not split it
    group = group_of(corpus)
    for a, b in zip(corpus.starts[:-1], corpus.starts[1:]):
        assert np.unique(group[corpus.tokens[a:b]]).shape[0] == 1
    # without it, lines without . ! ? run together (sentences end at . and blank lines)
    prose = word2vec.read_text(path, min_count=1)
    assert prose.num_sentences == 3


def test_windows_never_cross_a_sentence_boundary(tmp_path):
    path = tmp_path / "lines.txt"
    write_lines(path)
    corpus = word2vec.read_text(path, min_count=1, lines=True)
    group = group_of(corpus)
    centres, contexts = word2vec.skipgram_pairs(*corpus.sentences(np.arange(200)), window=4)
    assert centres.shape[0] == 200 * 5 * 4  # every ordered pair of a 5-word line: 20
    assert (group[centres] == group[contexts]).all()
    # the training batches too: shuffled shards of sentences, frequent words subsampled
    opts = dict(word2vec.DEFAULTS, window=3, batch=64, subsample=0.05)
    rng = np.random.default_rng(0)
    batches, words = word2vec.epoch_batches(rng, corpus, np.arange(1, 200, 3), opts)
    assert 0 < words <= 67 * 5  # the shard's words, less any subsampled
    centres = np.concatenate([c for c, _ in batches])
    contexts = np.concatenate([o for _, o in batches])
    assert centres.shape[0] > 0 and (group[centres] == group[contexts]).all()
    # whereas the lines read as one stream pair words across line ends
    prose = word2vec.read_text(path, min_count=1)
    centres, contexts = word2vec.skipgram_pairs(
        *prose.sentences(np.arange(prose.num_sentences)), window=4)
    assert (group_of(prose)[centres] != group_of(prose)[contexts]).any()


# -- negatives -------------------------------------------------------------------------


def test_negatives_are_drawn_from_the_unigram_distribution_to_the_075():
    corpus = word2vec.synthetic(300, 10, 2000, 10, 0.1, 1.0, seed=2)
    corpus.counts[[150, 298, 299]] = 0  # as if never seen: never a negative
    noise = word2vec.noise_distribution(corpus, 0.75)
    expected = corpus.counts ** 0.75 / (corpus.counts ** 0.75).sum()
    np.testing.assert_allclose(noise.probabilities, expected, rtol=1e-12)
    assert word2vec.noise_distribution(corpus, 0) is None  # uniform: prepare_sample's default
    # the held-out negatives follow it (a seeded draw, 20 x 5 per pair)
    opts = dict(word2vec.DEFAULTS, heldout=0.5, heldout_pairs=20_000, negatives=20, seed=0)
    _, _, negatives = word2vec.heldout_pairs(corpus, opts)
    counts = np.bincount(negatives.reshape(-1) - 300, minlength=300)
    assert counts[corpus.counts == 0].sum() == 0
    n = negatives.size
    positive = expected > 0
    chi2 = ((counts - n * expected)[positive] ** 2 / (n * expected)[positive]).sum()
    df = positive.sum() - 1
    assert chi2 < df + 4 * np.sqrt(2 * df), (chi2, df)  # mean df, sd sqrt(2 df)
    # the most frequent word is drawn less often than its share of the tokens (the point of
    # the 0.75: frequent words dominate the negatives less)
    assert counts[0] / n == pytest.approx(expected[0], rel=0.05)
    assert expected[0] < corpus.counts[0] / corpus.counts.sum()


class SampleRecorder:
    """A worker's clock and prepare_sample, recording the calls."""

    clock = 4

    def __init__(self):
        self.calls = []

    def prepare_sample(self, n, start, end=None, key_range=None, distribution=None):
        self.calls.append((n, start, key_range, distribution))
        return len(self.calls)


def test_training_draws_each_batchs_negatives_from_the_noise_distribution():
    noise = Distribution(np.arange(1, 11))
    w = SampleRecorder()
    negatives = word2vec.Negatives(w, [30, 20, 10], (10, 20), noise)
    negatives.prepare(5)
    assert negatives.take(4) == 1 and negatives.take(6) == 3
    assert w.calls == [(30, 4, (10, 20), noise), (20, 5, (10, 20), noise),
                       (10, 6, (10, 20), noise)]


# -- vectors in word2vec's text format ---------------------------------------------------


def load_word2vec_text(path):
    """The text format as gensim's KeyedVectors.load_word2vec_format(path, binary=False)
    reads it (gensim is not a dependency): a header "count dim"; then per word a line that
    rstrip().split(" ") makes [word, dim numbers]; exactly `count` of them."""
    with open(path, "rb") as f:
        count, dim = (int(x) for x in f.readline().decode("utf-8").split())
        words, rows = [], []
        for number in range(count):
            line = f.readline()
            if line == b"":
                raise EOFError("unexpected end of input; is count incorrect?")
            parts = line.decode("utf-8").rstrip().split(" ")
            if len(parts) != dim + 1:
                raise ValueError(f"invalid vector on line {number + 2}")
            words.append(parts[0])
            rows.append([np.float32(x) for x in parts[1:]])
        assert f.read() == b""  # nothing after the count's last word
    vectors = np.array(rows, dtype=np.float32).reshape(count, dim)
    assert len(set(words)) == count
    return words, vectors


def test_vectors_are_written_in_word2vecs_text_format(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(0, 1, size=(4, 3)).astype(np.float32)
    vectors[1, 2] = 1e-30
    vectors[2] = 0.0
    words = ["the", "café", "naïve", "t01_002"]
    path = tmp_path / "vectors.txt"
    word2vec.write_vectors(path, words, vectors)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "4 3" and lines[1].startswith("the ") and len(lines) == 5
    read_words, read = load_word2vec_text(path)
    assert read_words == words
    np.testing.assert_array_equal(read, vectors)  # float32 exactly
    for bad in (["a b", "c", "d", "e"], ["", "c", "d", "e"], ["a\tb", "c", "d", "e"]):
        with pytest.raises(ValueError, match="text format"):
            word2vec.write_vectors(tmp_path / "bad.txt", bad, vectors)
    with pytest.raises(ValueError, match="shape"):
        word2vec.write_vectors(tmp_path / "bad.txt", words[:3], vectors)


def test_generator_is_seeded_zipfian_and_topical():
    a = word2vec.synthetic(300, 10, 2000, 10, 0.1, 1.0, seed=3)
    b = word2vec.synthetic(300, 10, 2000, 10, 0.1, 1.0, seed=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.words == b.words
    assert not np.array_equal(a.tokens,
                              word2vec.synthetic(300, 10, 2000, 10, 0.1, 1.0, 4).tokens)
    # Zipf: word i is about (i+1) times rarer than word 0
    assert a.counts[0] > 5 * a.counts[9] > 0 and a.counts[0] > 50 * a.counts[199]
    # each topic has 30 words, named after it
    assert np.bincount(a.topics).tolist() == [30] * 10
    assert all(w.startswith(f"t{t:02d}_") for w, t in zip(a.words, a.topics))
    # a sentence's words share its topic, but for the noise (10%, a tenth of which lands
    # in the sentence's topic anyway)
    topics = a.topics[a.tokens].reshape(2000, 10)
    majority = np.array([np.bincount(row, minlength=10).max() for row in topics])
    assert 0.87 < majority.mean() / 10 < 0.95


class FakeWorker:
    """pull/push on an in-process table (no cluster): checks SkipGramStep alone."""

    def __init__(self, table):
        self.table = table
        self.pushed = []

    def pull(self, keys):
        return self.table[np.asarray(keys, dtype=np.int64)].copy()

    def push(self, keys, values):
        self.pushed.append((np.asarray(keys, dtype=np.int64), np.array(values)))


def test_the_step_pushes_what_word2vecs_update_changed_once_per_distinct_key():
    vocab, dim, k = 6, 3, 2
    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.5, size=(2 * vocab + 1, dim)).astype(np.float32)
    centres = np.array([0, 1, 0, 5])         # duplicate centres and contexts
    contexts = np.array([1, 0, 1, 2])
    negatives = np.array([[7, 8], [7, 6], [11, 7], [7, 7]])  # one also the context (7 = V+1)
    w = FakeWorker(table)
    step = word2vec.SkipGramStep(2 * vocab + 1, vocab, k)
    loss = step(w, centres, contexts, negatives.reshape(-1).astype(np.uint64), 0.1, 0.05)
    rows = np.arange(2 * vocab + 1)
    expected, expected_loss = reference_train(table, centres, contexts + vocab, negatives,
                                              0.1, 0.05)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    (keys, delta), = w.pushed  # one additive push of the batch's distinct keys
    assert sorted(keys.tolist()) == sorted(set(centres) | set(contexts + vocab)
                                           | set(negatives.reshape(-1).tolist()))
    assert delta.dtype == np.float32 and delta.shape == (keys.shape[0], dim)
    after = table.astype(np.float64).copy()
    after[keys] += delta
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-7)
    untouched = np.setdiff1d(rows, keys)
    np.testing.assert_array_equal(after[untouched], table[untouched])


STEP_VOCAB, STEP_DIM, STEP_K = 40, 6, 3


def step_batches(seed, workers):
    """A batch of (centres, contexts, negative output keys) per worker."""
    rng = np.random.default_rng(seed)
    v = STEP_VOCAB
    return [(rng.integers(0, v, 200), rng.integers(0, v, 200),
             rng.integers(v, 2 * v, 200 * STEP_K).astype(np.uint64)) for _ in range(workers)]


def steps_in_turn_task(w, seed):
    """Each worker trains its batch with the compiled step, one after the other; rank 0
    returns the whole table and the losses."""
    step = word2vec.SkipGramStep(2 * STEP_VOCAB + 1, STEP_VOCAB, STEP_K, adagrad=True)
    losses = []
    for rank, (centres, contexts, negatives) in enumerate(step_batches(seed, w.num_workers)):
        if rank == w.rank:
            losses.append(step(w, centres, contexts, negatives, 0.1, 0.1))
        w.wait_sync()
        w.barrier()
    stats = w.stats()  # of the steps alone
    return w.pull(np.arange(2 * STEP_VOCAB + 1)), losses, (stats["pulls_remote"],
                                                           stats["pushes_remote"])


def test_the_step_trains_rows_held_and_pulled_on_two_nodes_as_word2vecs_update():
    """Static placement on 2 nodes: each worker's batch names rows of both nodes, held
    ones read and written in shared memory, the others pulled from and pushed to their
    owner; in turn, the table ends as the update of both batches one after the other."""
    init = word2vec.EmbeddingInit(STEP_VOCAB, STEP_DIM, 5, state=1)
    initial = init(np.arange(2 * STEP_VOCAB + 1))
    results = adapm.run(steps_in_turn_task, args=(3,), nodes=2, mode="static",
                        num_keys=2 * STEP_VOCAB + 1, value_length=STEP_DIM + 1, init=init)
    expected, losses = initial.astype(np.float64), []
    for centres, contexts, negatives in step_batches(3, 2):
        expected, loss = reference_train(expected, centres, contexts + STEP_VOCAB,
                                         negatives.reshape(-1, STEP_K).astype(np.int64),
                                         0.1, 0.1, adagrad=True)
        losses.append(loss)
    (table, first, _), (_, second, remote) = results
    np.testing.assert_allclose(table, expected, rtol=1e-4, atol=1e-6)
    assert first + second == pytest.approx(losses, rel=1e-5)
    assert min(remote) > 0  # the second worker pulled and pushed rows of the other node


def test_reduced_windows_pair_each_word_with_its_own_window():
    tokens = np.arange(2000) % 97
    labels = np.repeat(np.arange(20), 100)  # 20 sentences of 100 words
    window = 5
    rng = np.random.default_rng(3)
    reach = np.random.default_rng(3).integers(1, window + 1, size=2000)
    centres, contexts = word2vec.skipgram_pairs(tokens, labels, window, rng)
    # as a set of positions: i pairs with j when |i - j| <= reach[i], in one sentence
    positions = np.arange(2000)
    expected = sorted((tokens[i], tokens[j]) for i in positions
                      for j in range(max(i - reach[i], 0), min(i + reach[i] + 1, 2000))
                      if j != i and labels[j] == labels[i])
    assert sorted(zip(centres.tolist(), contexts.tolist())) == expected
    # window + 1 contexts per word on average (not 2 window), as word2vec's and gensim's
    assert centres.shape[0] / 2000 == pytest.approx(window + 1, rel=0.05)
    # without an rng every word takes the whole window
    assert word2vec.skipgram_pairs(tokens, labels, window)[0].shape[0] == \
        20 * (2 * window * 100 - window * (window + 1))


def test_init_is_small_for_input_vectors_and_zero_elsewhere():
    init = word2vec.EmbeddingInit(vocab=10, dim=4, seed=1)
    values = init(np.arange(21, dtype=np.uint64))
    assert values.shape == (21, 4) and values.dtype == np.float32
    assert np.abs(values[:10, :4]).max() <= 0.5 / 4 and values[:10, :4].std() > 0.01
    assert not values[10:].any()  # output vectors and the metrics slot
    np.testing.assert_array_equal(init(np.array([3, 15], dtype=np.uint64)), values[[3, 15]])


# -- training -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_node():
    return word2vec.run(TINY, nodes=1, workers_per_node=1)


def test_one_node_learns_the_planted_topics(one_node):
    r = one_node
    # untrained: output vectors are 0, so every pair costs (1 + negatives) log 2
    assert r["heldout_before"] == pytest.approx(6 * np.log(2), rel=1e-4)
    assert r["heldout_after"] < 0.55 * r["heldout_before"]      # measured: 0.47 of it
    assert r["train_losses"][1] < r["train_losses"][0]
    assert r["heldout_losses"][1] <= r["heldout_losses"][0]
    assert r["chance"] == pytest.approx(29 / 299)
    assert r["precision"] >= 0.8 and r["precision"] > 5 * r["chance"]  # measured: 1.0
    assert len(r["neighbours"]) == 3 and r["probes"] == 50
    assert r["local_share"] == [1.0, 1.0]  # one node: every access local
    assert len(r["log"]) == 2 and "pairs/s) per worker" in r["log"][0]
    assert "words/s (" in r["log"][0] and len(r["words_per_s"]) == 2


def test_sgd_is_word2vecs_own_rate_schedule_and_trains_too():
    sgd = dict(word2vec.DEFAULTS, optimizer="sgd", lr=0.04, min_lr=0.001, epochs=4)
    assert word2vec.learning_rate(sgd, 0, 0.0) == pytest.approx(0.04)
    assert word2vec.learning_rate(sgd, 1, 0.5) == pytest.approx(0.04 - 0.039 * 1.5 / 4)
    assert word2vec.learning_rate(sgd, 3, 1.0) == pytest.approx(0.001)
    adagrad = dict(word2vec.DEFAULTS, epochs=4)   # the default: constant, 0.1
    assert {word2vec.learning_rate(adagrad, e, d) for e, d in ((0, 0), (3, 1))} == {0.1}
    assert word2vec.state_length(sgd) == 0 and word2vec.state_length(adagrad) == 1
    r = word2vec.run(dict(TINY, optimizer="sgd"), nodes=1, workers_per_node=1)
    assert r["heldout_after"] < 0.6 * r["heldout_before"]      # measured: 0.47 of it
    assert r["precision"] >= 0.8
    word2vec.check(dict(word2vec.DEFAULTS, lr=5e-5))  # min_lr is sgd's alone
    for bad, match in ((dict(optimizer="adam"), "optimizer"),
                       (dict(optimizer="sgd", lr=0.01, min_lr=0.02), "min_lr <= lr")):
        with pytest.raises(ValueError, match=match):
            word2vec.run(dict(TINY, **bad))


def test_two_nodes_reach_the_one_node_quality():
    one = word2vec.run(NODES_CHECK, nodes=1, workers_per_node=1)
    two = word2vec.run(NODES_CHECK, nodes=2, workers_per_node=1)
    assert two["heldout_before"] == pytest.approx(one["heldout_before"])
    assert two["heldout_after"] <= (1 + TOLERANCE) * one["heldout_after"], \
        (two["heldout_after"], one["heldout_after"])
    assert two["precision"] >= one["precision"] - PRECISION_TOLERANCE
    # really distributed: some accesses remote (the last epoch may be all local: intents
    # made every key local in time)
    assert min(two["local_share"]) < 1.0


# -- the command line -----------------------------------------------------------------


def command(args, cwd, timeout=120):
    """Run outside the checkout, whose adapm/ folder would shadow the installed package."""
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, cwd=cwd)
    return proc.returncode, proc.stdout


def test_cli_runs_end_to_end(tmp_path):
    rc, out = command([sys.executable, "-m", "adapm.apps.word2vec", "--nodes", "1",
                       "--workers-per-node", "2", *TINY_ARGS], tmp_path)
    assert rc == 0, out
    assert "1 node(s) x 2 worker(s)" in out
    assert "epoch 2/2: training loss" in out and "pairs/s) per worker" in out
    assert "untrained ->" in out and "nearest neighbours" in out
    assert "neighbour precision" in out


def letters(i):
    """A word made of letters only for id i (the reader splits words at anything else)."""
    word = ""
    i += 26
    while i:
        i, r = divmod(i, 26)
        word = string.ascii_lowercase[r] + word
    return word


def test_cli_trains_on_a_text_file(tmp_path):
    corpus = word2vec.synthetic(200, 5, 2000, 8, 0.1, 1.0, seed=1)
    path = tmp_path / "text.txt"
    with open(path, "w") as f:
        for a, b in zip(corpus.starts[:-1], corpus.starts[1:]):
            f.write(" ".join(letters(int(t)) for t in corpus.tokens[a:b]).capitalize() + ".\n")
    read = word2vec.read_text(path, min_count=1)
    assert sorted(read.counts.tolist(), reverse=True) == read.counts.tolist()
    assert read.tokens.shape[0] == corpus.tokens.shape[0]
    rc, out = command([sys.executable, "-m", "adapm.apps.word2vec", "--nodes", "1",
                       "--workers-per-node", "1", "--text", str(path), "--min-count", "1",
                       "--dim", "16", "--epochs", "2", "--batch", "256", "--heldout", "0.1"],
                      tmp_path)
    assert rc == 0, out
    assert f"{path}: {read.vocab_size:,} words" in out
    assert "untrained ->" in out and "neighbour precision" not in out  # no topics known


def test_cli_one_sentence_per_line_saves_vectors_and_json(tmp_path):
    corpus = word2vec.synthetic(120, 4, 1500, 8, 0.1, 1.0, seed=3)
    path = tmp_path / "lines.txt"
    with open(path, "w") as f:  # one sentence per line, no punctuation
        for a, b in zip(corpus.starts[:-1], corpus.starts[1:]):
            f.write(" ".join(letters(int(t)) for t in corpus.tokens[a:b]) + "\n")
    read = word2vec.read_text(path, min_count=1, lines=True)
    assert read.num_sentences == 1500
    vectors, out_json, prefix = tmp_path / "vectors.txt", tmp_path / "run.json", tmp_path / "w"
    rc, out = command([sys.executable, "-m", "adapm.apps.word2vec", "--nodes", "1",
                       "--text", str(path), "--one-sentence-per-line", "--min-count", "1",
                       "--dim", "8", "--epochs", "2", "--batch", "256", "--heldout", "0.1",
                       "--save-vectors", str(vectors), "--json", str(out_json),
                       "--worker-json", str(prefix)], tmp_path)
    assert rc == 0, out
    assert f"{read.vocab_size:,} words, {read.tokens.shape[0]:,} tokens, 1,500 sentences" in out
    assert f"to {vectors} (word2vec text format)" in out
    words, table = load_word2vec_text(vectors)
    assert words == read.words and table.shape == (read.vocab_size, 8)
    assert np.isfinite(table).all() and np.abs(table).max() > 0.5 / 8  # trained, not initial
    result = json.loads(out_json.read_text())
    assert result["heldout_after"] < result["heldout_before"]
    assert result["throughput"]["points"] > 0 and result["throughput"]["local_share"] == 1.0
    # the saved vectors are the ones the run's neighbours came from
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    sims = unit @ unit[0]
    sims[0] = -np.inf
    first, nearest = result["neighbours"][0].split(": ")
    assert first == words[0] and nearest.split(" ")[0] == words[int(np.argmax(sims))]
    worker = json.loads((tmp_path / "w.rank0.json").read_text())
    assert worker["points"] == result["throughput"]["points"] and "metrics" in worker
    # the flag needs a text file; a missing directory is refused before training
    rc, out = command([sys.executable, "-m", "adapm.apps.word2vec",
                       "--one-sentence-per-line"], tmp_path)
    assert rc == 2 and "--one-sentence-per-line needs --text" in out
    rc, out = command([sys.executable, "-m", "adapm.apps.word2vec", "--text", str(path),
                       "--save-vectors", str(tmp_path / "no" / "v.txt")], tmp_path)
    assert rc == 2 and "no such directory" in out


def test_runs_under_adapm_launch_on_two_nodes(tmp_path):
    num_keys, value_length = word2vec.table_shape(300, 16, 1)  # row-wise AdaGrad's state
    rc, out = command([LAUNCHER, "--nodes", "2", "--workers-per-node", "1", "--num-keys",
                       str(num_keys), "--value-length", str(value_length), "-m",
                       "adapm.apps.word2vec", *TINY_ARGS], tmp_path)
    assert rc == 0, out
    assert out.count("untrained ->") == 1 and "[n0 w0] [word2vec] done in" in out
    assert "neighbour precision" in out
    rc, out = command([LAUNCHER, "--num-keys", str(num_keys - 1), "--value-length",
                       str(value_length), "-m", "adapm.apps.word2vec", *TINY_ARGS], tmp_path)
    assert rc != 0 and f"--num-keys {num_keys} --value-length {value_length}" in out


# -- the whole corpus, named probes ------------------------------------------------------


def test_heldout_zero_trains_on_every_sentence(tmp_path):
    args = [a for a in TINY_ARGS]
    args[args.index("--heldout") + 1] = "0"
    args.append("--fixed-window")  # every pair within the window, so they can be counted
    out_json = tmp_path / "run.json"
    rc, out = command([sys.executable, "-m", "adapm.apps.word2vec", "--nodes", "1",
                       "--workers-per-node", "2", *args, "--json", str(out_json)], tmp_path)
    assert rc == 0, out
    result = json.loads(out_json.read_text())
    corpus = word2vec.synthetic(300, 10, 3000, 10, 0.1, 1.0, seed=0)
    every = word2vec.skipgram_pairs(*corpus.sentences(np.arange(3000)), window=2)[0]
    assert result["throughput"]["points"] == 2 * every.shape[0]  # both epochs, all pairs
    # nothing held out: the loss before and after is measured on training pairs
    assert result["loss_pairs"] == "training" and "training-sample loss" in out
    assert result["heldout_after"] < result["heldout_before"]


def write_stop_word_lines(path, lines=200, seed=0):
    """write_lines' groups with 'the' and 'of' in every line: the most frequent words."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            words = list(rng.permutation(GROUPS[i % 5] + ["the", "of"]))
            f.write(" ".join(words) + "\n")


def neighbour_lines(out):
    """{word: [neighbours]} of the printed nearest neighbours."""
    found = {}
    for line in out.splitlines():
        if line.startswith("[word2vec]   ") and ": " in line:
            word, rest = line[len("[word2vec]   "):].split(": ", 1)
            found[word] = [item.split(" ")[0] for item in rest.split(", ")]
    return found


def test_probe_prints_neighbours_of_the_named_words_not_stop_words(tmp_path):
    path = tmp_path / "lines.txt"
    write_stop_word_lines(path)
    base = [sys.executable, "-m", "adapm.apps.word2vec", "--nodes", "1", "--text", str(path),
            "--one-sentence-per-line", "--min-count", "1", "--dim", "16", "--epochs", "3",
            "--batch", "64", "--heldout", "0.1"]
    rc, out = command([*base, "--probe", "alpha,Kilo"], tmp_path)
    assert rc == 0, out
    shown = neighbour_lines(out)
    assert list(shown) == ["alpha", "kilo"]  # lowercased as the text is
    for word, group in (("alpha", GROUPS[0]), ("kilo", GROUPS[2])):
        assert len(set(shown[word]) & set(group)) >= 3, shown  # its group's words
    # by default: the most frequent words that are not stop words
    rc, out = command(base, tmp_path)
    assert rc == 0, out
    shown = neighbour_lines(out)
    assert len(shown) == 5 and not {"the", "of"} & set(shown), shown
    # a word outside the vocabulary is refused before training
    rc, out = command([*base, "--probe", "alpha,zulu"], tmp_path)
    assert rc == 2 and "zulu" in out and "vocabulary" in out
