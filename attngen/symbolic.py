"""Integer/boolean sympy expressions of the mask language: rendering to source, and evaluation.

The node set is the one mask_expr.py and mask_analysis.py produce: integers, symbols, +, integer
*, floor(n/d), ceiling(n/d), Mod(x, c), Abs, Min, Max, relations, And, Or, Not, true, false.

`render` prints Triton (or torch) source with Python floor semantics made explicit, since Triton's
integer // and % truncate toward zero like C:

    floor(q_idx/128)   ->  _floordiv(q_idx, 128)
    Mod(kv_idx, 2)     ->  _mod(kv_idx, 2)

`to_callable` turns the expression into plain closures over torch operations (built once, no
source generated); `evaluate` runs them. torch.compile can trace the closures (FlexAttention's
mask_mod in the benchmark) since they touch no sympy object.
"""

from __future__ import annotations

from functools import reduce

import sympy
import torch

DIALECTS = {
    "triton": {"min": "tl.minimum", "max": "tl.maximum", "abs": "tl.abs", "floordiv": "_floordiv", "mod": "_mod"},
    "torch": {"min": "host_min", "max": "host_max", "abs": "abs",  # ints or tensors (attngen/runtime/host_math.py)
              "floordiv": "host_floordiv", "mod": "host_mod"},
}
_REL = {sympy.Le: "<=", sympy.Lt: "<", sympy.Ge: ">=", sympy.Gt: ">", sympy.Eq: "==", sympy.Ne: "!="}


def _ratio(arg: sympy.Expr) -> tuple[sympy.Expr, int]:
    num, den = sympy.fraction(sympy.together(arg))
    if not den.is_Integer or den <= 0:
        raise ValueError(f"division by a non-constant: {arg}")
    return sympy.expand(num), int(den)


def _exact_quotient(e: sympy.Mul) -> sympy.Basic | None:
    """A product with a fractional coefficient that sympy proves integer-valued (it drops a floor
    around, e.g., Min(0, 2*q_idx)/2 - 1/2) as that floor, unevaluated: the integer helpers compute
    it exactly. None for an integer coefficient; an error for a product that may not be an integer."""
    coeff, _ = e.as_coeff_Mul()
    if coeff.is_Integer:
        return None
    if e.is_integer is not True:
        raise ValueError(f"non-integer product: {e}")
    return sympy.floor(e, evaluate=False)


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
        if (quotient := _exact_quotient(e)) is not None:
            return r(quotient)
        coeff, rest = e.as_coeff_Mul()
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
    return to_callable(e)({sym.name: value for sym, value in env.items()})


def _not(a):
    return ~a if isinstance(a, torch.Tensor) else not a


def _minimum(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.where(a <= b, a, b)  # no CPU scalar tensors for int operands
    return min(a, b)


def _maximum(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.where(a >= b, a, b)
    return max(a, b)


_FOLD = {sympy.Add: lambda a, b: a + b, sympy.And: lambda a, b: a & b, sympy.Or: lambda a, b: a | b,
         sympy.Min: _minimum, sympy.Max: _maximum}


def to_callable(e: sympy.Basic):
    """`e` as a plain Python function of an env dict {name: value}, built once from closures, so that
    tracers such as torch.compile see only torch operations (no sympy) when they call it."""
    if e is sympy.true or e is sympy.false:
        value = bool(e)
        return lambda env: value
    if e.is_Symbol:
        name = e.name
        return lambda env: env[name]
    if e.is_Integer:
        value = int(e)
        return lambda env: value
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        num, den = _ratio(e.args[0])
        sign = 1 if isinstance(e, sympy.floor) else -1
        f = to_callable(sign * num)
        return lambda env: sign * (f(env) // den)  # floor division for ints and tensors alike
    if isinstance(e, sympy.Pow):
        base, exp = e.args
        if not exp.is_Integer or exp < 1:
            raise ValueError(f"non-integer power: {e}")
        f, n = to_callable(base), int(exp)
        return lambda env: f(env) ** n
    if isinstance(e, sympy.Mul):
        if (quotient := _exact_quotient(e)) is not None:
            return to_callable(quotient)
        coeff, rest = e.as_coeff_Mul()
        c, fs = int(coeff), [to_callable(f) for f in sympy.Mul.make_args(rest)]

        def product(env):
            acc = c
            for f in fs:
                acc = acc * f(env)
            return acc
        return product
    if type(e) in _FOLD:
        op, fs = _FOLD[type(e)], [to_callable(a) for a in e.args]

        def fold(env):
            acc = fs[0](env)
            for f in fs[1:]:  # a plain loop: torch.compile traces it without generator support
                acc = op(acc, f(env))
            return acc
        return fold
    if isinstance(e, sympy.Mod):
        a, c = to_callable(e.args[0]), to_callable(e.args[1])
        return lambda env: a(env) % c(env)  # Python's sign convention for ints and tensors alike
    if isinstance(e, sympy.Abs):
        a = to_callable(e.args[0])
        return lambda env: abs(a(env))
    if isinstance(e, sympy.Not):
        a = to_callable(e.args[0])
        return lambda env: _not(a(env))
    rel = {sympy.Le: lambda a, b: a <= b, sympy.Lt: lambda a, b: a < b, sympy.Ge: lambda a, b: a >= b,
           sympy.Gt: lambda a, b: a > b, sympy.Eq: lambda a, b: a == b, sympy.Ne: lambda a, b: a != b}
    if type(e) in rel:
        op, lhs, rhs = rel[type(e)], to_callable(e.lhs), to_callable(e.rhs)
        return lambda env: op(lhs(env), rhs(env))
    raise ValueError(f"cannot evaluate {type(e).__name__}: {e}")
