"""Mask analysis: which tiles of the score matrix are EMPTY, FULL or PARTIAL, proven symbolically.

Two results, both pure data:

* `classify_tile` proves one BLOCK_M x BLOCK_N tile EMPTY (no visible pair), FULL (every pair
  visible) or PARTIAL (not proven either way) by interval arithmetic over the sympy condition.
  It is sound: EMPTY and FULL are never wrong; PARTIAL only costs mask code.

* `analyze` tries to derive, for every query row i, one contiguous range of visible keys
  [lo(i), hi(i)] in closed form, with lo and hi non-decreasing in i. Then the keys that a query
  block [m_first, m_last] may see are [lo(m_first), hi(m_last)], and the keys that all of its rows
  see are [lo(m_last), hi(m_first)]: the kernel loops over exactly the first range, without mask
  code in the second. Causal, sliding windows, prefix-LM and chunked masks take this form:

      causal, bottom_right:   kv_idx <= q_idx + Nk - Nq
        -> lo(i) = -oo, hi(i) = i + Nk - Nq
      prefix-LM (P = 64):     kv_idx < 64  or  kv_idx <= q_idx + Nk - Nq
        -> lo(i) = -oo, hi(i) = max(63, i + Nk - Nq)

  Masks whose visible keys are not one range (dilated, or not monotone in q_idx) get a `tiles`
  plan: the runtime builds a per-shape table of non-empty tiles, split into full and partial.

* A `document` mask depends on data (document ids passed with each call), so its plan is `tiles`
  with `document` set: per batch, the runtime combines the static classes of `cond` with the
  classes the documents' ids prove (a tile is EMPTY where its query and key id ranges do not
  meet, FULL where all its ids are one document) into per-batch tables.
"""

from __future__ import annotations

import enum
import functools
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import sympy
import torch

from .mask_expr import KV_IDX, NK, NQ, Q_IDX
from .runtime.tiles import layout_tiles
from .runtime.layouts import static_layout
from .runtime.tiles import cell_visibility
from .spec import Sparsity
from .symbolic import evaluate, to_callable

M_FIRST, M_LAST = sympy.symbols("m_first m_last", integer=True)


class TileClass(enum.Enum):
    EMPTY = "empty"
    FULL = "full"
    PARTIAL = "partial"


class PlanKind(enum.Enum):
    DENSE = "dense"  # no mask: every in-bounds tile is FULL
    RANGE = "range"  # one contiguous, monotone key range per row: closed-form loop bounds
    TILES = "tiles"  # anything else: a runtime table of non-empty tiles


@dataclass(frozen=True)
class RowRange:
    """Visible keys of query row q_idx: lo <= kv_idx <= hi; None is unbounded."""

    lo: sympy.Expr | None
    hi: sympy.Expr | None


@dataclass(frozen=True)
class MaskPlan:
    """The loop plan of one kernel. The forward walks keys for a block of queries; a transposed
    plan (the backward's dK/dV kernel) walks queries for a block of keys. Below, "outer" is the
    blocked index (q_idx, or kv_idx when transposed) and "inner" the one the loop walks."""

    kind: PlanKind
    cond: sympy.Basic | None  # the visibility condition; None for DENSE
    rows: RowRange | None = None  # RANGE only: the inner range of one outer index
    transposed: bool = False
    # RANGE only: inclusive inner bounds of an outer block [m_first, m_last], in M_FIRST, M_LAST, NQ, NK.
    kv_lo: sympy.Expr | None = None  # first inner index any outer index may see
    kv_hi: sympy.Expr | None = None  # last inner index any outer index may see
    full_lo: sympy.Expr | None = None  # first inner index every outer index sees
    full_hi: sympy.Expr | None = None  # last inner index every outer index sees
    document: bool = False  # TILES only: the tables also depend on each call's document ids
    sparsity: Sparsity | None = None  # TILES only: and on the block layout (its static terms, a layout per call)

    def describe(self) -> str:
        if self.document or self.sparsity:
            where = ["the documents match"] * self.document + [sympy.sstr(self.cond)] * (self.cond is not None)
            if self.sparsity:
                where.append(f"in the layout ({self.sparsity.describe()})")
            by_batch = self.document or bool(self.sparsity and self.sparsity.runtime)
            by_head = bool(self.sparsity and (self.sparsity.runtime or self.sparsity.random_blocks))
            per = {(False, False): "per-shape", (True, False): "per-batch", (False, True): "per-head",
                   (True, True): "per-batch and per-head"}[by_batch, by_head]
            given = " and ".join(["each call's document ids"] * self.document
                                 + ["the layout"] * bool(self.sparsity))
            return f"tiles: visible where {' and '.join(where)}; {per} tables from {given}"
        if self.kind is PlanKind.DENSE:
            return "dense: every in-bounds tile is full"
        inner = "queries" if self.transposed else "keys"
        if self.kind is PlanKind.TILES:
            return f"tiles: visible where {sympy.sstr(self.cond)}; runtime table of non-empty tiles"
        lo = "-oo" if self.rows.lo is None else sympy.sstr(self.rows.lo)
        hi = "+oo" if self.rows.hi is None else sympy.sstr(self.rows.hi)
        outer = "key kv_idx" if self.transposed else "query q_idx"
        return f"range: {outer} sees {inner} [{lo}, {hi}]"


# ----------------------------------------------------------------- row ranges

def _bound_of_atom(rel: sympy.Basic, var: sympy.Symbol) -> RowRange | None:
    """One relation, linear in `var` with a constant coefficient, as a range of var."""
    if isinstance(rel, sympy.Ne) or not isinstance(rel, sympy.core.relational.Relational):
        return None
    e = sympy.expand(rel.lhs - rel.rhs)
    abs_terms = [t for t in sympy.Add.make_args(e) if t.has(sympy.Abs) and t.has(var)]
    if abs_terms:  # c*|u| + r  <= 0   <=>   c*u + r <= 0 and -c*u + r <= 0   (c > 0)
        if len(abs_terms) != 1 or not isinstance(rel, (sympy.Le, sympy.Lt)):
            return None
        coeff, absval = abs_terms[0].as_coeff_Mul()
        if not isinstance(absval, sympy.Abs) or coeff <= 0:
            return None
        rest = e - abs_terms[0]
        op = type(rel)
        return _row_range(sympy.And(op(coeff * absval.args[0] + rest, 0), op(-coeff * absval.args[0] + rest, 0)), var)
    a = sympy.diff(e, var)
    b = sympy.expand(e - a * var)
    if not a.is_Number or a == 0 or b.has(var):
        return None
    if isinstance(rel, sympy.Lt):  # integers: x < 0  <=>  x <= -1
        b += 1
    elif isinstance(rel, sympy.Gt):
        b -= 1
    # a*kv + b (<= | >= | ==) 0
    upper, lower = sympy.floor(-b / a), sympy.ceiling(-b / a)
    if isinstance(rel, sympy.Eq):
        return RowRange(lower, upper)
    upper_bound = isinstance(rel, (sympy.Le, sympy.Lt)) == (a > 0)
    return RowRange(None, upper) if upper_bound else RowRange(lower, None)


def _join(bounds: list[sympy.Expr | None], fn) -> sympy.Expr | None:
    return None if any(b is None for b in bounds) else fn(*bounds)


def _row_range(cond: sympy.Basic, var: sympy.Symbol) -> RowRange | None:
    """The values of `var` satisfying cond, as one range whose ends depend on the other index."""
    if cond is sympy.true:
        return RowRange(None, None)
    if isinstance(cond, sympy.And):
        parts = [_row_range(a, var) for a in cond.args]
        if any(p is None for p in parts):
            return None
        los = [p.lo for p in parts if p.lo is not None]
        his = [p.hi for p in parts if p.hi is not None]
        return RowRange(sympy.Max(*los) if los else None, sympy.Min(*his) if his else None)
    if isinstance(cond, sympy.Or):
        parts = [_row_range(a, var) for a in cond.args]
        if any(p is None for p in parts):
            return None
        # A union of ranges is one range when all share an unbounded end.
        if all(p.lo is None for p in parts):
            return RowRange(None, _join([p.hi for p in parts], sympy.Max))
        if all(p.hi is None for p in parts):
            return RowRange(_join([p.lo for p in parts], sympy.Min), None)
        return None
    if not cond.has(var):
        return None  # a condition on the other index alone: not one range for every row
    if isinstance(cond, sympy.Eq):  # floor(v/c) == x  <=>  c*x <= v <= c*x + c - 1   (chunks)
        for side, other in ((cond.lhs, cond.rhs), (cond.rhs, cond.lhs)):
            if isinstance(side, sympy.floor) and not other.has(var):
                num, den = sympy.fraction(sympy.together(side.args[0]))
                if num == var and den.is_Integer and den > 0:
                    return RowRange(den * other, den * other + den - 1)
    return _bound_of_atom(cond, var)


def _envelope(cond: sympy.Basic, var: sympy.Symbol) -> RowRange | None:
    """A range of `var` holding every value that satisfies cond (a superset where _row_range has no
    exact one: conjuncts without a range, like a modulo test, are dropped), or None."""
    if isinstance(cond, sympy.And):
        parts = [p for p in (_envelope(a, var) for a in cond.args) if p is not None]
        if not parts:
            return None
        los = [p.lo for p in parts if p.lo is not None]
        his = [p.hi for p in parts if p.hi is not None]
        return RowRange(sympy.Max(*los) if los else None, sympy.Min(*his) if his else None)
    if isinstance(cond, sympy.Or):
        parts = [_envelope(a, var) for a in cond.args]
        if any(p is None for p in parts):
            return None
        return RowRange(_join([p.lo for p in parts], sympy.Min), _join([p.hi for p in parts], sympy.Max))
    return _row_range(cond, var)


def _nondecreasing(e: sympy.Expr, x: sympy.Symbol) -> bool:
    """A structural proof that e does not decrease as x grows (False: not proven)."""
    if not e.has(x):
        return True
    if e == x:
        return True
    if isinstance(e, (sympy.Add, sympy.Min, sympy.Max)):
        return all(_nondecreasing(a, x) for a in e.args)
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        return coeff > 0 and not rest.is_Mul and _nondecreasing(rest, x)
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        return _nondecreasing(e.args[0], x)
    return False


def analyze(cond: sympy.Basic | None, transposed: bool = False, document: bool = False,
            sparsity: Sparsity | None = None) -> MaskPlan:
    """The loop plan for a mask condition (see the module docstring). `transposed` plans walk
    queries for a block of keys (the backward's dK/dV kernel):

        causal top-left   kv_idx <= q_idx   ->   key kv_idx is seen by queries [kv_idx, +oo)

    `document`: the mask also compares per-call document ids; `sparsity`: the spec's block layout
    (both always a `tiles` plan: the tables combine the condition's tiles with them).
    """
    if cond is sympy.true:
        cond = None
    if document or sparsity is not None:
        return MaskPlan(PlanKind.TILES, cond, transposed=transposed, document=document, sparsity=sparsity)
    if cond is None:
        return MaskPlan(PlanKind.DENSE, None, transposed=transposed)
    inner, outer = (Q_IDX, KV_IDX) if transposed else (KV_IDX, Q_IDX)
    rows = _row_range(sympy.to_nnf(cond), inner)
    if rows is None or not all(b is None or _nondecreasing(b, outer) for b in (rows.lo, rows.hi)):
        return MaskPlan(PlanKind.TILES, cond, transposed=transposed)
    at = lambda b, m: None if b is None else b.subs(outer, m)  # noqa: E731
    return MaskPlan(PlanKind.RANGE, cond, rows, transposed,
                    kv_lo=at(rows.lo, M_FIRST), kv_hi=at(rows.hi, M_LAST),
                    full_lo=at(rows.lo, M_LAST), full_hi=at(rows.hi, M_FIRST))


# ----------------------------------------------------------- tile intervals

Interval = tuple[Fraction, Fraction]


def _iv(e: sympy.Basic, env: dict[sympy.Symbol, Interval]) -> Interval:
    """Bounds of an integer expression when each symbol ranges over its interval."""
    if e.is_Symbol:
        return env[e]
    if e.is_Number:
        v = Fraction(int(e.p), int(e.q))
        return v, v
    if isinstance(e, sympy.Add):
        lo = hi = Fraction(0)
        for a in e.args:
            l, h = _iv(a, env)
            lo, hi = lo + l, hi + h
        return lo, hi
    if isinstance(e, sympy.Mul):
        lo = hi = Fraction(1)
        for a in e.args:
            l, h = _iv(a, env)
            c = (lo * l, lo * h, hi * l, hi * h)
            lo, hi = min(c), max(c)
        return lo, hi
    if isinstance(e, sympy.Pow):
        base, exp = e.args
        if not exp.is_Integer or exp < 1:
            raise ValueError(f"no interval rule for the power {e}")
        l, h = _iv(base, env)
        n = int(exp)
        lo, hi = min(l ** n, h ** n), max(l ** n, h ** n)
        if n % 2 == 0 and l < 0 < h:  # an even power's minimum is inside the interval
            lo = Fraction(0)
        return lo, hi
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        l, h = _iv(e.args[0], env)
        f = math.floor if isinstance(e, sympy.floor) else math.ceil
        return Fraction(f(l)), Fraction(f(h))
    if isinstance(e, sympy.Mod):
        l, h = _iv(e.args[0], env)
        c = e.args[1]
        if not c.is_Integer or c <= 0:
            raise ValueError(f"mod by a non-constant: {e}")
        c = int(c)
        if math.floor(l / c) == math.floor(h / c):  # one period: mod is monotone here
            return l - c * math.floor(l / c), h - c * math.floor(l / c)
        return Fraction(0), Fraction(c - 1)
    if isinstance(e, sympy.Abs):
        l, h = _iv(e.args[0], env)
        if l >= 0:
            return l, h
        if h <= 0:
            return -h, -l
        return Fraction(0), max(-l, h)
    if isinstance(e, (sympy.Min, sympy.Max)):
        ivs = [_iv(a, env) for a in e.args]
        pick = min if isinstance(e, sympy.Min) else max
        return pick(i[0] for i in ivs), pick(i[1] for i in ivs)
    raise ValueError(f"no interval rule for {type(e).__name__}: {e}")


def _truth(c: sympy.Basic, env: dict[sympy.Symbol, Interval]) -> bool | None:
    """True / False when proven over the whole box, None when not."""
    if c is sympy.true:
        return True
    if c is sympy.false:
        return False
    if isinstance(c, sympy.And):
        ts = [_truth(a, env) for a in c.args]
        return False if False in ts else True if all(ts) else None
    if isinstance(c, sympy.Or):
        ts = [_truth(a, env) for a in c.args]
        return True if True in ts else False if all(t is False for t in ts) else None
    if isinstance(c, sympy.Not):
        t = _truth(c.args[0], env)
        return None if t is None else not t
    lo, hi = _iv(sympy.expand(c.lhs - c.rhs), env)  # relation of d = lhs - rhs with 0
    if isinstance(c, sympy.Le):
        return True if hi <= 0 else False if lo > 0 else None
    if isinstance(c, sympy.Lt):
        return True if hi < 0 else False if lo >= 0 else None
    if isinstance(c, sympy.Ge):
        return True if lo >= 0 else False if hi < 0 else None
    if isinstance(c, sympy.Gt):
        return True if lo > 0 else False if hi <= 0 else None
    if isinstance(c, sympy.Eq):
        return True if lo == hi == 0 else False if lo > 0 or hi < 0 else None
    if isinstance(c, sympy.Ne):
        return False if lo == hi == 0 else True if lo > 0 or hi < 0 else None
    raise ValueError(f"no truth rule for {type(c).__name__}: {c}")


def classify_tile(cond: sympy.Basic | None, q: tuple[int, int], kv: tuple[int, int], Nq: int, Nk: int) -> TileClass:
    """Classifies the tile of rows q[0]..q[1] and keys kv[0]..kv[1] (inclusive, in bounds)."""
    if cond is None:
        return TileClass.FULL
    env = {Q_IDX: tuple(map(Fraction, q)), KV_IDX: tuple(map(Fraction, kv)),
           NQ: (Fraction(Nq), Fraction(Nq)), NK: (Fraction(Nk), Fraction(Nk))}
    t = _truth(cond, env)
    return TileClass.PARTIAL if t is None else TileClass.FULL if t else TileClass.EMPTY


# ------------------------------------------------------------- tile counts

@dataclass(frozen=True)
class TileCounts:
    total: int  # in-bounds tiles of the score matrix
    visited: int  # tiles the kernel loops over
    partial: int  # of those, tiles that run mask code


def block_key_range(plan: MaskPlan, m_first, m_last, Nq: int, Nk: int, block_n: int):
    """RANGE plans: the kernel's three inner segments for outer blocks [m_first, m_last] (int64
    tensors), computed as the template computes them, in steps of block_n inner indices:
    [start, full_start) masked, [full_start, full_end) unmasked, [full_end, end) masked."""
    env = {M_FIRST: m_first, M_LAST: m_last, NQ: Nq, NK: Nk}
    n = Nq if plan.transposed else Nk  # how many inner indices there are
    bound = lambda e, default: torch.full_like(m_first, default) if e is None else m_first * 0 + evaluate(e, env)  # noqa: E731
    lo = bound(plan.kv_lo, 0).clamp(0, n)
    end = torch.minimum(torch.maximum(bound(plan.kv_hi, n - 1) + 1, lo), torch.full_like(lo, n))
    start = lo // block_n * block_n
    full_start = -(-bound(plan.full_lo, 0).clamp(min=0) // block_n) * block_n
    full_end = (bound(plan.full_hi, n - 1) + 1).clamp(0, n) // block_n * block_n
    none = full_start >= full_end
    full_start = torch.where(none, start, torch.maximum(full_start, start))
    full_end = torch.where(none, start, torch.maximum(full_end, start))
    return start, full_start, full_end, torch.maximum(end, full_end)


CELL = 16  # the cell of the cost model's mask grid: every tiling whose blocks are multiples of it shares one grid


@functools.lru_cache(maxsize=16)
def _cells(cond: sympy.Basic | None, Nq: int, Nk: int, gm: int, gn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per gm x gn cell of the score matrix: whether any pair is visible, and whether every
    in-bounds pair is (runtime.tiles.cell_visibility, the runtime's tile tables' own evaluation).
    Cached: callers must not modify the tensors."""
    if cond is None:
        return cell_visibility(None, Nq, Nk, gm, gn)
    fn = to_callable(cond)
    return cell_visibility(lambda q, k, nq, nk: fn({Q_IDX.name: q, KV_IDX.name: k, NQ.name: nq, NK.name: nk}),
                           Nq, Nk, gm, gn, envelope=_key_envelope(cond, Nq, Nk))


def _key_envelope(cond: sympy.Basic, Nq: int, Nk: int):
    """(first, last) -> [lo, hi]: the keys query rows first..last may see, from the condition's
    range-shaped conjuncts (bounds proven nondecreasing in q_idx); None where there are none."""
    env = _envelope(sympy.to_nnf(cond), KV_IDX)
    if env is None or not all(b is None or _nondecreasing(b, Q_IDX) for b in (env.lo, env.hi)):
        return None
    lo = None if env.lo is None else to_callable(env.lo.subs({NQ: Nq, NK: Nk}))
    hi = None if env.hi is None else to_callable(env.hi.subs({NQ: Nq, NK: Nk}))
    return lambda first, last: (0 if lo is None else int(lo({Q_IDX.name: first})),
                                Nk - 1 if hi is None else int(hi({Q_IDX.name: last})))


def dense_tile_classes(cond: sympy.Basic | None, Nq: int, Nk: int, block_m: int, block_n: int) -> torch.Tensor:
    """Exact classes of every tile by evaluating the mask densely: int8 [n_m, n_n] of
    0 = EMPTY, 1 = PARTIAL, 2 = FULL. Out-of-bounds rows and keys count as not visible. The
    mask is evaluated once per shape on a grid of cells (_cells): CELL x CELL where the blocks are
    multiples of CELL (every shipped candidate), finer otherwise."""
    gm, gn = math.gcd(block_m, CELL), math.gcd(block_n, CELL)
    any_c, all_c = _cells(cond, Nq, Nk, gm, gn)
    n_m, n_n = -(-Nq // block_m), -(-Nk // block_n)
    pad = (0, n_n * block_n // gn - any_c.shape[1], 0, n_m * block_m // gm - any_c.shape[0])
    shape = (n_m, block_m // gm, n_n, block_n // gn)  # cells past the end: nothing visible, all as it should be
    anyv = torch.nn.functional.pad(any_c, pad, value=False).reshape(shape).any(dim=3).any(dim=1)
    allv = torch.nn.functional.pad(all_c, pad, value=True).reshape(shape).all(dim=3).all(dim=1) & anyv
    return anyv.to(torch.int8) + allv.to(torch.int8)


def tiles_per_block(plan: MaskPlan, Nq: int, Nk: int, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visited, partial): int64 [n_outer], the tiles each outer block's program loops over and, of
    those, the ones that run mask code. block_m blocks queries and block_n keys, whichever of them
    the plan walks."""
    plan, static = _static_part(plan, Nq, Nk, block_m, block_n)
    if static is not None:
        return _counted(static, plan.transposed, Nk if plan.transposed else Nq, Nq if plan.transposed else Nk,
                        block_m if plan.transposed else block_n)
    outer, inner, outer_block, inner_block = (Nk, Nq, block_n, block_m) if plan.transposed else (Nq, Nk, block_m, block_n)
    n_outer, n_inner = -(-outer // outer_block), -(-inner // inner_block)
    ragged = inner % inner_block != 0
    if plan.kind is PlanKind.DENSE:
        visited = torch.full((n_outer,), n_inner, dtype=torch.int64)
        return visited, torch.full_like(visited, 1 if ragged else 0)
    if plan.kind is PlanKind.RANGE:
        first = torch.arange(n_outer, dtype=torch.int64) * outer_block
        last = torch.clamp(first + outer_block, max=outer) - 1
        start, f_lo, f_hi, end = block_key_range(plan, first, last, Nq, Nk, inner_block)
        visited = -(-(end - start) // inner_block)
        return visited, visited - (f_hi - f_lo) // inner_block
    return _counted(_classes(plan, Nq, Nk, block_m, block_n), plan.transposed, outer, inner, inner_block)


def element_plan(plan: MaskPlan) -> MaskPlan:
    """The plan of a document or layout plan's element mask alone (the plan itself otherwise): its
    closed-form bounds still bound the keys, since ids and a layout only remove some."""
    return analyze(plan.cond, plan.transposed) if plan.document or plan.sparsity else plan


def decode_key_width(plan: MaskPlan) -> tuple[int, int] | None:
    """(a, b): the last n rows of any square problem (a decode call's: Nq = Nk, rows Nk - n .. Nk -
    1) see keys within a span of at most a + b n, from the element mask's closed-form bounds (a
    window: its width + n; a chunk of C: C - 1 + n, its floors bounded by their arguments); None
    where the span grows with the length (no lower bound, or none linear in n alone)."""
    plan = element_plan(plan)
    if plan.kind is not PlanKind.RANGE or plan.transposed or plan.kv_lo is None:
        return None
    n = sympy.Symbol("n", integer=True, positive=True)
    rows = {M_FIRST: NK - n, M_LAST: NK - 1}
    his = [NK - 1] + ([] if plan.kv_hi is None else _bounds(plan.kv_hi.subs(rows).subs(NQ, NK), upper=True) or [])
    los = _bounds(plan.kv_lo.subs(rows).subs(NQ, NK), upper=False)
    best = None
    for hi, lo in itertools.product(his, los or []):
        span = sympy.expand(hi - lo + 1)
        if span.free_symbols - {n} or not span.is_polynomial(n):
            continue
        poly = sympy.Poly(span, n)
        coeffs = [sympy.Integer(0)] * (2 - len(poly.all_coeffs())) + list(poly.all_coeffs())
        if poly.degree() > 1 or not all(c.is_Rational for c in coeffs) or not coeffs[0].is_Integer or coeffs[0] < 0:
            continue
        width = (int(sympy.ceiling(coeffs[1])), int(coeffs[0]))
        best = width if best is None or width[::-1] < best[::-1] else best
    return best


_MAX_BOUNDS = 16  # candidate bounds of one expression (a choice per Min / Max argument)


def _bounds(e: sympy.Expr, upper: bool) -> list[sympy.Expr] | None:
    """Expressions without floor, ceiling, Mod, Min or Max that bound e from above (upper) or
    below, for integer symbols: each of them is a bound (one per choice of a Min's argument for an
    upper bound, of a Max's for a lower); None where no such bound is derived."""
    if not e.has(sympy.floor, sympy.ceiling, sympy.Mod, sympy.Min, sympy.Max):
        return [e]
    if isinstance(e, sympy.Add):
        parts = [_bounds(t, upper) for t in e.args]
        if any(p is None for p in parts):
            return None
        return [sympy.Add(*c) for c in itertools.islice(itertools.product(*parts), _MAX_BOUNDS)]
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff == 1 or not coeff.is_Rational:
            return None  # a product of symbolic factors: no bound derived
        inner = _bounds(rest, upper if coeff > 0 else not upper)
        return None if inner is None else [coeff * b for b in inner]
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        x = e.args[0]
        inner = _bounds(x, upper)
        if inner is None:
            return None
        if isinstance(e, sympy.floor) == upper:  # floor(x) <= x, ceiling(x) >= x
            return inner
        gap = 1 - sympy.Rational(1, _denominator(x)) if _denominator(x) else 1  # q x an integer: within 1 - 1/q
        return [b - gap if upper is False else b + gap for b in inner]
    if isinstance(e, sympy.Mod):
        q = e.args[1]
        if not (q.is_Integer and q > 0):
            return None
        return [q - 1] if upper else [sympy.Integer(0)]
    if isinstance(e, (sympy.Min, sympy.Max)):
        if isinstance(e, sympy.Min) != upper:
            return None  # a lower bound of a Min (an upper of a Max) needs every argument's: not linear
        out = []
        for arg in e.args:  # each argument bounds a Min from above (a Max from below)
            out.extend(_bounds(arg, upper) or [])
        return out[:_MAX_BOUNDS] or None
    return None


def _denominator(x: sympy.Expr) -> int | None:
    """q such that q x is an integer for integer symbols (x a sum of rational multiples of symbols
    and a rational), else None."""
    x = sympy.expand(x)
    terms = x.args if isinstance(x, sympy.Add) else (x,)
    q = 1
    for t in terms:
        coeff, rest = t.as_coeff_Mul()
        if not coeff.is_Rational or not (rest == 1 or (rest.is_Symbol and rest.is_integer)):
            return None
        q = sympy.ilcm(q, coeff.q)
    return q


def _static_part(plan: MaskPlan, Nq: int, Nk: int, block_m: int, block_n: int) -> tuple[MaskPlan, torch.Tensor | None]:
    """Document and layout plans at compile time: the plan of their element mask alone (one
    document), and with static layout terms the mask's tile classes inside that layout (else None)."""
    if not (plan.document or plan.sparsity):
        return plan, None
    layout = _static_layout_tiles(plan.sparsity, Nq, Nk, block_m, block_n)
    plan = element_plan(plan)
    return plan, None if layout is None else torch.where(layout, _classes(plan, Nq, Nk, block_m, block_n), 0)


def forward_tiles(plan: MaskPlan, Nq: int, Nk: int, block_m: int, block_n: int) -> torch.Tensor:
    """int8 [n_m, n_n] for a forward plan (queries outer): what its kernel does with each tile,
    0 skip, 1 mask, 2 run unmasked (`attngen show --emit tiles`; tiles_per_block counts the same)."""
    plan, tiles = _static_part(plan, Nq, Nk, block_m, block_n)
    if tiles is None and plan.kind is PlanKind.RANGE:
        n_m, n_n = -(-Nq // block_m), -(-Nk // block_n)
        first = torch.arange(n_m, dtype=torch.int64) * block_m
        start, f_lo, f_hi, end = block_key_range(plan, first, torch.clamp(first + block_m, max=Nq) - 1, Nq, Nk, block_n)
        n0 = torch.arange(n_n, dtype=torch.int64)[None, :] * block_n
        walked = (n0 >= start[:, None]) & (n0 < end[:, None])
        full = (n0 >= f_lo[:, None]) & (n0 < f_hi[:, None])
        return (walked.to(torch.int8) + full.to(torch.int8)).clamp(max=2)
    tiles = _classes(plan, Nq, Nk, block_m, block_n) if tiles is None else tiles
    if Nk % block_n:  # the last key tile always checks bounds
        tiles = tiles.clone()
        tiles[:, -1] = tiles[:, -1].clamp(max=1)
    return tiles


def _classes(plan: MaskPlan, Nq: int, Nk: int, block_m: int, block_n: int) -> torch.Tensor:
    if plan.kind is PlanKind.DENSE:
        return torch.full((-(-Nq // block_m), -(-Nk // block_n)), 2, dtype=torch.int8)
    return dense_tile_classes(plan.cond, Nq, Nk, block_m, block_n)


def _counted(classes: torch.Tensor, transposed: bool, outer: int, inner: int, inner_block: int):
    """(visited, partial) per outer block from tile classes [n_m, n_n]."""
    if transposed:
        classes = classes.T
    full = classes == 2
    if inner % inner_block:  # the last inner tile always needs the bounds check
        full[:, -1] = False
    visited = (classes > 0).sum(dim=1)
    return visited, visited - full.sum(dim=1)


def _static_layout_tiles(sparsity: Sparsity | None, Nq: int, Nk: int, block_m: int, block_n: int):
    """bool [n_m, n_n]: the static layout terms at the kernel's tiles (one head's random blocks),
    or None without static terms (a layout per call: the cost model counts every tile)."""
    if sparsity is None or not sparsity.is_static:
        return None
    bq, bk = sparsity.block
    layout = static_layout(sparsity.to_dict(), -(-Nq // bq), -(-Nk // bk), 1, "cpu")
    return layout_tiles(layout, -(-Nq // block_m), -(-Nk // block_n), block_m, block_n, bq, bk)[0, 0]


@functools.lru_cache(maxsize=256)
def tile_counts(plan: MaskPlan, Nq: int, Nk: int, block_m: int, block_n: int) -> TileCounts:
    """How many tiles the generated kernel visits and masks at one shape (for the cost model)."""
    visited, partial = tiles_per_block(plan, Nq, Nk, block_m, block_n)
    return TileCounts(-(-Nq // block_m) * -(-Nk // block_n), int(visited.sum()), int(partial.sum()))


def longest_first(plan: MaskPlan, Nq: int, Nk: int, block_m: int, block_n: int) -> bool:
    """Whether the later outer blocks have more work than the earlier ones (causal, prefix-LM), so
    that launching them in reverse order puts the longest programs first and shortens the tail."""
    visited, _ = tiles_per_block(plan, Nq, Nk, block_m, block_n)
    half = len(visited) // 2
    return half > 0 and visited[-half:].sum().item() > visited[:half].sum().item()
