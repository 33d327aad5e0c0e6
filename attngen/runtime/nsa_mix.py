"""The gates' mix of Native Sparse Attention modules: o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa,
by the module's _nsa_mix and _nsa_mix_bwd kernels (templates/nsa/mix.jinja; `fused_mix`) or by
torch ops (under torch.compile, and as the kernels' reference)."""

from __future__ import annotations

import torch
import triton


def _mix_torch(gates, o_cmp, o_slc, o_swa, dtype):
    """g_cmp o_cmp + g_slc o_slc + g_swa o_swa in float32, into dtype, in torch ops: four passes over
    the rows (a product, two in-place multiply-adds, the cast) where the sum of upcast products took
    about eleven (BENCHMARKS.md, "NSA's gates"). What torch.compile traces, and the kernels' reference."""
    g = gates.to(torch.float32)
    o = o_cmp * g[..., 0:1]
    return o.addcmul_(o_slc, g[..., 1:2]).addcmul_(o_swa, g[..., 2:3]).to(dtype)


def _mix(gates, o_cmp, o_slc, o_swa, dtype, rt=None):
    """o [B, Hq, N, Dv] = g_cmp o_cmp + g_slc o_slc + g_swa o_swa (gates [B, Hq, N, 3], the branches'
    outputs [B, Hq, N, Dv]; float32 math, into dtype): with the module rt and its fused_mix set, its
    _nsa_mix kernel (one pass over the rows; the backward _nsa_mix_bwd's, through _Mix), else and
    under torch.compile (which traces torch ops, not the launch) _mix_torch."""
    if rt is None or not rt.fused_mix or torch.compiler.is_compiling():
        return _mix_torch(gates, o_cmp, o_slc, o_swa, dtype)
    return _Mix.apply(rt, gates, o_cmp, o_slc, o_swa, dtype)


class _Mix(torch.autograd.Function):
    """The gates' mix by the module's kernels: o from _nsa_mix (NSAModule.mix_forward); the
    gradients of the gates and of the three branches' outputs that need one from _nsa_mix_bwd
    (NSAModule.mix_backward)."""

    @staticmethod
    def forward(ctx, rt, gates, o_cmp, o_slc, o_swa, dtype):
        ctx.save_for_backward(gates, o_cmp, o_slc, o_swa)
        ctx.rt = rt
        return rt.mix_forward(gates, o_cmp, o_slc, o_swa, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        grads = ctx.rt.mix_backward(do, *ctx.saved_tensors, ctx.needs_input_grad[1:5])
        return None, *grads, None


class NSAMixing:
    """NSAModule's mix kernels' launches: a mixin on NSAModule, which holds the kernels."""

    @staticmethod
    def _mix_rows(dv: int, elements: int) -> dict:
        """The mix kernels' tile: BLOCK_R rows of dv (padded to a power of two) about `elements` values."""
        pad = max(16, triton.next_power_of_2(dv))
        return dict(HEAD_DIM_V=dv, HEAD_DIM_V_PAD=pad, BLOCK_R=max(1, elements // pad))

    def mix_forward(self, gates, o_cmp, o_slc, o_swa, dtype):
        """o [B, Hq, N, Dv] in dtype (contiguous) = g_cmp o_cmp + g_slc o_slc + g_swa o_swa by the
        _nsa_mix kernel: gates [B, Hq, N, 3] and the outputs [B, Hq, N, Dv] of any float dtypes and
        strides (read in place), float32 math."""
        B, Hq, N, Dv = o_slc.shape
        if tuple(gates.shape) != (B, Hq, N, 3) or o_cmp.shape != o_slc.shape or o_swa.shape != o_slc.shape:
            raise ValueError(f"the gates' mix takes gates [B, Hq, N, 3] and three outputs [B, Hq, N, Dv] of one shape; "
                             f"got {list(gates.shape)}, {list(o_cmp.shape)}, {list(o_slc.shape)}, {list(o_swa.shape)}")
        o = torch.empty(B, Hq, N, Dv, dtype=dtype, device=o_slc.device)
        R = B * Hq * N
        if not o.numel():
            return o
        tile = self._mix_rows(Dv, 4096)
        self.mix_kernel[(-(-R // tile["BLOCK_R"]),)](
            gates, o_cmp, o_slc, o_swa, o, R, Hq, N, *gates.stride(), *o_cmp.stride(), *o_slc.stride(),
            *o_swa.stride(), num_warps=4, **tile)
        return o

    def mix_backward(self, do, gates, o_cmp, o_slc, o_swa, needs=(True, True, True, True)):
        """(d gates, d o_cmp, d o_slc, d o_swa) of mix_forward from do (any strides), by the
        _nsa_mix_bwd kernel, each in its input's dtype (contiguous); None where `needs` (gates, o_cmp,
        o_slc, o_swa) says no gradient is needed, and no launch where none is. d o_x = do g_x; d g_x
        = the sum over Dv of do o_x, in float32."""
        need_g, need_c, need_s, need_w = (bool(x) for x in needs)
        dg = torch.empty(gates.shape, dtype=gates.dtype, device=gates.device) if need_g else None
        dc, ds, dw = (torch.empty(x.shape, dtype=x.dtype, device=x.device) if need else None
                      for x, need in ((o_cmp, need_c), (o_slc, need_s), (o_swa, need_w)))
        B, Hq, N, Dv = o_slc.shape
        R = B * Hq * N
        if not (need_g or need_c or need_s or need_w) or not R or not Dv:
            if dg is not None:
                dg.zero_()  # no value dim: sums of nothing
            return dg, dc, ds, dw
        tile = self._mix_rows(Dv, 2048)
        self.mix_bwd_kernel[(-(-R // tile["BLOCK_R"]),)](
            do, gates, o_cmp, o_slc, o_swa, do if dc is None else dc, do if ds is None else ds,
            do if dw is None else dw, do if dg is None else dg, R, Hq, N, *do.stride(), *gates.stride(),
            *o_cmp.stride(), *o_slc.stride(), *o_swa.stride(), NEED_CMP=need_c, NEED_SLC=need_s, NEED_SWA=need_w,
            NEED_GATES=need_g, num_warps=4, **tile)
        return dg, dc, ds, dw
