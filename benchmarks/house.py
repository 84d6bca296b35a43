"""The house rules anyone can check: every function in `pipeline/` over 60 lines, and every import of `pipeline` or
Ray inside `camkd/` (the method library must never import either). Reads the source (no import), prints both lists
and exits 1 when either is non-empty. `tests/test_docs.py` runs the same functions.

    python benchmarks/house.py [--limit 60]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_CAMKD = ("pipeline", "ray")


def long_functions(root: Path = REPO / "pipeline", limit: int = 60) -> list[tuple[int, str]]:
    """(lines, 'path:line qualified.name') of every function or method longer than `limit` lines (the `def` line
    to the last line of its body; nested functions are listed on their own too), longest first."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, path: Path, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = child.end_lineno - child.lineno + 1
                name = prefix + child.name
                if lines > limit:
                    found.append((lines, f"{path.relative_to(REPO)}:{child.lineno} {name}"))
                visit(child, path, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, path, prefix + child.name + ".")
            else:
                visit(child, path, prefix)

    for path in sorted(root.rglob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), path, "")
    return sorted(found, key=lambda f: (-f[0], f[1]))


def forbidden_imports(root: Path = REPO / "camkd") -> list[str]:
    """'path:line module' for every import of `pipeline` or `ray` (or their submodules) anywhere in `root`,
    including imports inside functions."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for m in modules:
                if m.split(".")[0] in FORBIDDEN_IN_CAMKD:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {m}")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=60, help="longest function allowed, in lines")
    args = ap.parse_args()
    long = long_functions(limit=args.limit)
    imports = forbidden_imports()
    print(f"functions in pipeline/ over {args.limit} lines: {len(long)}")
    for lines, where in long:
        print(f"  {lines:4d}  {where}")
    print(f"imports of {' or '.join(FORBIDDEN_IN_CAMKD)} in camkd/: {len(imports)}")
    for where in imports:
        print(f"  {where}")
    return 1 if long or imports else 0


if __name__ == "__main__":
    sys.exit(main())
