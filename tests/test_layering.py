"""The import direction of DESIGN.md, checked for every module of the project.

memory <- network <- execution <- cluster <- operators <- api <- cli; bench may use everything below cli
(``shmflow bench`` is a cli command).

Every module of ``runtime`` and ``operators`` belongs to exactly one layer of
:data:`LAYERS` (a module that matches no layer fails the test, so a new
module must be placed). A module may import its own layer and the layers
below it, never one above. Imports inside functions count too: a lazy import
is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Bottom to top. A layer may import the layers listed before it, and itself.
#: Each entry: (layer name, module prefixes that belong to it).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("runtime.errors", "runtime._version")),
    ("memory", ("runtime.memory",)),
    ("io", ("runtime.io",)),
    ("managed", ("runtime.managed",)),
    ("state", ("runtime.state",)),
    ("network", ("runtime.network",)),
    ("config", ("runtime.config",)),
    ("checkpoint", ("runtime.checkpoint",)),
    ("execution", ("runtime.execution",)),
    ("web", ("runtime.web",)),  # stats blocks (written by workers), the coordinator's web server
    ("cluster", ("runtime.cluster",)),
    ("operators", ("operators",)),
    ("api", ("runtime.api", "runtime")),  # the package root re-exports the facade
    # Deprecated module paths, kept as thin re-exports for one release (CHANGELOG.md).
    ("compat", ("runtime.graph", "runtime.task", "runtime.subtask", "runtime.coordinator", "runtime.worker",
                "runtime.control", "runtime.client", "runtime.jobs")),
    ("bench", ("runtime.bench",)),  # uses every layer below; `shmflow bench` runs it
    ("cli", ("runtime.cli",)),
]
#: Pairs that may skip the order above: (importer layer, imported layer).
ALLOWED: set[tuple[str, str]] = {
    ("network", "network"),
}
#: Third-party modules a layer must never import.
FORBIDDEN_THIRD_PARTY = {
    "errors": ("numpy", "zmq", "msgpack", "cloudpickle"),
    "memory": ("zmq", "msgpack", "cloudpickle"),
    "io": ("zmq", "cloudpickle"),
    "managed": ("zmq", "cloudpickle"),
    "state": ("zmq", "cloudpickle"),
    "checkpoint": ("zmq", "cloudpickle"),
}
#: Deprecated shims inside a lower package (they re-export from their new home there).
SHIMS = {"runtime.network.channel"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def layer_of(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if prefix == "runtime" and module != "runtime":
                    continue  # the package root itself only, not every runtime.* module
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), name)
    return best[1] if best else None


RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.append(module)
            # ``from runtime import control`` imports the submodule runtime.control
            names.extend(f"{module}.{alias.name}" for alias in node.names
                         if (ROOT / Path(*module.split("."), alias.name)).with_suffix(".py").exists())
    return names


def project_modules() -> list[Path]:
    return sorted([*ROOT.glob("runtime/**/*.py"), *ROOT.glob("operators/**/*.py")])


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in project_modules() if layer_of(module_name(p)) is None]
    assert not unplaced, f"modules outside the layer table of tests/test_layering.py: {unplaced}"


def test_no_upward_imports():
    violations = []
    for path in project_modules():
        mod = module_name(path)
        if mod in SHIMS:
            continue
        layer = layer_of(mod)
        assert layer is not None
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in FORBIDDEN_THIRD_PARTY.get(layer, ()):
                violations.append(f"{mod} ({layer}) imports {name}")
                continue
            if top not in ("runtime", "operators"):
                continue
            target = layer_of(name)
            if target is None or target == layer or (layer, target) in ALLOWED:
                continue
            if RANK[target] > RANK[layer]:
                violations.append(f"{mod} ({layer}) imports {name} ({target}), a higher layer")
    assert not violations, "\n".join(violations)


def test_lower_layers_reach_no_higher_package_at_all():
    """The DESIGN.md rules in words: the worker's job loop never imports operators, memory never zmq."""
    for path in ROOT.glob("runtime/execution/**/*.py"):
        assert not any(n.startswith(("operators", "runtime.cluster", "runtime.api"))
                       for n in imports_of(path)), path
    for path in ROOT.glob("runtime/cluster/**/*.py"):
        assert not any(n.startswith(("operators", "runtime.api")) for n in imports_of(path)), path


def test_old_module_paths_still_import_with_a_deprecation_warning():
    import importlib
    import sys

    import pytest

    for name in ("runtime.graph", "runtime.task", "runtime.subtask", "runtime.coordinator", "runtime.worker",
                 "runtime.control", "runtime.client", "runtime.jobs", "runtime.network.channel"):
        sys.modules.pop(name, None)
        with pytest.warns(DeprecationWarning, match="moved"):
            module = importlib.import_module(name)
        assert module.__all__, name
        for public in module.__all__:
            assert hasattr(module, public), f"{name}.{public}"
