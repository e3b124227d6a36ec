"""Print hpo's internal import graph (every import statement, at module level or inside functions), its
cycles, and the imports of hpo modules made inside functions (which hide who depends on whom); exit 1 if
there is a cycle. Usage: python tools/import_graph.py"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "hpo").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target not in (name, "hpo"):
                    edges[name].add(target)
    return edges


def imports_inside_functions() -> dict[str, int]:
    """Per module, the import statements of hpo modules inside a function or method body (each counted once)."""
    found: dict[str, int] = {}
    for name, path in modules().items():
        tree, seen = ast.parse(path.read_text()), set()
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                hpo_import = (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "hpo")) or (
                    isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "hpo" for alias in node.names))
                if hpo_import and id(node) not in seen:
                    seen.add(id(node))
                    found[name] = found.get(name, 0) + 1
    return found


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(edges[node])
        return False

    return [(a, b) for a in sorted(edges) for b in sorted(edges[a]) if a < b and reaches(b, a)]


def main() -> int:
    edges = graph()
    for name in sorted(edges):
        print(f"{name:<32} -> {', '.join(sorted(edges[name])) or '-'}")
    found = cycles(edges)
    print(f"\n{len(edges)} modules, {sum(map(len, edges.values()))} import edges, {len(found)} cycles")
    for a, b in found:
        print(f"  cycle: {a} <-> {b}")
    inside = imports_inside_functions()
    print(f"{sum(inside.values())} imports of hpo modules inside functions: "
          + ", ".join(f"{name} {count}" for name, count in sorted(inside.items())))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
