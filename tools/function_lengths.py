"""List functions whose code is longer than a limit (default 80 lines).

Code lines: from the `def` (decorators included) to the end, less the
docstring (a public function's docstring is documentation, not logic).

    python tools/function_lengths.py [--limit 80] [PATH ...]

Exits 1 if any function or method is longer; the test suite runs it on
`kerasbn/` (the consolidation rule: no function over 80 lines).
"""

import argparse
import ast
import pathlib
import sys


def long_functions(paths, limit):
    found = []
    for root in paths:
        root = pathlib.Path(root)
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([node.lineno] + [d.lineno for d in
                                                 node.decorator_list])
                    length = node.end_lineno - first + 1
                    doc = node.body[0] if node.body else None
                    if (isinstance(doc, ast.Expr)
                            and isinstance(doc.value, ast.Constant)
                            and isinstance(doc.value.value, str)):
                        length -= doc.end_lineno - doc.lineno + 1
                    if length > limit:
                        found.append((str(path), node.lineno, node.name,
                                      length))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["kerasbn"])
    parser.add_argument("--limit", type=int, default=80)
    args = parser.parse_args(argv)
    found = long_functions(args.paths, args.limit)
    for path, line, name, length in found:
        print(f"{path}:{line}: {name} is {length} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
