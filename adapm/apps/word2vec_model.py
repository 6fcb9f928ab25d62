"""The word2vec app's model (adapm.apps.word2vec): the initial vectors, one skip-gram step
with negative sampling, the pair loss, and what the trained vectors show (nearest
neighbours of probe words, the vectors in word2vec's text format)."""

import io

import numpy as np

from adapm.apps._word2vec import KeyIndex, train_pairs
from adapm.table.initializers import initial_values

TOP_K = 5                 # neighbours per probe word for the neighbour precision
EVAL_BATCH = 8192         # held-out pairs per pull when measuring the held-out loss
ADAGRAD_EPS = 1e-8        # row-wise AdaGrad's, as adapm.optim.RowWiseAdagrad's default


class EmbeddingInit:
    """Initial values: input vectors (keys [0, V)) uniform in +-0.5/dim, seeded (as
    init=("uniform", ...), so the same whatever the number of nodes); output vectors
    (keys [V, 2V)) and the metrics slot (key 2V) zero, as word2vec's."""

    def __init__(self, vocab, dim, seed, state=0):
        self.vocab, self.dim, self.seed, self.state = vocab, dim, seed, state

    def __call__(self, keys):
        keys = np.asarray(keys, dtype=np.uint64)
        values = np.zeros((keys.shape[0], self.dim + self.state), dtype=np.float32)
        inputs = np.flatnonzero(keys < self.vocab)
        if inputs.shape[0]:
            lengths = np.full(inputs.shape[0], self.dim, dtype=np.uint64)
            half = 0.5 / self.dim
            values[inputs, :self.dim] = initial_values(
                ("uniform", -half, half, self.seed), keys[inputs], lengths,
                "float32").reshape(-1, self.dim)
        return values


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


class SkipGramStep:
    """One minibatch of skip-gram with negative sampling, trained as word2vec and gensim
    train (word2vec's update pair after pair, compiled: adapm.apps._word2vec): the
    batch's distinct rows are pulled once (from shared memory where this node holds them,
    from their owners otherwise), every pair is trained in turn on that copy, and what
    the batch changed is pushed as an additive update (in place where held, else to the
    owner): another worker's updates meanwhile are added to, never overwritten."""

    def __init__(self, num_keys, vocab, negatives, adagrad=False):
        self.keys = KeyIndex(num_keys)
        self.vocab, self.negatives, self.adagrad = vocab, negatives, adagrad

    def __call__(self, w, centres, contexts, negative_keys, alpha, alpha_end):
        """Train pairs (centres[i], contexts[i]) (word ids) against negative_keys (output
        keys, `negatives` per pair, pair by pair), the learning rate falling linearly from
        `alpha` to `alpha_end` over the batch. Returns the batch's summed loss."""
        pairs = centres.shape[0]
        keys = np.concatenate([centres, contexts + self.vocab, negative_keys.astype(np.int64)])
        distinct, inverse = self.keys.index(keys)
        values = w.pull(distinct)
        rows = np.array(values, dtype=np.float32, order="C")  # trained in place
        loss = train_pairs(rows, inverse, pairs, self.negatives, alpha, alpha_end,
                           self.adagrad, ADAGRAD_EPS)
        w.push(distinct, (rows - values).astype(values.dtype, copy=False))
        return loss


def pair_loss(w, vocab, dim, centres, contexts, negatives):
    """Mean loss per pair of (centres, contexts) with the given negative output keys."""
    total = 0.0
    for start in range(0, centres.shape[0], EVAL_BATCH):
        sl = slice(start, start + EVAL_BATCH)
        v_c = w.pull(centres[sl])[:, :dim]
        u_o = w.pull(vocab + contexts[sl])[:, :dim]
        neg = negatives[sl]
        u_n = w.pull(neg.reshape(-1))[:, :dim].reshape(neg.shape[0], neg.shape[1], dim)
        total -= float(log_sigmoid(np.einsum("ij,ij->i", v_c, u_o)).sum())
        total -= float(log_sigmoid(-np.einsum("ikj,ij->ik", u_n, v_c)).sum())
    return total / max(centres.shape[0], 1)


def nearest(vectors, probes, k):
    """For each probe word: its k nearest words by cosine of the vectors, (ids, cosines)."""
    norms = np.linalg.norm(vectors, axis=1)
    unit = vectors / np.maximum(norms, 1e-12)[:, None]
    sims = unit[probes] @ unit.T
    sims[np.arange(len(probes)), probes] = -np.inf  # not itself
    k = min(k, vectors.shape[0] - 1)
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    return top, np.take_along_axis(sims, top, axis=1)


def word_vectors(w, corpus, dim):
    """The word vectors (the input vectors, keys [0, V)), float32 (V, dim)."""
    return w.pull(np.arange(corpus.vocab_size))[:, :dim].astype(np.float32)


def write_vectors(path, words, vectors):
    """Word vectors in word2vec's text format: a line "V D", then one line per word,
    "word v1 ... vD" (values as %.9g: float32 exactly). gensim reads it with
    KeyedVectors.load_word2vec_format(path, binary=False). Words must be non-empty and
    free of whitespace (the reader's words are runs of letters)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise ValueError(f"{len(words)} words need a (words, dim) array, got shape "
                         f"{vectors.shape}")
    for word in words:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"word {word!r} cannot be written in the text format")
    body = io.StringIO()
    np.savetxt(body, vectors, fmt="%.9g", delimiter=" ")
    rows = body.getvalue().splitlines()
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{vectors.shape[0]} {vectors.shape[1]}\n")
        for word, row in zip(words, rows):
            f.write(f"{word} {row}\n")


# English function words: the most frequent words of any English text, whose neighbours
# say little, are not printed by default (the user names words with --probe).
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers herself him himself his how i if in into is
it its itself just me more most my myself no nor not now of off on once only or other our
ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself
yourselves also may might must shall upon us
""".split())


def probe_words(opts):
    """The words named by opts['probe'] (comma-separated, or a list), lowercased as the
    text reader lowercases the corpus; [] when none are named."""
    probe = opts.get("probe") or []
    if isinstance(probe, str):
        probe = probe.split(",")
    return [word.strip().lower() for word in probe if word.strip()]


def shown_ids(corpus, opts):
    """The ids of the words whose neighbours are printed: the --probe words, else the
    --show most frequent words that are not STOP_WORDS. ValueError for a named word
    outside the vocabulary."""
    named = probe_words(opts)
    if not named:
        kept = [i for i, word in enumerate(corpus.words) if word not in STOP_WORDS]
        return np.array(kept[:opts["show"]], dtype=np.int64)
    index = {word: i for i, word in enumerate(corpus.words)}
    missing = [word for word in named if word not in index]
    if missing:
        raise ValueError(f"--probe: not in the vocabulary: {', '.join(missing)} (words seen "
                         "at least --min-count times, at most --max-vocab of them)")
    return np.array([index[word] for word in named], dtype=np.int64)


def neighbour_report(vectors, corpus, opts):
    """Neighbours of the words of shown_ids by the word vectors; for a generated corpus
    also the neighbour precision (share of the TOP_K neighbours of each of the `probes`
    most frequent words that are in its planted topic) and its chance level."""
    v = corpus.vocab_size
    vectors = vectors.astype(np.float64)
    shown, probed = shown_ids(corpus, opts), min(opts["probes"], v)
    lines = []
    if shown.shape[0]:
        top, sims = nearest(vectors, shown, TOP_K)
        for i, word in enumerate(shown):
            near = ", ".join(f"{corpus.words[j]} {s:.2f}" for j, s in zip(top[i], sims[i]))
            lines.append(f"{corpus.words[word]}: {near}")
    precision = chance = None
    if corpus.topics is not None and probed:
        topics, probes = corpus.topics, np.arange(probed)
        top, _ = nearest(vectors, probes, TOP_K)
        precision = float((topics[top] == topics[probes, None]).mean())
        sizes = np.bincount(topics)
        chance = float(((sizes[topics[probes]] - 1) / (v - 1)).mean())
    return lines, precision, chance, probed
