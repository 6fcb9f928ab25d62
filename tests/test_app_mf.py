"""The matrix-factorisation app at tiny scale: it learns, N nodes match 1 node, files."""
import json
import subprocess
import sys

import numpy as np
import pytest

from adapm.apps import mf

pytestmark = pytest.mark.timeout(180)

TINY = dict(rows=3000, cols=300, train=60_000, test=6_000, rank=8, noise=0.1, epochs=3,
            batch=128, lr=0.1, reg=0.01, lookahead=None, seed=3)
# Same seed, same data and initial values: what differs between cluster shapes is the
# order in which workers' updates meet (and replicas' staleness). Measured over 8 runs of
# 2 nodes and of 1 node x 2 workers: from 2.1% better to 0.9% worse than 1 node x 1
# worker; the test allows 5%. (On a 5x smaller matrix, whose hottest row held 18% of the
# cells, the row partition made 2 workers 3-7% worse, on one node as on two.)
TOLERANCE = 0.05


def test_training_improves_rmse_and_two_nodes_match_one():
    one = mf.run(TINY, nodes=1, workers_per_node=1)
    assert one["rmse_after"] < 0.8 * one["rmse_before"], one
    two = mf.run(TINY, nodes=2, workers_per_node=1, mode="adaptive")
    assert two["rmse_before"] == pytest.approx(one["rmse_before"])  # same initial model
    assert abs(two["rmse_after"] - one["rmse_after"]) <= TOLERANCE * one["rmse_after"]
    assert two["workers"] == 2 and two["points"] == 3 * 60_000
    assert two["local_share"] > 0.9  # intents made the keys local


def test_plain_numpy_loop_is_the_same_sgd():
    plain = mf.train_plain(TINY)
    one = mf.run(TINY, nodes=1, workers_per_node=1)
    # one worker on one node is the same computation on the same shard order
    assert plain["rmse_before"] == pytest.approx(one["rmse_before"], rel=1e-6)
    assert plain["rmse_after"] == pytest.approx(one["rmse_after"], rel=1e-4)


def test_matrix_market_round_trip(tmp_path):
    rows, cols, train, test = mf.load_data(TINY)
    path = tmp_path / "m.mtx"
    mf.write_matrix_market(path, rows, cols, *train)
    r_rows, r_cols, r, c, y = mf.read_matrix_market(path)
    assert (r_rows, r_cols) == (rows, cols)
    np.testing.assert_array_equal(r, train[0])
    np.testing.assert_array_equal(c, train[1])
    np.testing.assert_allclose(y, train[2], rtol=1e-6)
    bad = tmp_path / "bad.mtx"
    bad.write_text("%%MatrixMarket matrix coordinate real general\n2 2 1\n3 1 0.5\n")
    with pytest.raises(ValueError, match="outside"):
        mf.read_matrix_market(bad)
    bad.write_text("%%MatrixMarket matrix array real general\n2 2\n")
    with pytest.raises(ValueError, match="coordinate"):
        mf.read_matrix_market(bad)


def test_cli_trains_from_files_it_wrote(tmp_path):
    # run outside the checkout, whose adapm/ folder would shadow the installed package
    small = ["--rows", "300", "--cols", "100", "--train", "8000", "--test", "800",
             "--rank", "4", "--epochs", "2"]
    subprocess.run([sys.executable, "-m", "adapm.apps.mf", *small, "--plain",
                    "--save-data", str(tmp_path)], check=True, timeout=120,
                   capture_output=True, cwd=tmp_path)
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "adapm.apps.mf", "--data", str(tmp_path / "train.mtx"),
         "--test-data", str(tmp_path / "test.mtx"), "--rank", "4", "--epochs", "2",
         "--nodes", "2", "--workers-per-node", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "data points/s" in proc.stdout and "test RMSE" in proc.stdout
    result = json.loads(out.read_text())
    assert result["rmse_after"] < result["rmse_before"]
    assert result["points"] == 2 * 8000
