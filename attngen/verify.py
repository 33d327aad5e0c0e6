"""Verification: a generated kernel against the float64 reference, on a matrix of shapes and dtypes.

Tolerance in the manner of FlexAttention's tests: the kernel's error against float64 must be at
most FACTOR x the error of an eager PyTorch computation in the same dtype, plus a tiny floor
(FLOOR x the quantity's magnitude; for the temperature's gradient, a sum whose terms cancel, at least
the root-sum-square of its terms); NaN never passes, and rows with no visible key must be exactly zero with LSE = -inf.
Outputs are poisoned with NaN before each run, so an element the kernel never wrote fails.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from . import reference, runtime
from .loader import load
from .spec import Spec, load_spec

FACTOR = 3.0
FLOOR = {"fp32": 1e-6, "fp16": 1e-5, "bf16": 1e-4}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    layout: str = "bhnd"  # "bnhd": q, k, v are [B, N, H, D] tensors seen through a permute (strided)

    def __str__(self) -> str:
        s = f"B{self.batch} H{self.heads_q}/{self.heads_kv} {self.seq_q}x{self.seq_k}"
        return s + (" strided" if self.layout == "bnhd" else "")


# The interpreter is slow: many small, ragged shapes, Nq != Nk both ways, GQA, strided inputs.
CPU_SHAPES = (
    Shape(1, 2, 1, 37, 53),
    Shape(2, 2, 2, 70, 30, "bnhd"),
    Shape(1, 4, 2, 128, 128),
    Shape(1, 1, 1, 1, 65),
    Shape(1, 2, 1, 150, 300),
)
# Realistic sizes for the GPU, up to 8k tokens.
GPU_SHAPES = (
    Shape(4, 16, 16, 1024, 1024),
    Shape(2, 16, 4, 2048, 2048, "bnhd"),
    Shape(1, 8, 2, 4096, 4096),
    Shape(1, 4, 1, 8192, 8192),
    Shape(2, 8, 8, 1000, 3000),
    Shape(2, 8, 2, 3000, 1000),
    Shape(1, 4, 4, 777, 777),
)


@dataclass(frozen=True)
class Packed:
    """A varlen case: packed sequences of these query and key lengths (attention_varlen)."""
    heads_q: int
    heads_kv: int
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]

    def __str__(self) -> str:
        return f"varlen H{self.heads_q}/{self.heads_kv} {len(self.lens_q)} seqs, {sum(self.lens_q)}x{sum(self.lens_k)}"


# Lengths 0 and 1, Nq_i != Nk_i both ways, GQA; on the GPU up to 4k-token sequences.
CPU_PACKED = (Packed(2, 1, (37, 0, 1, 80), (53, 5, 0, 80)), Packed(4, 2, (130, 64), (64, 200)))
GPU_PACKED = (Packed(16, 4, (1000, 0, 1, 3000, 517), (1000, 7, 0, 3000, 2049)),
              Packed(8, 8, (4096, 100, 2000), (4096, 100, 2000)), Packed(8, 2, (300,) * 20, (900,) * 20))


@dataclass(frozen=True)
class Decode:
    """A decoding case: attention_with_kvcache, n_q queries per sequence, caches of these lengths
    (capacity keys each; page_size > 0: paged, the pages shuffled)."""
    heads_q: int
    heads_kv: int
    n_q: int
    lengths: tuple[int, ...]
    capacity: int
    page_size: int = 0

    def __str__(self) -> str:
        paged = f", pages of {self.page_size}" if self.page_size else ""
        return f"decode H{self.heads_q}/{self.heads_kv} Nq {self.n_q}, {len(self.lengths)} seqs to {max(self.lengths)}{paged}"


# Lengths 0 and 1, fewer keys than queries, contexts past a window, GQA groups of 1 to 8, paged and not.
CPU_DECODE = (Decode(4, 2, 1, (0, 1, 90), 100), Decode(4, 1, 3, (2, 270), 288, 16))
GPU_DECODE = (Decode(32, 8, 1, (0, 1, 300, 4000, 8191), 8192), Decode(32, 8, 1, (32768,), 32768, 64),
              Decode(16, 2, 4, (3, 2048, 5000), 5120, 16), Decode(32, 4, 16, (17, 3000), 3072, 256),
              Decode(8, 8, 1, (1000,) * 8, 1024))


@dataclass(frozen=True)
class Result:
    spec: str
    dtype: str
    shape: Shape | Packed | Decode
    errors: tuple[tuple[str, float, float], ...]  # (quantity, max |kernel - ref|, max |eager - ref|)
    ok: bool
    why: str = ""


def random_inputs(spec: Spec, shape: Shape, dtype: torch.dtype, device, generator: torch.Generator):
    def make(h: int, n: int, d: int) -> torch.Tensor:
        if shape.layout == "bnhd":
            t = torch.randn(shape.batch, n, h, d, generator=generator, device=device, dtype=torch.float32)
            return t.to(dtype).permute(0, 2, 1, 3)
        return torch.randn(shape.batch, h, n, d, generator=generator, device=device, dtype=torch.float32).to(dtype)

    return (make(shape.heads_q, shape.seq_q, spec.head_dim), make(shape.heads_kv, shape.seq_k, spec.head_dim),
            make(shape.heads_kv, shape.seq_k, spec.head_dim_v))


def random_documents(shape: Shape, device, generator: torch.Generator, sorted_: bool = True):
    """Document ids (q_ids [B, Nq], kv_ids [B, Nk]) for a `document` mask: per batch, sorted runs of
    random lengths (packed sequences: at least three, about 100 positions on average, some much
    longer, so that tiles inside one document occur), or with sorted_=False ids 0-2 in any order; drawn for queries
    and keys apart, so when Nq != Nk a query's document can have no key (a row that sees nothing)."""
    def ids(n: int) -> torch.Tensor:
        if not sorted_:
            return torch.randint(0, 3, (shape.batch, n), generator=generator, device=device)
        return reference.documents_at_cuts(shape.batch, n, max(2, n // 100), generator)
    q_ids = ids(shape.seq_q)
    kv_ids = q_ids if shape.seq_q == shape.seq_k else ids(shape.seq_k)
    return q_ids, kv_ids


def _reference(spec: Spec, q, k, v, slopes, keep, dtype, do=None, documents=None, temperature=None, layout=None,
               budget_bytes: float = 8e9):
    """o, lse, given do (dq, dk, dv[, dtemperature]) and, in float64 with a temperature, the root-sum-square
    of dtemperature's Nq x Nk terms per head (else None); computed in `dtype` over chunks of whole GQA
    groups of heads, each chunk's score matrices within `budget_bytes`. Gradients come from autograd."""
    B, Hq, Nq, _ = q.shape
    Nk, group = k.shape[2], Hq // k.shape[1]
    # dtemperature's terms: a float64 temperature per score, whose gradient they are
    per_score = temperature is not None and do is not None and dtype == torch.float64
    per_head = max(1, Nq * Nk) * 8 * (8 if per_score else 6)  # a few float64 score-sized tensors kept for autograd
    chunk = max(1, int(budget_bytes // per_head) // group) * group
    o = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=torch.float64, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float64, device=q.device)
    grads = [torch.zeros(t.shape, dtype=torch.float64, device=q.device) for t in (q, k, v)]
    dtemp, squares = (torch.zeros(Hq, dtype=torch.float64, device=q.device) for _ in range(2))
    for b in range(B):
        for h0 in range(0, Hq, chunk):
            h1 = min(h0 + chunk, Hq)
            heads = (slice(h0, h1), slice(h0 // group, h1 // group), slice(h0 // group, h1 // group))
            leaves = [t[b:b + 1, hs].detach().to(dtype).requires_grad_(do is not None) for t, hs in zip((q, k, v), heads)]
            temp = None if temperature is None else temperature[h0:h1].detach().double()
            if per_score:
                temp = temp[None, :, None, None].expand(1, h1 - h0, Nq, Nk).clone()
            if temp is not None:
                temp.requires_grad_(do is not None)
            with torch.set_grad_enabled(do is not None):
                ob, lb = reference.attention(spec, *leaves, dtype=dtype,
                                             alibi_slopes_=slopes[h0:h1] if slopes is not None else None,
                                             keep=keep[b:b + 1, h0:h1] if keep is not None else None,
                                             documents=None if documents is None else tuple(d[b:b + 1] for d in documents),
                                             temperature=temp, layout=_rows(layout, b, h0, h1), heads=Hq, head_offset=h0)
                if do is not None:
                    ob.backward(do[b:b + 1, h0:h1].to(dtype))
            o[b, h0:h1], lse[b, h0:h1] = ob[0].detach(), lb[0].detach()
            if do is not None:
                for g, leaf, hs in zip(grads, leaves, heads):
                    g[b, hs] = leaf.grad[0].double()
                if per_score:
                    dtemp[h0:h1] += temp.grad.sum((0, 2, 3))
                    squares[h0:h1] += temp.grad.square().sum((0, 2, 3))
                elif temp is not None:
                    dtemp[h0:h1] += temp.grad
    return (o, lse, grads + ([dtemp] if temperature is not None and do is not None else []),
            squares.sqrt() if per_score else None)


def _rows(layout, b: int, h0: int, h1: int):
    """A block layout [B or 1, H or 1, ..] cut to batch b and heads [h0, h1) where not broadcast."""
    if layout is None:
        return None
    layout = layout[b:b + 1] if layout.shape[0] > 1 else layout
    return layout[:, h0:h1] if layout.shape[1] > 1 else layout


def random_layout(spec: Spec, shape: Shape, device, generator, seed: int) -> torch.Tensor:
    """A call-time block layout: the block diagonal and about 40% of the other blocks, per batch
    and head on even seeds and broadcast over one of them on odd ones; with two query blocks or
    more, the last of the first batch sees nothing (zeros and LSE -inf)."""
    bq, bk = spec.sparsity.block
    n_b, n_h = (shape.batch, shape.heads_q) if seed % 2 == 0 else ((1, shape.heads_q) if seed % 4 == 1 else (shape.batch, 1))
    n_qb, n_kb = -(-shape.seq_q // bq), -(-shape.seq_k // bk)
    diagonal = torch.eye(n_qb, n_kb, dtype=torch.bool, device=device)
    layout = (torch.rand(n_b, n_h, n_qb, n_kb, generator=generator, device=device) < 0.4) | diagonal
    if n_qb > 1:
        layout[0, :, -1] = False
    return layout


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN included: an unwritten element is blamed on the kernel, not here)."""
    a, b = a.detach().contiguous(), b.detach().contiguous()
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check(spec: Spec, module, shape: Shape, dtype: str, device, seed: int = 0, backward: bool = False,
          deterministic: bool | None = None) -> Result:
    """The kernels against the float64 reference at one shape; deterministic picks the backward's
    form (None: the module's default; the single pass's gradients are not bitwise repeatable, so
    only its outputs must match a repeated call)."""
    g = torch.Generator(device=device).manual_seed(seed)
    tdt = TORCH_DTYPES[dtype]
    q, k, v = random_inputs(spec, shape, tdt, device, g)
    slopes = None
    if spec.score.alibi:  # alternately random and geometric slopes, passed at call time
        slopes = torch.rand(shape.heads_q, generator=g, device=device) if seed % 2 else reference.alibi_slopes(shape.heads_q).to(device)
    kwargs = {"alibi_slopes": slopes} if slopes is not None else {}
    temperature = None
    if spec.score.temperature:  # a learned per-head factor: its gradient is checked too
        temperature = torch.rand(shape.heads_q, generator=g, device=device) + 0.5
    documents = None
    if spec.mask.document:  # sorted runs (packed sequences) and, on odd seeds, ids in any order
        documents = random_documents(shape, device, g, sorted_=seed % 2 == 0)
        kwargs["documents"] = documents
    layout = None
    if spec.sparsity is not None and spec.sparsity.runtime:
        layout = kwargs["layout"] = random_layout(spec, shape, device, g, seed)
    dropout_seed = 1000 + seed
    keep = (module.dropout_keep_mask(shape.batch, shape.heads_q, shape.seq_q, shape.seq_k, dropout_seed, device)
            if spec.dropout else None)
    do = None
    if backward:
        do = torch.randn(q.shape[:3] + (spec.head_dim_v,), generator=g, device=device, dtype=torch.float32).to(tdt)

    def run():
        if backward:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            extra = {}
            if temperature is not None:
                extra["temperature"] = temperature.detach().requires_grad_()
                leaves.append(extra["temperature"])
            o, lse = module.attention(*leaves[:3], return_lse=True, dropout_seed=dropout_seed,
                                      deterministic=deterministic, **kwargs, **extra)
            o.backward(do)
            return o.detach(), lse, [t.grad for t in leaves]
        # poison the output so an element the kernel never wrote shows as NaN
        out = torch.full(q.shape[:3] + (spec.head_dim_v,), float("nan"), dtype=tdt, device=device)
        extra = {} if temperature is None else {"temperature": temperature}
        return (*module.attention(q, k, v, return_lse=True, out=out, dropout_seed=dropout_seed, **kwargs, **extra), [])

    rt = runtime.of(module)
    direct = rt.direct
    if direct:
        rt.plans.clear()  # so that the first call launches through Triton
    o, lse, got = run()
    # On an NVIDIA GPU a signature's later calls launch the compiled kernels directly (the module's
    # _Plan), the first through Triton: the two must agree bit for bit.
    repeat_differs = False
    if direct:
        o2, lse2, got2 = run()
        n = 2 if _single_pass(module) else None  # atomics: gradients in any order
        repeat_differs = not all(_same_bits(a, b) for a, b in list(zip((o, lse, *got), (o2, lse2, *got2)))[:n])
    ref = _reference(spec, q, k, v, slopes, keep, torch.float64, do, documents, temperature, layout)
    eager = _reference(spec, q, k, v, slopes, keep, tdt, do, documents, temperature, layout)
    result = _judge(spec, dtype, shape, (o, lse, got), ref, eager, repeat_differs)
    return _labelled(result, module) if backward else result


def _single_pass(module) -> bool:
    """Whether the latest backward ran the single pass (a tiling may fall back to the two kernels)."""
    return runtime.of(module).last_backward == "single pass"


def _labelled(result: Result, module) -> Result:
    """The result with the backward form that ran in the spec column (verify --backward runs both)."""
    form = runtime.of(module).last_backward or "two kernels"  # e.g. "two kernels, dK/dV in Gluon"
    return dataclasses.replace(result, spec=f"{result.spec} ({form})")


def _judge(spec: Spec, dtype: str, shape, kernel, ref, eager, repeat_differs: bool) -> Result:
    """The verdict on the kernel's (o, lse, grads) against the float64 reference's and eager's
    (each o, lse, grads and the root-sum-square of dtemperature's terms or None)."""
    (o, lse, got), (ref_o, ref_lse, ref_grads, ref_terms), (eager_o, eager_lse, eager_grads, _) = kernel, ref, eager

    def max_err(a, b):
        return float((a.detach().double() - b).abs().max()) if a.numel() else 0.0

    dead = torch.isneginf(ref_lse)  # rows with no visible key
    errors = [("o", max_err(o, ref_o), max_err(eager_o, ref_o)),
              ("lse", max_err(lse[~dead], ref_lse[~dead]), max_err(eager_lse[~dead], ref_lse[~dead]))]
    errors += [(name, max_err(a, r), max_err(e, r))
               for name, a, r, e in zip(("dq", "dk", "dv", "dtemp"), got, ref_grads, eager_grads)]
    why = []
    if any(t.isnan().any() for t in [o, lse] + got):
        why.append("NaN in output (unwritten or invalid)")
    if repeat_differs:
        why.append("a repeated call (a direct launch) differs from the first")
    # The floor is in units of the quantity's magnitude: gradients share one scale, so a gradient
    # that is exactly zero in float64 (one visible key: softmax has no slope) gets the same floor.
    magnitude = {"o": ref_o.abs().max().item() if ref_o.numel() else 0.0, "lse": 10.0}
    magnitude.update(dict.fromkeys(("dq", "dk", "dv"), max((r.abs().max().item() for r in ref_grads[:3] if r.numel()), default=0.0)))
    magnitude["dtemp"] = ref_grads[3].abs().max().item() if len(ref_grads) > 3 else 0.0
    # dtemperature sums Nq x Nk terms that cancel (a softmax Jacobian's row sums to zero) but whose
    # rounding errors add up in quadrature: its scale is the terms' root-sum-square where larger
    if ref_terms is not None and ref_terms.numel():
        magnitude["dtemp"] = max(magnitude["dtemp"], ref_terms.max().item())
    for name, err, eager in errors:
        floor = (FLOOR["fp32"] if name == "lse" else FLOOR[dtype]) * max(1.0, magnitude[name])
        if err > FACTOR * eager + floor:
            why.append(f"{name} error {err:.2e} > {FACTOR} x eager {eager:.2e} + {floor:.0e}")
    if dead.any() and not (bool(torch.isneginf(lse[dead]).all()) and bool((o.detach()[dead] == 0).all())):
        why.append("rows with no visible key must give zeros and lse = -inf")
    return Result(spec.name, dtype, shape, tuple(errors), not why, "; ".join(why))


def check_varlen(spec: Spec, module, case: Packed, dtype: str, device, seed: int = 0, backward: bool = False,
                 deterministic: bool | None = None) -> Result:
    """attention_varlen on packed sequences against the reference run on each sequence alone."""
    g = torch.Generator(device=device).manual_seed(seed)
    tdt = TORCH_DTYPES[dtype]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
                  for lens in (case.lens_q, case.lens_k))
    B, tq, tk = len(case.lens_q), int(cu_q[-1]), int(cu_k[-1])
    mk = lambda n, h, d: torch.randn(n, h, d, generator=g, device=device).to(tdt)  # noqa: E731
    q, k, v = mk(tq, case.heads_q, spec.head_dim), mk(tk, case.heads_kv, spec.head_dim), mk(tk, case.heads_kv, spec.head_dim_v)
    kwargs, slopes, temperature, ids, layout, keep = {}, None, None, None, None, None
    if spec.score.alibi:
        slopes = kwargs["alibi_slopes"] = torch.rand(case.heads_q, generator=g, device=device)
    if spec.score.temperature:
        temperature = torch.rand(case.heads_q, generator=g, device=device) + 0.5
    if spec.mask.document:  # ids of the packed tokens: three runs within each sequence, for queries and keys apart
        ids = kwargs["documents"] = tuple(torch.cat([torch.arange(n, device=device) * 3 // max(n, 1) + 10 * i
                                                     for i, n in enumerate(lens)]).to(torch.int32)
                                          for lens in (case.lens_q, case.lens_k))
    if spec.sparsity is not None and spec.sparsity.runtime:
        bq, bk = spec.sparsity.block
        layout = kwargs["layout"] = torch.rand(B, case.heads_q, -(-max(case.lens_q) // bq), -(-max(case.lens_k) // bk),
                                               generator=g, device=device) < 0.5
    dropout_seed = 1000 + seed
    if spec.dropout:  # the kernels' keep-mask of sequence i: batch entry i of the longest shape's
        keep = module.dropout_keep_mask(B, case.heads_q, max(case.lens_q), max(case.lens_k), dropout_seed, device)
    do = torch.randn(tq, case.heads_q, spec.head_dim_v, generator=g, device=device).to(tdt) if backward else None

    def run():
        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
        extra = {}
        if temperature is not None:
            extra["temperature"] = temperature.detach().requires_grad_(backward)
        o, lse = runtime.of(module).attention_varlen(*leaves, cu_q, cu_k, max(case.lens_q), max(case.lens_k), return_lse=True,
                                         dropout_seed=dropout_seed, deterministic=deterministic, **kwargs, **extra)
        got = []
        if backward:
            o.backward(do)
            got = [t.grad for t in leaves] + ([extra["temperature"].grad] if temperature is not None else [])
        return o.detach(), lse, got

    rt = runtime.of(module)
    if rt.direct:
        rt.plans.clear()  # so that the first call launches through Triton, the second directly
    o, lse, got = run()
    repeat_differs = False
    if rt.direct:
        o2, lse2, got2 = run()
        n = 2 if _single_pass(module) else None  # atomics: gradients in any order
        repeat_differs = not all(_same_bits(a, b) for a, b in list(zip((o, lse, *got), (o2, lse2, *got2)))[:n])

    def packed_reference(dtype_):
        ro = torch.zeros(tq, case.heads_q, spec.head_dim_v, dtype=torch.float64, device=device)
        rl = torch.full((case.heads_q, tq), float("-inf"), dtype=torch.float64, device=device)
        grads = [torch.zeros(t.shape, dtype=torch.float64, device=device) for t in (q, k, v)]
        dtemp, squares = (torch.zeros(case.heads_q, dtype=torch.float64, device=device) for _ in range(2))
        for i, (nq, nk) in enumerate(zip(case.lens_q, case.lens_k)):
            q0, k0 = int(cu_q[i]), int(cu_k[i])
            if nq == 0 or nk == 0:  # nothing to see: zeros, -inf and zero gradients, as initialized
                continue
            cut = lambda t, s, n: t[s:s + n].transpose(0, 1)[None]  # noqa: E731
            doc = None if ids is None else (ids[0][q0:q0 + nq][None], ids[1][k0:k0 + nk][None])
            lay = None if layout is None else layout[i:i + 1, :, :-(-nq // bq), :-(-nk // bk)]
            kp = None if keep is None else keep[i:i + 1, :, :nq, :nk]
            o_i, l_i, g_i, terms_i = _reference(spec, cut(q, q0, nq), cut(k, k0, nk), cut(v, k0, nk), slopes, kp,
                                                dtype_, None if do is None else cut(do, q0, nq), doc, temperature, lay)
            ro[q0:q0 + nq], rl[:, q0:q0 + nq] = o_i[0].transpose(0, 1), l_i[0]
            for g_, part, s0, n in zip(grads, g_i, (q0, k0, k0), (nq, nk, nk)):
                g_[s0:s0 + n] = part[0].transpose(0, 1)
            if len(g_i) > 3:
                dtemp += g_i[3]
            if terms_i is not None:
                squares += terms_i.square()
        terms = squares.sqrt() if temperature is not None and backward and dtype_ == torch.float64 else None
        return ro.transpose(0, 1), rl, grads + ([dtemp] if temperature is not None and backward else []), terms
    # o as [Hq, total_q, Dv], row for row with lse [Hq, total_q]
    result = _judge(spec, dtype, case, (o.transpose(0, 1), lse, got), packed_reference(torch.float64),
                    packed_reference(tdt), repeat_differs)
    return _labelled(result, module) if backward else result


def paged(cache: torch.Tensor, page_size: int, table: torch.Tensor) -> torch.Tensor:
    """A contiguous cache [B, Hkv, S, D] as pages [pages, page_size, Hkv, D]: sequence b's page i at
    table[b, i] (int32 [B, ceil(S / page_size)], a permutation of the pages)."""
    B, Hkv, S, D = cache.shape
    per_seq = table.shape[1]
    padded = torch.zeros(B, Hkv, per_seq * page_size, D, dtype=cache.dtype, device=cache.device)
    padded[:, :, :S] = cache
    pages = torch.empty(B * per_seq, page_size, Hkv, D, dtype=cache.dtype, device=cache.device)
    pages[table.reshape(-1).long()] = padded.reshape(B, Hkv, per_seq, page_size, D).permute(0, 2, 3, 1, 4) \
        .reshape(-1, page_size, Hkv, D)
    return pages


def check_decode(spec: Spec, module, case: Decode, dtype: str, device, seed: int = 0) -> Result:
    """attention_with_kvcache against the float64 decoding reference (and eager in the dtype)."""
    g = torch.Generator(device=device).manual_seed(seed)
    tdt = TORCH_DTYPES[dtype]
    B = len(case.lengths)
    mk = lambda h, n, d: torch.randn(B, h, n, d, generator=g, device=device).to(tdt)  # noqa: E731
    q = mk(case.heads_q, case.n_q, spec.head_dim)
    k_cache, v_cache = mk(case.heads_kv, case.capacity, spec.head_dim), mk(case.heads_kv, case.capacity, spec.head_dim_v)
    lengths = torch.tensor(case.lengths, dtype=torch.int32, device=device)
    kwargs, ref_kw = {}, {}
    if spec.score.alibi:
        kwargs["alibi_slopes"] = ref_kw["alibi_slopes_"] = torch.rand(case.heads_q, generator=g, device=device)
    if spec.score.temperature:
        kwargs["temperature"] = ref_kw["temperature"] = torch.rand(case.heads_q, generator=g, device=device) + 0.5
    if spec.mask.document:  # documents of 1 to 200 positions, cut differently per sequence
        ids = torch.sort(torch.randint(0, max(2, case.capacity // 100), (B, case.capacity), generator=g,
                                       device=device), dim=1).values
        pos = (lengths.long()[:, None] - case.n_q + torch.arange(case.n_q, device=device)).clamp(0, case.capacity - 1)
        kwargs["documents"], ref_kw["documents"] = ids, (ids.gather(1, pos), ids)
    if spec.sparsity is not None and spec.sparsity.runtime:  # over the cache's positions, as decoding takes it
        bq, bk = spec.sparsity.block
        shape = (B, case.heads_q, -(-case.capacity // bq), -(-case.capacity // bk))
        kwargs["layout"] = ref_kw["layout"] = torch.rand(*shape, generator=g, device=device) < 0.4
    kc, vc, table = k_cache, v_cache, None
    if case.page_size:
        per_seq = -(-case.capacity // case.page_size)
        table = torch.randperm(B * per_seq, generator=g, device=device).reshape(B, per_seq).to(torch.int32)
        kc, vc = paged(k_cache, case.page_size, table), paged(v_cache, case.page_size, table)
    with torch.no_grad():
        o, lse = module.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, block_table=table, return_lse=True,
                                               **kwargs)
        o2, lse2 = module.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, block_table=table, return_lse=True,
                                                 **kwargs)
    repeat_differs = not (_same_bits(o, o2) and _same_bits(lse, lse2))
    ref = (*reference.decode(spec, q, k_cache, v_cache, lengths, **ref_kw), [], None)
    eager = (*reference.decode(spec, q, k_cache, v_cache, lengths, dtype=tdt, **ref_kw), [], None)
    return _judge(spec, dtype, case, (o, lse, []), ref, eager, repeat_differs)


def verify_spec(path: str | Path, *, device=None, dtypes=None, shapes=None, target: str = "sm90",
                backward: bool = False, varlen: bool = False, decode: bool = False,
                options: tuple[str, ...] = ()) -> list[Result]:
    """`options`: PassOptions flags compiled on, NAME, or off, NAME=false (an option's kernels
    verified before it is a default, or the other form after)."""
    from .tools.ab import flag_values

    spec = load_spec(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = load(path, target=target, **flag_values(options))
    dtypes = [d for d in (dtypes or spec.dtypes) if d in spec.dtypes]
    if spec.nsa is not None:  # NSA modules: attention and decoding (no varlen yet)
        from .verify_nsa import CPU_NSA, CPU_NSA_DECODE, GPU_NSA, GPU_NSA_DECODE, check_nsa, check_nsa_decode

        if varlen:
            return []
        if decode:
            cases = shapes or (GPU_NSA_DECODE if device.type == "cuda" else CPU_NSA_DECODE)
            return [check_nsa_decode(spec, module, c, d, device, seed=i) for d in dtypes for i, c in enumerate(cases)]
        cases = shapes or (GPU_NSA if device.type == "cuda" else CPU_NSA)
        return [check_nsa(spec, module, c, d, device, seed=i, backward=backward) for d in dtypes
                for i, c in enumerate(cases)]
    # --backward runs both backward forms (a spec with a learnable head parameter has only the two kernels)
    forms = (True, False) if backward and not runtime.of(module).n_grads else (None,)
    if decode:
        cases = shapes or (GPU_DECODE if device.type == "cuda" else CPU_DECODE)
        return [check_decode(spec, module, c, d, device, seed=i) for d in dtypes for i, c in enumerate(cases)]
    if varlen:
        cases = shapes or (GPU_PACKED if device.type == "cuda" else CPU_PACKED)
        return [check_varlen(spec, module, c, d, device, seed=i, backward=backward, deterministic=det)
                for det in forms for d in dtypes for i, c in enumerate(cases)]
    if shapes is None:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    return [check(spec, module, s, d, device, seed=i, backward=backward, deterministic=det)
            for det in forms for d in dtypes for i, s in enumerate(shapes)]


def format_table(results: list[Result]) -> str:
    """Markdown: each quantity's max error against float64, kernel / eager same-dtype; a new table
    wherever the quantities change (NSA modules have gates' and weights' gradients)."""
    lines, names = [], None
    for r in results:
        if [n for n, _, _ in r.errors] != names:
            names = [n for n, _, _ in r.errors]
            lines += [""] * bool(lines) + [
                "| spec | dtype | shape | " + " | ".join(f"{n} err (eager)" for n in names) + " | result |",
                "|---|---|---|" + "---|" * len(names) + "---|"]
        verdict = "ok" if r.ok else f"FAIL: {r.why}"
        cells = " | ".join(f"{e:.1e} ({x:.1e})" for _, e, x in r.errors)
        lines.append(f"| {r.spec} | {r.dtype} | {r.shape} | {cells} | {verdict} |")
    if not lines:
        lines = ["| spec | dtype | shape | result |", "|---|---|---|---|"]
    return "\n".join(lines) + "\n"
