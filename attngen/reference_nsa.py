"""The float64 reference of DeepSeek's Native Sparse Attention (NSA, arXiv 2502.11089).

Written directly from the method's math with plain torch, never from attngen's kernels, lowering or
runtime, so that a bug there cannot cancel out. Readable dense masks over clarity: every branch is a
masked softmax over an [N, M] score matrix (M = N, or the number of compressed tokens), so memory is
O(B * H * N * N) and nothing is cubic in N. Differentiable through autograd in every input except
the block selection, which is discrete (computed on detached tensors, so no gradient flows there).

Shapes: q [B, Hq, N, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv], gates [B, Hq, N, 3] (cmp, slc, swa);
G = Hq / Hkv, query head h uses KV head h // G. Queries and keys share positions 0 .. N - 1.

The three branches, for query t:
- compressed: KV windows of `compress_block` (l) tokens taken every `compress_stride` (d) tokens,
  compressed token j covering [j*d, j*d + l), j = 0 .. floor((N - l) / d); visible iff j*d + l - 1 <= t;
- selected: the union of the `select_count` (n) blocks of `select_block` (l') tokens chosen per
  (batch, KV head, query) from the compressed branch's probabilities (see selection_scores,
  select_blocks), with token causality j <= t;
- window: the `window` (w) latest keys, t - w < j <= t.
o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa. A query with nothing visible in a branch gets 0
there (in values and gradients, never NaN).
"""

from __future__ import annotations

import math

import torch

__all__ = ["compress", "selection_scores", "select_blocks", "nsa_attention", "num_compressed"]


# ------------------------------------------------------------------ helpers

def num_compressed(n: int, block: int, stride: int) -> int:
    """The number of compressed tokens of a length-n sequence: floor((n - l) / d) + 1, 0 when n < l."""
    return 0 if n < block else (n - block) // stride + 1


def _masked_softmax(s: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim restricted to `visible` (bool, broadcastable to s); 0 elsewhere.
    A row with nothing visible is all zeros, and so is its gradient (no NaN anywhere: masked
    scores are -inf before the exp, whose backward multiplies by exp(-inf) = 0)."""
    s = s.masked_fill(~visible, float("-inf"))
    if s.shape[-1] == 0:
        return s
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an empty row: any finite shift
    e = torch.exp(s - m)
    z = e.sum(dim=-1, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))


def _attend(q, k, v, visible, scale):
    """(o, p): o = softmax(scale * q k^T | visible) v with p those probabilities.
    q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv], visible bool broadcastable to [B, H, N, M]."""
    p = _masked_softmax((q @ k.transpose(-1, -2)) * scale, visible)
    return p @ v, p


def _expand_heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, Hkv, ...] -> [B, Hq, ...]: query head h reads KV head h // G."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def _compressed_visible(n: int, n_cmp: int, block: int, stride: int, device) -> torch.Tensor:
    """bool [N, n_cmp]: query t sees compressed token j iff its window ends at or before t."""
    t = torch.arange(n, device=device)[:, None]
    j = torch.arange(n_cmp, device=device)[None, :]
    return j * stride + block - 1 <= t


def _check_heads(q, k):
    hq, hkv = q.shape[1], k.shape[1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"reference_nsa: query heads ({hq}) must be a multiple of KV heads ({hkv})")


# ------------------------------------------------------------------ the interface

def compress(x: torch.Tensor, block: int, stride: int, kind: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, N, E] -> [B, H, n_cmp, E'] with n_cmp = floor((N - block) / stride) + 1 (0 when N < block).
    Compressed token j is phi(x[:, :, j*stride : j*stride + block, :]):
    - kind "mean": the mean over the window's tokens (E' = E);
    - kind "linear": flatten(window) @ weight[h], weight [H, block * E, E'] (E' = E in NSA), the
      flatten row-major over (token, feature), i.e. window.reshape(block * E)."""
    if block < 1 or stride < 1:
        raise ValueError(f"compress: block ({block}) and stride ({stride}) must be positive")
    B, H, N, E = x.shape
    n_cmp = num_compressed(N, block, stride)
    if n_cmp == 0:  # empty, yet in the graph (a linear weight then gets a zero gradient, not None)
        windows = x[:, :, :0, None, :].expand(B, H, 0, block, E)
    else:  # [B, H, n_cmp, block, E]: window j is tokens j*stride .. j*stride + block - 1
        windows = torch.stack([x[:, :, j * stride: j * stride + block, :] for j in range(n_cmp)], dim=2)
    if kind == "mean":
        return windows.mean(dim=3)
    if kind == "linear":
        if weight is None:
            raise ValueError("compress: kind 'linear' needs its weight [H, block * E, E']")
        if weight.dim() != 3 or weight.shape[0] != H or weight.shape[1] != block * E:
            raise ValueError(f"compress: weight must be [{H}, {block * E}, E'], got {list(weight.shape)}")
        weight = weight.to(x.dtype)
        flat = windows.reshape(B, H, n_cmp, block * E)  # row-major over (token, feature)
        return torch.einsum("bhjf,hfe->bhje", flat, weight)
    raise ValueError(f"compress: kind must be 'mean' or 'linear', got {kind!r}")


def selection_scores(q: torch.Tensor, k_cmp: torch.Tensor, *, block: int, stride: int, select_block: int,
                     scale: float | None = None) -> torch.Tensor:
    """float64 [B, Hkv, N, ceil(N / select_block)], no gradient: the selection block scores.
    p_cmp [B, Hq, N, n_cmp] is the compressed branch's probabilities (softmax(scale * q k_cmp^T)
    over the compressed tokens query t sees, 0 elsewhere), P [B, Hkv, N, n_cmp] its sum over the G
    query heads of each KV head, and block beta (keys [beta*l', (beta+1)*l')) scores
        s[beta] = sum_j P[j] * |[j*d, j*d + l) intersect [beta*l', (beta+1)*l')| / d.
    Computed in float64 from the given q and k_cmp (whatever their dtype)."""
    _check_heads(q, k_cmp)
    B, Hq, N, D = q.shape
    Hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    n_blocks = math.ceil(N / select_block)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    with torch.no_grad():
        q64, k64 = q.detach().to(torch.float64), k_cmp.detach().to(torch.float64)
        visible = _compressed_visible(N, n_cmp, block, stride, q.device)
        p_cmp = _masked_softmax((q64 @ _expand_heads(k64, Hq).transpose(-1, -2)) * scale, visible)
        P = p_cmp.reshape(B, Hkv, Hq // Hkv, N, n_cmp).sum(dim=2)  # heads h*G .. h*G + G-1 -> KV head h
        scores = torch.zeros(B, Hkv, N, n_blocks, dtype=torch.float64, device=q.device)
        if n_cmp == 0:
            return scores
        # compressed token j overlaps blocks first[j] .. last[j]; add P[j] * overlap / d to each
        start = torch.arange(n_cmp, device=q.device) * stride
        first, last = start // select_block, (start + block - 1) // select_block
        for offset in range(int((last - first).max()) + 1):
            beta = first + offset
            lo = torch.maximum(start, beta * select_block)
            hi = torch.minimum(start + block, (beta + 1) * select_block)
            overlap = (hi - lo).clamp(min=0).to(torch.float64) / stride  # 0 past last[j]
            beta = beta.clamp(max=n_blocks - 1)  # (only where overlap is 0 already)
            scores.index_add_(-1, beta, P * overlap)
    return scores


def select_blocks(scores: torch.Tensor, *, select_block: int, count: int, init_blocks: int,
                  local_blocks: int) -> torch.Tensor:
    """int32 [B, Hkv, N, n], n = min(count, n_blocks): the blocks query t (row t of scores
    [B, Hkv, N, n_blocks]) attends to, ascending, -1 padded. Per row, with qb = t // select_block:
    - blocks 0 .. init_blocks-1 and qb-local_blocks+1 .. qb (those >= 0) are always selected;
    - no block after qb is ever selected;
    - the remaining places (count in all, the forced blocks included) go to the highest scores
      among blocks 0 .. qb, ties to the lower index;
    so a row selects min(count, qb + 1) blocks. Needs init_blocks + local_blocks <= count (so the
    forced blocks always fit). Discrete: no gradient."""
    if min(count, init_blocks, local_blocks) < 0:
        raise ValueError("select_blocks: count, init_blocks and local_blocks must be >= 0")
    if init_blocks + local_blocks > count:
        raise ValueError(f"select_blocks: init_blocks ({init_blocks}) + local_blocks ({local_blocks}) "
                         f"forced blocks exceed select_count ({count})")
    B, Hkv, N, n_blocks = scores.shape
    n = min(count, n_blocks)
    with torch.no_grad():
        scores = scores.detach().to(torch.float64)
        qb = (torch.arange(N, device=scores.device) // select_block)[:, None]  # [N, 1]
        beta = torch.arange(n_blocks, device=scores.device)[None, :]  # [1, n_blocks]
        eligible = beta <= qb
        forced = eligible & ((beta < init_blocks) | (beta > qb - local_blocks))
        # priority: forced first, then by score, never an ineligible block; a stable descending
        # sort keeps equal priorities in index order, so ties go to the lower index
        priority = torch.where(forced, torch.inf, scores)
        priority = torch.where(eligible, priority, -torch.inf)
        order = torch.sort(priority, dim=-1, descending=True, stable=True).indices[..., :n]
        # a row has qb + 1 eligible blocks, sorted before the ineligible ones: keep at most that many
        taken = torch.arange(n, device=scores.device)[None, :] <= qb  # [N, n]
        chosen = torch.where(taken, order, n_blocks)  # n_blocks sorts after every real block
        chosen = torch.sort(chosen, dim=-1).values
        chosen = torch.where(chosen == n_blocks, -1, chosen)
    return chosen.to(torch.int32)


def _selected_visible(indices: torch.Tensor, n: int, select_block: int) -> torch.Tensor:
    """bool [B, Hkv, N, N]: key j is in one of row t's selected blocks and j <= t."""
    B, Hkv, N, _ = indices.shape
    n_blocks = math.ceil(n / select_block)
    idx = indices.long()
    in_block = torch.zeros(B, Hkv, N, n_blocks + 1, dtype=torch.bool, device=indices.device)
    in_block.scatter_(-1, torch.where(idx < 0, n_blocks, idx), True)  # -1 padding -> a spare column
    key_block = torch.arange(n, device=indices.device) // select_block
    t = torch.arange(n, device=indices.device)[:, None]
    j = torch.arange(n, device=indices.device)[None, :]
    return in_block[..., key_block] & (j <= t)


def nsa_attention(q, k, v, gates, *, compress_block=32, compress_stride=16, compress_kind="mean", w_k=None,
                  w_v=None, select_block=64, select_count=16, init_blocks=1, local_blocks=2, window=512,
                  scale=None, dtype=torch.float64, return_parts=False, indices=None):
    """NSA: o [B, Hq, N, Dv] in `dtype` (every computation in `dtype`, float64 by default; the
    selection scores always float64), differentiable in q, k, v, gates and (compress_kind "linear")
    w_k [Hkv, l*D, D], w_v [Hkv, l*Dv, Dv]. With return_parts, a dict: "o", the branch outputs
    "o_cmp", "o_slc", "o_swa" [B, Hq, N, Dv], "indices" int32 [B, Hkv, N, min(select_count,
    ceil(N / select_block))] (ascending, -1 padded) and "scores" float64 [B, Hkv, N, ceil(N / select_block)].
    See the module's docstring for the math. `indices` (int32 [B, Hkv, N, n], as select_blocks gives),
    when given, replace the selection in the selected branch: a kernel's own selection, checked
    against select_blocks' apart (near-equal scores may order differently in lower precision);
    "indices" in the parts are then the reference's own."""
    _check_heads(q, k)
    given = indices
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    if k.shape != (B, Hkv, N, D) or v.shape[:3] != (B, Hkv, N):
        raise ValueError(f"nsa_attention: k {list(k.shape)} and v {list(v.shape)} don't match q {list(q.shape)}")
    if gates.shape != (B, Hq, N, 3):
        raise ValueError(f"nsa_attention: gates must be [{B}, {Hq}, {N}, 3], got {list(gates.shape)}")
    if window < 0:
        raise ValueError(f"nsa_attention: window must be >= 0, got {window}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v, gates = (x.to(dtype) for x in (q, k, v, gates))  # .to keeps the graph to the inputs
    device = q.device
    t = torch.arange(N, device=device)[:, None]
    j = torch.arange(N, device=device)[None, :]

    # compressed branch
    k_cmp = compress(k, compress_block, compress_stride, compress_kind, None if w_k is None else w_k.to(dtype))
    v_cmp = compress(v, compress_block, compress_stride, compress_kind, None if w_v is None else w_v.to(dtype))
    if k_cmp.shape[-1] != D:
        raise ValueError(f"nsa_attention: compressed keys have dim {k_cmp.shape[-1]}, queries {D}")
    visible_cmp = _compressed_visible(N, k_cmp.shape[2], compress_block, compress_stride, device)
    o_cmp, _ = _attend(q, _expand_heads(k_cmp, Hq), _expand_heads(v_cmp, Hq), visible_cmp, scale)

    # selection (discrete, no gradient) and the selected branch
    scores = selection_scores(q, k_cmp, block=compress_block, stride=compress_stride,
                              select_block=select_block, scale=scale)
    indices = select_blocks(scores, select_block=select_block, count=select_count,
                            init_blocks=init_blocks, local_blocks=local_blocks)
    if given is not None and (tuple(given.shape[:3]) != (B, Hkv, N) or given.min() < -1
                              or given.max() >= math.ceil(N / select_block)):
        raise ValueError(f"nsa_attention: indices must be [{B}, {Hkv}, {N}, n] block numbers in [-1, "
                         f"{math.ceil(N / select_block)}); got {list(given.shape)}")
    used = indices if given is None else given.to(device)
    visible_slc = _expand_heads(_selected_visible(used, N, select_block), Hq)
    k_full, v_full = _expand_heads(k, Hq), _expand_heads(v, Hq)
    o_slc, _ = _attend(q, k_full, v_full, visible_slc, scale)

    # sliding-window branch
    visible_swa = (j <= t) & (j > t - window)
    o_swa, _ = _attend(q, k_full, v_full, visible_swa, scale)

    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_swa
    if not return_parts:
        return o
    return {"o": o, "o_cmp": o_cmp, "o_slc": o_slc, "o_swa": o_swa, "indices": indices, "scores": scores}
