"""The float64 reference, built directly from the spec and never from the lowering.

The dense mask comes from the spec's fields (causal, window, prefix) written out here by hand, and
from the expression evaluated on its Python syntax tree with torch (mask_expr.evaluate_mask_expr),
not from the sympy condition the compiler lowers. So a lowering bug cannot cancel out. The block
sparsity (`sparsity_mask`) is written out here per element too, not taken from the runtime's layouts.
"""

from __future__ import annotations

import math

import torch

from .mask_expr import evaluate_mask_expr
from .spec import Spec


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes: 2^(-8i/n) for a power of two n, interleaved otherwise."""
    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    p = 2 ** int(math.floor(math.log2(heads)))
    extra = powers(2 * p)[0::2][: heads - p]
    return torch.tensor(powers(p) + extra, dtype=torch.float64)


def dense_mask(spec: Spec, Nq: int, Nk: int, device="cpu", rows=None) -> torch.Tensor:
    """bool [Nq, Nk]: may query i see key j? With `rows` (query positions), only those rows: [len(rows), Nk]."""
    m = spec.mask
    i = (torch.arange(Nq, device=device) if rows is None else rows.to(device))[:, None]
    j = torch.arange(Nk, device=device)[None, :]
    vis = torch.ones(i.shape[0], Nk, dtype=torch.bool, device=device)

    def off(align: str) -> int:
        return Nk - Nq if align == "bottom_right" else 0

    if m.causal is not None or m.prefix is not None:
        causal = j <= i + off(m.causal.align if m.causal else "bottom_right")
        vis &= causal | (j < m.prefix) if m.prefix is not None else causal
    if m.window is not None:
        o = off(m.window.align)
        if m.window.left is not None:
            vis &= j >= i + o - m.window.left
        if m.window.right is not None:
            vis &= j <= i + o + m.window.right
    if m.expr is not None:
        vis &= evaluate_mask_expr(m.expr, dict(m.constants), i, j, Nq, Nk).to(device)
    return vis


def sparsity_mask(spec: Spec, Nq: int, Nk: int, heads: int, layout=None, device="cpu") -> torch.Tensor:
    """bool [1 or B, 1 or H, Nq, Nk]: does the spec's `sparsity` section let query i see key j?
    The union of its terms, each decided per element from its blocks q_idx // bq and kv_idx // bk;
    `layout` bool [B or 1, H or 1, ceil(Nq / bq), ceil(Nk / bk)] is the call-time one (`layout:
    runtime`). All True without a sparsity section."""
    if spec.sparsity is None and layout is None:
        return torch.ones(1, 1, Nq, Nk, dtype=torch.bool, device=device)
    runtime = None
    if layout is not None or spec.sparsity.runtime:
        runtime = _runtime_sparsity(spec, Nq, Nk, layout, device)
    vis = _static_sparsity(spec, Nq, Nk, heads, device)
    return vis if runtime is None else vis | runtime


def _static_sparsity(spec: Spec, Nq: int, Nk: int, heads: int, device, rows=None) -> torch.Tensor:
    """bool [1, H', Nq, Nk] (H' = heads with a random term, else 1): the union of the local, global,
    stride and random terms; all False when there are none. With `rows` (query positions), only
    those rows of the Nq x Nk problem: [1, H', len(rows), Nk]."""
    sp = spec.sparsity
    bq, bk = sp.block
    qb = (torch.arange(Nq, device=device) if rows is None else rows.to(device))[:, None] // bq
    kb = torch.arange(Nk, device=device)[None, :] // bk
    vis = torch.zeros(qb.shape[0], Nk, dtype=torch.bool, device=device)
    if sp.has_local:
        # the key block is at most `left` blocks before the query block's diagonal, `right` after
        after = kb - qb
        lo = after >= -sp.local_left if sp.local_left is not None else torch.ones_like(vis)
        hi = after <= sp.local_right if sp.local_right is not None else torch.ones_like(vis)
        vis |= lo & hi
    if sp.global_blocks:
        vis |= (kb < sp.global_blocks) | (qb < sp.global_blocks)
    if sp.stride is not None:
        vis |= (kb + 1) % sp.stride == 0
    vis = vis[None, None]
    if sp.random_blocks:
        # The documented contract: per head and query block, the `blocks` key blocks of the
        # smallest CPU-drawn scores, ties to the lower index. Here by rank: key block kb is picked
        # when fewer than `blocks` blocks come before it in the stable order.
        n_qb, n_kb = -(-Nq // bq), -(-Nk // bk)
        g = torch.Generator(device="cpu").manual_seed(sp.random_seed)
        scores = torch.rand(heads, n_qb, n_kb, generator=g)
        order = torch.sort(scores, dim=-1, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_kb).expand_as(order).contiguous())
        picked = (rank < sp.random_blocks).to(device)  # [heads, n_qb, n_kb]
        vis = vis | picked[:, qb, kb][None]
    return vis


def _runtime_sparsity(spec: Spec, Nq: int, Nk: int, layout, device, rows=None) -> torch.Tensor:
    """bool [B or 1, H or 1, Nq, Nk]: the call-time block layout, expanded to elements (with `rows`,
    only those query positions' rows)."""
    sp = spec.sparsity
    if sp is None or not sp.runtime:
        raise ValueError(f"spec {spec.name!r} has no `sparsity: {{layout: runtime}}`: layout= is not taken")
    if layout is None:
        raise ValueError(f"spec {spec.name!r} has a runtime sparsity layout: pass layout= "
                         "(bool [B or 1, H or 1, query blocks, key blocks])")
    bq, bk = sp.block
    blocks = (-(-Nq // bq), -(-Nk // bk))
    if layout.dtype != torch.bool or layout.dim() != 4 or tuple(layout.shape[2:]) != blocks:
        raise ValueError(f"layout must be bool [B or 1, H or 1, {blocks[0]}, {blocks[1]}]; "
                         f"got {layout.dtype} {list(layout.shape)}")
    if rows is None:
        layout = layout.to(device).repeat_interleave(bq, dim=2)[:, :, :Nq]
    else:
        layout = layout.to(device)[:, :, rows.to(device) // bq]
    return layout.repeat_interleave(bk, dim=3)[:, :, :, :Nk]


def documents_at_cuts(batch: int, n: int, cuts: int, generator: torch.Generator, low: int = 0) -> torch.Tensor:
    """Document ids int32 [batch, n] on the generator's device: per row, the positions cut at
    `cuts` random places in [low, n) into sorted runs (packed sequences of random lengths)."""
    device = generator.device
    at = torch.randint(low, max(n, low + 1), (batch, cuts), generator=generator, device=device)
    return (torch.arange(n, device=device)[None, :, None] >= at[:, None, :]).sum(dim=2).to(torch.int32)


def document_mask(q_ids: torch.Tensor, kv_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, Nq, Nk]: are query i and key j of batch b in the same document?"""
    return q_ids[:, :, None] == kv_ids[:, None, :]


def attention(spec: Spec, q, k, v, *, alibi_slopes_=None, scale=None, dtype=torch.float64, keep=None,
              documents=None, temperature=None, layout=None, heads=None, head_offset=0, rows=None):
    """O [B, Hq, Nq, Dv] and LSE [B, Hq, Nq] computed in `dtype` (float64 by default; the input
    dtype gives the eager same-precision baseline the tolerance is measured against).
    `keep` [B, Hq, Nq, Nk] applies the spec's dropout with that keep-mask; LSE ignores dropout.
    `documents` = (q_ids [B, Nq], kv_ids [B, Nk]): the document ids a `document` mask compares.
    `temperature` [Hq] (default ones) multiplies each head's scores, for a spec with score.temperature;
    or [1, Hq, Nq, Nk], one per score, whose gradient is then the summands of dtemperature.
    `layout` bool [B or 1, Hq or 1, query blocks, key blocks]: the call-time block layout of a spec
    with `sparsity: {layout: runtime}`. When q holds heads head_offset.. of a call with `heads`
    query heads (verify runs heads in chunks), the random sparsity term is drawn for all `heads`
    and those heads taken. `rows` (decoding): q's rows are these positions of the square Nk x Nk
    problem (its documents' q_ids and its layout's rows are those of q; no dropout then).
    Differentiable: gradients of the float64 result are the reference gradients."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if rows is not None and keep is not None:
        raise ValueError("reference.attention: rows= (decoding) takes no dropout")
    sq = Nq if rows is None else Nk  # the problem's query extent (square when decoding)
    q, k, v = (t.to(dtype) for t in (q, k, v))  # .to keeps autograd's graph to the inputs
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * (spec.scale if scale is None else scale)
    if spec.score.temperature and temperature is not None:
        tau = temperature.to(q.device, dtype)
        s = s * (tau if tau.dim() == 4 else tau[None, :, None, None])
    if spec.score.softcap is not None:
        s = spec.score.softcap * torch.tanh(s / spec.score.softcap)
    if spec.score.alibi:
        slopes = alibi_slopes(Hq) if alibi_slopes_ is None else alibi_slopes_
        i = (torch.arange(Nq, device=q.device) + Nk - Nq if rows is None else rows.to(q.device))[:, None]
        j = torch.arange(Nk, device=q.device)[None, :]
        dist = (i - j).abs().to(dtype)
        s = s - slopes.to(q.device, dtype)[None, :, None, None] * dist
    vis = dense_mask(spec, Nq, Nk, q.device) if rows is None else dense_mask(spec, Nk, Nk, q.device, rows)
    if spec.mask.document:
        if documents is None:
            raise ValueError(f"spec {spec.name!r} has a document mask: pass documents=(q_ids, kv_ids)")
        vis = vis[None] & document_mask(*(d.to(q.device) for d in documents))
        vis = vis[:, None]  # [B, 1, Nq, Nk]
    if spec.sparsity is not None or layout is not None:
        # sparsity_mask's two parts: the layout is sliced like q by the caller, the random term here
        runtime = None
        if layout is not None or spec.sparsity.runtime:
            runtime = _runtime_sparsity(spec, sq, Nk, layout, q.device, rows)
        block = _static_sparsity(spec, sq, Nk, heads or Hq, q.device, rows)
        if block.shape[1] > 1:
            block = block[:, head_offset:head_offset + Hq]
        vis = vis & (block if runtime is None else block | runtime)  # [1 or B, 1 or Hq, Nq, Nk]
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s.float() if dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing visible: all zeros
    if keep is not None and spec.dropout:
        p = p * keep.to(p.dtype) / (1.0 - spec.dropout)
    o = p @ v
    return o, lse


def decode(spec: Spec, q, k_cache, v_cache, lengths, *, dtype=torch.float64, documents=None, layout=None,
           **kwargs):
    """Decoding, per sequence: O [B, Hq, Nq, Dv] and LSE [B, Hq, Nq] for queries at the last Nq
    positions of sequences of `lengths` (their keys the first lengths[b] rows of the contiguous
    caches [B, Hkv, S, *]): rows of the square L x L problem (the spec's mask and score at absolute
    positions, L = lengths[b]); a query before position 0, or of an empty sequence, gets zeros and
    LSE -inf. `documents` = (q_ids [B, Nq], kv_ids [B, >= L]); `layout` bool [B or 1, H or 1, ..]
    over the cache's positions, of which a sequence takes its top-left ceil(L / bq) x ceil(L / bk)
    blocks. kwargs go to attention (alibi_slopes_, temperature, scale)."""
    B, Hq, Nq, _ = q.shape
    o = torch.zeros(B, Hq, Nq, v_cache.shape[-1], dtype=dtype, device=q.device)
    lse = torch.full((B, Hq, Nq), float("-inf"), dtype=dtype, device=q.device)
    for b, L in enumerate(int(n) for n in lengths):
        first = max(0, Nq - L)  # the queries at positions >= 0
        if first == Nq:
            continue
        rows = torch.arange(L - Nq + first, L, device=q.device)
        own = {}
        if documents is not None:
            own["documents"] = (documents[0][b:b + 1, first:], documents[1][b:b + 1, :L])
        if layout is not None:
            bq, bk = spec.sparsity.block
            own["layout"] = (layout[b:b + 1] if layout.shape[0] > 1 else layout[:1])[:, :, :-(-L // bq), :-(-L // bk)]
        ob, lb = attention(spec, q[b:b + 1, :, first:], k_cache[b:b + 1, :, :L], v_cache[b:b + 1, :, :L],
                           dtype=dtype, rows=rows, **own, **kwargs)
        o[b, :, first:], lse[b, :, first:] = ob[0], lb[0]
    return o, lse
