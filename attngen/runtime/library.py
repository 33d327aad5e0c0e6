"""The torch.library ops of a kernel module: what torch.compile traces instead of the host code
(one op per direction, with fake and autograd registrations, and one for decoding)."""

from __future__ import annotations

import torch

from . import decode_gate as dec_gate
from .block_mask import BlockMask
from .sparse import Sparse, kept_seqlens, made_for
from .tiles import Documents

_OP_NAMES: dict[str, int] = {}


class _Ops:
    """The module's torch.library ops: what torch.compile traces instead of the host code."""

    def __init__(self, forward, backward, decode):
        self.forward, self.backward, self.decode = forward, backward, decode


def _op_prefix(rt) -> str:
    """attngen::<module key>_<n>: a module loaded again (same key) registers ops of new names."""
    _OP_NAMES[rt.key] = n = _OP_NAMES.get(rt.key, -1) + 1
    return f"attngen::{rt.key}_{n}"


def register_ops(rt) -> _Ops:
    name = _op_prefix(rt)
    # the seed is an int, not a tensor: a CPU tensor in the graph would be an input of its CUDA graphs
    # packed sequences (attention_varlen): cu_q, cu_k and the longest lengths; q, k, v [1, H, total, D] views
    fwd_schema = ("(Tensor q, Tensor k, Tensor v, Tensor hp, Tensor? q_ids, Tensor? kv_ids, Tensor? layout, "
                  "Tensor? cu_q, Tensor? cu_k, int max_q, int max_k, float scale, SymInt seed, float p_drop, "
                  "bool? deterministic) -> (Tensor, Tensor)")
    bwd_schema = ("(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor hp, Tensor? q_ids, "
                  "Tensor? kv_ids, Tensor? layout, Tensor? cu_q, Tensor? cu_k, int max_q, int max_k, float scale, "
                  "SymInt seed, float p_drop, bool? deterministic) -> (Tensor, Tensor, Tensor, Tensor)")

    def sparse(q_ids, kv_ids, layout, cu_q, cu_k, max_q, max_k, q, k):
        docs = None if q_ids is None else made_for("documents", q_ids, kv_ids, lambda: Documents(q_ids, kv_ids))
        blocks = None if layout is None else made_for("layout", layout, layout, lambda: BlockMask(layout))
        seqlens = None if cu_q is None else kept_seqlens(cu_q, cu_k, max_q, max_k, q.shape[2], k.shape[2])
        return Sparse(docs, blocks, seqlens)

    def fwd(q, k, v, hp, q_ids, kv_ids, layout, cu_q, cu_k, max_q, max_k, scale, seed, p_drop, deterministic):
        return rt.forward(q, k, v, hp, scale, seed, p_drop, None, True,
                          sparse(q_ids, kv_ids, layout, cu_q, cu_k, max_q, max_k, q, k))

    def fwd_fake(q, k, v, hp, q_ids, kv_ids, layout, cu_q, cu_k, max_q, max_k, scale, seed, p_drop, deterministic):
        B, H, N = q.shape[:3]
        # packed: o lies as [total, H, Dv] in memory (rt.forward), seen as [1, H, total, Dv]
        o = q.new_empty((N, H, rt.head_dim_v)).transpose(0, 1)[None] if cu_q is not None else q.new_empty((B, H, N, rt.head_dim_v))
        return o, q.new_empty((B, H, N), dtype=torch.float32)

    def bwd(do, q, k, v, o, lse, hp, q_ids, kv_ids, layout, cu_q, cu_k, max_q, max_k, scale, seed, p_drop,
            deterministic):
        dq, dk, dv, dhp = rt.backward(do, q, k, v, o, lse, hp, scale, seed, p_drop,
                                      sparse(q_ids, kv_ids, layout, cu_q, cu_k, max_q, max_k, q, k),
                                      deterministic=deterministic)
        return dq, dk, dv, torch.zeros_like(hp) if dhp is None else dhp

    def bwd_fake(do, q, k, v, o, lse, hp, q_ids, kv_ids, layout, cu_q, cu_k, max_q, max_k, scale, seed, p_drop,
                 deterministic):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(hp)

    forward_op = torch.library.custom_op(f"{name}_fwd", fwd, mutates_args=(), schema=fwd_schema)
    forward_op.register_fake(fwd_fake)
    backward_op = torch.library.custom_op(f"{name}_bwd", bwd, mutates_args=(), schema=bwd_schema)
    backward_op.register_fake(bwd_fake)

    def setup_context(ctx, inputs, output):
        q, k, v, hp, q_ids, kv_ids, layout, cu_q, cu_k, max_q, max_k, scale, seed, p_drop, deterministic = inputs
        extra = (q_ids, kv_ids, layout, cu_q, cu_k)
        ctx.save_for_backward(q, k, v, *output, hp, *(t for t in extra if t is not None))
        ctx.scale, ctx.seed, ctx.p_drop, ctx.given = scale, seed, p_drop, tuple(t is not None for t in extra)
        ctx.maxes, ctx.deterministic = (max_q, max_k), deterministic

    def backward(ctx, do, dlse):
        q, k, v, o, lse, hp, *given = ctx.saved_tensors
        given = iter(given)
        extra = [next(given) if g else None for g in ctx.given]
        dq, dk, dv, dhp = backward_op(do.contiguous(), q, k, v, o, lse, hp, *extra, *ctx.maxes, ctx.scale, ctx.seed,
                                      ctx.p_drop, ctx.deterministic)
        return dq, dk, dv, dhp, *[None] * 11

    forward_op.register_autograd(backward, setup_context=setup_context)

    # decoding: the caches are read, never written (appending is torch indexing before the op)
    # q_ids .. row0: the call's document ids and block layout (runtime/decode_gate.py)
    dec_schema = ("(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, Tensor? block_table, Tensor hp, "
                  "Tensor? q_ids, Tensor? kv_ids, Tensor? layout, Tensor? row0, float scale, int splits) "
                  "-> (Tensor, Tensor)")

    def decode(q, k_cache, v_cache, seqlens, block_table, hp, q_ids, kv_ids, layout, row0, scale, splits):
        gate = dec_gate.Gate(q_ids, kv_ids, layout, row0, rt.layout_block or (16, 16))
        return rt.decode(q, k_cache, v_cache, seqlens, block_table, hp, scale, splits, gate)

    def decode_fake(q, k_cache, v_cache, seqlens, block_table, hp, q_ids, kv_ids, layout, row0, scale, splits):
        B, H, N = q.shape[:3]
        return q.new_empty((B, H, N, rt.head_dim_v)), q.new_empty((B, H, N), dtype=torch.float32)

    decode_op = torch.library.custom_op(f"{name}_decode", decode, mutates_args=(), schema=dec_schema)
    decode_op.register_fake(decode_fake)
    return _Ops(forward_op, backward_op, decode_op)


class _NSAOps:
    """An NSA module's torch.library ops for the parts that are not torch: the selection (no
    gradient) and the selected branch (forward, and backward through register_autograd)."""

    def __init__(self, select, selected, selected_decode, compressed_decode, compress_update, attend_decode):
        self.select, self.selected, self.selected_decode = select, selected, selected_decode
        self.compressed_decode, self.compress_update, self.attend_decode = compressed_decode, compress_update, \
            attend_decode


def register_nsa_ops(rt) -> _NSAOps:
    name = _op_prefix(rt)

    def select(q, k_cmp, lse_cmp, scale):  # k_cmp with no token: lse_cmp is empty and unread
        if rt.fused_selection and k_cmp.shape[2]:
            return rt.select_fused(q, k_cmp, lse_cmp, scale)[0]
        return rt.select(q, k_cmp, lse_cmp if k_cmp.shape[2] else None, scale)

    def select_fake(q, k_cmp, lse_cmp, scale):
        B, _, N, _ = q.shape
        return q.new_empty((B, k_cmp.shape[1], N, min(rt.count, -(-N // rt.l_sel))), dtype=torch.int32)

    select_op = torch.library.custom_op(f"{name}_nsa_select", select, mutates_args=(),
                                        schema="(Tensor q, Tensor k_cmp, Tensor lse_cmp, float scale) -> Tensor")
    select_op.register_fake(select_fake)

    def fwd(q, k, v, indices, scale):
        return rt.selected_forward(q, k, v, indices, scale)

    def fwd_fake(q, k, v, indices, scale):
        B, H, N = q.shape[:3]
        return q.new_empty((B, H, N, rt.head_dim_v)), q.new_empty((B, H, N), dtype=torch.float32)

    def bwd(q, k, v, indices, o, lse, do, scale):
        return rt.selected_backward(q, k, v, indices, o, lse, do, scale)

    def bwd_fake(q, k, v, indices, o, lse, do, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    fwd_op = torch.library.custom_op(f"{name}_nsa_slc_fwd", fwd, mutates_args=(),
                                     schema="(Tensor q, Tensor k, Tensor v, Tensor indices, float scale) -> (Tensor, Tensor)")
    fwd_op.register_fake(fwd_fake)
    bwd_op = torch.library.custom_op(f"{name}_nsa_slc_bwd", bwd, mutates_args=(),
                                     schema="(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor o, Tensor lse, "
                                            "Tensor do, float scale) -> (Tensor, Tensor, Tensor)")
    bwd_op.register_fake(bwd_fake)

    def setup_context(ctx, inputs, output):
        q, k, v, indices, scale = inputs
        ctx.save_for_backward(q, k, v, indices, *output)
        ctx.scale = scale

    def backward(ctx, do, dlse):
        q, k, v, indices, o, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(q, k, v, indices, o, lse, do.contiguous(), ctx.scale)
        return dq, dk, dv, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)

    # decoding: q's row t at position first[b] + t of a cache, paged with a block table (no backward)
    def decode(q, k_cache, v_cache, indices, first, scale, block_table):
        return rt.selected_forward(q, k_cache, v_cache, indices, scale, first, block_table)[0]

    def decode_fake(q, k_cache, v_cache, indices, first, scale, block_table):
        return q.new_empty((*q.shape[:3], rt.head_dim_v))

    decode_op = torch.library.custom_op(f"{name}_nsa_slc_decode", decode, mutates_args=(),
                                        schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, "
                                               "Tensor first, float scale, Tensor? block_table) -> Tensor")
    decode_op.register_fake(decode_fake)

    # decoding's compressed branch and selection by the two fused kernels (fused_decode): o_cmp, blocks
    def cmp_decode(q, k_cmp, v_cmp, lengths, scale, S):
        return rt._decode_compressed_fused(q, (k_cmp, v_cmp), lengths, scale, S)[:2]

    def cmp_decode_fake(q, k_cmp, v_cmp, lengths, scale, S):
        B, Hq, Nq, _ = q.shape
        n = min(rt.count, -(-S // rt.l_sel))
        return (q.new_empty((B, Hq, Nq, v_cmp.shape[3]), dtype=torch.float32),
                q.new_empty((B, k_cmp.shape[1], Nq, n), dtype=torch.int32))

    cmp_op = torch.library.custom_op(f"{name}_nsa_cmp_decode", cmp_decode, mutates_args=(),
                                     schema="(Tensor q, Tensor k_cmp, Tensor v_cmp, Tensor lengths, float scale, "
                                            "int S) -> (Tensor, Tensor)")
    cmp_op.register_fake(cmp_decode_fake)

    # decoding's update of the compressed cache, in place, by its kernel (fused_decode)
    def update(k_cache, v_cache, k_cmp, v_cmp, lengths, Nq, block_table, w_k, w_v):
        weights = None if w_k is None else (w_k, w_v)
        rt._update_compressed_kernel(k_cache, v_cache, (k_cmp, v_cmp), lengths, Nq, weights, block_table)

    update_op = torch.library.custom_op(f"{name}_nsa_cmp_update", update, mutates_args=("k_cmp", "v_cmp"),
                                        schema="(Tensor k_cache, Tensor v_cache, Tensor(a!) k_cmp, Tensor(b!) v_cmp, "
                                               "Tensor lengths, int Nq, Tensor? block_table, Tensor? w_k, "
                                               "Tensor? w_v) -> ()")
    update_op.register_fake(lambda *args: None)

    # decoding's selected and window branches with the gates' mix (fused_decode): o
    def attend(q, k_cache, v_cache, indices, lengths, scale, block_table, o_cmp, gates):
        return rt._decode_attend_fused(q, k_cache, v_cache, indices, lengths, scale, block_table, o_cmp, gates)

    def attend_fake(q, k_cache, v_cache, indices, lengths, scale, block_table, o_cmp, gates):
        return q.new_empty((*q.shape[:3], rt.head_dim_v))

    attend_op = torch.library.custom_op(f"{name}_nsa_attend_decode", attend, mutates_args=(),
                                        schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, "
                                               "Tensor lengths, float scale, Tensor? block_table, Tensor o_cmp, "
                                               "Tensor gates) -> Tensor")
    attend_op.register_fake(attend_fake)
    return _NSAOps(select_op, fwd_op, decode_op, cmp_op, update_op, attend_op)
