"""The seams of the package, read from its source: no import cycles, private APIs behind one door,
the file names under runs/<study>/ spelled in one module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "harness"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (imports there never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped |= {id(child) for statement in node.body for child in ast.walk(statement)}
    return skipped


def imported_modules(name: str, tree: ast.Module) -> set[str]:
    """Every module this one imports, at the top or inside functions."""
    skipped = type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                package = name.split(".")[: len(name.split(".")) - node.level + (name in MODULES and
                                                                                  MODULES[name].name == "__init__.py")]
                base = ".".join(package + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def harness_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        targets = {target for target in imported_modules(name, parsed(path)) if target in MODULES}
        graph[name] = {target for target in targets if target != name and MODULES[target].read_text().strip()
                       and not name.startswith(target + ".")}  # a package's own (empty) __init__ is no edge
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_anywhere_in_the_package():
    graph = harness_graph()
    assert "harness.train" in graph["harness.study"]  # the graph sees the imports at all
    assert "harness.tracking" in graph["harness.study"]  # ... including those inside functions
    assert cycles(graph) == []


PRIVATE_ATTRIBUTES = {"_storage", "_backend", "_trial_id", "_manipulate", "_rdb"}


def private_uses(tree: ast.Module) -> list[str]:
    """Imports of third-party private modules (a component starting with "_", or wandb.proto) and
    attribute accesses to known private members."""
    uses = []
    for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules = [node.module]
        for module in modules:
            parts = module.split(".")
            if parts[0] not in ("harness", "__future__") and (
                    any(part.startswith("_") for part in parts) or module.startswith("wandb.proto")):
                uses.append(f"import {module} (line {node.lineno})")
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            uses.append(f".{node.attr} (line {node.lineno})")
    return uses


def test_third_party_private_apis_are_used_in_harness_compat_only():
    users = {name: private_uses(parsed(path)) for name, path in MODULES.items()}
    assert users["harness.compat"], "the scan finds the private uses in harness.compat itself"
    elsewhere = {name: uses for name, uses in users.items() if uses and name != "harness.compat"}
    assert elsewhere == {}


FOLDER_FILES = ("config.yaml", "metrics.csv", "last.pt", "best.pt", "valid_logits.npy", "valid_index.csv",
                "per_class_f1.npy", "confusion.npy", "result.json", "traceback.txt", "members.json",
                "metrics.json", "valid_probs.npy", "eval_metrics", "study.db", "trials.csv", "report.html",
                "remedies.json", "predictions.csv", "model.pt2", "outage.json", "tracked.json", "budget.json")


def spelled_file_names(tree: ast.Module) -> list[str]:
    """String constants (not docstrings) that hold one of the file names of a study's folder, or of a trial's or
    an ensemble's folder in it."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [f"{node.value!r} (line {node.lineno})" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and any(name in node.value for name in FOLDER_FILES)
            and "<study>" not in node.value]  # a path shown to a person ("runs/<study>/report.html") is prose


def test_the_file_names_under_a_study_folder_are_spelled_in_harness_folders_only():
    spelled = {name: spelled_file_names(parsed(path)) for name, path in MODULES.items()}
    assert spelled["harness.folders"], "the scan finds the names in harness.folders itself"
    elsewhere = {name: found for name, found in spelled.items() if found and name != "harness.folders"}
    assert elsewhere == {}


def test_every_module_is_listed_in_the_architecture_doc():
    """docs/architecture.md names every module of the package (by path, or by name in backticks in its
    package's row), so that it stays true to the code when a module is added."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if path.name == "__init__.py":
            continue
        if path.name == "__main__.py":
            named = f"python -m {module_name(path.parent / '__init__.py')}" in doc
        else:
            named = relative in doc or f"`{path.stem}`" in doc or f"`{module_name(path).removeprefix('harness.')}`" in doc
        if not named:
            missing.append(relative)
    assert not missing, f"modules not described in docs/architecture.md: {missing}"
