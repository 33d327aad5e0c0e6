"""Property tests of the mask analysis (attngen/mask_analysis.py) against dense masks built
independently of sympy:

* expression masks are evaluated from their TEXT with `evaluate_mask_expr` (torch, straight from
  the Python AST), never through the sympy tree the analysis works on;
* MaskSpec masks (causal / window / prefix) are built by hand below from the spec semantics.

Claims: `classify_tile` is sound (EMPTY / FULL never wrong) and exact for single-align
causal / window / prefix masks; RANGE plans' `block_key_range` covers every visible key and
never leaves mask code out where a key is hidden; `dense_tile_classes` and `tile_counts` agree
with a tile-by-tile classification done here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attngen.mask import mask_condition
from attngen.mask_analysis import (PlanKind, TileClass, analyze, block_key_range, classify_tile, decode_key_width,
                                   dense_tile_classes, tile_counts)
from attngen.mask_expr import KV_IDX, NK, NQ, Q_IDX, evaluate_mask_expr, parse_mask_expr
from attngen.spec import Causal, MaskSpec, Window
from attngen.symbolic import evaluate

pytestmark = pytest.mark.compiler

ALIGNS = ("top_left", "bottom_right")
CLASS_CODE = {TileClass.EMPTY: 0, TileClass.PARTIAL: 1, TileClass.FULL: 2}
SLOW = [HealthCheck.too_slow, HealthCheck.filter_too_much]

sizes = st.integers(1, 160)
blocks = st.sampled_from([16, 32, 64])

# Transposed plans (the backward's dK/dV kernel walks queries for a block of keys) are tested with
# the same claims.
orientations = st.sampled_from([False, True])


def plan_for(cond, transposed: bool = False):
    return analyze(cond, transposed=transposed)


def is_transposed(plan) -> bool:
    return plan.transposed


# ------------------------------------------------------------------ dense oracles

def grid(Nq: int, Nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(Nq, dtype=torch.int64)[:, None], torch.arange(Nk, dtype=torch.int64)[None, :]


def expr_visible(text: str, constants: dict, Nq: int, Nk: int) -> torch.Tensor:
    """[Nq, Nk] bool: the mask evaluated from its text (not from sympy)."""
    q, k = grid(Nq, Nk)
    return evaluate_mask_expr(text, constants, q, k, Nq, Nk)


def spec_visible(mask: MaskSpec, Nq: int, Nk: int) -> torch.Tensor:
    """[Nq, Nk] bool: the mask built by hand from the spec semantics (independent of mask.py)."""
    q, k = grid(Nq, Nk)
    offset = lambda align: Nk - Nq if align == "bottom_right" else 0  # noqa: E731
    vis = torch.ones(Nq, Nk, dtype=torch.bool)
    if mask.causal is not None or mask.prefix is not None:
        off = offset(mask.causal.align if mask.causal is not None else "bottom_right")
        causal = k <= q + off
        vis &= (k < mask.prefix) | causal if mask.prefix is not None else causal
    if mask.window is not None:
        off = offset(mask.window.align)
        if mask.window.left is not None:
            vis &= k >= q + off - mask.window.left
        if mask.window.right is not None:
            vis &= k <= q + off + mask.window.right
    if mask.expr is not None:
        vis &= expr_visible(mask.expr, dict(mask.constants), Nq, Nk)
    return vis


def tiles(Nq: int, Nk: int, BM: int, BN: int):
    """(m, n, (q0, q1), (k0, k1)) for every tile, bounds inclusive and clipped to the matrix."""
    for m in range(-(-Nq // BM)):
        for n in range(-(-Nk // BN)):
            yield m, n, (m * BM, min((m + 1) * BM, Nq) - 1), (n * BN, min((n + 1) * BN, Nk) - 1)


def exact_class(tile: torch.Tensor) -> TileClass:
    return TileClass.FULL if bool(tile.all()) else TileClass.PARTIAL if bool(tile.any()) else TileClass.EMPTY


def own_classes(vis: torch.Tensor, BM: int, BN: int) -> torch.Tensor:
    """int8 [n_m, n_n] of 0 = EMPTY, 1 = PARTIAL, 2 = FULL over in-bounds pairs, tile by tile."""
    Nq, Nk = vis.shape
    out = torch.zeros(-(-Nq // BM), -(-Nk // BN), dtype=torch.int8)
    for m, n, (q0, q1), (k0, k1) in tiles(Nq, Nk, BM, BN):
        out[m, n] = CLASS_CODE[exact_class(vis[q0:q1 + 1, k0:k1 + 1])]
    return out


# --------------------------------------------------------- expression strategies

literals = st.integers(0, 12) | st.sampled_from([16, 24, 32, 48, 64, 100, 128])
divisors = st.integers(1, 6) | st.sampled_from([8, 16, 32, 48, 64]) | st.integers(7, 80)
CMP = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
SIMPLE_INDEX_EXPRS = ["q_idx", "kv_idx", "(q_idx - kv_idx)", "(kv_idx - q_idx)", "(q_idx + kv_idx)",
                      "(kv_idx + 7)", "(q_idx - Nq)", "(kv_idx - Nk + Nq)", "(2 * kv_idx)"]


def int_exprs(names=("q_idx", "kv_idx", "Nq", "Nk"), products: bool = False, max_leaves: int = 5):
    """Integer expression text. `*` always has a literal operand unless `products` (a product of two
    non-constants, which the language accepts and sympy may turn into a Pow)."""
    index = [n for n in names if n.endswith("idx")]
    leaves = (st.sampled_from(index) | st.sampled_from(index)  # weighted towards the indices
              | st.sampled_from([n for n in names if n not in index]) | literals.map(str))

    def extend(inner):
        s = (st.tuples(inner, st.sampled_from(["+", "-"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
             | st.tuples(inner, literals).map(lambda t: f"({t[0]} * {t[1]})")
             | st.tuples(literals, inner).map(lambda t: f"({t[0]} * {t[1]})")
             | st.tuples(inner, st.sampled_from(["//", "%"]), divisors).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
             | inner.map(lambda a: f"(-{a})")
             | inner.map(lambda a: f"abs({a})")
             | st.tuples(st.sampled_from(["min", "max"]), st.lists(inner, min_size=2, max_size=3))
             .map(lambda t: f"{t[0]}({', '.join(t[1])})"))
        if products:
            s |= st.tuples(inner, inner).map(lambda t: f"({t[0]} * {t[1]})")
        return s

    return st.recursive(leaves, extend, max_leaves=max_leaves)


def combine(atoms, max_leaves: int = 4):
    def extend(inner):
        return (st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
                | inner.map(lambda a: f"(not {a})"))

    return st.recursive(atoms, extend, max_leaves=max_leaves)


def bool_exprs(products: bool = False):
    ints = int_exprs(products=products)
    simple = st.sampled_from(SIMPLE_INDEX_EXPRS)
    comparisons = (st.tuples(ints, CMP, ints).map(" ".join)
                   | st.tuples(ints, CMP, ints, CMP, ints).map(" ".join)
                   # both indices present, so that most masks are neither all True nor all False
                   | st.tuples(ints, CMP, ints).map(lambda t: f"q_idx + {t[0]} {t[1]} kv_idx + {t[2]}")
                   # thresholds on // and % of index differences, where tile bounds are tight
                   | divisors.flatmap(lambda d: st.tuples(
                       simple, st.sampled_from(["//", "%"]), st.just(d), CMP,
                       st.integers(-2, 2) | st.integers(d - 3, d + 1) | st.integers(-3, 70)))
                   .map(lambda t: f"{t[0]} {t[1]} {t[2]} {t[3]} {t[4]}"))
    return combine(comparisons | st.sampled_from(["True", "False"]))


def range_friendly_exprs():
    """Masks built from relations linear in kv_idx against expressions of the row, so that many
    give RANGE plans (and the rest TILES)."""
    qe = int_exprs(names=("q_idx", "Nq", "Nk"), max_leaves=4)
    kv_side = st.sampled_from(["kv_idx", "2 * kv_idx", "kv_idx * 3", "-kv_idx", "kv_idx + 5", "kv_idx - Nk"])
    atoms = (st.tuples(kv_side, CMP, qe).map(" ".join)
             | st.tuples(qe, CMP, kv_side).map(" ".join)
             | st.tuples(qe, st.sampled_from(["<", "<="]), literals).map(lambda t: f"abs(kv_idx - {t[0]}) {t[1]} {t[2]}")
             | st.tuples(divisors, qe).map(lambda t: f"kv_idx // {t[0]} == {t[1]}")
             | divisors.map(lambda c: f"q_idx // {c} == kv_idx // {c}")
             | st.tuples(literals, st.sampled_from(["Nk - Nq", "0"])).map(lambda t: f"kv_idx < {t[0]} or kv_idx <= q_idx + {t[1]}"))
    return combine(atoms, max_leaves=3)


# ------------------------------------------------------------ MaskSpec strategies

aligns = st.sampled_from(ALIGNS)
amounts = st.integers(0, 40) | st.integers(0, 200)


@st.composite
def mask_specs(draw, with_expr: bool = True, one_align: bool = False):
    align = draw(aligns) if one_align else None
    pick = lambda: align if one_align else draw(aligns)  # noqa: E731
    causal = draw(st.booleans())
    window = draw(st.booleans())
    left = draw(st.none() | amounts) if window else None
    right = draw(st.none() | amounts) if window else None
    prefix = draw(st.none() | amounts)
    if one_align and prefix is not None and not causal:
        causal = align == "top_left"  # a prefix without causal uses bottom_right
    expr, constants = None, ()
    if with_expr and draw(st.booleans()):
        if draw(st.booleans()):
            expr, constants = "q_idx // C == kv_idx // C", (("C", draw(st.integers(1, 64))),)
        else:
            expr = draw(bool_exprs() | range_friendly_exprs())
    return MaskSpec(causal=Causal(pick()) if causal else None,
                    window=Window(left, right, pick()) if window else None,
                    prefix=prefix, expr=expr, constants=constants)


# ------------------------------------------------------------------ 1. soundness

def assert_sound(cond, vis: torch.Tensor, BM: int, BN: int, what: str) -> None:
    Nq, Nk = vis.shape
    for _, _, qs, ks in tiles(Nq, Nk, BM, BN):
        cls = classify_tile(cond, qs, ks, Nq, Nk)
        tile = vis[qs[0]:qs[1] + 1, ks[0]:ks[1] + 1]
        where = f"{what}; Nq={Nq} Nk={Nk} tile q={qs} kv={ks}"
        if cls is TileClass.EMPTY:
            assert not tile.any(), f"classified EMPTY but has visible pairs: {where}"
        elif cls is TileClass.FULL:
            assert tile.all(), f"classified FULL but has hidden pairs: {where}"
        else:
            assert cls is TileClass.PARTIAL


@settings(max_examples=200, deadline=None, suppress_health_check=SLOW)
@given(text=bool_exprs(products=True) | range_friendly_exprs(), Nq=sizes, Nk=sizes, BM=blocks, BN=blocks)
def test_classify_tile_sound_on_random_expressions(text, Nq, Nk, BM, BN):
    cond = parse_mask_expr(text, {})
    assert_sound(cond, expr_visible(text, {}, Nq, Nk), BM, BN, repr(text))


periods = st.sampled_from([8, 16, 24, 32, 48, 64, 96]) | st.integers(1, 100)


@st.composite
def periodic_thresholds(draw):
    """`x % d CMP k` / `x // d CMP k` with d often a multiple of the block sizes and k at the edges
    of the period: the interval rules for % and // are exercised where a tile lies in one period."""
    d = draw(periods)
    k = draw(st.integers(-2, 2) | st.integers(d - 3, d + 1) | st.integers(d // 2 - 1, d // 2 + 1))
    text = f"{draw(st.sampled_from(SIMPLE_INDEX_EXPRS))} {draw(st.sampled_from(['%', '//']))} {d} {draw(CMP)} {k}"
    if draw(st.booleans()):
        text = f"({text}) {draw(st.sampled_from(['and', 'or']))} kv_idx <= q_idx + {draw(literals)}"
    return text


@settings(max_examples=200, deadline=None, suppress_health_check=SLOW)
@given(text=periodic_thresholds(), Nq=sizes, Nk=sizes, BM=blocks, BN=blocks)
def test_classify_tile_sound_on_periodic_thresholds(text, Nq, Nk, BM, BN):
    assert_sound(parse_mask_expr(text, {}), expr_visible(text, {}, Nq, Nk), BM, BN, repr(text))


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW)
@given(mask=mask_specs(), Nq=sizes, Nk=sizes, BM=blocks, BN=blocks)
def test_classify_tile_sound_on_random_specs(mask, Nq, Nk, BM, BN):
    cond, vis = mask_condition(mask), spec_visible(mask, Nq, Nk)
    assert cond is not None or vis.all(), f"{mask}: no condition, but hidden pairs"
    assert_sound(cond, vis, BM, BN, repr(mask))


# ------------------------------------------------------------------ 2. exactness

# Exactness holds when every part of the mask uses one align. Then every relation is a bound on
# d = kv_idx - q_idx against the same offset (plus `kv_idx < P` for a prefix), the intervals of d
# that the parts allow all contain that offset, and a tile realizes every d between its extremes:
# so a tile where no conjunct is false everywhere has a visible pair, and a union (prefix) that
# holds everywhere on a tile has one branch that does.
#
# With mixed aligns the per-conjunct interval test is inherently inexact: conjuncts can each be
# satisfiable on a tile but not jointly. E.g. causal top_left (d <= 0) and window bottom_right with
# left=10 at Nq=16, Nk=66 (d >= 40): no pair is visible anywhere, yet the tile q=[0,15], kv=[0,63]
# is PARTIAL. That is sound (PARTIAL only costs mask code), so mixed aligns are tested for
# soundness only (above).

@settings(max_examples=150, deadline=None, suppress_health_check=SLOW)
@given(mask=mask_specs(with_expr=False, one_align=True), Nq=sizes, Nk=sizes, BM=blocks, BN=blocks)
def test_classify_tile_exact_on_single_align_specs(mask, Nq, Nk, BM, BN):
    cond = mask_condition(mask)
    vis = spec_visible(mask, Nq, Nk)
    for _, _, qs, ks in tiles(Nq, Nk, BM, BN):
        want = exact_class(vis[qs[0]:qs[1] + 1, ks[0]:ks[1] + 1])
        got = classify_tile(cond, qs, ks, Nq, Nk)
        assert got is want, f"{mask}; Nq={Nq} Nk={Nk} tile q={qs} kv={ks}: {got} != exact {want}"


def test_mixed_align_inexact_example_is_sound():
    mask = MaskSpec(causal=Causal("top_left"), window=Window(left=10, right=None, align="bottom_right"))
    cond, vis = mask_condition(mask), spec_visible(mask, 16, 66)
    assert not vis.any()
    assert classify_tile(cond, (0, 15), (0, 63), 16, 66) in (TileClass.EMPTY, TileClass.PARTIAL)
    assert_sound(cond, vis, 16, 64, repr(mask))


# ------------------------------------------------------------- 3. RANGE plans

def assert_rows_exact(plan, vis: torch.Tensor, what: str) -> None:
    """The plan's closed-form range [lo(i), hi(i)] is exactly the visible inner indices of every
    outer index i (in bounds): the loop bounds below are only right if it is."""
    Nq, Nk = vis.shape
    t = is_transposed(plan)
    outer_vis = vis.T if t else vis
    n_outer, n_inner = outer_vis.shape
    i = torch.arange(n_outer, dtype=torch.int64)
    env = {Q_IDX: i, KV_IDX: i, NQ: Nq, NK: Nk}  # the bounds depend on the outer index only
    j = torch.arange(n_inner, dtype=torch.int64)[None, :]
    pred = torch.ones(n_outer, n_inner, dtype=torch.bool)
    if plan.rows.lo is not None:
        pred &= j >= (i * 0 + evaluate(plan.rows.lo, env))[:, None]
    if plan.rows.hi is not None:
        pred &= j <= (i * 0 + evaluate(plan.rows.hi, env))[:, None]
    bad = (pred != outer_vis).any(dim=1).nonzero().flatten()
    assert not len(bad), f"{what}; {plan.describe()}; Nq={Nq} Nk={Nk}: range wrong at outer index {int(bad[0])}"


def assert_block_ranges(plan, vis: torch.Tensor, BM: int, BN: int, what: str) -> None:
    """For every outer block (queries, or keys when transposed): the segments are aligned and
    ordered, every visible pair has its inner index in [start, end), and every inner index in
    [full_start, full_end) is visible to every in-bounds outer index of the block."""
    Nq, Nk = vis.shape
    t = is_transposed(plan)
    outer_vis = vis.T if t else vis  # [outer, inner]
    outer_block, inner_block = (BN, BM) if t else (BM, BN)
    n_outer, n_inner = outer_vis.shape
    first = torch.arange(-(-n_outer // outer_block), dtype=torch.int64) * outer_block
    last = torch.clamp(first + outer_block, max=n_outer) - 1
    segs = block_key_range(plan, first, last, Nq, Nk, inner_block)
    for m in range(len(first)):
        start, full_start, full_end, end = (int(s[m]) for s in segs)
        o0, o1 = int(first[m]), int(last[m])
        where = f"{what}; {plan.describe()}; Nq={Nq} Nk={Nk} BM={BM} BN={BN} block [{o0}, {o1}]: " \
                f"start={start} full=[{full_start}, {full_end}) end={end}"
        assert start % inner_block == 0 and full_start % inner_block == 0 and full_end % inner_block == 0, where
        assert 0 <= start <= full_start <= full_end <= end <= n_inner, where
        rows = outer_vis[o0:o1 + 1]
        seen = rows.any(dim=0).nonzero().flatten()
        if len(seen):
            assert int(seen.min()) >= start and int(seen.max()) < end, f"visible pair outside the loop: {where}"
        assert rows[:, full_start:full_end].all(), f"hidden pair in the unmasked segment: {where}"


def assert_range_counts(plan, vis: torch.Tensor, BM: int, BN: int) -> None:
    """RANGE tile_counts: every non-empty tile is visited; the unmasked tiles are FULL."""
    Nq, Nk = vis.shape
    own = own_classes(vis, BM, BN)
    counts = tile_counts(plan, Nq, Nk, BM, BN)
    assert counts.total == own.numel()
    assert counts.visited >= int((own > 0).sum())
    assert 0 <= counts.partial <= counts.visited
    assert counts.visited - counts.partial <= int((own == 2).sum())


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW)
@given(mask=mask_specs(), Nq=sizes, Nk=sizes, BM=blocks, BN=blocks, transposed=orientations)
def test_block_key_range_on_random_specs(mask, Nq, Nk, BM, BN, transposed):
    cond = mask_condition(mask)
    plan = plan_for(cond, transposed)
    if cond is None:
        assert plan.kind is PlanKind.DENSE
        return
    # causal / window / prefix, in any combination, are one monotone key range per query; per key,
    # the queries of a prefix mask (all of them for kv_idx < P) are not, so only causal / window there.
    if mask.expr is None and not (transposed and mask.prefix is not None):
        assert plan.kind is PlanKind.RANGE, f"{mask}: {plan.describe()}"
    if plan.kind is PlanKind.RANGE:
        vis = spec_visible(mask, Nq, Nk)
        assert_rows_exact(plan, vis, repr(mask))
        assert_block_ranges(plan, vis, BM, BN, repr(mask))
        assert_range_counts(plan, vis, BM, BN)


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW)
@given(text=range_friendly_exprs(), Nq=sizes, Nk=sizes, BM=blocks, BN=blocks, transposed=orientations)
def test_block_key_range_on_random_expressions(text, Nq, Nk, BM, BN, transposed):
    plan = plan_for(parse_mask_expr(text, {}), transposed)
    assume(plan.kind is PlanKind.RANGE)
    vis = expr_visible(text, {}, Nq, Nk)
    assert_rows_exact(plan, vis, repr(text))
    assert_block_ranges(plan, vis, BM, BN, repr(text))
    assert_range_counts(plan, vis, BM, BN)


RANGE_MASKS = [
    MaskSpec(causal=Causal("top_left")),
    MaskSpec(causal=Causal("bottom_right")),
    MaskSpec(window=Window(left=7, right=0)),
    MaskSpec(window=Window(left=None, right=5, align="top_left")),
    MaskSpec(window=Window(left=3, right=9, align="top_left")),
    MaskSpec(causal=Causal("bottom_right"), window=Window(left=20, right=None)),
    MaskSpec(prefix=24),
    MaskSpec(prefix=0, causal=Causal("top_left")),
    MaskSpec(prefix=40, window=Window(left=16, right=None)),
    MaskSpec(causal=Causal("top_left"), expr="q_idx // C == kv_idx // C", constants=(("C", 32),)),
    MaskSpec(causal=Causal("bottom_right"), expr="q_idx // 48 == kv_idx // 48"),
    MaskSpec(expr="abs(q_idx - kv_idx) <= 10"),
    MaskSpec(expr="kv_idx < 16 or kv_idx <= q_idx + Nk - Nq"),
]
TILES_MASKS = [
    MaskSpec(expr="(q_idx - kv_idx) % 2 == 0"),
    MaskSpec(causal=Causal("top_left"), expr="(q_idx - kv_idx) % 2 == 0"),
    MaskSpec(expr="kv_idx != q_idx"),
    MaskSpec(expr="kv_idx <= Nq - q_idx"),  # not monotone in q_idx
]


@pytest.mark.parametrize("mask", RANGE_MASKS, ids=repr)
def test_known_masks_give_range_plans(mask):
    plan = analyze(mask_condition(mask))
    assert plan.kind is PlanKind.RANGE, plan.describe()
    assert not is_transposed(plan)
    for Nq, Nk in [(1, 1), (37, 37), (64, 130), (130, 64), (160, 160)]:
        vis = spec_visible(mask, Nq, Nk)
        for BM, BN in [(16, 16), (32, 64), (64, 32)]:
            assert_block_ranges(plan, vis, BM, BN, repr(mask))
            assert_range_counts(plan, vis, BM, BN)
        assert_rows_exact(plan, vis, repr(mask))


@pytest.mark.parametrize("mask", TILES_MASKS, ids=repr)
def test_known_masks_give_tiles_plans(mask):
    assert analyze(mask_condition(mask)).kind is PlanKind.TILES


@pytest.mark.parametrize("mask", [m for m in RANGE_MASKS if m.prefix is None and m.expr is None], ids=repr)
def test_known_masks_give_transposed_range_plans(mask):
    plan = analyze(mask_condition(mask), transposed=True)
    assert plan.kind is PlanKind.RANGE and is_transposed(plan), plan.describe()
    for Nq, Nk in [(1, 1), (37, 37), (64, 130), (130, 64), (160, 160)]:
        vis = spec_visible(mask, Nq, Nk)
        for BM, BN in [(16, 16), (32, 64), (64, 32)]:
            assert_block_ranges(plan, vis, BM, BN, repr(mask))
            assert_range_counts(plan, vis, BM, BN)
        assert_rows_exact(plan, vis, repr(mask))


def test_no_mask_is_dense():
    plan = analyze(mask_condition(MaskSpec()))
    assert plan.kind is PlanKind.DENSE
    c = tile_counts(plan, 100, 70, 32, 64)
    assert (c.total, c.visited, c.partial) == (4 * 2, 4 * 2, 4)  # Nk=70 is ragged: one masked tile per row


# ------------------------------------------------- 4. dense classes and counts

def assert_dense_classes_and_counts(cond, vis: torch.Tensor, BM: int, BN: int, what: str,
                                    transposed: bool = False) -> None:
    Nq, Nk = vis.shape
    own = own_classes(vis, BM, BN)
    got = dense_tile_classes(cond, Nq, Nk, BM, BN)
    assert got.dtype == torch.int8 and got.shape == own.shape
    assert torch.equal(got, own), f"{what}; Nq={Nq} Nk={Nk} BM={BM} BN={BN}:\n{got}\n!= own\n{own}"
    plan = plan_for(cond, transposed)
    if plan.kind is not PlanKind.TILES:
        return
    counts = tile_counts(plan, Nq, Nk, BM, BN)
    # [outer tiles, inner tiles]: the ragged last inner tile always runs the bounds check
    unmasked, ragged = ((own == 2).T, Nq % BM) if transposed else (own == 2, Nk % BN)
    if ragged:
        unmasked[:, -1] = False
    nonempty = int((own > 0).sum())
    assert counts.total == own.numel(), what
    assert counts.visited == nonempty, what
    assert counts.partial == nonempty - int(unmasked.sum()), what


@settings(max_examples=200, deadline=None, suppress_health_check=SLOW)
@given(text=bool_exprs() | range_friendly_exprs(), Nq=sizes, Nk=sizes, BM=blocks, BN=blocks,
       transposed=orientations)
def test_dense_tile_classes_and_counts_on_random_expressions(text, Nq, Nk, BM, BN, transposed):
    cond = parse_mask_expr(text, {})
    assert_dense_classes_and_counts(cond, expr_visible(text, {}, Nq, Nk), BM, BN, repr(text), transposed)


@settings(max_examples=100, deadline=None, suppress_health_check=SLOW)
@given(mask=mask_specs(), Nq=sizes, Nk=sizes, BM=blocks, BN=blocks, transposed=orientations)
def test_dense_tile_classes_and_counts_on_random_specs(mask, Nq, Nk, BM, BN, transposed):
    assert_dense_classes_and_counts(mask_condition(mask), spec_visible(mask, Nq, Nk), BM, BN, repr(mask),
                                    transposed)


@pytest.mark.parametrize("BM,BN", [(64, 128), (40, 24)])
def test_dense_tile_classes_over_several_bands_and_cell_sizes(BM, BN):
    """Long rows: the mask's cell grid is evaluated a band of rows at a time (three bands here);
    blocks that are not multiples of 16 use finer cells. Both must agree with tile-by-tile classes
    of the mask evaluated from its text."""
    text = "(q_idx - kv_idx) % 3 != 0 and kv_idx <= q_idx + 700"
    cond = parse_mask_expr(text, {})
    assert_dense_classes_and_counts(cond, expr_visible(text, {}, 2100, 5001), BM, BN, text)


@pytest.mark.parametrize("text", ["(q_idx - kv_idx) % 2 == 0", "kv_idx % 3 != 1 and kv_idx <= q_idx",
                                  "(q_idx // 16 + kv_idx // 16) % 2 == 0"])
def test_tiles_plan_counts_examples(text):
    cond = parse_mask_expr(text, {})
    assert analyze(cond).kind is PlanKind.TILES
    for Nq, Nk, BM, BN in [(1, 1, 16, 16), (100, 70, 32, 64), (160, 128, 64, 16), (33, 161, 16, 32)]:
        for transposed in [False, True]:
            assert_dense_classes_and_counts(cond, expr_visible(text, {}, Nq, Nk), BM, BN, repr(text), transposed)


# ------------------------------------------------ products of non-constants

# The mask language accepts `int * int` with both operands non-constant; parse_mask_expr lowers
# `x * x` to a sympy Pow. The interval rules, the evaluator and the renderer must handle both.

@pytest.mark.parametrize("text", ["q_idx * q_idx <= kv_idx", "(q_idx + 1) * (q_idx - kv_idx) <= kv_idx"])
def test_classify_tile_on_squares(text):
    cond = parse_mask_expr(text, {})
    assert_sound(cond, expr_visible(text, {}, 40, 40), 16, 16, text)


@pytest.mark.parametrize("text", ["q_idx * kv_idx <= 40", "q_idx * q_idx <= kv_idx"])
def test_dense_tile_classes_on_products(text):
    cond = parse_mask_expr(text, {})
    assert_dense_classes_and_counts(cond, expr_visible(text, {}, 40, 40), 16, 16, text)


def test_block_key_range_on_product_bound():
    text = "kv_idx < Nq * Nk"
    plan = analyze(parse_mask_expr(text, {}))
    assert plan.kind is PlanKind.RANGE
    assert_block_ranges(plan, expr_visible(text, {}, 5, 40), 16, 16, text)


# ------------------------------------------------------- the cost model's key envelope

ENVELOPE_MASKS = [
    "(q_idx - kv_idx) % 2 == 0 and kv_idx <= q_idx and kv_idx >= q_idx - 40",  # dilated window
    "kv_idx <= q_idx + Nk - Nq and (kv_idx % 3 == 0 or kv_idx >= q_idx - 7)",   # a causal envelope only
    "(kv_idx <= q_idx and kv_idx >= q_idx - 30) or kv_idx < 5",                 # an Or: [0, max(q, 4)]
    "abs(q_idx - kv_idx) <= 9 and (q_idx + kv_idx) % 4 != 1",                   # |.| window and a modulo
    "kv_idx // 16 == q_idx // 16 and kv_idx % 2 == 1",                          # chunks
    "(q_idx + kv_idx) % 3 == 0",                                                # no envelope
]


@settings(max_examples=40, deadline=None, suppress_health_check=SLOW)
@given(text=st.sampled_from(ENVELOPE_MASKS), Nq=sizes, Nk=sizes, gm=st.sampled_from([4, 8, 16]),
       gn=st.sampled_from([4, 8, 16]))
def test_cells_within_the_key_envelope_equal_the_dense_evaluation(text, Nq, Nk, gm, gn):
    """Evaluating the mask only inside the bounds its range-shaped conjuncts give (the cost model's
    shortcut, mask_analysis._key_envelope) changes no cell's classes."""
    from attngen.mask_analysis import _key_envelope
    from attngen.runtime.tiles import cell_visibility
    from attngen.symbolic import to_callable

    cond = parse_mask_expr(text, {})
    fn = to_callable(cond)
    visible = lambda q, k, nq, nk: fn({Q_IDX.name: q, KV_IDX.name: k, NQ.name: nq, NK.name: nk})  # noqa: E731
    envelope = _key_envelope(cond, Nq, Nk)
    assert (envelope is None) == (text == ENVELOPE_MASKS[-1])
    dense = cell_visibility(visible, Nq, Nk, gm, gn)
    cut = cell_visibility(visible, Nq, Nk, gm, gn, envelope=envelope)
    assert torch.equal(dense[0], cut[0]) and torch.equal(dense[1], cut[1])


# ------------------------------------------------------------ decode key width

def assert_decode_width(plan, vis_of, text: str, lengths=(1, 7, 64, 150)) -> None:
    """decode_key_width's (a, b): the last n rows of any square Nk x Nk problem see keys within a span
    of at most a + b n (checked on the dense mask at several lengths)."""
    width = decode_key_width(plan)
    if width is None:
        return
    a, b = width
    for Nk in lengths:
        vis = vis_of(Nk)
        for n in range(1, min(Nk, 5) + 1):
            cols = vis[Nk - n:].any(0).nonzero().flatten()
            if len(cols):
                assert int(cols[-1] - cols[0]) + 1 <= a + b * n, f"{text}: Nk={Nk} n={n} width={width}"


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW)
@given(mask=mask_specs())
def test_decode_key_width_bounds_random_specs(mask):
    assert_decode_width(plan_for(mask_condition(mask)), lambda Nk: spec_visible(mask, Nk, Nk), repr(mask))


@settings(max_examples=200, deadline=None, suppress_health_check=SLOW)
@given(text=range_friendly_exprs())
def test_decode_key_width_bounds_random_expressions(text):
    assert_decode_width(plan_for(parse_mask_expr(text, {})), lambda Nk: expr_visible(text, {}, Nk, Nk), text)


@pytest.mark.parametrize("mask, want", [
    (MaskSpec(window=Window(left=256, right=0, align="bottom_right")), (256, 1)),
    (MaskSpec(causal=Causal(align="top_left"), window=Window(left=10, right=None, align="top_left")), (10, 1)),
    (MaskSpec(causal=Causal(align="bottom_right")), None),  # grows with the length
    (MaskSpec(window=Window(left=None, right=5, align="bottom_right")), None),
])
def test_decode_key_width_of_known_masks(mask, want):
    assert decode_key_width(plan_for(mask_condition(mask))) == want


@pytest.mark.parametrize("text, want", [
    ("q_idx // 256 == kv_idx // 256 and kv_idx <= q_idx", (255, 1)),  # a chunk: its floors bounded
    ("q_idx // 100 == kv_idx // 100 and kv_idx <= q_idx", (99, 1)),
    ("q_idx // 64 == kv_idx // 64 and q_idx - kv_idx < 40 and kv_idx <= q_idx", (39, 1)),  # the tighter one
    ("q_idx // 100 == kv_idx // 100", (99, 1)),  # no causal: the keys end at Nk - 1
    ("kv_idx >= q_idx - Nk % 8 - 3 and kv_idx <= q_idx", (10, 1)),  # a Mod, with a negative sign
    ("kv_idx <= q_idx", None),
])
def test_decode_key_width_of_chunks(text, want):
    plan = plan_for(parse_mask_expr(text, {}))
    assert decode_key_width(plan) == want
    assert_decode_width(plan, lambda Nk: expr_visible(text, {}, Nk, Nk), text, lengths=(1, 7, 8, 9, 13, 15, 64, 300, 520))
