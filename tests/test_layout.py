"""The op layer's shape (issue 36): small files, and helpers that take records, not long lists of loose flags."""

from __future__ import annotations

import ast
from pathlib import Path

OPS = Path(__file__).resolve().parents[1] / "ofa_kernels" / "ops"
SCHEMA_DECORATORS = ("custom_op", "register_fake")  # registered ops and their fakes: their schemas take plain args


def _parameters(node: ast.FunctionDef) -> int:
    a = node.args
    return len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)


def test_no_file_of_the_op_layer_is_over_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in OPS.glob("*.py")}
    assert sizes and all(n <= 400 for n in sizes.values()), sizes


def test_no_function_of_the_op_layer_takes_more_than_10_parameters_but_the_registered_schemas():
    long = []
    for path in OPS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _parameters(node) <= 10:
                continue
            if any(name in ast.unparse(d) for d in node.decorator_list for name in SCHEMA_DECORATORS):
                continue
            long.append(f"{path.name}:{node.lineno} {node.name} ({_parameters(node)})")
    assert not long, long
