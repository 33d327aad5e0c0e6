"""Verification of NSA modules (specs with an `nsa:` section) against attngen/reference_nsa.py:
the selection on its own (the forced blocks exactly, the rest as sets, a mismatch allowed only
between blocks of equal score, within the dtype's rounding), then the output and the gradients of q, k, v, the gates and the
compression weights, against the float64 reference run with the module's own selection (and eager
in the dtype, which sets the tolerance as in verify.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference_nsa
from .spec import Spec

# Scores this close (relative) may order either way: the module scores in float32 from compressed
# keys rounded to the dtype (its kernels' inputs), the reference in float64 from unrounded ones.
SCORE_RTOL = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 3e-2}


@dataclass(frozen=True)
class NSACase:
    batch: int
    heads_q: int
    heads_kv: int
    seq: int

    def __str__(self) -> str:
        return f"nsa B{self.batch} H{self.heads_q}/{self.heads_kv} N{self.seq}"


# On the CPU (the interpreter): early rows without a compressed token, GQA groups of 3 and 2; the
# top-n's choice and a binding window at these lengths are tests/test_nsa.py's (a spec with small
# counts). On the GPU: past 16 blocks of 64 and the 512-key window, GQA groups of 4, 1 and 16.
CPU_NSA = (NSACase(1, 3, 1, 77), NSACase(1, 2, 1, 300))
GPU_NSA = (NSACase(2, 16, 4, 2048), NSACase(1, 4, 4, 1500), NSACase(1, 16, 1, 1024))


def priority(scores: torch.Tensor, positions: torch.Tensor, nsa) -> torch.Tensor:
    """The selection's order of the blocks of rows at `positions` (1-d, scores' rows):
    forced blocks +inf, blocks after the row's own -inf, the others their score."""
    beta = torch.arange(scores.shape[-1], device=scores.device)
    own = (positions // nsa.select_block)[..., None].to(scores.device)
    forced = (beta < nsa.init_blocks) | ((beta > own - nsa.local_blocks) & (beta <= own))
    return torch.where(beta > own, -torch.inf, torch.where(forced, torch.inf, scores.double()))


def selection_agrees(ours: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, rtol: float = 1e-4) -> tuple[bool, int]:
    """(ok, rows that differ): per row, the blocks only one side chose must score alike, the best
    one the reference alone chose at most rtol (relative) above the worst one we alone chose.
    Given priorities (forced blocks +inf, ineligible ones -inf), a forced block must be chosen by
    both and an ineligible one by neither."""
    n_blocks = scores.shape[-1]

    def members(idx):
        m = torch.zeros(*idx.shape[:3], n_blocks + 1, dtype=torch.bool, device=idx.device)
        return m.scatter_(-1, torch.where(idx < 0, n_blocks, idx.long()), True)[..., :n_blocks]

    a, b = members(ours), members(ref.to(ours.device))
    differ = (a != b).any(-1)
    if not differ.any():
        return True, 0
    s = scores.to(ours.device)
    ours_worst = torch.where(a & ~b, s, torch.inf).amin(-1)
    ref_best = torch.where(b & ~a, s, -torch.inf).amax(-1)
    same_count = a.sum(-1) == b.sum(-1)
    finite = torch.isfinite(ours_worst) & torch.isfinite(ref_best)
    close = finite & (ref_best <= ours_worst + rtol * ours_worst.abs().clamp(min=1.0))
    ok = bool((same_count & close)[differ].all())
    return ok, int(differ.sum())


def check_nsa(spec: Spec, module, case: NSACase, dtype: str, device, seed: int = 0, backward: bool = True):
    from .verify import FACTOR, FLOOR, TORCH_DTYPES, Result

    n = spec.nsa
    g = torch.Generator(device=device).manual_seed(seed)
    tdt = TORCH_DTYPES[dtype]
    B, N = case.batch, case.seq
    mk = lambda *shape: torch.randn(*shape, generator=g, device=device).to(tdt)  # noqa: E731
    q, k, v = mk(B, case.heads_q, N, spec.head_dim), mk(B, case.heads_kv, N, spec.head_dim), \
        mk(B, case.heads_kv, N, spec.head_dim_v)
    gates = torch.rand(B, case.heads_q, N, 3, generator=g, device=device).to(tdt)
    inputs = [q, k, v, gates]
    if n.compress_kind == "linear":
        inputs += [mk(case.heads_kv, n.compress_block * e, e) * (n.compress_block * e) ** -0.5
                   for e in (spec.head_dim, spec.head_dim_v)]
    inputs = [x.requires_grad_(backward) for x in inputs]
    weights = tuple(inputs[4:]) or None
    o, indices = module.attention(*inputs[:3], gates=gates, compress_weights=weights, return_indices=True)
    do = torch.randn(o.shape, generator=g, device=device).to(tdt)
    grads = list(torch.autograd.grad(o, inputs, do)) if backward else []
    kw = dict(compress_block=n.compress_block, compress_stride=n.compress_stride, compress_kind=n.compress_kind,
              select_block=n.select_block, select_count=n.select_count, init_blocks=n.init_blocks,
              local_blocks=n.local_blocks, window=n.window, return_parts=True, indices=indices)

    def reference(dt):
        xs = [x.detach().to(dt).requires_grad_(backward) for x in inputs]
        parts = reference_nsa.nsa_attention(*xs[:4], w_k=xs[4] if weights else None, w_v=xs[5] if weights else None,
                                            dtype=dt, **kw)
        return parts, (list(torch.autograd.grad(parts["o"], xs, do.to(dt))) if backward else [])

    (ref, ref_grads), (eager, eager_grads) = reference(torch.float64), reference(tdt)
    names = ["o", "dq", "dk", "dv", "dgates", "dw_k", "dw_v"]
    errors, why = [], []
    rank = priority(ref["scores"], torch.arange(N, device=device), n)
    selected_ok, differ = selection_agrees(indices, ref["indices"], rank, SCORE_RTOL[dtype])
    if not selected_ok:
        why.append(f"the selection differs from the reference's beyond equal scores ({differ} rows differ)")
    scale = ref["o"].abs().max().item()
    grad_scale = max((r.abs().max().item() for r in ref_grads[:3]), default=0.0)
    for name, got, want, base in zip(names, [o] + grads, [ref["o"]] + ref_grads, [eager["o"]] + eager_grads):
        want = want.detach()
        err = float((got.detach().double() - want).abs().max()) if got.numel() else 0.0
        eager_err = float((base.detach().double() - want).abs().max()) if got.numel() else 0.0
        errors.append((name, err, eager_err))
        magnitude = scale if name == "o" else max(grad_scale, want.abs().max().item())
        floor = FLOOR[dtype] * max(1.0, magnitude)
        if not err <= FACTOR * eager_err + floor:
            why.append(f"{name} error {err:.2e} > {FACTOR} x eager {eager_err:.2e} + {floor:.0e}")
    if any(t.isnan().any() for t in [o] + grads):
        why.append("NaN in output or gradients")
    return Result(spec.name, dtype, case, tuple(errors), not why, "; ".join(why))


@dataclass(frozen=True)
class NSADecode:
    """NSA decoding: n_q tokens appended to caches of these lengths (capacity keys each), paged in
    shuffled pages of `page` tokens when page > 0; `fused`: with NSAModule.fused_decode (the
    compressed cache's update, the compressed branch and the selection in kernels)."""
    heads_q: int
    heads_kv: int
    n_q: int
    lengths: tuple[int, ...]
    capacity: int
    page: int = 0
    fused: bool = False

    def __str__(self) -> str:
        return (f"nsa decode H{self.heads_q}/{self.heads_kv} Nq {self.n_q}, {len(self.lengths)} seqs to "
                f"{max(self.lengths)}" + (f", pages of {self.page}" if self.page else "")
                + (", fused_decode" if self.fused else ""))


CPU_NSA_DECODE = (NSADecode(4, 2, 3, (0, 30, 149), 160), NSADecode(4, 2, 2, (47, 140), 160, page=16),  # 30: a window ends among the new rows
                  NSADecode(4, 2, 2, (47, 140), 160, page=16, fused=True))
# windows end at the new rows of 4095 and 3005 (positions 4095 and 3007)
GPU_NSA_DECODE = (NSADecode(16, 4, 1, (100, 2000, 4095), 4096), NSADecode(16, 1, 4, (1000, 3005), 3072 + 64),
                  NSADecode(16, 4, 1, (100, 2000, 4095), 4096, page=16),
                  NSADecode(16, 4, 1, (100, 2000, 4095), 4096, fused=True),
                  NSADecode(16, 1, 4, (1000, 3005), 3072 + 64, page=16, fused=True),
                  NSADecode(16, 4, 128, (0, 1000, 3900), 4096, page=64, fused=True))  # chunked prefill


def check_nsa_decode(spec: Spec, module, case: NSADecode, dtype: str, device, seed: int = 0):
    """attention_with_kvcache of an NSA module (appending, the compressed cache updated in place)
    against the reference's rows at those positions of each whole sequence; the selection as sets
    (ties within the dtype's rounding allowed)."""
    from .verify import FACTOR, FLOOR, TORCH_DTYPES, Result

    n, rt = spec.nsa, module.RUNTIME
    g = torch.Generator(device=device).manual_seed(seed)
    tdt = TORCH_DTYPES[dtype]
    B, D, Dv, S, Nq = len(case.lengths), spec.head_dim, spec.head_dim_v, case.capacity, case.n_q
    mk = lambda *shape: torch.randn(*shape, generator=g, device=device).to(tdt)  # noqa: E731
    k_cache, v_cache = mk(B, case.heads_kv, S, D), mk(B, case.heads_kv, S, Dv)
    weights = None
    if n.compress_kind == "linear":
        weights = tuple(mk(case.heads_kv, n.compress_block * e, e) * (n.compress_block * e) ** -0.5 for e in (D, Dv))
    before = torch.tensor(case.lengths, dtype=torch.int32, device=device)
    table, caches = None, (k_cache, v_cache)
    if case.page:  # the same rows in shuffled pages [pages, page, Hkv, *]
        from .verify import paged

        per_seq = -(-S // case.page)
        table = torch.randperm(B * per_seq, generator=g, device=device).to(torch.int32).reshape(B, per_seq)
        caches = tuple(paged(c, case.page, table) for c in caches)
    cmp_cache = rt.compressed_cache(*caches, before, weights, block_table=table)
    q, k_new, v_new = mk(B, case.heads_q, Nq, D), mk(B, case.heads_kv, Nq, D), mk(B, case.heads_kv, Nq, Dv)
    gates = torch.rand(B, case.heads_q, Nq, 3, generator=g, device=device).to(tdt)
    saved, rt.fused_decode = rt.fused_decode, case.fused
    try:
        o, indices = module.attention_with_kvcache(q, *caches, cache_seqlens=before, gates=gates, cmp_cache=cmp_cache,
                                                   k=k_new, v=v_new, compress_weights=weights, return_indices=True,
                                                   block_table=table)
    finally:
        rt.fused_decode = saved
    if case.page:  # the reference reads the appended rows back in sequence order
        from .runtime.nsa_decode import _rows

        positions = torch.arange(S, device=device).expand(B, S)
        k_cache, v_cache = (_rows(c, table, positions) for c in caches)
    kw = dict(compress_block=n.compress_block, compress_stride=n.compress_stride, compress_kind=n.compress_kind,
              select_block=n.select_block, select_count=n.select_count, init_blocks=n.init_blocks,
              local_blocks=n.local_blocks, window=n.window, return_parts=True)
    errs, eager_errs, why, differ = [], [], [], 0
    for b, L in enumerate(int(x) + Nq for x in case.lengths):
        q_full = mk(1, case.heads_q, L, D)
        q_full[:, :, -Nq:] = q[b]
        gates_full = torch.rand(1, case.heads_q, L, 3, generator=g, device=device).to(tdt)
        gates_full[:, :, -Nq:] = gates[b]
        args = (q_full, k_cache[b:b + 1, :, :L], v_cache[b:b + 1, :, :L], gates_full)
        w = {"w_k": weights[0], "w_v": weights[1]} if weights else {}
        ref = reference_nsa.nsa_attention(*args, **w, **kw)
        eager = reference_nsa.nsa_attention(*args, **w, dtype=tdt, **kw)["o"]
        rows = slice(max(0, L - Nq), L)
        got = o[b][:, Nq - (rows.stop - rows.start):]
        errs.append(float((got.double() - ref["o"][0, :, rows]).abs().max()) if got.numel() else 0.0)
        eager_errs.append(float((eager[0, :, rows].double() - ref["o"][0, :, rows]).abs().max()) if got.numel() else 0.0)
        mine = indices[b:b + 1, :, Nq - (rows.stop - rows.start):]
        ref_idx = ref["indices"][:, :, rows]
        width = max(mine.shape[-1], ref_idx.shape[-1])
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=-1)  # noqa: E731
        rank = priority(ref["scores"][:, :, rows], torch.arange(rows.start, rows.stop, device=device), n)
        ok, d = selection_agrees(pad(mine), pad(ref_idx), rank, SCORE_RTOL[dtype])
        differ += d
        if not ok:
            why.append(f"sequence {b}: the selection differs beyond equal scores")
    err, eager_err = max(errs), max(eager_errs)
    floor = FLOOR[dtype] * max(1.0, float(o.abs().max()))
    if not err <= FACTOR * eager_err + floor:
        why.append(f"o error {err:.2e} > {FACTOR} x eager {eager_err:.2e} + {floor:.0e}")
    if o.isnan().any():
        why.append("NaN in output")
    return Result(spec.name, dtype, case, (("o", err, eager_err),), not why, "; ".join(why))
