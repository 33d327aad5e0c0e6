"""The mask expression language: accepted constructs agree across three evaluation paths
(sympy lowering, torch evaluator, and plain Python as a test-only oracle); hostile text is rejected."""

from __future__ import annotations

import ast
import builtins
import itertools
import math
from fractions import Fraction
from pathlib import Path

import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attngen.mask_expr as mask_expr_module
from attngen.errors import SpecError
from attngen.mask_expr import (KV_IDX, MAX_EXPR_CHARS, NK, NQ, Q_IDX, evaluate_mask_expr,
                               parse_mask_expr, validate_mask_expr)

pytestmark = pytest.mark.compiler

CONSTANTS = {"CHUNK": 4, "W": 3, "NEG": -5}
SOURCE = "specs/x.yaml"


# ------------------------------------------------------------------ oracles

def sympy_value(expr, env: dict):
    """Evaluates a sympy tree exactly with Fractions (fast; avoids float rounding of floor(x/c))."""
    if expr is sympy.true or expr is sympy.false:
        return bool(expr)
    if expr.is_Symbol:
        return Fraction(env[expr])
    if expr.is_Rational:
        return Fraction(int(expr.p), int(expr.q))
    args = [sympy_value(a, env) for a in expr.args]
    ops = {
        sympy.Add: sum, sympy.Mul: math.prod, sympy.Abs: lambda a: abs(a[0]),
        sympy.Min: min, sympy.Max: max, sympy.Mod: lambda a: a[0] % a[1],
        sympy.floor: lambda a: Fraction(math.floor(a[0])),
        sympy.ceiling: lambda a: Fraction(math.ceil(a[0])),
        sympy.Pow: lambda a: a[0] ** int(a[1]),
        sympy.And: all, sympy.Or: any, sympy.Not: lambda a: not a[0],
        sympy.Lt: lambda a: a[0] < a[1], sympy.Le: lambda a: a[0] <= a[1],
        sympy.Gt: lambda a: a[0] > a[1], sympy.Ge: lambda a: a[0] >= a[1],
        sympy.Eq: lambda a: a[0] == a[1], sympy.Ne: lambda a: a[0] != a[1],
    }
    for kind, op in ops.items():
        if expr.func is kind:
            return op(args)
    raise AssertionError(f"unexpected sympy node {expr.func} in {expr}")


def python_value(text: str, constants: dict, q: int, kv: int, nq: int, nk: int) -> bool:
    """Test-only oracle: the expression *is* Python, so Python itself defines its meaning."""
    names = {"q_idx": q, "kv_idx": kv, "Nq": nq, "Nk": nk, "abs": abs, "min": min, "max": max, **constants}
    return bool(eval(text, {"__builtins__": {}}, names))  # noqa: S307 (test oracle on generated text)


def check_three_ways(text: str, constants: dict, nq: int = 9, nk: int = 11) -> None:
    q = torch.arange(nq).reshape(nq, 1)
    kv = torch.arange(nk).reshape(1, nk)
    got_torch = evaluate_mask_expr(text, constants, q, kv, nq, nk)
    assert got_torch.dtype == torch.bool and got_torch.shape == (nq, nk)
    expr = parse_mask_expr(text, constants)
    assert isinstance(expr, sympy.Basic) and expr.free_symbols <= {Q_IDX, KV_IDX, NQ, NK}
    for i, j in itertools.product(range(nq), range(nk)):
        want = python_value(text, constants, i, j, nq, nk)
        env = {Q_IDX: i, KV_IDX: j, NQ: nq, NK: nk}
        assert bool(got_torch[i, j]) == want, (text, i, j)
        assert sympy_value(expr, env) == want, (text, expr, i, j)
    for i, j in [(0, 0), (nq - 1, nk - 1), (nq // 2, 1)]:  # cross-check the Fraction interpreter
        assert bool(expr.subs({Q_IDX: i, KV_IDX: j, NQ: nq, NK: nk})) == python_value(text, constants, i, j, nq, nk)


# ------------------------------------------------------------------ accepted constructs

ACCEPTED = [
    "q_idx >= kv_idx",
    "q_idx == kv_idx",
    "q_idx != kv_idx",
    "q_idx < kv_idx or q_idx > kv_idx + 2",
    "kv_idx <= q_idx + Nk - Nq",
    "kv_idx // CHUNK == q_idx // CHUNK",
    "(q_idx - 7) // 3 == (kv_idx - 9) // 2",
    "(q_idx - kv_idx) % 4 == 1",
    "(kv_idx - q_idx) % (CHUNK * 2 - 1) < 3",
    "-q_idx // W <= -kv_idx % W",
    "q_idx * NEG * -1 < kv_idx // -NEG + NEG % 3",
    "0 <= q_idx - kv_idx < W",
    "kv_idx < 4 <= q_idx != 7",
    "abs(q_idx - kv_idx) <= W",
    "min(q_idx, kv_idx) >= max(2, Nq // 3, kv_idx - 5)",
    "not (q_idx < kv_idx) and True",
    "not not (kv_idx > 3) or False",
    "True",
    "False",
    "1 < 2",
    "q_idx * kv_idx - 3 * q_idx > +kv_idx",
    "q_idx < 3 and kv_idx < 5 or q_idx == kv_idx and not kv_idx == 0",
    "(q_idx <\n    kv_idx + 1)",
    "  q_idx < 1",
    "q_idx < 1\n",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_accepted_constructs_agree(text):
    check_three_ways(text, CONSTANTS)


def test_lowering_shapes():
    assert parse_mask_expr("q_idx == kv_idx", {}) == sympy.Eq(Q_IDX, KV_IDX)
    assert parse_mask_expr("q_idx != kv_idx", {}) == sympy.Ne(Q_IDX, KV_IDX)
    assert parse_mask_expr("kv_idx // C == q_idx % C", {"C": 8}) == sympy.Eq(
        sympy.floor(KV_IDX / 8), sympy.Mod(Q_IDX, 8))
    assert parse_mask_expr("0 <= q_idx - kv_idx < 4", {}) == sympy.And(
        sympy.Le(0, Q_IDX - KV_IDX), sympy.Lt(Q_IDX - KV_IDX, 4))
    assert parse_mask_expr("abs(q_idx) < min(Nq, max(Nk, 1))", {}) == sympy.Lt(
        sympy.Abs(Q_IDX), sympy.Min(NQ, sympy.Max(NK, 1)))
    assert parse_mask_expr("True", {}) is sympy.true
    assert parse_mask_expr("1 > 2", {}) is sympy.false


def test_negative_operands_use_floor_semantics():
    q = torch.arange(-10, 11).reshape(-1, 1)
    kv = torch.zeros(1, 1, dtype=torch.int64)
    for c in (1, 2, 3, 7):
        for text in (f"q_idx // {c} == kv_idx - 1", f"q_idx % {c} == kv_idx + 1"):
            got = evaluate_mask_expr(text, {}, q, kv, 1, 1)[:, 0]
            expr = parse_mask_expr(text, {})
            for row, i in enumerate(range(-10, 11)):
                want = (i // c == -1) if "//" in text else (i % c == 1)
                assert bool(got[row]) == want
                assert bool(expr.subs({Q_IDX: i, KV_IDX: 0})) == want


def test_constant_result_is_broadcast():
    out = evaluate_mask_expr("True", {}, torch.arange(3).reshape(3, 1), torch.arange(5), 3, 5)
    assert out.dtype == torch.bool and out.shape == (3, 5) and bool(out.all())
    out = evaluate_mask_expr("Nq > Nk", {}, torch.arange(3).reshape(3, 1), torch.arange(5), 3, 5)
    assert out.shape == (3, 5) and not bool(out.any())


# ------------------------------------------------------------------ random expressions

def int_exprs(divisor_names):
    leaves = st.sampled_from(["q_idx", "kv_idx", "Nq", "Nk", "C", "NEG"]) | st.integers(0, 12).map(str)
    divisors = st.integers(1, 6).map(str) | st.sampled_from([*divisor_names, "(D + 1)", "(2 * D - 1)", "-NEG"])

    def extend(inner):
        return (st.tuples(inner, st.sampled_from(["+", "-", "*"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
                | st.tuples(inner, st.sampled_from(["//", "%"]), divisors).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
                | inner.map(lambda a: f"(-{a})")
                | inner.map(lambda a: f"abs({a})")
                | st.tuples(st.sampled_from(["min", "max"]), st.lists(inner, min_size=2, max_size=3))
                .map(lambda t: f"{t[0]}({', '.join(t[1])})"))

    return st.recursive(leaves, extend, max_leaves=6)


def bool_exprs():
    ints = int_exprs(["D"])
    cmp = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
    comparisons = (st.tuples(ints, cmp, ints).map(" ".join)
                   | st.tuples(ints, cmp, ints, cmp, ints).map(" ".join))

    def extend(inner):
        return (st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
                | inner.map(lambda a: f"(not {a})"))

    return st.recursive(comparisons | st.sampled_from(["True", "False"]), extend, max_leaves=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=bool_exprs(), c=st.integers(-20, 20), d=st.integers(1, 9),
       nq=st.integers(1, 7), nk=st.integers(1, 7))
def test_random_expressions_agree(text, c, d, nq, nk):
    constants = {"C": c, "D": d, "NEG": -3}
    try:
        validate_mask_expr(text, constants)
    except SpecError as e:  # only the size limits may reject generated text
        assert "at most" in str(e)
        return
    check_three_ways(text, constants, nq, nk)


# ------------------------------------------------------------------ rejected text

HOSTILE = [
    "__import__('os')",
    "q_idx.__class__",
    "open('x')",
    "[q_idx][0]",
    "lambda: 1",
    "[x for x in ()]",
    "'a' < 'b'",
    "q_idx < 1.5",
    "q_idx ** 2 < 3",
    "q_idx / 2 < 3",
    "q_idx & 1",
    "q_idx | 1 == 1",
    "q_idx ^ 1 == 1",
    "q_idx << 1 == 1",
    "q_idx >> 1 == 1",
    "~q_idx == 1",
    "(y := 1)",
    "q_idx if 1 else 2",
    "min(q_idx)",
    "abs(q_idx, kv_idx) < 1",
    "max(q_idx, kv_idx, key=abs) < 1",
    "min(*[q_idx, 1]) < 1",
    "foo(q_idx)",
    "q_idx < UNKNOWN",
    "q_idx < 1 and " * 50 + "True",
    " + ".join(["1"] * 150) + " < q_idx",
    "q_idx + 1",
    "q_idx",
    "q_idx // kv_idx > 0",
    "q_idx // Nk > 0",
    "q_idx % 0 == 0",
    "q_idx % (CHUNK - 4) == 0",
    "q_idx // -1 == 0",
    "q_idx // NEG == 0",
    "q_idx < ",
    "",
    "   ",
    "(q_idx < 3) + 1 < 5",
    "abs(q_idx < kv_idx) < 1",
    "q_idx < True",
    "not q_idx",
    "q_idx < 1 and 3",
    "q_idx in (1, 2)",
    "q_idx is kv_idx",
    "q_idx < b'1'",
    "q_idx < 1j",
    "q_idx < f'{q_idx}'",
    "q_idx < None",
    "q_idx < {1: 2}",
    "abs < 1",
    "q_idx < 3000000000",
    "q_idx < 1; import os",
    "(q_idx <\n 1.0)",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_is_rejected(text):
    with pytest.raises(SpecError) as info:
        parse_mask_expr(text, CONSTANTS, source=SOURCE, field="mask.expr")
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: mask.expr: ") and "column" in message
    assert info.value.field == "mask.expr"
    with pytest.raises(SpecError):  # the torch path validates too
        evaluate_mask_expr(text, CONSTANTS, torch.arange(2), torch.arange(2), 2, 2)


@pytest.mark.parametrize("text, fragment", [
    ("__import__('os')", "column 1: `__import__('os')` is not allowed: calls are limited to abs, min, max"),
    ("q_idx < UNKNOWN", "column 9: `UNKNOWN` is an unknown name; allowed names: q_idx, kv_idx, Nq, Nk, CHUNK, NEG, W"),
    ("q_idx / 2 < 3", "use `//`"),
    ("q_idx + 1", "must be a boolean"),
    ("q_idx // kv_idx > 0", "column 10: `kv_idx` is not a constant"),
    ("q_idx % 0 == 0", "column 9: `0` evaluates to 0"),
    ("(q_idx < 3) + 1 < 5", "column 2: `q_idx < 3` is a boolean where an integer belongs"),
    ("q_idx < ", "column 8: not a valid expression"),
    ("q_idx < 1 )", "column 11: not a valid expression"),
    ("x" * (MAX_EXPR_CHARS + 1), f"{MAX_EXPR_CHARS + 1} characters long"),
    ("  q_idx < 1.5", "column 11: `1.5`"),
    ("(q_idx <\n 1.0)", "line 2, column 2: `1.0`"),
])
def test_error_messages_name_the_piece_and_column(text, fragment):
    with pytest.raises(SpecError) as info:
        parse_mask_expr(text, CONSTANTS, source=SOURCE)
    assert fragment in str(info.value)


# ------------------------------------------------------------------ nothing is executed

def test_hostile_calls_never_run(monkeypatch):
    """Names that would have side effects if anything evaluated them are rejected, and never run."""
    calls = []
    monkeypatch.setattr(builtins, "attngen_probe", lambda *a: calls.append(a) or 0, raising=False)
    for text in ["attngen_probe() == 0", "q_idx < attngen_probe()", "abs(attngen_probe()) < 1",
                 "q_idx < 1 or attngen_probe() == 0", "(attngen_probe.x) < 1", "q_idx < abs.__call__(1)"]:
        with pytest.raises(SpecError):
            parse_mask_expr(text, {})
        with pytest.raises(SpecError):
            evaluate_mask_expr(text, {}, torch.arange(2), torch.arange(2), 2, 2)
    assert calls == []


def test_only_ast_compilation_happens(monkeypatch):
    """eval/exec are refused outright; compile is allowed only to build an AST (ast.parse uses it)."""
    real_compile = builtins.compile

    def ast_only_compile(source, filename, mode, flags=0, *args, **kwargs):
        assert flags & ast.PyCF_ONLY_AST, "compiled to a code object"
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(builtins, "compile", ast_only_compile)
    text = "abs(q_idx - kv_idx) <= max(W, CHUNK // 2) and not (q_idx % CHUNK == 0)"
    parse_mask_expr(text, CONSTANTS)
    evaluate_mask_expr(text, CONSTANTS, torch.arange(4).reshape(4, 1), torch.arange(4), 4, 4)


def test_module_source_has_no_dynamic_execution():
    tree = ast.parse(Path(mask_expr_module.__file__).read_text())
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__", "getattr", "globals", "locals"}
