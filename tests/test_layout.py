"""The package's dependency rules, read from the import statements (docs/api.md names the public
API; these keep the layout honest):

- the networks import nothing of stad; the metrics need no torch (not even through stad);
- no library module imports the CLI;
- plugins import only the public adapter API (``stad.datasets``, ``stad.errors``);
- only ``stad/artifacts.py`` opens weight files (safetensors, ``torch.load``/``torch.save``),
  and only ``stad/export.py`` ONNX ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import stad.datasets

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stad"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names (at any depth,
    functions included), with ``from pkg import name`` also giving ``pkg.name``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def stad_imports(name: str) -> set[str]:
    return {m for m in imports(MODULES[name]) if m in MODULES and m != "stad"}


def closure(name: str) -> set[str]:
    """The stad modules ``name`` imports, transitively (package ``__init__`` files aside:
    importing a submodule runs them, but they only re-export)."""
    seen, todo = set(), [name]
    while todo:
        for m in stad_imports(todo.pop()) - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_the_rules_see_the_package() -> None:
    assert {"stad.networks", "stad.metrics", "stad.cli", "stad.artifacts", "stad.api"} <= set(
        MODULES)
    # The reader finds imports at any depth: stad.api imports the commands inside functions.
    assert "torch" in imports(MODULES["stad.networks"])
    assert {"stad.commands.train", "stad.errors"} <= closure("stad.api")


def test_networks_import_nothing_of_stad() -> None:
    assert not {m for m in imports(MODULES["stad.networks"]) if m.split(".")[0] == "stad"}


def test_metrics_need_no_torch() -> None:
    for name in ("stad.metrics", *closure("stad.metrics")):
        assert not {m for m in imports(MODULES[name]) if m.split(".")[0] == "torch"}, name


def test_no_library_module_imports_the_cli() -> None:
    users = {n for n in MODULES if "stad.cli" in imports(MODULES[n])}
    assert users <= {"stad.__main__"}, users


# The adapter API, name by name, as docs/datasets.md ("Plugins") and the plugin guide list it.
PLUGIN_API = {"stad.datasets": {"API_VERSION", "Sample", "Split", "Label", "DatasetAdapter",
                                "SPLITS", "LABELS", "check_pairs"},
              "stad.errors": {"DataError"}}


def test_the_documented_adapter_api_is_what_stad_datasets_exports() -> None:
    assert PLUGIN_API["stad.datasets"] == set(stad.datasets.__all__)
    for doc in (REPO / "docs" / "datasets.md", REPO / "plugins" / "stad-btad" / "README.md"):
        text = doc.read_text(encoding="utf-8")
        assert all(f"`{name}" in text for name in PLUGIN_API["stad.datasets"]), doc


@pytest.mark.parametrize("source", sorted((REPO / "plugins").glob("*/src/**/*.py")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_import_only_the_adapter_api(source: Path) -> None:
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):  # `import stad...` would reach every module
            assert not [a.name for a in node.names if a.name.split(".")[0] == "stad"], node.lineno
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "stad":
            names = {a.name for a in node.names}
            allowed = PLUGIN_API.get(node.module, set())
            assert names <= allowed, (node.module, names - allowed)


WEIGHT_IO = {"safetensors", "safetensors.torch", "torch.load", "torch.save"}


def test_only_artifacts_opens_weight_files() -> None:
    openers = set()
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = {f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
                 if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        if (imports(path) | calls) & WEIGHT_IO:
            openers.add(name)
    assert openers == {"stad.artifacts"}, openers


def test_only_export_handles_onnx() -> None:
    users = {name for name, path in MODULES.items()
             if {m.split(".")[0] for m in imports(path)} & {"onnx", "onnxruntime"}
             or "_require(\"onnx" in path.read_text(encoding="utf-8")}
    assert users == {"stad.export"}, users
