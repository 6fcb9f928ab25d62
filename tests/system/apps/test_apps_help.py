"""Every app's --help renders: click prints help text as written, so '%%' would show."""
import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

APPS = ["mf", "kge", "word2vec", "ctr", "gnn"]
NEEDS_TORCH = {"ctr", "gnn"}


@pytest.mark.parametrize("app", APPS)
def test_help_renders(app, tmp_path):
    if app in NEEDS_TORCH and importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch")
    proc = subprocess.run([sys.executable, "-m", f"adapm.apps.{app}", "--help"],
                          capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Usage:" in proc.stdout and "--nodes" in proc.stdout
    assert "%%" not in proc.stdout, proc.stdout


# Every option each app had before the shared options (adapm.apps.common.app_options)
# replaced their own copies: all of them still work.
OPTIONS = {
    "mf": "rows cols train test rank noise epochs batch lr reg data test-data save-data plain",
    "kge": "entities relations triples clusters noise dim epochs batch negatives lr reg "
           "init-std sample-ahead valid-fraction test-fraction valid-sample train-file "
           "test-file save-data",
    "word2vec": "text min-count max-vocab vocab topics sentences sentence-length noise zipf "
                "heldout heldout-pairs dim window negatives subsample epochs batch lr probes "
                "show one-sentence-per-line ns-exponent save-vectors",
    "ctr": "train test fields vocab max-bag buckets dim epochs batch lr data test-data "
           "save-data plain",
    "gnn": "graph-nodes graph-edges communities p-in exponent dim hidden fanouts epochs batch "
           "lr init-std edges labels save-data plain",
}
SHARED = {"--nodes": "nodes", "--workers-per-node": "workers_per_node", "--mode": "mode",
          "--lookahead": "lookahead", "--seed": "seed", "--json": "json_path",
          "--worker-json": "worker_json"}


@pytest.mark.parametrize("app", APPS)
def test_apps_share_the_cluster_options(app):
    if app in NEEDS_TORCH and importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch")
    from adapm.apps import common
    from adapm.common.config import MODES
    command = importlib.import_module(f"adapm.apps.{app}").main
    by_flag = {opt: p for p in command.params for opt in p.opts}
    names = [p.name for p in command.params]
    assert len(names) == len(set(names))  # no option twice
    for flag in [f"--{o}" for o in OPTIONS[app].split()] + list(SHARED):
        assert flag in by_flag, (app, flag)
    for flag, name in SHARED.items():
        assert by_flag[flag].name == name, (app, flag)
    assert by_flag["--nodes"].default == common.NODES == 2
    assert by_flag["--workers-per-node"].default == common.WORKERS_PER_NODE == 1
    assert list(by_flag["--mode"].type.choices) == list(MODES)
    assert by_flag["--mode"].default == "adaptive"
    assert by_flag["--lookahead"].default is None and by_flag["--seed"].default == 0
    # the shared options come first in --help, in the same order in every app
    assert names[:len(SHARED)] == list(SHARED.values())
