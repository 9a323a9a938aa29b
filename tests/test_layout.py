"""The folders import one way: utils (leaf helpers) <- datasets, nets <- the application (pips2/) <- pips2.cli
<- the top-level scripts. Read from the source, including imports inside functions (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what each layer may import of the project (its own layer included); the scripts reach the rest through pips2.cli
ALLOWED = {
    "utils": ("pips2.utils",),
    "datasets": ("pips2.utils", "pips2.datasets"),
    "nets": ("pips2.utils", "pips2.nets"),
    "app": ("pips2.utils", "pips2.datasets", "pips2.nets", "pips2.app"),
    "cli": ("pips2.utils", "pips2.datasets", "pips2.nets", "pips2.app", "pips2.cli"),
    "scripts": ("pips2.cli",),
}


def layer_of(path: Path) -> str:
    """The layer a source file belongs to."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] in ("utils", "datasets", "nets"):
        return rel.parts[0]
    if rel.parts[:2] == ("pips2", "cli"):
        return "cli"
    return "app" if rel.parts[0] == "pips2" else "scripts"


def imported(src: str, name: str) -> list[tuple[int, str]]:
    """(line, module) of every import of the project in a file's source; relative imports are refused."""
    out = []
    for node in ast.walk(ast.parse(src, name)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}:{node.lineno}: relative import"
            mod = node.module or ""
            # `from pips2 import tracking` names a module of the application; `from pips2.utils import video` one
            # of utils: the module imported is the package's child
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names] if mod in ("pips2", "pips2.cli") else \
                [(node.lineno, mod)]
    return [(line, m) for line, m in out if m == "pips2" or m.startswith("pips2.")]


def canonical(module: str) -> str:
    """pips2.<app module> as pips2.app.<module>, so every layer is a prefix."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] not in ("utils", "datasets", "nets", "cli"):
        return ".".join(["pips2", "app", *parts[1:]])
    return module


SOURCES = sorted([*ROOT.glob("utils/*.py"), *ROOT.glob("datasets/*.py"), *ROOT.glob("nets/*.py"),
                  *ROOT.glob("pips2/*.py"), *ROOT.glob("pips2/cli/*.py"), *ROOT.glob("*.py")])


def test_the_layers_cover_every_source_folder():
    assert {layer_of(p) for p in SOURCES} == set(ALLOWED)
    assert len(SOURCES) > 40


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_go_one_way(layer):
    wrong = []
    for path in (p for p in SOURCES if layer_of(p) == layer):
        for line, module in imported(path.read_text(), str(path)):
            mod = canonical(module)
            if mod == "pips2" and layer in ("app", "cli"):  # the package itself (pips2.load_model)
                continue
            if not any(mod == a or mod.startswith(a + ".") for a in ALLOWED[layer]):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not wrong, f"{layer} imports against the layers' direction:\n" + "\n".join(wrong)


def test_the_check_sees_a_wrong_import():
    """Imports inside functions and `from pips2 import <app module>` are seen (the rule is not vacuous)."""
    src = "import os\ndef f():\n    from pips2 import tracking\n    from pips2.nets.pips2 import Pips\n"
    found = [(line, canonical(m)) for line, m in imported(src, "probe.py")]
    assert found == [(3, "pips2.app.tracking"), (4, "pips2.nets.pips2")]
    assert not any(m.startswith(ALLOWED["utils"]) for _, m in found)
