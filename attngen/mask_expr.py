"""The mask expression language: a small, safe, Python-like language for `mask.expr`.

Grammar (a whitelisted subset of Python expressions; nothing is ever eval'd)::

    mask    := boolean
    boolean := boolean "or" boolean | boolean "and" boolean | "not" boolean
             | int CMP int (CMP int)*          # chains: a <= b < c  means  a <= b and b < c
             | "True" | "False" | "(" boolean ")"
    int     := int ("+" | "-" | "*") int | int ("//" | "%") POSITIVE_CONSTANT
             | ("-" | "+") int | "abs(" int ")" | ("min" | "max") "(" int ("," int)+ ")"
             | "q_idx" | "kv_idx" | "Nq" | "Nk" | CONSTANT_NAME | INTEGER | "(" int ")"
    CMP     := "<" | "<=" | ">" | ">=" | "==" | "!="

POSITIVE_CONSTANT is an int built only from literals and named constants that evaluates to > 0,
so `//` and `%` have unambiguous floor semantics in generated code. Literals and constants must
fit in 32 bits. The text is parsed with `ast.parse(..., mode="eval")`, checked by one validating
walker (`validate_mask_expr`), then lowered by two independent evaluators: sympy and torch.
"""

from __future__ import annotations

import ast
import operator
from functools import reduce
from typing import TYPE_CHECKING, Any, Mapping

import sympy

from .errors import SpecError

if TYPE_CHECKING:
    import torch

Q_IDX, KV_IDX, NQ, NK = sympy.symbols("q_idx kv_idx Nq Nk", integer=True)
MAX_EXPR_CHARS = 500
MAX_EXPR_NODES = 200  # counted as expression nodes (names, literals, operations, calls)
MAX_ABS_LITERAL = 2**31 - 1
INDEX_NAMES = ("q_idx", "kv_idx", "Nq", "Nk")
FUNCTIONS = ("abs", "min", "max")

_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_COMPARE = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)
_OP_TEXT = {ast.FloorDiv: "//", ast.Mod: "%"}
_BIT_OPS = (ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift, ast.Invert)
_WHY_NOT = {  # node type -> why it is rejected
    ast.Attribute: "attribute access is not part of the language",
    ast.Subscript: "subscripts are not part of the language",
    ast.Lambda: "lambdas are not part of the language",
    ast.NamedExpr: "`:=` is not part of the language",
    ast.Starred: "`*` unpacking is not part of the language",
    ast.IfExp: "if-expressions are not part of the language; combine conditions with `and`/`or`",
    ast.JoinedStr: "f-strings are not part of the language",
    ast.Slice: "slices are not part of the language",
}
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_CONTAINERS = (ast.List, ast.Tuple, ast.Set, ast.Dict)


class _Validator:
    """Checks a parsed expression against the whitelist and types every node (`int` or `bool`)."""

    def __init__(self, text: str, lead: int, constants: Mapping[str, int], source: str, field: str):
        self.text, self.lead, self.constants = text, lead, dict(constants)
        self.source, self.field = source, field

    def error(self, message: str, line: int = 1, col: int = 1) -> SpecError:
        col += self.lead if line == 1 else 0
        where = f"line {line}, column {col}" if "\n" in self.text else f"column {col}"
        return SpecError(self.source, self.field, f"{where}: {message}")

    def reject(self, node: ast.AST, why: str) -> SpecError:
        segment = ast.get_source_segment(self.text, node) or type(node).__name__
        segment = segment if len(segment) <= 60 else segment[:57] + "..."
        return self.error(f"`{segment}` {why}", node.lineno, node.col_offset + 1)

    def expect(self, node: ast.expr, kind: str) -> int | None:
        """Checks `node` has `kind`; returns its value when it is an integer constant, else None."""
        got, value = self.check(node)
        if got != kind:
            hint = ("a comparison such as `q_idx >= kv_idx`" if kind == "bool"
                    else "arithmetic, comparisons, abs, min and max take integers")
            raise self.reject(node, f"is {'an integer' if got == 'int' else 'a boolean'} where "
                              f"{'a boolean' if kind == 'bool' else 'an integer'} belongs: {hint}")
        return value

    def check(self, node: ast.expr) -> tuple[str, int | None]:
        """Returns (kind, constant value or None); raises SpecError on anything off the whitelist."""
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                return "bool", None
            if isinstance(node.value, int):
                return "int", self.small(node, node.value)
            raise self.reject(node, "is not allowed: only integer literals and True/False are")
        if isinstance(node, ast.Name):
            if node.id in INDEX_NAMES:
                return "int", None
            if node.id in self.constants:
                return "int", self.small(node, self.constants[node.id])
            if node.id in FUNCTIONS:
                raise self.reject(node, f"is a function; call it, e.g. `{node.id}(q_idx - kv_idx)`")
            names = ", ".join([*INDEX_NAMES, *sorted(self.constants)])
            raise self.reject(node, f"is an unknown name; allowed names: {names}")
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                self.expect(value, "bool")
            return "bool", None
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                self.expect(node.operand, "bool")
                return "bool", None
            if isinstance(node.op, ast.Invert):
                raise self.reject(node, "is not allowed: bit operations are not part of the language")
            value = self.expect(node.operand, "int")
            return "int", None if value is None else (-value if isinstance(node.op, ast.USub) else value)
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Div):
                raise self.reject(node, "is not allowed: `/` is not integer division; use `//`")
            if isinstance(node.op, ast.Pow):
                raise self.reject(node, "is not allowed: `**` is not part of the language; multiply instead")
            if isinstance(node.op, _BIT_OPS):
                raise self.reject(node, "is not allowed: bit operations are not part of the language")
            if type(node.op) not in _ARITH:
                raise self.reject(node, "is not allowed: operators are + - * // %")
            left, right = self.expect(node.left, "int"), self.expect(node.right, "int")
            if type(node.op) in _OP_TEXT and (right is None or right <= 0):
                shown = "is not a constant" if right is None else f"evaluates to {right}"
                raise self.reject(node.right, f"{shown}, but the right operand of "
                                  f"`{_OP_TEXT[type(node.op)]}` must be a positive integer constant "
                                  "(literals and named constants only)")
            if left is None or right is None:
                return "int", None
            return "int", _ARITH[type(node.op)](left, right)
        if isinstance(node, ast.Compare):
            bad = [op for op in node.ops if not isinstance(op, _COMPARE)]
            if bad:
                raise self.reject(node, "is not allowed: comparisons are < <= > >= == !=")
            for operand in (node.left, *node.comparators):
                self.expect(operand, "int")
            return "bool", None
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in FUNCTIONS:
                raise self.reject(node, "is not allowed: calls are limited to abs, min, max")
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                raise self.reject(node, f"is not allowed: {name} takes plain positional arguments")
            if (len(node.args) != 1) if name == "abs" else (len(node.args) < 2):
                wanted = "exactly 1 argument" if name == "abs" else "at least 2 arguments"
                raise self.reject(node, f"is not allowed: {name} takes {wanted}")
            values = [self.expect(a, "int") for a in node.args]
            if any(v is None for v in values):
                return "int", None
            return "int", {"abs": lambda v: abs(v[0]), "min": min, "max": max}[name](values)
        if isinstance(node, _COMPREHENSIONS):
            raise self.reject(node, "is not allowed: comprehensions are not part of the language")
        if isinstance(node, _CONTAINERS):
            raise self.reject(node, "is not allowed: lists, tuples, sets and dicts are not part of the language")
        why = _WHY_NOT.get(type(node), f"{type(node).__name__} is not part of the language")
        raise self.reject(node, f"is not allowed: {why}")

    def small(self, node: ast.expr, value: int) -> int:
        if abs(value) > MAX_ABS_LITERAL:
            raise self.reject(node, f"is {value}, which does not fit in 32 bits")
        return value


def validate_mask_expr(text: str, constants: Mapping[str, int], *, source: str = "<expr>",
                       field: str = "mask.expr") -> ast.expr:
    """Checks `text` against the grammar; returns the body of its (whitelisted, boolean) AST."""
    if not isinstance(text, str):
        raise SpecError(source, field, f"column 1: expected a string, got {type(text).__name__}")
    body = text.lstrip(" \t")
    v = _Validator(body, len(text) - len(body), constants, source, field)
    if not body.strip():
        raise v.error("the expression is empty")
    if len(text) > MAX_EXPR_CHARS:
        raise v.error(f"the expression is {len(text)} characters long; at most {MAX_EXPR_CHARS} are allowed")
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError as e:
        line, col = e.lineno or 1, e.offset
        if not col:  # the parser ran off the end of the text
            line, col = body.rstrip().count("\n") + 1, len(body.rstrip().split("\n")[-1]) + 1
        raise v.error(f"not a valid expression: {e.msg}", line, col) from None
    except ValueError as e:  # e.g. null bytes, on some Python versions
        raise v.error(f"not a valid expression: {e}") from None
    nodes = sum(isinstance(n, ast.expr) for n in ast.walk(tree))
    if nodes > MAX_EXPR_NODES:
        raise v.error(f"the expression has {nodes} parts; at most {MAX_EXPR_NODES} are allowed")
    if v.check(tree.body)[0] != "bool":
        raise v.reject(tree.body, "is an integer, but a mask expression must be a boolean "
                       "(a comparison such as `q_idx >= kv_idx`)")
    return tree.body


_SYMPY_COMPARE = {ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge,
                  ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne}


def parse_mask_expr(text: str, constants: Mapping[str, int], *, source: str = "<expr>",
                    field: str = "mask.expr") -> sympy.Basic:
    """Validates `text` and returns a sympy boolean over Q_IDX, KV_IDX, NQ, NK (constants substituted).

    `a // c` -> floor(a / c), `a % c` -> Mod(a, c) (c > 0, floor semantics), abs/min/max -> Abs/Min/Max.
    Raises SpecError(source, field, "column N: ...").
    """
    names = {"q_idx": Q_IDX, "kv_idx": KV_IDX, "Nq": NQ, "Nk": NK,
             **{k: sympy.Integer(v) for k, v in constants.items() if k not in INDEX_NAMES}}

    def lower(node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return sympy.true if node.value is True else sympy.false if node.value is False else sympy.Integer(node.value)
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.BoolOp):
            return (sympy.And if isinstance(node.op, ast.And) else sympy.Or)(*map(lower, node.values))
        if isinstance(node, ast.UnaryOp):
            x = lower(node.operand)
            return sympy.Not(x) if isinstance(node.op, ast.Not) else -x if isinstance(node.op, ast.USub) else x
        if isinstance(node, ast.BinOp):
            a, b = lower(node.left), lower(node.right)
            if isinstance(node.op, ast.FloorDiv):
                return sympy.floor(a / b)
            if isinstance(node.op, ast.Mod):
                return sympy.Mod(a, b)
            return _ARITH[type(node.op)](a, b)
        if isinstance(node, ast.Compare):
            xs = [lower(x) for x in (node.left, *node.comparators)]
            return sympy.And(*(_SYMPY_COMPARE[type(op)](a, b) for op, a, b in zip(node.ops, xs, xs[1:])))
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)  # validated
        return {"abs": sympy.Abs, "min": sympy.Min, "max": sympy.Max}[node.func.id](*map(lower, node.args))

    return lower(validate_mask_expr(text, constants, source=source, field=field))


def evaluate_mask_expr(text: str, constants: Mapping[str, int], q_idx: "torch.Tensor",
                       kv_idx: "torch.Tensor", Nq: int, Nk: int) -> "torch.Tensor":
    """Evaluates the validated expression with torch ops straight from the AST (not via sympy).

    q_idx and kv_idx are int64 tensors that broadcast together; returns a bool tensor of the
    broadcast shape. `//` is torch.div(rounding_mode="floor") and `%` is torch.remainder.
    """
    import torch

    q, kv = torch.as_tensor(q_idx, dtype=torch.int64), torch.as_tensor(kv_idx, dtype=torch.int64)

    def const(v: int | bool) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.bool if isinstance(v, bool) else torch.int64, device=q.device)

    names = {"q_idx": q, "kv_idx": kv, "Nq": const(int(Nq)), "Nk": const(int(Nk)),
             **{k: const(int(v)) for k, v in constants.items() if k not in INDEX_NAMES}}
    compare = {ast.Lt: torch.lt, ast.LtE: torch.le, ast.Gt: torch.gt, ast.GtE: torch.ge,
               ast.Eq: torch.eq, ast.NotEq: torch.ne}

    def run(node: ast.expr) -> torch.Tensor:
        if isinstance(node, ast.Constant):
            return const(node.value)
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.BoolOp):
            combine = torch.logical_and if isinstance(node.op, ast.And) else torch.logical_or
            return reduce(combine, map(run, node.values))
        if isinstance(node, ast.UnaryOp):
            x = run(node.operand)
            return torch.logical_not(x) if isinstance(node.op, ast.Not) else -x if isinstance(node.op, ast.USub) else x
        if isinstance(node, ast.BinOp):
            a, b = run(node.left), run(node.right)
            if isinstance(node.op, ast.FloorDiv):
                return torch.div(a, b, rounding_mode="floor")
            if isinstance(node.op, ast.Mod):
                return torch.remainder(a, b)
            return _ARITH[type(node.op)](a, b)
        if isinstance(node, ast.Compare):
            xs = [run(x) for x in (node.left, *node.comparators)]
            return reduce(torch.logical_and, (compare[type(op)](a, b) for op, a, b in zip(node.ops, xs, xs[1:])))
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)  # validated
        args = [run(a) for a in node.args]
        if node.func.id == "abs":
            return torch.abs(args[0])
        return reduce(torch.minimum if node.func.id == "min" else torch.maximum, args)

    result = run(validate_mask_expr(text, constants))
    return result.expand(torch.broadcast_shapes(q.shape, kv.shape)).contiguous()
