"""Ran on: Triton 3.6.0, torch 2.11.0+cu130, an NVIDIA H100 (2026-12-08, as committed in fb8f3f7; results:
data/gluon_bwd_probe_*_2026-12-08_h100_*.txt); its dK/dV kernel's waits changed since (below), offline only.

A probe, not a backend (issues 16 and 20): the dK/dV kernel of the two-kernel backward at head dim
256 written in Gluon (`triton.experimental.gluon`, Triton 3.6), to see whether explicit layouts
recover what Triton loses there. At 64 keys on 8 warps Triton lays QK^T and dO V^T (products whose
result feeds another product) with every warp along M, so both warpgroups compute the same 64-key
product: 6 products' tensor work a step where 4 are needed (docs/decisions/head-dims-256.md). Here
the two warpgroups split the queries of S^T = K Q^T and dP^T = V dO^T (NVMMA layout warps [4, 2],
as FlashAttention-3 does at d256), P^T and dS^T go through shared memory to be the A operand of
dV += P^T dO and dK += dS^T Q, whose warpgroups split the head dim, and the products are async:
S^T and dP^T issued back to back, P^T computed while dP^T runs, dV and dK waited for at the step's
end. (As it ran on the H100 they were carried in flight across the step, and ptxas serialized
every wgmma of the kernel, warning C7515: its timings are of the serialized kernel, at d128 too;
docs/decisions/gluon-dkdv.md.) The dK/dV kernel is the runtime's own (attngen/runtime/gluon_dkdv.py,
at the tilings below); the dQ kernel lives here only. Not warp-specialized: one partition of 8
warps also issues the TMA loads of Q and dO, STAGES deep. With WARPS_M 8 (d128: 128 keys, each
warpgroup its own 64) the same schedule with P^T and dS^T as register operands, FlashAttention-3's
d128 layout, beside attngen's dense d128 kernel.

Inputs: q, k, v, do [B, H, N, D] contiguous bf16 / fp16 (GQA: k, v with H / G heads), the
natural-log LSE [B, H, Nq] and delta = rowsum(dO * O) [B, H, Nq] in fp32. Outputs dK, dV in the
inputs' dtype, checked against float64 autograd. A dQ kernel beside it (128 queries on 8 warps,
each warpgroup its own 64; S and dP back to back, dQ += dS K in flight), so that the two kernels
can be timed as a backward: each beside attngen's own kernel by torch.profiler, in the same process,
at the head_dim_256, head_dim_192 and dense (d128) specs' modules and tilings.

    python experiments/gluon_bwd_probe.py             # on a GPU: check, then time
    python experiments/gluon_bwd_probe.py --offline   # no GPU: compile for sm90, print the SASS mix

Offline (Triton 3.6 for sm90): no spills; 32 HGMMA 64x16x16 / 64x32x16 for the two score
products a step at d256 where Triton's kernel issues 64; 3 waits in each kernel's SASS (40 of 40
HGMMA waited for one by one in the dK/dV kernel as it ran).
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import statistics

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

from attngen.runtime import gluon_dkdv
from attngen.tools.inspect_kernels import gluon_dkdv_sm90, gluon_sm90, registers, sass
from backward_profile_gpu import kernel_times  # (run from experiments/: its directory is on the path)

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed after Triton 3.6
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # likewise (the runtime looks them up alike)

# (BLOCK_M queries a step, BLOCK_N keys a program, STAGES, WARPS_M) per (D, Dv)
CONFIGS = {(256, 256): [(64, 64, 2, 4), (32, 64, 3, 4)], (192, 128): [(64, 64, 2, 4), (64, 64, 3, 4), (32, 64, 3, 4)],
           (128, 128): [(64, 128, 2, 8), (64, 128, 3, 8), (64, 64, 3, 4)]}
DTYPES = (torch.bfloat16,)  # checked in; fp16 compiles the same layouts
# timed beside its module, with its mask (the head dims' specs are causal: bottom-right, at Nq = Nk the same)
SPECS = {(256, 256): ("head_dim_256", True), (192, 128): ("head_dim_192", True), (128, 128): ("dense", False)}


@gluon.jit
def _gl_bwd_dq(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DQ, stride_lb, stride_lh, stride_qb, stride_qh,
               stride_qn, H, GROUP, Nq, Nk, D, qk_scale, sm_scale, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
               BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr, STAGES: gl.constexpr):
    # One program: BLOCK_M (128) queries of one (batch, head), each warpgroup its own 64 rows; K and V
    # stream in by TMA, STAGES deep. S = Q K^T and dP = dO V^T issued back to back, P computed while
    # dP runs, dQ += dS K left in flight across the step.
    off_bh = gl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP
    first = gl.program_id(0) * BLOCK_M
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols: gl.constexpr = gl.SliceLayout(0, s_layout)

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, do_desc.block_type.shape, do_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    end = Nk
    if CAUSAL:
        end = gl.minimum(first + BLOCK_M, Nk)
    n_tiles = gl.cdiv(end, BLOCK_N)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    _tma_load(q_desc, [off_b, off_h, first, 0], q_bar, q_smem)
    _tma_load(do_desc, [off_b, off_h, first, 0], q_bar, do_smem)
    for j in gl.static_range(STAGES - 1):
        if j < n_tiles:
            mbarrier.expect(ready.index(j), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [off_b, off_hk, j * BLOCK_N, 0], ready.index(j), k_bufs.index(j))
            _tma_load(v_desc, [off_b, off_hk, j * BLOCK_N, 0], ready.index(j), v_bufs.index(j))
    offs_m = first + gl.arange(0, BLOCK_M, layout=rows)
    row = off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
    lse2 = gl.load(LSE + row + offs_m, mask=offs_m < Nq, other=0.0) * 1.4426950408889634
    delta = gl.load(DELTA + row + offs_m, mask=offs_m < Nq, other=0.0)
    mbarrier.wait(q_bar, 0)
    q_op = q_smem.reshape([BLOCK_M, HEAD_DIM])
    do_op = do_smem.reshape([BLOCK_M, HEAD_DIM_V])
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    dq = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=dq_layout))
    for i in range(n_tiles):
        st = i % STAGES
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        k_op = k_bufs.index(st).reshape([BLOCK_N, HEAD_DIM])
        v_op = v_bufs.index(st).reshape([BLOCK_N, HEAD_DIM_V])
        s_tok = warpgroup_mma(q_op, k_op.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do_op, v_op.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_tok, q_op, k_op))[0]  # the previous step's dQ product is done too
        _cta_barrier()  # ... in both warpgroups: its stage is free
        nxt = i + STAGES - 1
        if nxt < n_tiles:
            sn = nxt % STAGES
            mbarrier.expect(ready.index(sn), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [off_b, off_hk, nxt * BLOCK_N, 0], ready.index(sn), k_bufs.index(sn))
            _tma_load(v_desc, [off_b, off_hk, nxt * BLOCK_N, 0], ready.index(sn), v_bufs.index(sn))
        p = gl.exp2(s * qk_scale - lse2[:, None])
        offs_n = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=cols)
        if CAUSAL:
            p = gl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        p = gl.where(offs_n[None, :] < Nk, p, 0.0)  # keys past Nk arrive as zeros, scores 0: not keys
        dp = warpgroup_mma_wait(0, deps=(dp_tok, do_op, v_op))[0]
        ds = gl.convert_layout((p * (dp - delta[:, None])).to(dtype),
                               gl.DotOperandLayout(operand_index=0, parent=dq_layout, k_width=2))
        dq = warpgroup_mma(ds, k_op, dq, is_async=True)
    dq_t = warpgroup_mma_wait(0, deps=(dq,))  # one dependency: the value itself
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    offs_om = first + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
    out = gl.convert_layout((dq_t * sm_scale).to(dtype), out_layout)
    base = off_b.to(gl.int64) * stride_qb + off_h.to(gl.int64) * stride_qh
    gl.store(DQ + base + offs_om[:, None] * stride_qn + offs_d[None, :], out,
             mask=(offs_om[:, None] < Nq) & (offs_d[None, :] < D))


def _descriptor(t, rows):
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[t.dtype]
    block = [1, 1, rows, triton.next_power_of_2(t.shape[-1])]  # columns past the head dim arrive as zeros
    return GluonDescriptor(t, list(t.shape), list(t.stride()), block, gl.NVMMASharedLayout.get_default_for(block, gdt))


def dkdv(q, k, v, do, lse, delta, causal, BLOCK_M=64, BLOCK_N=64, STAGES=2, WARPS_M=4):
    """dK, dV of softmax(Q K^T / sqrt(D)) V (causal: top-left aligned) from the saved LSE and delta,
    by the runtime's kernel (attngen/runtime/gluon_dkdv.py) at this tiling."""
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    gluon_dkdv.dkdv(q, k, v, do, lse, delta, dk, dv, 1 / math.sqrt(q.shape[-1]), "top_left" if causal else None,
                    (BLOCK_M, BLOCK_N, STAGES, WARPS_M))
    return dk, dv


DQ_CONFIGS = {(256, 256): (128, 32, 2), (192, 128): (128, 32, 3), (128, 128): (128, 64, 3)}  # BLOCK_M, BLOCK_N, STAGES


def dq(q, k, v, do, lse, delta, causal, BLOCK_M=128, BLOCK_N=64, STAGES=2):
    """dQ from the saved LSE and delta (8 warps, 128 queries a program)."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty_like(q)
    sm_scale = 1 / math.sqrt(D)
    _gl_bwd_dq[(triton.cdiv(Nq, BLOCK_M), B * H)](
        _descriptor(q, BLOCK_M), _descriptor(k, BLOCK_N), _descriptor(v, BLOCK_N), _descriptor(do, BLOCK_M), lse, delta,
        out, lse.stride(0), lse.stride(1), *out.stride()[:3], H, H // Hkv, Nq, Nk, D, sm_scale * 1.4426950408889634,
        sm_scale, causal, BLOCK_M, BLOCK_N, triton.next_power_of_2(D), triton.next_power_of_2(Dv), STAGES, num_warps=8)
    return out


def _reference(q, k, v, do, causal):
    """float64 dK, dV by autograd, the natural-log LSE and delta (from the float64 output)."""
    G = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    kk, vv = k64.repeat_interleave(G, 1), v64.repeat_interleave(G, 1)
    s = q64 @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    o = torch.softmax(s, -1) @ vv
    o.backward(do.double())
    lse = torch.logsumexp(s, -1).float()
    delta = (o.detach() * do.double()).sum(-1).float()
    return k64.grad, v64.grad, lse.detach(), delta, q64.grad


def check() -> bool:
    ok_all = True
    for (D, Dv), (B, Hq, Hkv, N) in ((dims, shape) for dims in CONFIGS
                                     for shape in [(2, 4, 2, 1000), (1, 2, 1, 130)]):
        for causal in (False, True):
            for dtype in DTYPES:
                q, do = (torch.randn(B, Hq, N, d, device="cuda", dtype=dtype) for d in (D, Dv))
                k, v = (torch.randn(B, Hkv, N, d, device="cuda", dtype=dtype) for d in (D, Dv))
                ref_dk, ref_dv, lse, delta, ref_dq = _reference(q, k, v, do, causal)
                got = dq(q, k, v, do, lse, delta, causal, *DQ_CONFIGS[D, Dv])
                err, scale = (got.double() - ref_dq).abs().max().item(), ref_dq.abs().max().item()
                ok = err <= 2e-2 * scale + 1e-2
                ok_all &= ok
                print(f"check dQ d{D}/{Dv} B{B} H{Hq}/{Hkv} N{N} causal={causal} {dtype} {DQ_CONFIGS[D, Dv]}: max error "
                      f"{err:.1e} (of {scale:.1e}) {'ok' if ok else 'FAILED'}")
                for cfg in CONFIGS[D, Dv]:
                    dk, dv = dkdv(q, k, v, do, lse, delta, causal, *cfg)
                    err = max((dk.double() - ref_dk).abs().max().item(), (dv.double() - ref_dv).abs().max().item())
                    scale = max(ref_dk.abs().max().item(), ref_dv.abs().max().item())
                    ok = err <= 2e-2 * scale + 1e-2
                    ok_all &= ok
                    print(f"check d{D}/{Dv} B{B} H{Hq}/{Hkv} N{N} causal={causal} {dtype} {cfg}: max error {err:.1e} "
                          f"(of {scale:.1e}) {'ok' if ok else 'FAILED'}")
    return ok_all


def _kernel_ms(fn, name: str, reps: int = 20) -> float:
    """Median CUDA time (ms) of the kernels whose name starts with `name` over `reps` calls of fn."""
    return statistics.median(ms for kernel, ms in kernel_times(fn, reps).items() if kernel.startswith(name))


def time_against_attngen():
    import attngen
    from attngen import runtime

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; bf16; "
          "each kernel alone (torch.profiler median), TFLOP/s of its products (dK/dV 4, dQ 3)")
    for (D, Dv), (spec, causal) in SPECS.items():
        module = attngen.load(f"specs/{spec}.yaml")
        rt = runtime.of(module)
        print(f"{spec}: attngen's tilings dK/dV {rt.config('bwd_dkdv', 'bf16', 4096, 4096)}, "
              f"dQ {rt.config('bwd_dq', 'bf16', 4096, 4096)}")
        for B, H, N in ((4, 16, 4096), (1, 16, 16384)):
            q, do = (torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16) for d in (D, Dv))
            k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16) for d in (D, Dv))
            with torch.no_grad():
                o, lse = module.attention(q, k, v, return_lse=True)
            delta = (o.float() * do.float()).sum(-1)
            pairs = B * H * N * N * (0.5 if causal else 1.0)
            hp = rt.head_param_rows(q, {})
            ref = rt.backward(do, q, k, v, o, lse, hp, rt.scale, 0, 0.0, runtime.Sparse())
            ours = lambda: rt.backward(do, q, k, v, o, lse, hp, rt.scale, 0, 0.0, runtime.Sparse())  # noqa: E731
            times = {"attngen dK/dV": _kernel_ms(ours, "_attn_bwd_dkdv"), "attngen dQ": _kernel_ms(ours, "_attn_bwd_dq")}
            for cfg in CONFIGS[D, Dv]:
                times[f"gluon dK/dV {cfg}"] = _kernel_ms(lambda: dkdv(q, k, v, do, lse, delta, causal, *cfg), "_gl_bwd")
                dk, dv = dkdv(q, k, v, do, lse, delta, causal, *cfg)
                diff = max((dk.float() - ref[1].float()).abs().max().item(), (dv.float() - ref[2].float()).abs().max().item())
                print(f"  {cfg}: max difference from attngen's dK, dV {diff:.1e}")
            cfg = DQ_CONFIGS[D, Dv]
            times[f"gluon dQ {cfg}"] = _kernel_ms(lambda: dq(q, k, v, do, lse, delta, causal, *cfg), "_gl_bwd")
            diff = (dq(q, k, v, do, lse, delta, causal, *cfg).float() - ref[0].float()).abs().max().item()
            print(f"  dQ {cfg}: max difference from attngen's dQ {diff:.1e}")
            line = []
            for name, ms in times.items():  # dK/dV: QK^T, dO V^T, P^T dO, dS^T Q; dQ: QK^T, dO V^T, dS K
                flops = 2 * pairs * (2 * D + Dv if "dQ" in name else 2 * D + 2 * Dv)
                line.append(f"{name} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
            best = min(ms for name, ms in times.items() if name.startswith("gluon dK/dV"))
            print(f"  B{B} H{H} N{N}: " + ", ".join(line) + f"; backward's two kernels: attngen "
                  f"{times['attngen dK/dV'] + times['attngen dQ']:.3f} ms, gluon {best + times[f'gluon dQ {cfg}']:.3f}")


def _describe(kernel) -> str:
    """A compiled kernel's registers, shared memory and SASS instruction mix."""
    ops = collections.Counter(re.findall(r"\b(HGMMA\.\w+|UTMALDG|MUFU\.EX2|LDL|STL|BAR\.SYNC|WARPGROUP\.DEPBAR)\b",
                                         sass(kernel)))
    return (f"regs {registers(kernel)}, shared {kernel.metadata.shared} B, "
            + ", ".join(f"{op} {n}" for op, n in sorted(ops.items())))


def offline():
    """Compile each configuration for sm90 without a GPU and count what its SASS holds."""
    for (D, Dv), cfgs in CONFIGS.items():
        for cfg, causal in ((c, causal) for c in cfgs for causal in (False, True)):
            kernel = gluon_dkdv_sm90(D, Dv, "top_left" if causal else None, tiles=cfg)
            print(f"dK/dV d{D}/{Dv} {cfg} causal={causal}: " + _describe(kernel))
        t, tv = (torch.empty(1, 2, 1024, d, dtype=torch.bfloat16) for d in (D, Dv))
        rows = torch.empty(1, 2, 1024)
        BM, BN, ST = DQ_CONFIGS[D, Dv]
        for causal in (False, True):
            args = (_descriptor(t, BM), _descriptor(t, BN), _descriptor(tv, BN), _descriptor(tv, BM), rows, rows, t,
                    rows.stride(0), rows.stride(1), *t.stride()[:3], 2, 1, 1024, 1024, D, 0.1, 0.1, causal, BM, BN,
                    triton.next_power_of_2(D), triton.next_power_of_2(Dv), ST)
            print(f"dQ d{D}/{Dv} {(BM, BN, ST)} causal={causal}: " + _describe(gluon_sm90(_gl_bwd_dq, args)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--offline", action="store_true", help="compile for sm90 without a GPU")
    ap.add_argument("--time-only", action="store_true", help="skip the check against float64")
    args = ap.parse_args()
    if args.offline:
        offline()
        return
    torch.manual_seed(0)
    if not args.time_only:
        print("all correct" if check() else "SOME FAILED")
    time_against_attngen()


if __name__ == "__main__":
    main()
