"""The import rules between the stages (docs/architecture.md), read off the source with ast:

- export never imports verify (the pipeline composes them);
- runtime and verify import nothing of export: they read folders through the contract
  package (shira_export.artifacts);
- no import cycle anywhere in the package, counting imports inside functions (they only
  hide a cycle) but not those under `if TYPE_CHECKING:` (never run).

`import a.b.c` from a module outside package `a.b` runs `a/__init__` and `a/b/__init__`
first, so those count as edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "shira_export"
# Known cycles, each with its owner's reason; an entry here must name exactly one cycle's modules.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(module: str, node: ast.AST) -> list[str]:
    """Modules of this package that the import statement `node` in `module` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [n for n in names if n.split(".")[0] == "shira_export"]


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import that can run."""
    found: list[tuple[str, bool, int]] = []

    def walk(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    walk(other, top)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((t, top, child.lineno) for t in _targets(module, child))
            walk(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(MODULES[module].read_text()), True)
    return found


def _graph() -> dict[str, dict[str, tuple[bool, int]]]:
    graph: dict[str, dict[str, tuple[bool, int]]] = {m: {} for m in MODULES}
    for module in MODULES:
        for target, top, line in _imports(module):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way run too, unless already running
                step = ".".join(parts[:i])
                if step in MODULES and not (module == step or module.startswith(step + ".")):
                    graph[module].setdefault(step, (top, line))
    return graph


GRAPH = _graph()


def _cycles(graph: dict[str, dict[str, tuple[bool, int]]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
            elif nxt not in index:
                index[nxt] = low[nxt] = len(index)
                stack.append(nxt)
                on_stack.add(nxt)
                work.append((nxt, iter(graph[nxt])))
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
    return found


def _violations(source_prefix: str, target_prefix: str, *, allowed: tuple[str, ...] = ()) -> list[str]:
    return [
        f"{m}:{line} imports {t}"
        for m, edges in sorted(GRAPH.items())
        if m.startswith(source_prefix)
        for t, (_, line) in sorted(edges.items())
        if (t == target_prefix or t.startswith(target_prefix + ".")) and t not in allowed
    ]


def test_the_walk_sees_the_imports_it_must_judge():
    # the rules below are only as good as the graph: a few edges that exist must be found
    assert "shira_export.verify" in GRAPH["shira_export.pipeline"]
    assert "shira_export.export.merged" in GRAPH["shira_export.pipeline"]
    assert GRAPH["shira_export.verify.candidates"]["shira_export.artifacts.manifest"][0]  # module level
    assert not GRAPH["shira_export.verify.candidates"]["shira_export.runtime"][0]  # inside a function
    assert "shira_export.verify.report" not in GRAPH["shira_export.verify.junit"]  # TYPE_CHECKING only


def test_export_does_not_import_verify():
    assert _violations("shira_export.export", "shira_export.verify") == []


@pytest.mark.parametrize("stage", ["shira_export.runtime", "shira_export.verify"])
def test_runtime_and_verify_read_folders_through_the_contract(stage):
    assert _violations(stage, "shira_export.export") == []


def test_the_contract_depends_on_no_stage_but_what_it_re_exports():
    # naming and adapter_io re-export export.graph_delta / export.adapter_file (defined there)
    reexports = ("shira_export.export", "shira_export.export.graph_delta", "shira_export.export.adapter_file")
    for stage in (
        "shira_export.export",
        "shira_export.verify",
        "shira_export.runtime",
        "shira_export.pipeline",
        "shira_export.tuner",
    ):
        assert _violations("shira_export.artifacts", stage, allowed=reexports) == []


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    unknown = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    detail = [
        f"{a} -> {b} (line {line}{'' if top else ', inside a function'})"
        for c in cycles
        if c not in KNOWN_CYCLES
        for a in sorted(c)
        for b, (top, line) in sorted(GRAPH[a].items())
        if b in c
    ]
    assert unknown == [], "\n".join(detail)


def test_a_cycle_is_found():
    graph = {"a": {"b": (True, 1)}, "b": {"c": (False, 2)}, "c": {"a": (True, 3)}, "d": {"a": (True, 4)}}
    assert _cycles(graph) == [frozenset({"a", "b", "c"})]
    assert _cycles({"a": {"b": (True, 1)}, "b": {}}) == []


def test_the_moved_entry_points_still_answer_under_their_old_names_with_a_warning():
    import shira_export
    import shira_export.export as export_stage

    for name in ("export_merged", "export_sparse"):
        with pytest.warns(DeprecationWarning, match=f"shira_export.{name}"):
            old = getattr(export_stage, name)
        assert old is getattr(shira_export, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        export_stage.no_such_name  # noqa: B018
