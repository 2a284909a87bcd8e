"""Imports point one way: data <- models <- methods <- objectives <- loop <- api <- cli.

Read from the source with ``ast`` (nothing is imported), so a cycle hidden inside a function body
is caught as well as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "lmtune"

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "config", "distributed", "runlog", "metrics", "checkpoint", "env", "allocator")),
    ("data", ("data", "assets")),
    ("models", ("models", "quant", "frozen_matmul", "recompute", "generate")),
    ("methods", ("methods",)),
    # models/heads.py loads adapters (methods) to run a saved classifier: by what it imports it sits
    # with the classify objective, and moving it to objectives/ would say so (left for a later change).
    ("objectives", ("objectives", "regularize", "models.heads")),
    ("loop", ("engine", "fsdp", "progress", "evaluation_loop", "resume", "train", "rundir", "runrecord", "run",
              "footprint", "pretrain")),
    ("api", ("__init__", "api", "evaluate", "demo", "compile", "export")),
    ("cli", ("cli", "__main__")),
]

# Imports from a lower layer to a higher one that remain, each with its reason (none today).
UPWARD_ALLOWED: set[tuple[str, str]] = set()

# Function-local imports of lmtune modules that remain. Everything else is imported at the top.
LOCAL_ALLOWED = {
    # cli.py imports each command's module only when that command runs, so `lmtune --help` and
    # argument errors answer without loading torch and transformers.
    "cli": {"config", "run", "pretrain", "generate", "evaluate", "methods.adapters", "footprint", "demo",
            "__init__", "models.heads", "compile.commands", "export.command", "env"},
    # `import lmtune` must stay cheap (no torch): the package and the API import their code when called.
    "__init__": {"api", "config", "run"},
    "api": {"config", "run", "methods.adapters", "generate", "evaluate", "footprint", "data.readers"},
    # lmtune.compile is a callable package whose functions load their modules (and torch) when called.
    "compile": {"compile.commands"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(SRC.rglob("*.py")) if "assets" not in p.parts}


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The lmtune modules an import statement names, as dotted names below ``lmtune``."""
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative import: lmtune uses none, but resolve it rather than miss it
            base = importer.split(".")[:-node.level] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
        else:
            if not node.module or not (node.module == "lmtune" or node.module.startswith("lmtune.")):
                return []
            module = node.module.removeprefix("lmtune").removeprefix(".")
        if not module:  # `from lmtune import checkpoint` names a module, `from lmtune import __version__` not
            return [a.name if (SRC / f"{a.name}.py").is_file() or (SRC / a.name).is_dir() else "__init__"
                    for a in node.names]
        return [module]
    return [a.name.removeprefix("lmtune.") if a.name != "lmtune" else "__init__"
            for a in node.names if a.name == "lmtune" or a.name.startswith("lmtune.")]


def _layer(module: str) -> int:
    head = module.split(".")[0] or "__init__"
    for key in (module, head):  # a module listed by its full name wins over its package
        for i, (_, members) in enumerate(LAYERS):
            if key in members:
                return i
    raise AssertionError(f"lmtune.{module} is in no layer of tests/test_layering.py; add it to LAYERS")


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    out = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks
            out += [n for n in node.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return out


def test_every_module_has_a_layer():
    for name in _sources():
        _layer(name)


def test_no_module_imports_a_higher_layer():
    upward = []
    for name, tree in _sources().items():
        for node in _top_level_imports(tree):
            for target in _targets(node, name):
                if _layer(target) > _layer(name) and (name, target) not in UPWARD_ALLOWED:
                    upward.append(f"lmtune.{name} ({LAYERS[_layer(name)][0]}) imports lmtune.{target} "
                                  f"({LAYERS[_layer(target)][0]}), line {node.lineno}")
    assert not upward, "\n".join(upward)


def test_no_function_local_import_of_lmtune_modules_outside_the_allow_list():
    local = []
    for name, tree in _sources().items():
        top = {id(n) for n in _top_level_imports(tree)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                for target in _targets(node, name):
                    if target not in LOCAL_ALLOWED.get(name, set()):
                        local.append(f"lmtune.{name} line {node.lineno} imports lmtune.{target} inside a function")
    assert not local, "\n".join(local)


def test_the_allow_lists_hold_no_stale_entries():
    sources = _sources()
    for name, allowed in LOCAL_ALLOWED.items():
        tree = sources[name]
        top = {id(n) for n in _top_level_imports(tree)}
        found = {t for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top
                 for t in _targets(n, name)}
        assert not allowed - found, f"LOCAL_ALLOWED[{name!r}] lists imports it no longer makes: {allowed - found}"
    for name, target in UPWARD_ALLOWED:
        found = {t for n in _top_level_imports(sources[name]) for t in _targets(n, name)}
        assert target in found, f"UPWARD_ALLOWED lists {name} -> {target}, which is gone: drop the entry"


def _guarded_imports(tree: ast.Module) -> list[tuple[ast.Try, list[str], str]]:
    """(try statement, modules its body imports, handler source) for each `except ImportError`."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        for handler in node.handlers:
            names = [handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts
            if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                imported = [a.name if isinstance(s, ast.Import) else (s.module or "")
                            for s in node.body if isinstance(s, (ast.Import, ast.ImportFrom)) for a in s.names]
                out.append((node, imported, ast.unparse(handler)))
    return out


def test_import_errors_of_lmtune_itself_are_never_caught():
    for name, tree in _sources().items():
        for node, imported, handler in _guarded_imports(tree):
            own = [m for m in imported if m == "lmtune" or m.startswith("lmtune.")]
            assert not own, f"lmtune.{name} line {node.lineno} turns an ImportError of {own} into something else"
            if imported:  # an optional third-party package: the message says what to install
                assert "pip install" in handler, (f"lmtune.{name} line {node.lineno}: the ImportError handler for "
                                                  f"{imported} must name the package to pip install")


@pytest.mark.parametrize(("broken", "user"), [("lmtune.models.heads", "lmtune.evaluate"),
                                             ("lmtune.methods.adapters", "lmtune.objectives.reference")])
def test_a_broken_lmtune_module_fails_loudly_rather_than_as_not_included(monkeypatch, broken, user):
    # Both used to catch the ImportError and report the feature as "not included in this installation".
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, broken, None)  # importing it now raises ImportError
    monkeypatch.delitem(sys.modules, user, raising=False)
    with pytest.raises(ImportError, match=broken):
        importlib.import_module(user)
