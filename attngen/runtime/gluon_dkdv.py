"""The dK/dV kernel of the two-kernel backward in Gluon, for head dims that pad to 256 on Hopper.

At 64 keys on 8 warps (the only dK/dV tiling that holds dK and dV at d256) Triton lays QK^T and
dO V^T with every warp along M, so both warpgroups compute the same 64-key product: 6 products'
tensor work a step where 4 are needed. Here the layouts are explicit: the two warpgroups split the
queries of S^T = K Q^T and dP^T = V dO^T (as FlashAttention-3 does at d256), P^T and dS^T go through
shared memory to be the A operand of dV += P^T dO and dK += dS^T Q, whose warpgroups split the head
dim; S^T and dP^T are issued back to back, P^T computed while dP^T runs, and dV and dK waited for
at the step's end (in flight into the next step, the last one's merge with the zero-trip path made
ptxas serialize every wgmma: its warning C7515). Q and dO arrive by TMA, STAGES deep. It sums in a
fixed order, so the backward stays deterministic. Its measurements: docs/decisions/gluon-dkdv.md.
WARPS_M 8 instead (128 keys, each warpgroup its own 64, P^T and dS^T from registers) is
FlashAttention-3's d128 layout, for experiments/gluon_bwd_probe.py.

A module takes it where PassOptions.gluon_dkdv compiled it in (GLUON_DKDV; off by default until
its runtime path has run on a GPU). It covers the plain cases only: no mask or a causal one, no score modifier, no dropout, whole
sequences (no documents, packed sequences, layouts or windows of a larger problem), fp16 / bf16 on
sm90; `eligible` says which, and everything else runs the generated Triton kernel. Hand-written,
not rendered from a template: the first kernel of a Gluon family (its parts are the spec-driven
ones the Triton templates have, once it earns them).
"""

from __future__ import annotations

import torch
import triton

# queries a step, keys a program (8 warps), stages; 213 KB of shared memory at d256. (Names apart from the
# runtime's others: `generate --standalone` puts every runtime module in one namespace.)
GL_BLOCK_M, GL_BLOCK_N, GL_STAGES = 64, 64, 2
GL_DTYPES = (torch.float16, torch.bfloat16)


def spec_eligible(spec: dict) -> bool:
    """A spec whose backward this kernel computes: no mask but causal, no score modifier, no
    dropout, no layout (the generated module's SPEC)."""
    mask, score = spec.get("mask", {}), spec.get("score", {})
    return (set(mask) <= {"causal"} and not score.get("softcap") and not score.get("alibi")
            and not score.get("temperature") and not spec.get("dropout") and not spec.get("sparsity")
            and not spec.get("nsa"))


def eligible(spec: dict, q, k, v, do, head_dim_pad: int, head_dim_v_pad: int) -> bool:
    """This call's dK/dV by the Gluon kernel: a spec_eligible spec, 16-bit CUDA tensors on sm90,
    q and k padded to 256 (where Triton's kernel duplicates its score products), TMA-legal strides."""
    if not (spec_eligible(spec) and head_dim_pad == 256 and head_dim_v_pad <= 256):
        return False
    if q.dtype not in GL_DTYPES or not on_sm90(q) or not available():
        return False
    return all(t.dtype == q.dtype and tma_legal(t) for t in (q, k, v, do))


def on_sm90(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) == (9, 0)


def tma_legal(t: torch.Tensor) -> bool:
    """A 16-bit [B, H, N, D] tensor a TMA descriptor can read: unit stride along D, the others
    positive multiples of 16 bytes, a 16-byte aligned start (an expanded gradient's stride 0 is not)."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))


# Gluon's names, which the kernel's source reads as module globals: set by _define() on first use
gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_init = warpgroup_mma_wait = None
_GluonDescriptor = _tma_load = _cta_barrier = None
_GLUON: dict = {}  # "kernel": the @gluon.jit kernel once defined, None where this Triton has no Gluon Hopper ops


def kernel():
    """The Gluon kernel, defined on first use: Gluon's import is not paid at attngen's import while
    the option is off. None where this Triton lacks Gluon or its Hopper ops."""
    if "kernel" not in _GLUON:
        try:
            _GLUON["kernel"] = _define()
        except (ImportError, AttributeError):  # depends on the installed Triton
            _GLUON["kernel"] = None
    return _GLUON["kernel"]


def available() -> bool:
    return kernel() is not None


def _define():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_init, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # two were renamed after Triton 3.6
    globals().update(gluon=gluon, gl=gl, fence_async_shared=fence_async_shared, mbarrier=mbarrier, tma=tma,
                     warpgroup_mma=warpgroup_mma, warpgroup_mma_init=warpgroup_mma_init,
                     warpgroup_mma_wait=warpgroup_mma_wait, _GluonDescriptor=TensorDescriptor,
                     _tma_load=getattr(tma, "async_load", None) or tma.async_copy_global_to_shared,
                     _cta_barrier=getattr(gl, "thread_barrier", None) or gl.barrier)

    @gluon.jit
    def _gl_bwd_dkdv(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, stride_lb, stride_lh,
                     stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, H, GROUP, Nq, Nk, D, Dv, shift,
                     qk_scale, sm_scale, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr, STAGES: gl.constexpr,
                     WARPS_M: gl.constexpr):
        # One program: BLOCK_N keys of one (batch, KV head), walking the query tiles of its group's
        # heads in order. Causal: key j is visible to query i iff j <= i + shift (shift = Nk - Nq
        # bottom-right, 0 top-left).
        HKV = H // GROUP
        off_bh = gl.program_id(1)
        off_b = off_bh // HKV
        off_hk = off_bh % HKV
        first = gl.program_id(0) * BLOCK_N
        dtype: gl.constexpr = q_desc.dtype
        # WARPS_M 4: S^T / dP^T [BLOCK_N, BLOCK_M] with the two warpgroups splitting the queries, dK / dV
        # the columns; WARPS_M 8: each warpgroup its own 64 of 128 keys throughout
        WARPS_N: gl.constexpr = 8 // WARPS_M
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS_M, WARPS_N],
                                                           instr_shape=[16, BLOCK_M // WARPS_N, 16])
        dk_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS_M, WARPS_N],
                                                            instr_shape=[16, HEAD_DIM // WARPS_N, 16])
        dv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS_M, WARPS_N],
                                                            instr_shape=[16, HEAD_DIM_V // WARPS_N, 16])
        cols: gl.constexpr = gl.SliceLayout(0, s_layout)
        rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        pt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)

        k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
        q_bufs = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], pt_layout)
        ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], pt_layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)

        # the query tiles of each head in the group (causal: from the first that sees the block)
        m_first = 0
        if CAUSAL:
            m_first = gl.maximum(first - shift, 0) // BLOCK_M
        per_head = gl.maximum(gl.cdiv(Nq, BLOCK_M) - m_first, 0)
        n_tiles = GROUP * per_head

        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [off_b, off_hk, first, 0], kv_bar, k_smem)
        _tma_load(v_desc, [off_b, off_hk, first, 0], kv_bar, v_smem)
        for j in gl.static_range(STAGES - 1):
            if j < n_tiles:
                h = off_hk * GROUP + j // per_head
                m0 = (m_first + j % per_head) * BLOCK_M
                mbarrier.expect(ready.index(j), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
                _tma_load(q_desc, [off_b, h, m0, 0], ready.index(j), q_bufs.index(j))
                _tma_load(do_desc, [off_b, h, m0, 0], ready.index(j), do_bufs.index(j))
        mbarrier.wait(kv_bar, 0)
        k_op = k_smem.reshape([BLOCK_N, HEAD_DIM])
        v_op = v_smem.reshape([BLOCK_N, HEAD_DIM_V])

        offs_n = first + gl.arange(0, BLOCK_N, layout=rows)
        zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=dk_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM_V], gl.float32, layout=dv_layout)
        for i in range(n_tiles):
            st = i % STAGES
            h = off_hk * GROUP + i // per_head
            m0 = (m_first + i % per_head) * BLOCK_M
            mbarrier.wait(ready.index(st), (i // STAGES) & 1)
            q_op = q_bufs.index(st).reshape([BLOCK_M, HEAD_DIM])
            do_op = do_bufs.index(st).reshape([BLOCK_M, HEAD_DIM_V])
            s_tok = warpgroup_mma(k_op, q_op.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(v_op, do_op.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            # in order: this warpgroup's dV and dK of the previous step are done too; once both
            # warpgroups' are (the barrier), that step's stage and P^T / dS^T are free
            sT = warpgroup_mma_wait(1, deps=(s_tok, k_op, q_op))[0]
            _cta_barrier()
            nxt = i + STAGES - 1
            if nxt < n_tiles:
                sn = nxt % STAGES
                hn = off_hk * GROUP + nxt // per_head
                mn = (m_first + nxt % per_head) * BLOCK_M
                mbarrier.expect(ready.index(sn), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
                _tma_load(q_desc, [off_b, hn, mn, 0], ready.index(sn), q_bufs.index(sn))
                _tma_load(do_desc, [off_b, hn, mn, 0], ready.index(sn), do_bufs.index(sn))
            offs_m = m0 + gl.arange(0, BLOCK_M, layout=cols)
            row = off_b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh
            # the saved LSE (natural log); -inf where a row sees nothing: +inf here, so its P is 0
            lse = gl.load(LSE + row + offs_m, mask=offs_m < Nq, other=float("-inf"))
            lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            pT = gl.exp2(sT * qk_scale - lse2[None, :])
            if CAUSAL:
                pT = gl.where(offs_m[None, :] + shift >= offs_n[:, None], pT, 0.0)
            if WARPS_N == 2:
                p_smem.store(pT.to(dtype))
            dpT = warpgroup_mma_wait(0, deps=(dp_tok, v_op, do_op))[0]
            delta = gl.load(DELTA + row + offs_m, mask=offs_m < Nq, other=0.0)
            dsT = pT * (dpT - delta[None, :])
            if WARPS_N == 2:
                ds_smem.store(dsT.to(dtype))
                fence_async_shared()
                _cta_barrier()  # each warpgroup wrote half of P^T and dS^T; each product reads all of them
                dv_tok = warpgroup_mma(p_smem, do_op, dv, is_async=True)
                dk_tok = warpgroup_mma(ds_smem, q_op, dk, is_async=True)
            else:  # a warpgroup holds whole rows of P^T and dS^T: the products' A operand from registers
                p_op = gl.convert_layout(pT.to(dtype), gl.DotOperandLayout(operand_index=0, parent=dv_layout,
                                                                           k_width=2))
                ds_op = gl.convert_layout(dsT.to(dtype), gl.DotOperandLayout(operand_index=0, parent=dk_layout,
                                                                             k_width=2))
                dv_tok = warpgroup_mma(p_op, do_op, dv, is_async=True)
                dk_tok = warpgroup_mma(ds_op, q_op, dk, is_async=True)
            dk, dv = warpgroup_mma_wait(0, deps=(dk_tok, dv_tok))  # not carried in flight: see the docstring

        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
        offs_on = (first + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_layout))).to(gl.int64)  # rows x strides
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
        base = off_b.to(gl.int64) * stride_kb + off_hk.to(gl.int64) * stride_kh
        gl.store(DK + base + offs_on[:, None] * stride_kn + offs_d[None, :],
                 gl.convert_layout((dk * sm_scale).to(dtype), out_layout),
                 mask=(offs_on[:, None] < Nk) & (offs_d[None, :] < D))
        offs_dv = gl.arange(0, HEAD_DIM_V, layout=gl.SliceLayout(0, out_layout))
        base = off_b.to(gl.int64) * stride_vb + off_hk.to(gl.int64) * stride_vh
        gl.store(DV + base + offs_on[:, None] * stride_vn + offs_dv[None, :],
                 gl.convert_layout(dv.to(dtype), out_layout),
                 mask=(offs_on[:, None] < Nk) & (offs_dv[None, :] < Dv))

    return _gl_bwd_dkdv

def _gl_descriptor(t: torch.Tensor, rows: int):
    """A TMA descriptor over [B, H, N, D] with [1, 1, rows, D padded to a power of two] blocks (rows
    and columns past the tensor arrive as zeros)."""
    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    block = [1, 1, rows, triton.next_power_of_2(t.shape[-1])]
    return _GluonDescriptor(t, list(t.shape), list(t.stride()), block, gl.NVMMASharedLayout.get_default_for(block, gdt))


def launch_args(q, k, v, do, lse, delta, dk, dv, scale: float, causal: str | None, tiles=None):
    """The kernel's arguments; causal: None, "top_left" or "bottom_right"; tiles: (BLOCK_M, BLOCK_N,
    STAGES, WARPS_M), the runtime's by default."""
    block_m, block_n, stages, warps_m = tiles or (GL_BLOCK_M, GL_BLOCK_N, GL_STAGES, 4)
    Hq, Nq, D = q.shape[1], q.shape[2], q.shape[3]
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    shift = Nk - Nq if causal == "bottom_right" else 0
    return (_gl_descriptor(q, block_m), _gl_descriptor(k, block_n), _gl_descriptor(v, block_n),
            _gl_descriptor(do, block_m),
            lse, delta, dk, dv, lse.stride(0), lse.stride(1), *dk.stride()[:3], *dv.stride()[:3], Hq, Hq // Hkv,
            Nq, Nk, D, Dv, shift, scale * 1.4426950408889634, scale, causal is not None, block_m, block_n,
            triton.next_power_of_2(D), triton.next_power_of_2(Dv), stages, warps_m)


def dkdv(q, k, v, do, lse, delta, dk, dv, scale: float, causal: str | None, tiles=None) -> None:
    """dK and dV into dk, dv from the saved LSE (natural log, [B, Hq, Nq]) and delta = rowsum(dO O)."""
    B, Hkv, Nk = k.shape[:3]
    block_n = (tiles or (GL_BLOCK_M, GL_BLOCK_N))[1]
    kernel()[(triton.cdiv(Nk, block_n), B * Hkv)](*launch_args(q, k, v, do, lse, delta, dk, dv, scale, causal, tiles),
                                                  num_warps=8)

