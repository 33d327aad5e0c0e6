"""A spec's mask as one symbolic condition over q_idx, kv_idx, Nq and Nk.

Every part of `mask:` present is combined with `and`:

    causal (align)    kv_idx <= q_idx + off
    window (l, r)     q_idx + off - l <= kv_idx <= q_idx + off + r     (a missing side is unbounded)
    prefix P          kv_idx < P  or  causal                           (causal's align, bottom_right if none)
    expr              the parsed expression

with off = Nk - Nq for `bottom_right` and 0 for `top_left` (FlashAttention-2's convention).
The float64 reference builds its dense mask from the spec separately (reference.py), so a slip
here shows up as a mismatch instead of cancelling out.
"""

from __future__ import annotations

import sympy

from .mask_expr import KV_IDX, NK, NQ, Q_IDX, parse_mask_expr
from .spec import MaskSpec


def _offset(align: str) -> sympy.Expr:
    return NK - NQ if align == "bottom_right" else sympy.Integer(0)


def mask_condition(mask: MaskSpec, source: str = "<spec>") -> sympy.Basic | None:
    """The visibility condition of a key for a query, or None when every key is visible."""
    parts: list[sympy.Basic] = []
    if mask.prefix is not None or mask.causal is not None:
        align = mask.causal.align if mask.causal else "bottom_right"
        causal = KV_IDX <= Q_IDX + _offset(align)
        parts.append(sympy.Or(KV_IDX < mask.prefix, causal) if mask.prefix is not None else causal)
    if mask.window is not None:
        w, off = mask.window, _offset(mask.window.align)
        if w.left is not None:
            parts.append(KV_IDX >= Q_IDX + off - w.left)
        if w.right is not None:
            parts.append(KV_IDX <= Q_IDX + off + w.right)
    if mask.expr is not None:
        parts.append(parse_mask_expr(mask.expr, dict(mask.constants), source=source))
    if not parts:
        return None
    cond = sympy.And(*parts)
    return None if cond is sympy.true else cond
