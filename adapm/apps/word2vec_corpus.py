"""The word2vec app's data (adapm.apps.word2vec): a generated corpus or a text file as
sentences of word ids, skip-gram pairs, subsampling, the held-out split and the noise
distribution of the negatives."""

import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np

from adapm.client.sampling import Distribution


@dataclass
class Corpus:
    """Sentences of word ids: sentence s is tokens[starts[s]:starts[s + 1]]. Word ids are
    ranks by frequency (0 = most frequent). `topics[i]` is word i's planted topic (generated
    corpora only)."""

    words: list
    counts: np.ndarray
    tokens: np.ndarray
    starts: np.ndarray
    topics: Optional[np.ndarray] = None

    @property
    def vocab_size(self):
        return len(self.words)

    @property
    def num_sentences(self):
        return self.starts.shape[0] - 1

    def sentences(self, ids):
        """(tokens, sentence label per token) of the sentences `ids`, in that order."""
        ids = np.asarray(ids, dtype=np.int64)
        begin, end = self.starts[ids], self.starts[ids + 1]
        lengths = end - begin
        labels = np.repeat(np.arange(ids.shape[0]), lengths)
        offsets = np.arange(labels.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return self.tokens[np.repeat(begin, lengths) + offsets], labels


def synthetic(vocab, topics, sentences, length, noise, exponent, seed):
    """A corpus with planted structure: word i (ids by expected frequency rank) has Zipf frequency
    1/(i+1)^exponent and belongs to one of `topics` topics (a seeded shuffle, so every
    topic has frequent and rare words). A sentence picks one topic (by its share of the
    frequency mass) and draws its `length` words from that topic's words, by frequency;
    each word is instead, with probability `noise`, drawn from the whole vocabulary. Words
    of one topic co-occur, words of different topics only through noise. Word names are
    tTT_JJJ: topic TT, the topic's JJJ-th most frequent word."""
    if topics < 1 or vocab < topics:
        raise ValueError(f"need 1 <= topics <= vocab, got {topics} topics, {vocab} words")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab + 1) ** exponent
    topic_of = rng.permutation(np.arange(vocab) % topics)
    members = [np.flatnonzero(topic_of == t) for t in range(topics)]
    mass = np.array([weights[m].sum() for m in members])
    sentence_topic = rng.choice(topics, size=sentences, p=mass / mass.sum())
    tokens = np.empty((sentences, length), dtype=np.int64)
    for t in range(topics):
        rows = np.flatnonzero(sentence_topic == t)
        cdf = np.cumsum(weights[members[t]])
        draws = np.searchsorted(cdf, rng.random((rows.shape[0], length)) * cdf[-1])
        tokens[rows] = members[t][np.minimum(draws, members[t].shape[0] - 1)]
    cdf = np.cumsum(weights)
    noisy = rng.random((sentences, length)) < noise
    tokens[noisy] = np.minimum(np.searchsorted(cdf, rng.random(int(noisy.sum())) * cdf[-1]),
                               vocab - 1)
    within = np.empty(vocab, dtype=np.int64)
    for m in members:
        within[m] = np.arange(m.shape[0])
    words = [f"t{topic_of[i]:02d}_{within[i]:03d}" for i in range(vocab)]
    counts = np.bincount(tokens.reshape(-1), minlength=vocab)
    starts = np.arange(0, sentences * length + 1, length, dtype=np.int64)
    return Corpus(words, counts, tokens.reshape(-1).astype(np.int32), starts, topic_of)


SENTENCE_END = re.compile(r"[.!?]+|\n[ \t\r\f\v]*\n")
WORD = re.compile(r"[^\W\d_]+")  # runs of letters (any script); the rest separates words


def read_text(path, min_count=5, max_vocab=0, lines=False):
    """A corpus from any plain-text file (UTF-8; undecodable bytes replaced). The text is
    lowercased and split into sentences at . ! ? and blank lines (with `lines`: at every
    line end, and nowhere else: one sentence per line, as word2vec's and gensim's
    LineSentence input), and into words at anything that is not a letter. No window
    crosses a sentence's end. The vocabulary: words seen at least `min_count` times,
    most frequent first (ties alphabetical), at most `max_vocab` of them (0: no limit).
    Other words are dropped from the sentences (so a window spans over them), as are
    sentences left with fewer than two words."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read().lower()
    pieces = text.splitlines() if lines else SENTENCE_END.split(text)
    sentences = [WORD.findall(piece) for piece in pieces]
    counts = Counter(word for sentence in sentences for word in sentence)
    vocab = sorted((w for w, c in counts.items() if c >= min_count),
                   key=lambda w: (-counts[w], w))
    if max_vocab:
        vocab = vocab[:max_vocab]
    if len(vocab) < 2:
        raise ValueError(f"{path}: {len(vocab)} word(s) occur at least {min_count} times; "
                         "word2vec needs a vocabulary of 2 or more (lower --min-count)")
    index = {w: i for i, w in enumerate(vocab)}
    kept = [[index[w] for w in sentence if w in index] for sentence in sentences]
    kept = [s for s in kept if len(s) >= 2]
    if not kept:
        raise ValueError(f"{path}: no sentence has two words of the vocabulary")
    lengths = np.array([len(s) for s in kept], dtype=np.int64)
    tokens = np.fromiter((i for s in kept for i in s), dtype=np.int32, count=int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return Corpus(vocab, np.bincount(tokens, minlength=len(vocab)), tokens, starts, None)


def skipgram_pairs(tokens, labels, window, rng=None):
    """(centres, contexts): every ordered pair of words at most `window` apart within one
    sentence (labels: the sentence of each token). With `rng`, word2vec's and gensim's
    reduced windows: each word draws its own window uniformly from 1 .. window and pairs,
    as a centre, with the words within it (so a word has window + 1 contexts on average
    in a long sentence, not 2 window)."""
    reach = None if rng is None else rng.integers(1, window + 1, size=tokens.shape[0])
    centres, contexts = [], []
    for offset in range(1, window + 1):
        same = labels[:-offset] == labels[offset:]
        left, right = same, same  # left: the earlier word is the centre
        if reach is not None:
            left, right = same & (reach[:-offset] >= offset), same & (reach[offset:] >= offset)
        centres += [tokens[:-offset][left], tokens[offset:][right]]
        contexts += [tokens[offset:][left], tokens[:-offset][right]]
    if not centres:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return (np.concatenate(centres).astype(np.int64),
            np.concatenate(contexts).astype(np.int64))


def subsample(rng, corpus, tokens, labels, threshold):
    """word2vec's subsampling of frequent words: an occurrence of a word of corpus frequency
    f is kept with probability min(1, sqrt(threshold / f) + threshold / f)."""
    if threshold <= 0:
        return tokens, labels
    f = corpus.counts / max(corpus.counts.sum(), 1)
    ratio = threshold / np.maximum(f[tokens], 1e-12)
    keep = rng.random(tokens.shape[0]) < np.sqrt(ratio) + ratio
    return tokens[keep], labels[keep]


def split_sentences(corpus, heldout):
    """(training sentence ids, held-out sentence ids): the last `heldout` share is held out."""
    n = corpus.num_sentences
    cut = n - int(round(n * heldout))
    return np.arange(cut), np.arange(cut, n)


def noise_distribution(corpus, exponent):
    """The distribution negatives are drawn from, over the V output keys: word i with
    probability proportional to count_i^exponent (word2vec: 0.75; a word never seen is
    never drawn), as an adapm.client.sampling.Distribution; None for exponent 0 (uniform: every
    word equally likely, prepare_sample's default)."""
    if exponent == 0:
        return None
    return Distribution(corpus.counts.astype(np.float64) ** exponent)


def loss_pairs(opts):
    """Whose pairs the evaluation loss is measured on: the held-out sentences', or with
    heldout 0 (every sentence trained on) the training sentences'."""
    return "held-out" if opts["heldout"] > 0 else "training"


def heldout_pairs(corpus, opts):
    """The evaluation pairs (at most opts['heldout_pairs'], a seeded choice) of the
    held-out sentences (with heldout 0: of the training sentences, loss_pairs) and their
    fixed negatives, output keys drawn from the noise distribution the training draws
    from: the same for every run with this seed, whatever the number of nodes and
    workers."""
    train, held = split_sentences(corpus, opts["heldout"])
    if loss_pairs(opts) == "training":
        held = train
    centres, contexts = skipgram_pairs(*corpus.sentences(held), opts["window"])
    rng = np.random.default_rng([opts["seed"], 7])
    if centres.shape[0] > opts["heldout_pairs"]:
        pick = np.sort(rng.choice(centres.shape[0], opts["heldout_pairs"], replace=False))
        centres, contexts = centres[pick], contexts[pick]
    v, shape = corpus.vocab_size, (centres.shape[0], opts["negatives"])
    noise = noise_distribution(corpus, opts["ns_exponent"])
    if noise is None:
        negatives = rng.integers(v, 2 * v, size=shape)
    else:
        negatives = v + noise.draw(rng, shape[0] * shape[1]).reshape(shape)
    return centres, contexts, negatives
