"""The CTR app at tiny scale: it learns, DDP keeps the MLPs identical, the parameter
server matches torch's own EmbeddingBag, Criteo files round-trip, the CLI reports."""
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from adapm.apps import ctr  # noqa: E402

pytestmark = pytest.mark.timeout(240)

TINY = dict(train=24_000, test=4_000, fields=4, vocab=2_000, max_bag=3, buckets=10_000,
            dim=8, epochs=1, batch=512, lr=0.05, lookahead=None, seed=1, data=None,
            test_data=None, worker_json=None)


def test_two_nodes_learn_and_keep_their_mlps_identical():
    summary = ctr.run(dict(TINY, return_tower=True), nodes=2, workers_per_node=1,
                      mode="adaptive")
    assert summary["auc_after"] > summary["auc_before"] + 0.1, summary
    assert summary["logloss_after"] < summary["logloss_before"], summary
    first, second = summary["towers"]
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):  # DistributedDataParallel over both workers
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-6)
    assert summary["workers"] == 2 and summary["local_share"] > 0.5


def test_one_node_matches_torch_embedding_bag():
    """One worker: the same batches through adapm.torch.EmbeddingBag (rows and Adagrad
    in the table) and through torch.nn.EmbeddingBag with torch.optim.Adagrad."""
    one = ctr.run(dict(TINY), nodes=1, workers_per_node=1, mode="adaptive")
    plain = ctr.train_plain(dict(TINY))
    assert one["auc_before"] == pytest.approx(plain["auc_before"], abs=1e-6)
    assert one["auc_after"] == pytest.approx(plain["auc_after"], abs=2e-3)
    assert one["logloss_after"] == pytest.approx(plain["logloss_after"], rel=1e-2)


def test_criteo_files_round_trip(tmp_path):
    opts = dict(TINY, train=2_000, test=500)
    ctr.save(opts, str(tmp_path))
    lines = (tmp_path / "train.tsv").read_text().splitlines()
    assert len(lines) == 2_000
    fields = lines[0].split("\t")
    assert len(fields) == 1 + ctr.DENSE + ctr.FIELDS
    train, test = ctr.load_data(dict(opts, data=str(tmp_path / "train.tsv"),
                                     test_data=str(tmp_path / "test.tsv")))
    generated, _ = ctr.load_data(opts)
    np.testing.assert_array_equal(train.labels, generated.labels)
    np.testing.assert_allclose(train.dense, np.log1p(np.round(np.expm1(generated.dense))),
                               rtol=1e-5)
    assert len(test) == 500 and train.fields == ctr.FIELDS


def test_auc_and_log_loss():
    assert ctr.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert ctr.auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert ctr.auc([1, 0], [0.2, 0.8]) == 0.0
    assert ctr.log_loss(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))


def test_hashing_separates_fields():
    same_raw = ctr.hash_features(np.array([0, 1]), np.array([7, 7]), 1 << 20)
    assert same_raw[0] != same_raw[1]
    assert (ctr.hash_features(np.arange(4), np.arange(4), 100) < 100).all()


def test_cli_reports_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "adapm.apps.ctr", "--nodes", "2", "--train", "8000",
         "--test", "2000", "--fields", "4", "--vocab", "1000", "--buckets", "5000",
         "--dim", "8", "--batch", "512", "--json", str(out)],
        capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test AUC" in proc.stdout and "samples/s" in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["workers"] == 2 and "auc_after" in summary


def test_runs_under_adapm_launch(tmp_path):
    """Launched workers write the optimizer's initial values themselves and join one
    torch.distributed group across the launched nodes."""
    from pathlib import Path
    launcher = str(Path(sys.executable).with_name("adapm-launch"))
    proc = subprocess.run(
        [launcher, "--nodes", "2", "--num-keys", "5000", "--value-length", "16",
         "-m", "adapm.apps.ctr", "--train", "4000", "--test", "1000", "--fields", "4",
         "--vocab", "500", "--buckets", "5000", "--dim", "8", "--batch", "512"],
        capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "trained" in proc.stdout and "test AUC" in proc.stdout
