"""The package's layout: imports run one way (no cycle between starqa's modules, counting imports inside functions,
which still tie two modules together, nor between its subpackages), and no module borrows another module's private
names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "starqa"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def starqa_imports(path: Path, modules: set[str]) -> list[tuple[str, list[str]]]:
    """(imported starqa module, names taken from it) for every import in the file, wherever it sits."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "starqa"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "starqa":
                continue
            names = [alias.name for alias in node.names]
            # `from starqa.evidence import quotes` imports the module starqa.evidence.quotes
            submodules = [f"{base}.{name}" for name in names if f"{base}.{name}" in modules]
            found += [(sub, []) for sub in submodules]
            rest = [name for name in names if f"{base}.{name}" not in modules]
            if rest:
                found.append((base, rest))
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    borrowed = []
    for name, path in files.items():
        for target, names in starqa_imports(path, modules):
            if target in modules and target != name:
                graph[name].add(target)
            borrowed += [f"{name} imports {target}.{n}" for n in names
                         if n.startswith("_") and not n.startswith("__") and target != name]
    return graph, borrowed


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_the_package():
    graph, _ = import_graph()
    assert graph["starqa.evidence.collect"] >= {"starqa.evidence.quotes", "starqa.evidence.heads"}  # the walk sees
    found = cycles(graph)
    assert not found, "modules that import each other (directly or round a loop): " + "; ".join(
        " <-> ".join(component) for component in found)


def test_no_import_cycle_between_the_subpackages():
    """The layout's floors (documents/, model/, store/, engine/, evidence/, answer/, ...): a module of one may import
    from another only if nothing there imports back, so each phase reads from the ones below it."""
    graph, _ = import_graph()
    floors: dict[str, set[str]] = {}
    for name, targets in graph.items():
        for target in targets:
            a, b = name.split(".")[1:2], target.split(".")[1:2]
            if a and b and a != b:
                floors.setdefault(a[0], set()).add(b[0])
    assert floors["answer"] >= {"evidence", "engine"}  # the walk sees the floors
    nodes = set(floors) | {floor for targets in floors.values() for floor in targets}
    found = cycles({node: floors.get(node, set()) for node in nodes})
    assert not found, "subpackages that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_borrows_another_modules_private_names():
    _, borrowed = import_graph()
    assert not borrowed, "\n".join(borrowed)


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
