"""Block-sparse layouts: which (query block, key block) pairs a spec's `sparsity:` section makes
visible, as bool tensors [B or 1, H or 1, n_qb, n_kb].

`static_layout` builds the terms known from the spec (local, global, stride, random) from the plain
dict `Spec.to_dict()["sparsity"]` gives; a layout passed at call time (`layout: runtime`) is a
BlockMask (block_mask.py). The visible set is the union of the terms; the kernels intersect it with the
element mask. Work is O(n_qb * n_kb * H'): blocks, never elements.
"""

from __future__ import annotations

import torch


def static_layout(sparsity: dict, n_qb: int, n_kb: int, heads: int, device) -> torch.Tensor | None:
    """bool [1, H', n_qb, n_kb], H' = heads with a random term, else 1: the union of the static
    terms, in top-left aligned block coordinates (the diagonal is qb == kb). None when the section
    has only `layout: runtime`.

    - local {left, right}: kb - qb in [-left, right]; a None side is unbounded.
    - global g: kb < g (every query sees them) or qb < g (they see every key).
    - stride s: kb % s == s - 1.
    - random {blocks: r, seed}, the contract (reference.sparsity_mask re-implements it)::

          g = torch.Generator(device="cpu").manual_seed(seed)
          scores = torch.rand(heads, n_qb, n_kb, generator=g)
          visible = scores.argsort(dim=-1, stable=True)[..., :min(r, n_kb)]

      per (head, query block) the r key blocks of the smallest scores, the same for every batch
      entry; made on the CPU, then moved to `device`.
    """
    local, global_, stride, random = (sparsity.get(k) for k in ("local", "global", "stride", "random"))
    if local is None and not global_ and stride is None and not random:
        return None
    qb = torch.arange(n_qb, device=device)[:, None]
    kb = torch.arange(n_kb, device=device)[None, :]
    vis = torch.zeros(n_qb, n_kb, dtype=torch.bool, device=device)
    if local is not None:
        near = torch.ones_like(vis)
        if local.get("left") is not None:
            near &= kb >= qb - local["left"]
        if local.get("right") is not None:
            near &= kb <= qb + local["right"]
        vis |= near
    if global_:
        vis |= (kb < global_) | (qb < global_)
    if stride is not None:
        vis |= kb % stride == stride - 1
    vis = vis[None, None]
    if random:
        vis = vis | _random_layout(random["blocks"], random.get("seed", 0), n_qb, n_kb, heads).to(device)[None]
    return vis


def _random_layout(blocks: int, seed: int, n_qb: int, n_kb: int, heads: int) -> torch.Tensor:
    """bool [heads, n_qb, n_kb] on the CPU: the random term of static_layout's contract."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(heads, n_qb, n_kb, generator=g)
    picked = scores.argsort(dim=-1, stable=True)[..., :min(blocks, n_kb)]
    vis = torch.zeros(heads, n_qb, n_kb, dtype=torch.bool)
    return vis.scatter_(-1, picked, True)
