"""Context parallelism: one sequence's attention across the ranks of a torch.distributed group,
each holding a shard of Q, K and V along the sequence (docs/distributed.md).

    q, k, v = (shard(x, world, rank) for x in (q_full, k_full, v_full))   # zigzag by default
    o = context_parallel_attention(mod, q, k, v, seq_len=N)               # o: this rank's shard

Every kernel call is a window of the whole problem (runtime/window.py): the spec's mask, score
modifiers and dropout are evaluated at global positions, and the mask analysis's tile classes
come from them, so a remote block no query sees is never launched and a fully visible one runs
without mask code. Partial results merge by their log-sum-exps in fp32; the backward sends dK and
dV around the ring in a fixed order (deterministic for a world size) or reduce-scatters them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .runtime import KernelModule
from .runtime import of as runtime_of
from .runtime.sparse import Sparse
from .runtime.tiles import Documents, cell_visibility
from .runtime.window import Window

LAYOUTS = ("zigzag", "contiguous")
STRATEGIES = ("ring", "allgather")


# ---------------------------------------------------------------- layouts

def chunks(seq_len: int, world: int, rank: int, layout: str = "zigzag") -> tuple[tuple[int, int], ...]:
    """(start, length) of the sequence's pieces that `rank` holds, in the order it stores them.
    contiguous: the world's equal parts (lengths differ by at most 1); zigzag: the sequence cut
    into 2 x world parts, rank r holding part r and part 2 x world - 1 - r (a head and a tail, so
    that causal work is balanced; PyTorch's head-tail load balancer's order)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    parts = world if layout == "contiguous" else 2 * world
    mine = (rank,) if layout == "contiguous" else (rank, parts - 1 - rank)
    bound = lambda i: i * seq_len // parts  # noqa: E731
    return tuple((bound(i), bound(i + 1) - bound(i)) for i in mine)


def shard_length(seq_len: int, world: int, rank: int, layout: str = "zigzag") -> int:
    """How many tokens `rank` holds."""
    return sum(n for _, n in chunks(seq_len, world, rank, layout))


def shard(x: torch.Tensor, world: int, rank: int, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard of a whole-sequence tensor (along `dim`), contiguous."""
    return torch.cat([x.narrow(dim, s, n) for s, n in chunks(x.shape[dim], world, rank, layout)], dim).contiguous()


def unshard(shards, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The whole-sequence tensor from every rank's shard (a list in rank order, e.g. gathered)."""
    world = len(shards)
    seq_len = sum(s.shape[dim] for s in shards)
    pieces = {}
    for rank, x in enumerate(shards):
        offset = 0
        for start, n in chunks(seq_len, world, rank, layout):
            if n:
                pieces[start] = x.narrow(dim, offset, n)
            offset += n
    return torch.cat([pieces[s] for s in sorted(pieces)], dim) if pieces else shards[0]


def work(visible, seq_len: int, world: int, layout: str = "zigzag", band: int = 256) -> list[int]:
    """Per rank, the visible (query, key) pairs of its queries under a host mask `visible(q_idx,
    kv_idx, Nq, Nk)` (None: every pair), counted densely: its attention FLOPs are 4 x D x this."""
    out = []
    kv = torch.arange(seq_len)[None, :]
    for rank in range(world):
        total = 0
        for start, n in chunks(seq_len, world, rank, layout):
            for m0 in range(start, start + n, band):
                q = torch.arange(m0, min(start + n, m0 + band))[:, None]
                seen = True if visible is None else visible(q, kv, seq_len, seq_len)
                total += int(torch.as_tensor(seen).expand(q.shape[0], seq_len).sum())
        out.append(total)
    return out


# ---------------------------------------------------------------- the entry point

def context_parallel_attention(mod, q, k, v, *, seq_len: int | None = None, group=None, strategy: str = "ring",
                               layout: str = "zigzag", documents=None, alibi_slopes=None, temperature=None,
                               scale=None, training: bool = True, dropout_seed=None, return_lse: bool = False):
    """This rank's shard of attention over the whole sequence, from its shards of q [B, Hq, n, D],
    k [B, Hkv, n, D] and v [B, Hkv, n, Dv] in `layout` (see `shard`); differentiable.

    seq_len: the whole sequence's length (default: the sum of the ranks' shard lengths, one
    all-reduce). strategy: "ring" passes K/V blocks around the ring, overlapping each transfer
    with the current block's compute; "allgather" gathers K/V once and reduce-scatters their
    gradients. documents: this rank's shard of the document ids [B, n], for specs with a document
    mask. The other keywords are the module's `attention` ones; the dropout seed is the group's
    first rank's (given there, or drawn there), broadcast, so that every rank drops the same
    elements. A learnable head parameter's gradient is this rank's share, as for any other
    parameter: summed over the group by whatever reduces gradients over a mesh that includes the
    context dimension (DDP/FSDP), or by the caller. The backward is the deterministic two-kernel one.
    Not supported: packed sequences, block-sparse layouts, torch.compile (the function is eager)."""
    rt = mod if isinstance(mod, KernelModule) else runtime_of(mod)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    rt.check(q, k, v)
    if rt.sparsity:
        raise ValueError(f"spec {rt.name!r} has a block-sparse layout: context parallelism does not support it")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be shards of one sequence: {q.shape[2]} and {k.shape[2]} rows")
    group = group or dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if seq_len is None:
        n = torch.tensor([q.shape[2]], device=q.device if dist.get_backend(group) == "nccl" else "cpu")
        dist.all_reduce(n, group=group)
        seq_len = int(n.item())
    if shard_length(seq_len, world, rank, layout) != q.shape[2]:
        raise ValueError(f"rank {rank}: a {layout} shard of {seq_len} tokens over {world} ranks has "
                         f"{shard_length(seq_len, world, rank, layout)} rows; q has {q.shape[2]}")
    ids = None
    if rt.document:
        if documents is None:
            raise ValueError(f"spec {rt.name!r} has a document mask: pass documents= (this rank's shard of the ids [B, n])")
        if not isinstance(documents, torch.Tensor) or tuple(documents.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(f"documents must be this rank's shard of the ids, [{q.shape[0]}, {q.shape[2]}]")
        ids = _all_shards(documents.contiguous(), group, world, seq_len, layout, dim=1)
    elif documents is not None:
        raise TypeError(f"spec {rt.name!r} has no document mask: documents= is not taken")
    hp = rt.head_param_rows(q, {"alibi_slopes": alibi_slopes, "temperature": temperature})
    scale = rt.scale if scale is None else float(scale)
    p_drop = rt.dropout_p if training else 0.0
    seed = 0
    if p_drop > 0:
        seed = _shared_seed(group, q.device, dropout_seed)
    ctx = _Context(rt, group, world, rank, seq_len, layout, strategy, ids, scale, seed, p_drop)
    o, lse = _ContextParallel.apply(ctx, q, k, v, hp)
    return (o, lse) if return_lse else o


def _shared_seed(group, device, given) -> int:
    """The group's first rank's dropout seed (given, or drawn there), broadcast: every rank drops the
    same elements even where the ranks were given, or drew, different seeds."""
    seed = torch.randint(0, 2**31 - 1, (1,)) if given is None else torch.tensor([int(given)])
    seed = seed.to(device if dist.get_backend(group) == "nccl" else "cpu")
    dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
    return int(seed.item())


def _all_shards(x: torch.Tensor, group, world: int, seq_len: int, layout: str, dim: int) -> torch.Tensor:
    """The whole-sequence tensor from every rank's shard of it (shards may differ in length by a
    few rows: padded to the longest for the gather)."""
    lengths = [shard_length(seq_len, world, r, layout) for r in range(world)]
    longest = max(lengths)
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim) if pad[dim] else x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return unshard([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], layout, dim)


class _Context:
    """What the forward hands the backward besides tensors."""

    def __init__(self, rt, group, world, rank, seq_len, layout, strategy, ids, scale, seed, p_drop):
        self.rt, self.group, self.world, self.rank = rt, group, world, rank
        self.seq_len, self.layout, self.strategy, self.ids = seq_len, layout, strategy, ids
        self.scale, self.seed, self.p_drop = scale, seed, p_drop
        self.device = None  # the tensors' (set by the forward)

    def pieces(self, rank: int) -> list[tuple[int, int, int]]:
        """(position, length, row in the shard) of a rank's non-empty pieces."""
        out, row = [], 0
        for start, n in chunks(self.seq_len, self.world, rank, self.layout):
            if n:
                out.append((start, n, row))
            row += n
        return out

    def pairs(self, kv_rank: int):
        """(window, query rows, key rows, Sparse) for each pair of this rank's query pieces and
        kv_rank's key pieces (-1: the whole sequence's keys, all-gathered) with a visible pair."""
        kv_pieces = [(0, self.seq_len, 0)] if kv_rank < 0 else self.pieces(kv_rank)
        for qs, qn, qr in self.pieces(self.rank):
            for ks, kn, kr in kv_pieces:
                w = Window(qs, ks, self.seq_len, self.seq_len)
                if not self.any_visible(w, qn, kn):  # document ids only ever hide more
                    continue
                sparse = Sparse(Documents(self.ids[:, qs:qs + qn], self.ids[:, ks:ks + kn])) if self.ids is not None \
                    else Sparse()
                yield w, slice(qr, qr + qn), slice(kr, kr + kn), sparse

    def any_visible(self, w: Window, qn: int, kn: int) -> bool:
        """Whether the spec's mask lets any of the window's queries see any of its keys (kept per
        module, window and device: a model's layers and steps reuse them)."""
        key = (self.rt.key, w, qn, kn, str(self.device))
        if key not in _VISIBLE:
            if len(_VISIBLE) >= 4096:
                _VISIBLE.clear()
            visible = self.rt.visible
            # per 128 x 128 cell: the mask is evaluated a band of rows at a time (bounded memory)
            _VISIBLE[key] = visible is None or bool(
                cell_visibility(w.host_mask(visible), qn, kn, 128, 128, self.device)[0].any())
        return _VISIBLE[key]


_VISIBLE: dict = {}


def _merge(o_acc, lse_acc, o, lse):
    """In place: (o_acc, lse_acc) and (o, lse) combined by their log-sum-exps, in fp32; rows that
    saw nothing (-inf) stay zeros."""
    m = torch.maximum(lse_acc, lse)
    m = torch.where(m == float("-inf"), 0.0, m)
    a, b = torch.exp(lse_acc - m), torch.exp(lse - m)
    total = a + b
    o_acc.mul_(a[..., None]).add_(o.float() * b[..., None]).div_(torch.where(total > 0, total, 1.0)[..., None])
    lse_acc.copy_(torch.where(total > 0, m + torch.log(total), float("-inf")))


def _exchange(group, world: int, rank: int, send, recv):
    """Start sending tensors `send` to the next rank and receiving `recv` from the previous one."""
    nxt, prv = dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in send] + [dist.P2POp(dist.irecv, t, prv, group) for t in recv]
    return dist.batch_isend_irecv(ops)


def _shard_rows(ctx: _Context, rank: int) -> int:
    return shard_length(ctx.seq_len, ctx.world, rank, ctx.layout)


def ring_step_forward(ctx: _Context, q, k, v, hp, src: int, o_acc, lse_acc) -> None:
    """One ring step: this rank's queries against rank `src`'s K/V shard (k, v), each visible window
    one call, merged into the fp32 accumulators in place."""
    for w, rows, keys, sparse in ctx.pairs(src):
        o, lse = ctx.rt.forward(q[:, :, rows], k[:, :, keys], v[:, :, keys], hp, ctx.scale, ctx.seed, ctx.p_drop,
                                sparse=sparse, window=w)
        _merge(o_acc[:, :, rows], lse_acc[:, :, rows], o, lse)


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(fctx, ctx: _Context, q, k, v, hp):
        rt = ctx.rt
        ctx.device = q.device
        B, Hq, n, _ = q.shape
        o_acc = torch.zeros(B, Hq, n, rt.head_dim_v, dtype=torch.float32, device=q.device)
        lse_acc = torch.full((B, Hq, n), float("-inf"), dtype=torch.float32, device=q.device)
        if ctx.strategy == "allgather":
            k_all, v_all = (_all_shards(x, ctx.group, ctx.world, ctx.seq_len, ctx.layout, 2) for x in (k, v))
            for w, rows, _, sparse in ctx.pairs(-1):
                o, lse = rt.forward(q[:, :, rows], k_all, v_all, hp, ctx.scale, ctx.seed, ctx.p_drop,
                                    sparse=sparse, window=w)
                o_acc[:, :, rows], lse_acc[:, :, rows] = o.float(), lse
        else:
            kv = (k.contiguous(), v.contiguous())
            for step in range(ctx.world):
                src = (ctx.rank - step) % ctx.world
                pending = None
                if step < ctx.world - 1:  # the next block travels while this one is computed
                    nxt_rows = _shard_rows(ctx, (src - 1) % ctx.world)
                    nxt = tuple(x.new_empty(*x.shape[:2], nxt_rows, x.shape[3]) for x in kv)
                    pending = (_exchange(ctx.group, ctx.world, ctx.rank, kv, nxt), nxt)
                ring_step_forward(ctx, q, *kv, hp, src, o_acc, lse_acc)
                if pending:
                    for req in pending[0]:
                        req.wait()
                    kv = pending[1]
        o = o_acc.to(q.dtype)
        fctx.save_for_backward(q, k, v, hp, o, lse_acc)
        fctx.ctx = ctx
        fctx.mark_non_differentiable(lse_acc)
        return o, lse_acc

    @staticmethod
    def backward(fctx, do, _dlse):
        ctx = fctx.ctx
        rt = ctx.rt
        q, k, v, hp, o, lse = fctx.saved_tensors
        do = do.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        # a head parameter's gradient: per row, summed over the windows, corrected once rows are whole
        dhp_rows = torch.zeros((hp.shape[0], 3, *q.shape[:3]), dtype=torch.float32, device=q.device) \
            if rt.n_grads else None

        def pair_grads(w, rows, keys, sparse, k_, v_):
            grads = rt.backward(do[:, :, rows], q[:, :, rows], k_[:, :, keys], v_[:, :, keys], o[:, :, rows],
                                lse[:, :, rows].contiguous(), hp, ctx.scale, ctx.seed, ctx.p_drop, sparse, window=w,
                                deterministic=True)
            dq[:, :, rows] += grads[0].float()
            if dhp_rows is not None:
                dhp_rows[..., rows] += grads[3]
            return grads[1], grads[2]

        if ctx.strategy == "allgather":
            k_all, v_all = (_all_shards(x, ctx.group, ctx.world, ctx.seq_len, ctx.layout, 2) for x in (k, v))
            dk_all = torch.zeros(k_all.shape, dtype=torch.float32, device=q.device)
            dv_all = torch.zeros(v_all.shape, dtype=torch.float32, device=q.device)
            for w, rows, keys, sparse in ctx.pairs(-1):
                dk_, dv_ = pair_grads(w, rows, keys, sparse, k_all, v_all)
                dk_all += dk_.float()
                dv_all += dv_.float()
            dk, dv = (_reduce_scatter(x, ctx) for x in (dk_all, dv_all))
        else:
            kv = (k.contiguous(), v.contiguous())
            dkv = None  # the travelling sums for the block held, arriving from the previous rank
            for step in range(ctx.world):
                src = (ctx.rank - step) % ctx.world
                pending = None
                if step < ctx.world - 1:
                    nxt_rows = _shard_rows(ctx, (src - 1) % ctx.world)
                    nxt = tuple(x.new_empty(*x.shape[:2], nxt_rows, x.shape[3]) for x in kv)
                    pending = (_exchange(ctx.group, ctx.world, ctx.rank, kv, nxt), nxt)
                partial = [torch.zeros(x.shape, dtype=torch.float32, device=q.device) for x in kv]
                for w, rows, keys, sparse in ctx.pairs(src):
                    dk_, dv_ = pair_grads(w, rows, keys, sparse, *kv)
                    partial[0][:, :, keys] += dk_.float()
                    partial[1][:, :, keys] += dv_.float()
                if dkv is not None:  # computed before waiting: the sums' transfer overlapped this step
                    for req in dkv[0]:
                        req.wait()
                    partial = [a + b for a, b in zip(dkv[1], partial)]
                if ctx.world == 1:
                    dkv = ((), partial)
                    break
                # send these sums on with the block; after the last step they arrive at its owner
                arriving = [torch.empty(x.shape[:2] + (_shard_rows(ctx, (src - 1) % ctx.world),) + x.shape[3:],
                                        dtype=torch.float32, device=q.device) for x in kv]
                # (the sums sent are kept referenced until the transfer is waited for: the allocator
                # must not hand their memory to the next step while the transfer reads it)
                dkv = (_exchange(ctx.group, ctx.world, ctx.rank, partial, arriving), arriving, partial)
                if pending:
                    for req in pending[0]:
                        req.wait()
                    kv = pending[1]
            for req in dkv[0]:
                req.wait()
            dk, dv = dkv[1]
        dhp = None if dhp_rows is None else rt.finish_head_param_grads(dhp_rows)
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dhp


def _reduce_scatter(full: torch.Tensor, ctx: _Context) -> torch.Tensor:
    """This rank's shard of the sum over ranks of a whole-sequence tensor (dim 2): the ranks'
    shards padded to the longest, reduce-scattered (an all-reduce where the backend has no
    reduce-scatter: gloo before torch 2.13 or so)."""
    lengths = [_shard_rows(ctx, r) for r in range(ctx.world)]
    longest = max(lengths)
    parts = []
    for r, n in enumerate(lengths):
        s = shard(full, ctx.world, r, ctx.layout)
        parts.append(torch.cat([s, s.new_zeros(*s.shape[:2], longest - n, s.shape[3])], 2) if n < longest else s)
    out = torch.empty_like(parts[0])
    if dist.get_backend(ctx.group) != "gloo":
        dist.reduce_scatter(out, parts, group=ctx.group)
        return out[:, :, :lengths[ctx.rank]]
    try:  # gloo fails on every rank alike where it has no reduce-scatter: no rank is left waiting
        dist.reduce_scatter(out, parts, group=ctx.group)
    except (RuntimeError, NotImplementedError):
        dist.all_reduce(full, group=ctx.group)
        return shard(full, ctx.world, ctx.rank, ctx.layout)
    return out[:, :, :lengths[ctx.rank]]
