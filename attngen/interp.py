"""An interpreter of the tile IR: runs any kernel's ops on torch tensors (float64), tile by tile,
the way the kernel's loop walks them, so that the IR can be checked against the reference by
itself (tests/test_interp.py), apart from codegen and Triton.

    o, lse = forward(fwd_kernel, q, k, v, block=(16, 16))
    dq, dk, dv, dparams = backward(dkdv_kernel, dq_kernel, q, k, v, o, lse, do, block=(16, 16))

Each op kind has one evaluator: the score modifiers' come from attngen/ops.py (with their
derivative rules), the family's structural ops (loads, online softmax, the products) are below. The
loop visits the tiles the kernel's mask plan gives (closed-form bounds: only those, with mask code
only on partial ones, as the kernel runs), so a wrong plan shows as a wrong result.
"""

from __future__ import annotations

import torch

from .ir import Kernel, OpKind, Region
from .mask_analysis import PlanKind, block_key_range
from .mask_expr import KV_IDX, NK, NQ, Q_IDX
from .ops import SCORE_MODS, Env
from .runtime.layouts import static_layout
from .runtime.roles import ROLES
from .symbolic import evaluate


def _segments(kernel: Kernel, outer: tuple[int, int], Nq: int, Nk: int, block: int):
    """(inner start, masked) for each tile the kernel's loop visits for outer rows [first, last)."""
    plan, role = kernel.attr("mask_plan"), ROLES[kernel.attr("role")]
    n = Nq if role.transposed else Nk
    if plan is None or plan.kind is PlanKind.TILES:
        return [(i, True) for i in range(0, n, block)]
    first, last = (torch.tensor([v]) for v in (outer[0], outer[1] - 1))
    start, full_start, full_end, end = (int(x) for x in block_key_range(plan, first, last, Nq, Nk, block))
    loop = kernel.attr("loop")
    split = loop is not None and loop.segments == ("masked", "full", "masked")
    return ([(i, True) for i in range(start, full_start, block)]
            + [(i, not split) for i in range(full_start, full_end, block)]
            + [(i, True) for i in range(full_end, end, block)])


class _Tile:
    """The values of one (outer block, inner tile) pair: positions, the mask inputs, the params."""

    def __init__(self, q_idx, kv_idx, Nq, Nk, params, documents, layout, masked):
        self.env = Env(q_idx, kv_idx, Nq, Nk, params)
        self.documents, self.layout, self.masked = documents, layout, masked

    def visible(self, cond, doc, sparsity=None) -> torch.Tensor:
        e = self.env
        vis = (e.q_idx < e.Nq) & (e.kv_idx < e.Nk)
        if cond is not None:
            vis = vis & evaluate(cond, {Q_IDX: e.q_idx, KV_IDX: e.kv_idx, NQ: e.Nq, NK: e.Nk})
        if doc:
            q_ids, kv_ids = self.documents
            vis = vis[None, None] & (q_ids[:, e.q_idx[:, 0]][:, :, None] == kv_ids[:, e.kv_idx[0]][:, None, :])[:, None]
        if sparsity is not None:  # the block layout [B', H', n_qb, n_kb], read at each pair's blocks
            bq, bk = sparsity.block
            vis = vis & self.layout[:, :, e.q_idx[:, 0] // bq][:, :, :, e.kv_idx[0] // bk]
        return vis


def _score_chain(kernel: Kernel, values: dict, tile: _Tile) -> None:
    """Evaluates qk and the score modifiers of `kernel` into `values` (name -> tensor)."""
    for op in kernel.ops:
        if op.region is not Region.KV_LOOP and op.kind is not OpKind.QK:
            continue
        if op.kind is OpKind.QK:
            values[op.name] = values["q"] @ values["k"].transpose(-1, -2)
        elif op.kind is OpKind.MASK:
            s = values[op.inputs[0]]
            vis = tile.visible(op.attr("cond"), op.attr("document") is not None, op.attr("layout")) if tile.masked else True
            values[op.name] = torch.where(vis, s, float("-inf")) if tile.masked else s
            values["__visible"] = vis
        elif op.kind in SCORE_MODS:
            values[op.name] = SCORE_MODS[op.kind].evaluate(op, values[op.inputs[0]], tile.env)


def _params(params: dict, scale: float, Hq: int) -> dict:
    out = {name: v.double().reshape(1, Hq, 1, 1) for name, v in params.items()}
    return out | {"scale": scale}


def _expand(t: torch.Tensor, Hq: int) -> torch.Tensor:
    return t.double().repeat_interleave(Hq // t.shape[1], dim=1)


def block_layout(kernel: Kernel, Hq: int, Nq: int, Nk: int, layout=None):
    """The kernel's block layout: its spec's static terms (for Hq heads) or'ed with the call's
    `layout` (bool [B or 1, H or 1, n_qb, n_kb]); None without a sparsity section."""
    mask = kernel.op(OpKind.MASK)
    sparsity = mask.attr("layout") if mask else None
    if sparsity is None:
        return None
    bq, bk = sparsity.block
    static = static_layout(sparsity.to_dict(), -(-Nq // bq), -(-Nk // bk), Hq, "cpu")
    if sparsity.runtime:
        return layout if static is None else static | layout
    return static


def forward(kernel: Kernel, q, k, v, *, block=(16, 16), scale=None, params=None, documents=None, layout=None,
            keep=None, p_drop: float = 0.0):
    """o [B, Hq, Nq, Dv] and lse [B, Hq, Nq] (natural log) of the forward kernel's IR."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    layout = block_layout(kernel, Hq, Nq, Nk, layout)
    scale = next(o for o in kernel.ops if o.kind is OpKind.SCALE).attr("scale") if scale is None else scale
    prm = _params(params or {}, scale, Hq)
    k, v, q = _expand(k, Hq), _expand(v, Hq), q.double()
    bm, bn = block
    o = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, Hq, Nq), float("-inf"), dtype=torch.float64)
    for m0 in range(0, Nq, bm):
        m1 = min(m0 + bm, Nq)
        m_i = torch.full((B, Hq, m1 - m0), float("-inf"), dtype=torch.float64)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros(B, Hq, m1 - m0, v.shape[-1], dtype=torch.float64)
        for n0, masked in _segments(kernel, (m0, m1), Nq, Nk, bn):
            n1 = min(n0 + bn, Nk)
            tile = _Tile(torch.arange(m0, m1)[:, None], torch.arange(n0, n1)[None, :], Nq, Nk, prm, documents, layout,
                         masked)
            values = {"q": q[:, :, m0:m1], "k": k[:, :, n0:n1], "v": v[:, :, n0:n1]}
            _score_chain(kernel, values, tile)
            for op in kernel.ops:
                if op.kind is OpKind.ONLINE_SOFTMAX:
                    s = values[op.inputs[0]]
                    m_new = torch.maximum(m_i, s.amax(-1))
                    m_use = torch.where(torch.isneginf(m_new), 0.0, m_new)
                    p = torch.exp(s - m_use[..., None])
                    alpha = torch.exp(m_i - m_use)
                    l_i = l_i * alpha + p.sum(-1)
                    values[op.name], m_i = p, m_new
                elif op.kind is OpKind.DROPOUT:
                    values[op.name] = values[op.inputs[0]] * keep[:, :, m0:m1, n0:n1] / (1 - p_drop)
                elif op.kind is OpKind.PV:
                    acc = acc * alpha[..., None] + values[op.inputs[0]] @ values["v"]
        for op in kernel.ops:
            if op.kind is OpKind.NORMALIZE:
                o[:, :, m0:m1] = acc / torch.where(l_i == 0, 1.0, l_i)[..., None]
            elif op.kind is OpKind.STORE_LSE:
                lse[:, :, m0:m1] = torch.where(l_i == 0, float("-inf"), m_i + torch.log(torch.where(l_i == 0, 1.0, l_i)))
    return o, lse


def _vjps(kernel: Kernel, values: dict, tile: _Tile, grads: dict) -> None:
    """The backward IR's vjp ops: the chain rule through the score modifiers; parameter gradients
    summed over the tile where the op accumulates them."""
    by_input = {(o.kind.value, o.inputs[0]): o for o in kernel.ops if o.inputs}
    for op in kernel.ops:
        if op.kind is not OpKind.VJP:
            continue
        g, s_in = values[op.inputs[0]], values[op.inputs[1]]
        if op.attr("of") == OpKind.MASK.value:  # masked scores have P = 0: nothing flows through them
            values[op.name] = torch.where(values.get("__visible", True), g, 0.0)
            continue
        fwd_op = by_input[(op.attr("of"), op.inputs[1])]
        values[op.name], pgrads = SCORE_MODS[fwd_op.kind].vjp_evaluate(fwd_op, g, s_in, tile.env)
        if op.attr("accumulates"):
            for name, contribution in pgrads.items():
                grads[name] = grads.get(name, 0) + contribution.sum(dim=(0, 2, 3))


def backward(dkdv: Kernel, dq_kernel: Kernel, q, k, v, o, lse, do, *, block=(16, 16), scale=None, params=None,
             documents=None, layout=None, keep=None, p_drop: float = 0.0):
    """dq, dk, dv and {param: gradient [Hq]} from the two backward kernels' IR."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    layout = block_layout(dq_kernel, Hq, Nq, Nk, layout)
    scale = next(op for op in dq_kernel.ops if op.kind is OpKind.SCALE).attr("scale") if scale is None else scale
    prm = _params(params or {}, scale, Hq)
    ke, ve, q, do, o, lse = _expand(k, Hq), _expand(v, Hq), q.double(), do.double(), o.double(), lse.double()
    D = (do * o).sum(-1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(ke), torch.zeros_like(ve)
    pgrads: dict = {}
    bm, bn = block

    def tile_products(kernel, m0, m1, n0, n1, masked, grads):
        tile = _Tile(torch.arange(m0, m1)[:, None], torch.arange(n0, n1)[None, :], Nq, Nk, prm, documents, layout, masked)
        values = {"q": q[:, :, m0:m1], "k": ke[:, :, n0:n1], "v": ve[:, :, n0:n1], "do": do[:, :, m0:m1]}
        _score_chain(kernel, values, tile)
        out = {}
        for op in kernel.ops:
            if op.kind is OpKind.RECOMPUTE_P:
                values[op.name] = torch.exp(values[op.inputs[0]] - lse[:, :, m0:m1, None]).nan_to_num(0.0)
            elif op.kind is OpKind.DROPOUT:
                values[op.name] = values[op.inputs[0]] * keep[:, :, m0:m1, n0:n1] / (1 - p_drop)
            elif op.kind is OpKind.DV:
                out["dv"] = values[op.inputs[0]].transpose(-1, -2) @ values["do"]
            elif op.kind is OpKind.DP:
                dp = values["do"] @ values["v"].transpose(-1, -2)
                values[op.name] = dp * keep[:, :, m0:m1, n0:n1] / (1 - p_drop) if keep is not None else dp
            elif op.kind is OpKind.DS:
                values[op.name] = values["p"] * (values["dp"] - D[:, :, m0:m1, None])
        _vjps(kernel, values, tile, grads)
        for op in kernel.ops:
            if op.kind is OpKind.DK:
                out["dk"] = values[op.inputs[0]].transpose(-1, -2) @ values["q"]
            elif op.kind is OpKind.DQ:
                out["dq"] = values[op.inputs[0]] @ values["k"]
        return out

    for n0 in range(0, Nk, bn):  # the dK/dV kernel: a key block walks query tiles
        n1 = min(n0 + bn, Nk)
        for m0, masked in _segments(dkdv, (n0, n1), Nq, Nk, bm):
            m1 = min(m0 + bm, Nq)
            out = tile_products(dkdv, m0, m1, n0, n1, masked, {})
            dk[:, :, n0:n1] += out["dk"]
            dv[:, :, n0:n1] += out["dv"]
    for m0 in range(0, Nq, bm):  # the dQ kernel: a query block walks key tiles
        m1 = min(m0 + bm, Nq)
        for n0, masked in _segments(dq_kernel, (m0, m1), Nq, Nk, bn):
            n1 = min(n0 + bn, Nk)
            dq[:, :, m0:m1] += tile_products(dq_kernel, m0, m1, n0, n1, masked, pgrads)["dq"]
    fold = lambda t: t.view(B, Hkv, Hq // Hkv, *t.shape[2:]).sum(2)  # noqa: E731  (GQA: sum each group)
    return dq, fold(dk), fold(dv), pgrads
