"""Integer/boolean sympy expressions of the mask language: rendering to source, and evaluation.

The node set is the one mask_expr.py and mask_analysis.py produce: integers, symbols, +, integer
*, floor(n/d), ceiling(n/d), Mod(x, c), Abs, Min, Max, relations, And, Or, Not, true, false.

`render` prints Triton (or torch) source with Python floor semantics made explicit, since Triton's
integer // and % truncate toward zero like C:

    floor(q_idx/128)   ->  _floordiv(q_idx, 128)
    Mod(kv_idx, 2)     ->  _mod(kv_idx, 2)

`evaluate` computes the same expression on torch tensors, without generating any source.
"""

from __future__ import annotations

from functools import reduce

import sympy
import torch

DIALECTS = {
    "triton": {"min": "tl.minimum", "max": "tl.maximum", "abs": "tl.abs", "floordiv": "_floordiv", "mod": "_mod"},
    "torch": {"min": "torch.minimum", "max": "torch.maximum", "abs": "torch.abs",
              "floordiv": "_host_floordiv", "mod": "torch.remainder"},
}
_REL = {sympy.Le: "<=", sympy.Lt: "<", sympy.Ge: ">=", sympy.Gt: ">", sympy.Eq: "==", sympy.Ne: "!="}


def _ratio(arg: sympy.Expr) -> tuple[sympy.Expr, int]:
    num, den = sympy.fraction(sympy.together(arg))
    if not den.is_Integer or den <= 0:
        raise ValueError(f"division by a non-constant: {arg}")
    return sympy.expand(num), int(den)


def render(e: sympy.Basic, dialect: str = "triton", names: dict[str, str] | None = None) -> str:
    """Source for `e`; `names` maps symbol names to the variables holding them."""
    fn, names = DIALECTS[dialect], names or {}
    r = lambda x: render(x, dialect, names)  # noqa: E731
    if e is sympy.true or e is sympy.false:
        return str(bool(e))
    if e.is_Symbol:
        return names.get(e.name, e.name)
    if e.is_Integer:
        return str(int(e)) if e >= 0 else f"({int(e)})"
    if isinstance(e, sympy.Add):
        terms = sorted(e.args, key=lambda t: (t.is_Number, sympy.default_sort_key(t)))
        out = r(terms[0])
        for t in terms[1:]:
            coeff, rest = t.as_coeff_Mul()
            out += f" - {r(-t)}" if coeff < 0 else f" + {r(t)}"
        return f"({out})"
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if not coeff.is_Integer:
            raise ValueError(f"non-integer product: {e}")
        factors = [r(f) for f in sorted(sympy.Mul.make_args(rest), key=sympy.default_sort_key)]
        body = " * ".join(factors) if len(factors) > 1 else factors[0]
        if coeff == -1:
            return f"(-{body})" if len(factors) == 1 else f"(-({body}))"
        return f"({int(coeff)} * {body})" if coeff != 1 else (f"({body})" if len(factors) > 1 else body)
    if isinstance(e, sympy.Pow):
        base, exp = e.args
        if not exp.is_Integer or exp < 1:
            raise ValueError(f"non-integer power: {e}")
        return "(" + " * ".join([r(base)] * int(exp)) + ")"
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        num, den = _ratio(e.args[0])
        if isinstance(e, sympy.floor):
            return f"{fn['floordiv']}({r(num)}, {den})"
        return f"(-{fn['floordiv']}({r(-num)}, {den}))"
    if isinstance(e, sympy.Mod):
        return f"{fn['mod']}({r(e.args[0])}, {r(e.args[1])})"
    if isinstance(e, sympy.Abs):
        return f"{fn['abs']}({r(e.args[0])})"
    if isinstance(e, (sympy.Min, sympy.Max)):
        f = fn["min" if isinstance(e, sympy.Min) else "max"]
        args = sorted(e.args, key=sympy.default_sort_key)
        return reduce(lambda acc, a: f"{f}({acc}, {r(a)})", args[1:], r(args[0]))
    if type(e) in _REL:
        return f"({r(e.lhs)} {_REL[type(e)]} {r(e.rhs)})"
    if isinstance(e, (sympy.And, sympy.Or)):
        op = " & " if isinstance(e, sympy.And) else " | "
        return "(" + op.join(r(a) for a in sorted(e.args, key=sympy.default_sort_key)) + ")"
    if isinstance(e, sympy.Not):
        return f"(~{r(e.args[0])})"
    raise ValueError(f"cannot render {type(e).__name__}: {e}")


def evaluate(e: sympy.Basic, env: dict[sympy.Symbol, "int | torch.Tensor"]):
    """Evaluates `e` with symbols bound to ints or int64 tensors (broadcasting)."""
    ev = lambda x: evaluate(x, env)  # noqa: E731
    if e is sympy.true or e is sympy.false:
        return bool(e)
    if e.is_Symbol:
        return env[e]
    if e.is_Integer:
        return int(e)
    if isinstance(e, sympy.Add):
        return reduce(lambda a, b: a + b, (ev(a) for a in e.args))
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if not coeff.is_Integer:
            raise ValueError(f"non-integer product: {e}")
        return reduce(lambda a, b: a * b, (ev(f) for f in sympy.Mul.make_args(rest)), int(coeff))
    if isinstance(e, sympy.Pow):
        base, exp = e.args
        if not exp.is_Integer or exp < 1:
            raise ValueError(f"non-integer power: {e}")
        b = ev(base)
        return reduce(lambda x, _: x * b, range(int(exp) - 1), b)
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        num, den = _ratio(e.args[0])
        sign = 1 if isinstance(e, sympy.floor) else -1
        n = ev(sign * num)
        q = torch.div(n, den, rounding_mode="floor") if isinstance(n, torch.Tensor) else n // den
        return sign * q
    if isinstance(e, sympy.Mod):
        a, c = ev(e.args[0]), ev(e.args[1])
        return torch.remainder(a, c) if isinstance(a, torch.Tensor) else a % c
    if isinstance(e, sympy.Abs):
        a = ev(e.args[0])
        return a.abs() if isinstance(a, torch.Tensor) else abs(a)
    if isinstance(e, (sympy.Min, sympy.Max)):
        f = torch.minimum if isinstance(e, sympy.Min) else torch.maximum
        vals = [torch.as_tensor(ev(a)) for a in e.args]
        return reduce(f, vals)
    if type(e) in _REL:
        a, b = ev(e.lhs), ev(e.rhs)
        return {sympy.Le: lambda: a <= b, sympy.Lt: lambda: a < b, sympy.Ge: lambda: a >= b,
                sympy.Gt: lambda: a > b, sympy.Eq: lambda: a == b, sympy.Ne: lambda: a != b}[type(e)]()
    if isinstance(e, sympy.And):
        return reduce(lambda a, b: a & b, (ev(a) for a in e.args))
    if isinstance(e, sympy.Or):
        return reduce(lambda a, b: a | b, (ev(a) for a in e.args))
    if isinstance(e, sympy.Not):
        a = ev(e.args[0])
        return ~a if isinstance(a, torch.Tensor) else not a
    raise ValueError(f"cannot evaluate {type(e).__name__}: {e}")
