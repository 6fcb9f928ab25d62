"""The package's layers (docs/architecture.md, "Layers"): every module under adapm/ imports
only from its own layer and the layers below it, found by walking the source's syntax
trees (imports inside functions included). The facade (`adapm`, `adapm.optim`,
`adapm.torch`, `adapm.data`) is for users and the apps, never for the layers."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

PACKAGE = Path(__file__).resolve().parents[2] / "adapm"

# Bottom to top. A layer imports from the layers before it and from itself.
LAYERS = ("common", "table", "checkpoint", "wire", "policy", "node|client", "ml", "ops", "apps")
FACADE = {"adapm", "adapm.optim", "adapm.torch", "adapm.data"}
SIBLINGS = {("node", "client"), ("client", "node")}  # one rank, but strangers to each other
# Within a layer: the data plane never reaches into the control plane.
FORBIDDEN_INSIDE = {("node.data", "node.control")}
# Third-party modules a layer must not use: the table and the policy do no I/O.
NO_NETWORK = ("zmq", "socket")
NETWORK_FREE = ("common", "table", "checkpoint", "policy")


def rank(layer):
    return next(i for i, names in enumerate(LAYERS) if layer in names.split("|"))


def layer_of(module):
    """'adapm.node.data.rounds' -> 'node'; the facade and unknown modules -> None."""
    parts = module.split(".")
    if parts[0] != "adapm" or module in FACADE or len(parts) < 2:
        return None
    return parts[1] if any(parts[1] in names.split("|") for names in LAYERS) else None


def module_name(path):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source, module):
    """Every module the source imports, as absolute dotted names (relative ones resolved)."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            for alias in node.names:  # `from adapm.node import server` imports adapm.node.server
                yield f"{base}.{alias.name}"


def violations(source, module):
    """The rule's complaints about one module's source (empty: it keeps the rule)."""
    own = layer_of(module)
    if own is None:
        return []
    found = []
    for target in imported_modules(source, module):
        top = target.split(".")[0]
        if own in NETWORK_FREE and top in NO_NETWORK:
            found.append(f"{module} imports {target}: the {own} layer does no network I/O")
        if target in FACADE and own != "apps":
            found.append(f"{module} imports the facade {target}: import its layer's module")
            continue
        other = layer_of(target)
        if other is None or other == own:
            if other == own:
                found += [f"{module} imports {target}: {a} must not import {b}"
                          for a, b in FORBIDDEN_INSIDE
                          if module.startswith(f"adapm.{a}") and target.startswith(f"adapm.{b}")]
            continue
        if (own, other) in SIBLINGS:
            found.append(f"{module} imports {target}: {own} and {other} do not know each other")
        elif rank(other) > rank(own):
            found.append(f"{module} ({own}) imports {target} ({other}), a layer above it")
    return found


def package_modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_imports_only_from_below():
    found = []
    for path in package_modules():
        found += violations(path.read_text(), module_name(path))
    assert found == [], "\n".join(found)


def test_every_module_sits_in_a_layer_or_the_facade():
    outside = [module_name(p) for p in package_modules()
               if layer_of(module_name(p)) is None and module_name(p) not in FACADE]
    assert outside == []


def test_no_module_is_longer_than_600_lines():
    long = {module_name(p): n for p in package_modules()
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


@pytest.mark.parametrize("module, source", [
    ("adapm.table.shared_table", "from adapm.node import server"),
    ("adapm.table.shared_table", "import adapm.wire.protocol"),
    ("adapm.common.errors", "def f():\n    from adapm.table.keys import as_keys\n"),
    ("adapm.client.worker", "from adapm.node.control.coordinator import Coordinator"),
    ("adapm.node.server", "from adapm.client import worker"),
    ("adapm.node.data.rounds", "from adapm.node.control import metrics"),
    ("adapm.node.data.rounds", "from ..control import metrics"),
    ("adapm.policy.manager", "import zmq"),
    ("adapm.wire.protocol", "import adapm.optim"),
    ("adapm.ml.torch", "from adapm.ops.runner import run"),
])
def test_a_forbidden_import_is_caught(module, source):
    assert violations(source, module) != []


@pytest.mark.parametrize("module, source", [
    ("adapm.node.server", "from adapm.node.data import rounds\nfrom adapm.wire import protocol"),
    ("adapm.client.worker", "from adapm.table.shared_table import SharedTable"),
    ("adapm.apps.mf", "import adapm\nimport adapm.optim"),
    ("adapm.node.control.metrics", "from adapm.node.data.rounds import Rounds"),
])
def test_an_allowed_import_passes(module, source):
    assert violations(source, module) == []
