"""The import direction of DESIGN.md: memory <- network <- runtime core <- operators <- facade <- examples.

Parses every module's imports with ``ast`` and fails on an upward import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module prefix -> prefixes it must never import
FORBIDDEN = {
    "runtime.errors": ["runtime.", "operators"],
    "runtime.memory": ["runtime.network", "runtime.io", "runtime.config", "runtime.coordinator",
                       "runtime.worker", "runtime.task", "runtime.graph", "runtime.api", "runtime.cli",
                       "operators", "zmq"],
    "runtime.network": ["runtime.coordinator", "runtime.worker", "runtime.task", "runtime.graph",
                        "runtime.api", "runtime.cli", "operators"],
    "runtime.io": ["runtime.network", "runtime.coordinator", "runtime.worker", "runtime.api", "operators"],
    "runtime.managed": ["runtime.network", "runtime.config", "runtime.coordinator", "runtime.worker",
                        "runtime.task", "runtime.graph", "runtime.api", "runtime.cli", "runtime.execution",
                        "runtime.cluster", "runtime.subtask", "runtime.jobs", "operators", "zmq"],
    "runtime.config": ["runtime.network", "runtime.coordinator", "runtime.worker", "runtime.api", "operators"],
    "runtime.worker": ["operators", "runtime.api"],
    "runtime.coordinator": ["operators", "runtime.api"],
    "runtime.task": ["operators", "runtime.api"],
    "runtime.graph": ["operators", "runtime.api"],
    "operators": ["runtime.api"],
}
ALLOWED_EXCEPTIONS = {"runtime.errors": ["runtime.errors"]}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_no_upward_imports():
    violations = []
    for path in sorted([*ROOT.glob("runtime/**/*.py"), *ROOT.glob("operators/**/*.py")]):
        mod = module_name(path)
        for prefix, banned in FORBIDDEN.items():
            if mod != prefix and not mod.startswith(prefix + "."):
                continue
            for name in imports_of(path):
                for bad in banned:
                    if name == bad.rstrip(".") or name.startswith(bad if bad.endswith(".") else bad + "."):
                        violations.append(f"{mod} imports {name}")
                    elif name == bad:
                        violations.append(f"{mod} imports {name}")
    assert not violations, "\n".join(violations)
