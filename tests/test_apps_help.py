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
