"""The knowledge-graph-embedding app (ComplEx) at tiny scale: its gradients and filtered
ranking, that it learns, that N nodes match 1 node, the TSV files, the command line."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapm.apps import kge

pytestmark = pytest.mark.timeout(180)

# 1,000 entities in 10 clusters, about 14,000 distinct triples of which 20% are test
# triples (a large test share keeps the metric's own noise down). 4 epochs reach the
# plateau of the validation MRR on this graph (it stays flat until about epoch 7).
TINY = dict(kge.DEFAULTS, entities=1000, relations=8, triples=20_000, clusters=10,
            batch=128, epochs=4, test_fraction=0.2, valid_sample=200, seed=1)
# Same seed: same graph, same initial values, same shards and negatives per rank; what
# differs between cluster shapes is the order in which workers' updates meet. Measured
# (3 seeds x 5 runs of 2 nodes x 1 worker against 1 node x 1 worker): filtered MRR within
# 0.023 absolute of the 1-node run, Hits@10 within 0.02; the test allows 0.05 (about 15%
# of the MRR of ~0.3).
TOLERANCE = 0.05
LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    b, k, dim = 3, 4, 5
    h, r, t = (rng.normal(size=(b, 2 * dim)) for _ in range(3))
    neg = rng.normal(size=(b, k, 2 * dim))
    corrupt_tail = rng.random((b, k)) < 0.5
    _, *grads = kge.batch_loss_and_grads(h, r, t, neg, corrupt_tail)
    for array, grad in zip((h, r, t, neg), grads):
        numeric = np.zeros_like(array)
        for i in np.ndindex(array.shape):
            old = array[i]
            array[i] = old + 1e-6
            up = kge.batch_loss_and_grads(h, r, t, neg, corrupt_tail)[0]
            array[i] = old - 1e-6
            down = kge.batch_loss_and_grads(h, r, t, neg, corrupt_tail)[0]
            array[i] = old
            numeric[i] = (up - down) / 2e-6
        np.testing.assert_allclose(grad, numeric, atol=1e-6)
    # the score is ComplEx's Re(<h, r, conj(t)>)
    as_complex = [x[:, :dim] + 1j * x[:, dim:] for x in (h, r, t)]
    expected = np.real((as_complex[0] * as_complex[1] * np.conj(as_complex[2])).sum(axis=1))
    np.testing.assert_allclose(kge.score_and_grads(h, r, t)[0], expected, atol=1e-12)


def test_filtered_ranks_match_a_plain_loop():
    rng = np.random.default_rng(1)
    e, r, dim = 30, 3, 4
    triples = np.unique(np.column_stack([rng.integers(0, e, 200), rng.integers(0, r, 200),
                                         rng.integers(0, e, 200)]), axis=0)
    graph = kge.Graph(e, r, triples[:150], triples[150:160], triples[160:])
    known = kge.KnownTriples(graph)
    ent, rel = rng.normal(size=(e, 2 * dim)), rng.normal(size=(r, 2 * dim))
    ent[7] = ent[3]  # a tie: counted half
    tail_ranks, head_ranks = kge.filtered_ranks(ent, rel, graph.test, known, chunk=7)
    truth = {tuple(x) for x in triples}
    for i, (h, rl, t) in enumerate(graph.test):
        tail_scores = [kge.score_and_grads(ent[h], rel[rl], ent[x])[0] for x in range(e)]
        head_scores = [kge.score_and_grads(ent[x], rel[rl], ent[t])[0] for x in range(e)]
        tail_rivals = [x for x in range(e) if x != t and (h, rl, x) not in truth]
        head_rivals = [x for x in range(e) if x != h and (x, rl, t) not in truth]
        for scores, true, rivals, rank in ((tail_scores, t, tail_rivals, tail_ranks[i]),
                                           (head_scores, h, head_rivals, head_ranks[i])):
            better = sum(scores[x] > scores[true] + 1e-9 for x in rivals)
            tied = sum(abs(scores[x] - scores[true]) <= 1e-9 for x in rivals)
            assert rank == pytest.approx(1 + better + 0.5 * tied)


def test_training_beats_the_untrained_model_clearly():
    result = kge.run(TINY, nodes=1, workers_per_node=1)
    assert result["mrr_before"] < 0.02 and result["hits10_before"] < 0.05  # about random
    assert result["mrr_after"] > 0.2, result
    assert result["hits10_after"] > 0.35, result
    assert result["mrr_after"] > 10 * result["mrr_before"]
    assert len(result["log"]) == TINY["epochs"]
    assert all("valid filtered MRR" in line for line in result["log"])


def test_two_nodes_reach_the_quality_of_one_node():
    one = kge.run(TINY, nodes=1, workers_per_node=1)
    two = kge.run(TINY, nodes=2, workers_per_node=1, mode="adaptive")
    assert two["mrr_before"] == pytest.approx(one["mrr_before"])  # same initial model
    assert abs(two["mrr_after"] - one["mrr_after"]) <= TOLERANCE, (one, two)
    assert abs(two["hits10_after"] - one["hits10_after"]) <= TOLERANCE, (one, two)
    assert two["workers"] == 2 and two["points"] == one["points"]
    # intents (the batches' keys) and prepared samples (the negatives) made keys local
    assert two["local_share"] > 0.9, two


def test_tsv_files_round_trip(tmp_path):
    graph = kge.load_graph(TINY)
    kge.save(graph, tmp_path)
    named = [kge.read_tsv(tmp_path / f"{part}.tsv") for part in ("train", "valid", "test")]
    assert named[0][0, 0].startswith("e") and named[0][0, 1].startswith("r")
    ids, entity_names, relation_names = kge.index_names(named)
    # every generated entity occurs, and zero-padded names sort like the ids: same ids
    assert len(entity_names) == graph.entities and len(relation_names) == graph.relations
    for read, original in zip(ids, (graph.train, graph.valid, graph.test)):
        np.testing.assert_array_equal(read, original)
    # read as --train-file/--test-file: the test file as is, validation held out of train
    # (entities that occur in valid.tsv only are not in these files: compare by name)
    opts = dict(TINY, train_file=str(tmp_path / "train.tsv"),
                test_file=str(tmp_path / "test.tsv"))
    from_files = kge.load_graph(opts)
    entity_ids = np.array([int(name[1:]) for name in from_files.entity_names])
    relation_ids = np.array([int(name[1:]) for name in from_files.relation_names])

    def original(triples):
        return np.column_stack([entity_ids[triples[:, 0]], relation_ids[triples[:, 1]],
                                entity_ids[triples[:, 2]]])

    np.testing.assert_array_equal(original(from_files.test), graph.test)
    both = original(np.concatenate([from_files.train, from_files.valid]))
    np.testing.assert_array_equal(np.unique(both, axis=0), np.unique(graph.train, axis=0))
    assert from_files.valid.shape[0] == round(TINY["valid_fraction"] * len(graph.train))
    assert from_files.entities == len(np.unique(np.concatenate(
        [graph.train[:, [0, 2]], graph.test[:, [0, 2]]])))
    # one file only: validation and test triples are held out of it
    alone = kge.load_graph(dict(TINY, train_file=str(tmp_path / "train.tsv")))
    n = len(graph.train)
    assert len(alone.test) == round(TINY["test_fraction"] * n)
    assert len(alone.valid) == round(TINY["valid_fraction"] * n)
    assert len(alone.train) + len(alone.valid) + len(alone.test) == n
    # names are any strings; ids follow their sorted order
    (tmp_path / "named.tsv").write_text("paris\tcapital_of\tfrance\n\n"
                                        "berlin\tcapital_of\tgermany\n")
    (ids,), entities, relations = kge.index_names([kge.read_tsv(tmp_path / "named.tsv")])
    assert list(entities) == ["berlin", "france", "germany", "paris"]
    assert list(relations) == ["capital_of"]
    np.testing.assert_array_equal(ids, [[3, 0, 1], [0, 0, 2]])
    (tmp_path / "bad.tsv").write_text("a\tr\tb\na\tr\n")
    with pytest.raises(ValueError, match="bad.tsv:2"):
        kge.read_tsv(tmp_path / "bad.tsv")


def test_command_line_generates_saves_and_trains_from_files_launched(tmp_path):
    # (run outside the checkout, whose adapm/ folder would shadow the installed package)
    small = ["--entities", "400", "--relations", "6", "--triples", "6000", "--clusters", "8",
             "--dim", "8", "--epochs", "3", "--batch", "128", "--valid-sample", "100"]
    # no validation split: every entity is in train.tsv or test.tsv, so the launched run
    # below knows its table size (400 entities + 6 relations)
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "adapm.apps.kge", *small, "--nodes", "1",
         "--workers-per-node", "2", "--valid-fraction", "0", "--save-data", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "data points (triples)/s per worker" in proc.stdout
    assert "test filtered MRR" in proc.stdout and "(untrained: " in proc.stdout
    result = json.loads(out.read_text())
    assert result["mrr_after"] > result["mrr_before"] and result["workers"] == 2
    # the saved files, on a cluster started by adapm-launch (value length 4 x dim)
    proc = subprocess.run(
        [LAUNCHER, "--nodes", "2", "--num-keys", "406", "--value-length", "32",
         "-m", "adapm.apps.kge", "--train-file", str(tmp_path / "train.tsv"),
         "--test-file", str(tmp_path / "test.tsv"), "--dim", "8", "--epochs", "3",
         "--batch", "128", "--valid-sample", "0"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 node(s) x 1 worker(s)" in proc.stdout
    assert "test filtered MRR" in proc.stdout
    # a table of the wrong shape is refused with the shape the app needs
    proc = subprocess.run(
        [LAUNCHER, "--nodes", "1", "--num-keys", "100", "--value-length", "32",
         "-m", "adapm.apps.kge", "--train-file", str(tmp_path / "train.tsv"), "--dim", "8"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "--num-keys 406 --value-length 32" in proc.stdout + proc.stderr


def named(graph, triples):
    """Triples (ids of `graph`) as a set of name tuples."""
    entities, relations = graph.names()
    return {(entities[h], relations[r], entities[t]) for h, r, t in triples}


def test_valid_file_is_the_validation_set_and_is_filtered(tmp_path):
    graph = kge.load_graph(TINY)
    kge.save(graph, tmp_path)
    files = {part: str(tmp_path / f"{part}.tsv") for part in ("train", "valid", "test")}
    read = kge.load_graph(dict(TINY, train_file=files["train"], valid_file=files["valid"],
                               test_file=files["test"]))
    # PyKEEN's layout: each file is its split, nothing held out of the training file
    for part in ("train", "valid", "test"):
        assert named(read, getattr(read, part)) == named(graph, getattr(graph, part)), part
    # the filtered ranking leaves out every known triple, the validation file's too
    known = kge.KnownTriples(read)
    rows, tails = known.tails.pairs(read.valid[:, 0] * read.relations + read.valid[:, 1])
    found = set(zip(rows.tolist(), tails.tolist()))
    assert all((i, t) in found for i, t in enumerate(read.valid[:, 2].tolist()))
    # without a test file the test triples are held out of the training file
    no_test = kge.load_graph(dict(TINY, train_file=files["train"], valid_file=files["valid"]))
    assert named(no_test, no_test.valid) == named(graph, graph.valid)
    assert len(no_test.test) == round(TINY["test_fraction"] * len(graph.train))
    assert named(no_test, np.concatenate([no_test.train, no_test.test])) == \
        named(graph, graph.train)


def test_command_line_valid_file_and_saved_embeddings(tmp_path):
    graph = kge.load_graph(dict(TINY, entities=300, relations=4, triples=5000, clusters=6))
    kge.save(graph, tmp_path)
    files = ["--train-file", str(tmp_path / "train.tsv"), "--valid-file",
             str(tmp_path / "valid.tsv"), "--test-file", str(tmp_path / "test.tsv")]
    out, saved = tmp_path / "result.json", tmp_path / "emb"
    proc = subprocess.run(
        [sys.executable, "-m", "adapm.apps.kge", *files, "--dim", "8", "--epochs", "3",
         "--batch", "128", "--valid-sample", "100", "--nodes", "2", "--save-embeddings",
         str(saved), "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    epochs = [line for line in proc.stdout.splitlines() if "] epoch " in line]
    assert len(epochs) == 3 and all("valid filtered MRR" in line for line in epochs)
    assert f"{len(graph.valid):,} valid" in proc.stdout
    result = json.loads(out.read_text())
    # the saved embeddings, with their names, are the trained model: they give the
    # reported test MRR
    read = kge.load_graph(dict(TINY, train_file=files[1], valid_file=files[3],
                               test_file=files[5]))
    entity_names = (saved / "entities.tsv").read_text(encoding="utf-8").split("\n")[:-1]
    relation_names = (saved / "relations.tsv").read_text(encoding="utf-8").split("\n")[:-1]
    assert entity_names == list(read.entity_names)
    assert relation_names == list(read.relation_names)
    entities, relations = np.load(saved / "entities.npy"), np.load(saved / "relations.npy")
    assert entities.shape == (read.entities, 16) and relations.shape == (read.relations, 16)
    model = json.loads((saved / "model.json").read_text())
    assert model["model"] == "ComplEx" and model["dim"] == 8
    ranks = np.concatenate(kge.filtered_ranks(entities.astype(np.float64),
                                              relations.astype(np.float64), read.test,
                                              kge.KnownTriples(read)))
    assert (1.0 / ranks).mean() == pytest.approx(result["mrr_after"], rel=1e-6)
    assert result["mrr_after"] > 3 * result["mrr_before"]
    # a validation file needs a training file
    proc = subprocess.run([sys.executable, "-m", "adapm.apps.kge", "--valid-file",
                           str(tmp_path / "valid.tsv")], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "--valid-file needs --train-file" in proc.stderr
