"""Figures of the code's shape: each module's share of the project's lines, the longest functions, and the import
checks (ref/ imports nothing outside ref/, shapes/ imports ref/ and itself only, no import cycles).

    python -m bench.code_figures [--top 10]
"""
import argparse
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ref", "shapes", "toy", "bench")
SCRIPTS = ("train", "sample", "eval", "prepare")


def project_modules():
    """{module name: path} of the project's Python files (tests apart)."""
    modules = {name: REPO / f"{name}.py" for name in SCRIPTS}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            modules[f"{package}.{path.stem}"] = path
    return modules


def imported_modules(tree, known):
    """The project modules a module imports (at any depth of its body)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def cycles(graph):
    """Every strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for node in graph:
        if node not in index:
            visit(node)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    modules = project_modules()
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    lines = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    total = sum(lines.values())
    print(f"{total} lines in {len(modules)} modules (tests apart); the largest:")
    for name in sorted(lines, key=lines.get, reverse=True)[:args.top]:
        print(f"  {name:<28} {lines[name]:>5}  {lines[name] / total:6.1%}")
    functions = [(node.end_lineno - node.lineno + 1, f"{name}.{node.name}") for name, tree in trees.items()
                 for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    print("the longest functions (lines, docstring included):")
    for length, name in sorted(functions, reverse=True)[:args.top]:
        print(f"  {name:<40} {length:>4}")
    graph = {name: imported_modules(tree, modules) - {name} for name, tree in trees.items()}
    outside_ref = {name: sorted(m for m in graph[name] if not m.startswith("ref."))
                   for name in graph if name.startswith("ref.")}
    outside_shapes = {name: sorted(m for m in graph[name] if m.split(".")[0] not in ("ref", "shapes"))
                      for name in graph if name.startswith("shapes.") and name != "shapes.experiment"}
    print("ref/ imports outside ref/:", {k: v for k, v in outside_ref.items() if v} or "none")
    print("shapes/ (experiment apart, which drives the scripts) imports outside ref/ and shapes/:",
          {k: v for k, v in outside_shapes.items() if v} or "none")
    print("import cycles:", cycles(graph) or "none")


if __name__ == "__main__":
    main()
