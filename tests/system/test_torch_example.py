"""The complete CTR example of docs/torch.md runs as written (it is extracted from it)."""
import re
import subprocess
import sys

import pytest
from testpaths import ROOT

pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(240)

DOC = ROOT / "docs" / "torch.md"


def test_the_ctr_example_runs(tmp_path):
    text = DOC.read_text()
    section = text[text.index("## A complete CTR model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "ctr_example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = eval(proc.stdout.strip().splitlines()[-1].split(":", 1)[1])  # noqa: S307
    assert len(losses) == 2 and all(0 < loss < 0.62 for loss in losses), losses
