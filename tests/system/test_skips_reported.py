"""README.md's test command installs no optional package: the run must say at its top
and bottom which tests skip for that and how to include them (issue 17, point 9: before,
53 tests skipped with nothing but "53 skipped"), and '.[test-all]' must install them all."""
import importlib.util
import re
import subprocess
import sys

import pytest
from testpaths import ROOT, TESTS

import conftest

PIP_NAMES = {"torch": "torch", "pyarrow": "pyarrow", "prometheus_client": "prometheus_client",
             "yaml": "pyyaml"}


def test_missing_packages_are_named_with_the_command_that_includes_them(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "pyarrow") else object())
    lines = conftest.pytest_report_header(None)
    text = "\n".join(lines)
    assert "SKIPPED" in text and "- torch (extra 'torch')" in text, text
    assert "- pyarrow (extra 'fast')" in text and "prometheus" not in text, text
    assert "pip install '.[test-all]'" in text, text


def test_nothing_is_said_when_every_optional_package_is_there(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert conftest.pytest_report_header(None) == []


def test_the_test_all_extra_installs_every_optional_package():
    text = (ROOT / "pyproject.toml").read_text()
    [extra] = re.findall(r'^test-all = \[(.*?)\]', text, flags=re.S | re.M)
    names = {re.split(r"[<>=\[]", item.strip().strip('"'))[0]
             for item in extra.split(",") if item.strip()}
    assert {PIP_NAMES[module] for module, _, _ in conftest.OPTIONAL_PACKAGES} <= names
    assert {"pytest", "pytest-timeout"} <= names
    assert "'.[test-all]'" in (ROOT / "README.md").read_text()


@pytest.mark.timeout(60)
def test_a_run_prints_the_report_at_its_top_and_bottom(tmp_path):
    """A real pytest run of one trivial test under this conftest, in a Python that cannot
    import torch (a module of that name that raises stands in front of it)."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'torch' else "
        "real(name, *a)\n")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "conftest.py").write_text(
        (TESTS / "conftest.py").read_text())
    (tmp_path / "t" / "test_one.py").write_text("def test_one():\n    assert True\n")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path / "t")],
        capture_output=True, text=True, cwd=tmp_path, timeout=50,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "hide")}).stdout
    assert out.count("optional packages missing") == 2, out
    assert "- torch (extra 'torch')" in out, out
