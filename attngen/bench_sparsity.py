"""Benchmarks of sparsity (issue 15), on a GPU, peers in the same process:

- block-sparse specs beside FlexAttention given the same blocks (a BlockMask made with
  `from_kv_blocks` from the layout and the element mask's block classes: the equivalent BlockMask,
  with the spec's mask as its mask_mod) and, for a layout per call, beside the same module with
  every block visible (full density);
- the layout build: a BlockMask and the tables of a training step, time and peak memory;
- packed sequences beside FlashAttention-2's varlen kernel (torch.nn.attention.varlen) and Flex
  with the equivalent document mask.

Times are medians of triton.testing.do_bench in ms; each peer's output is checked against ours.
"""

from __future__ import annotations

import inspect
import time

import torch

DT = torch.bfloat16  # the dtype benchmarked

from . import runtime
from .bench import BenchShape, _time, bench_layout, flex_mask_mod
from .loader import load
from .runtime.tiles import FULL, PARTIAL, document_classes, tile_classes
from .spec import load_spec


def _flex_mask(spec, layout: torch.Tensor, classes: torch.Tensor, n: int, heads: int, doc_ids=None):
    """FlexAttention's BlockMask for the visible blocks of `layout` [B|1, H|1, nqb, nkb] whose
    element classes are `classes` (EMPTY, PARTIAL, FULL; broadcastable), the spec's mask as mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    element = flex_mask_mod(spec, n, doc_ids)
    bq, bk = spec.sparsity.block if spec.sparsity else (128, 128)
    by_batch, by_head = layout.shape[0] > 1, layout.shape[1] > 1

    def mask_mod(b, h, q_idx, kv_idx):  # the whole mask (Flex runs it on partial blocks; eager Flex everywhere)
        vis = layout[b if by_batch else 0, h if by_head else 0, q_idx // bq, kv_idx // bk]
        return vis if element is None else vis & element(b, h, q_idx, kv_idx)

    def lists(blocks):
        num = blocks.sum(-1).to(torch.int32)
        return num, torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    partial, full = layout & (classes == PARTIAL), layout & (classes == FULL)
    return BlockMask.from_kv_blocks(*lists(partial.contiguous()), *lists(full.contiguous()), BLOCK_SIZE=(bq, bk),
                                    mask_mod=mask_mod, seq_lengths=(n, n))


def _flex(block_mask, scale):
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=scale)


def _run(name, fns: dict, inputs, do, backward: bool, log) -> dict:
    """ms per implementation, each checked against the first's output (but full_density, which
    computes more); a failure is a note."""
    out, ref = {}, None
    for peer, fn in fns.items():
        try:
            with torch.no_grad():
                got = fn(*inputs).float()
            if ref is None:
                ref = got
            elif peer != "full_density" and not (got - ref).abs().max().item() < 2e-2 * max(1.0, ref.abs().max().item()):
                out[peer] = "differs from ours"
                continue
            out[peer] = _time(fn, backward, inputs, do)
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            out[peer] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    log(f"{name}: " + ", ".join(f"{p} {v:.3f} ms" if isinstance(v, float) else f"{p} {v}" for p, v in out.items()))
    return out


def block_sparse(path, shapes=(BenchShape(1, 16, 16384), BenchShape(1, 16, 65536)), backward: bool = False,
                 log=print) -> list[dict]:
    spec, module = load_spec(path), load(path)
    rt = runtime.of(module)
    rows = []
    for shape in shapes:
        B, H, n = shape.batch, shape.heads, shape.seq
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, n, spec.head_dim, generator=g, device="cuda", dtype=DT)
                   .requires_grad_(backward) for _ in range(3))
        do = torch.randn_like(q)
        bq, bk = spec.sparsity.block
        static = rt.static_layout(n, n, H, "cuda")
        layout = bench_layout(spec, shape, "cuda") if rt.runtime_layout else static
        if rt.runtime_layout and static is not None:
            layout = layout | static
        classes = tile_classes(rt.visible, n, n, bq, bk, "cuda")[0][None, None]
        density = float((layout & (classes > 0)).float().mean())
        kw = {"layout": module.BlockMask(bench_layout(spec, shape, "cuda"))} if rt.runtime_layout else {}
        fns = {"attngen": lambda q, k, v: module.attention(q, k, v, training=False, **kw),
               "flex": _flex(_flex_mask(spec, layout, classes, n, H), spec.scale)}
        if rt.runtime_layout:
            every = module.BlockMask(torch.ones(1, 1, -(-n // bq), -(-n // bk), dtype=torch.bool, device="cuda"))
            fns["full_density"] = lambda q, k, v: module.attention(q, k, v, training=False, layout=every)
        ms = _run(f"{spec.name} {shape} {'fwd+bwd' if backward else 'fwd'} density {density:.3f}", fns, (q, k, v), do,
                  backward, log)
        rows.append({"spec": spec.name, "shape": str(shape), "mode": "fwd+bwd" if backward else "fwd",
                     "block_density": density, "ms": ms})
    return rows


def layout_build(path, seqs=(16384, 65536, 131072), batch: int = 8, heads: int = 16, log=print) -> list[dict]:
    """A per-head layout [batch, heads, nqb, nkb] (a band, a global block and 2% random blocks): the
    time and peak memory from the bool layout to the tables of a training step (the forward, dQ and
    dK/dV kernels' tables), medians of 5, each from a fresh BlockMask."""
    spec, module = load_spec(path), load(path)
    rt = runtime.of(module)
    rows = []
    for n in seqs:
        shape = BenchShape(batch, heads, n)
        g = torch.Generator(device="cuda").manual_seed(0)
        base = bench_layout(spec, shape, "cuda")
        layout = base | (torch.rand(batch, heads, *base.shape[2:], generator=g, device="cuda") < 0.02)
        q = torch.empty(1, 1, 1, spec.head_dim, device="cuda", dtype=DT).expand(batch, heads, n, -1)
        for role in ("fwd", "bwd_dq", "bwd_dkdv"):  # the mask's classes at this shape: made once per shape, not timed
            rt.static_classes(n, n, *(rt.config(role, "bf16", n, n)[b] for b in ("BLOCK_M", "BLOCK_N")), q.device,
                              with_layout=False)
        times = []
        torch.cuda.synchronize()
        start_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(5):
            t0 = time.perf_counter()
            blocks = module.BlockMask(layout)
            for role in ("fwd", "bwd_dq", "bwd_dkdv"):
                rt._tables(role, rt.config(role, "bf16", n, n), q, q, runtime.Sparse(None, blocks))
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
        times.sort()
        rows.append({"seq": n, "batch": batch, "heads": heads, "blocks": layout.numel(), "ms": times[2], "peak_mib": peak})
        log(f"layout build N={n} B={batch} H={heads}: {times[2]:.2f} ms (median of 5), peak {peak:.0f} MiB, "
            f"{layout.numel()} blocks")
    return rows


def _packing(total: int, g: torch.Generator, low: int = 100, high: int = 8192) -> list[int]:
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < low and len(lengths) > 1:  # no sequence under `low`: the remainder joins the one before
        lengths[-2] += lengths.pop()
    return lengths


def varlen(path, totals=(16384, 65536), heads: int = 16, backward: bool = False, log=print) -> list[dict]:
    """Packed sequences of 100 to 8192 tokens (the last one joined to its neighbour if shorter), `total` in all: ours beside FlashAttention-2's varlen
    (causal: bottom-right per sequence, as ours) and Flex with the equivalent document mask."""
    spec, module = load_spec(path), load(path)
    rt = runtime.of(module)
    causal = spec.mask.causal is not None
    rows = []
    for total in totals:
        g = torch.Generator().manual_seed(total)
        lengths = _packing(total, g)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        q, k, v = (torch.randn(total, heads, spec.head_dim, device="cuda", dtype=DT).requires_grad_(backward)
                   for _ in range(3))
        do = torch.randn_like(q)
        longest = max(lengths)
        fns = {"attngen": lambda q, k, v: module.attention_varlen(q, k, v, cu, cu, longest, longest)}
        try:
            from torch.nn.attention.varlen import varlen_attn
            params = inspect.signature(varlen_attn).parameters
            extra = ({"is_causal": causal} if "is_causal" in params else {"window_size": (-1, 0 if causal else -1)})
            fns["fa2_varlen"] = lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest, scale=spec.scale, **extra)
        except ImportError:
            pass
        ids = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))[None]
        static = rt.static_classes(total, total, 128, 128, "cuda", with_layout=False)[0]
        classes = document_classes(static, ids, ids, 128, 128)  # [1, 1, nqb, nkb]
        # Flex: the packed batch as one sequence of documents (self-attention packing: equal query and
        # key lengths, so the spec's mask over the whole and the same document is the mask per sequence)
        flex_mask = _flex_mask(spec, classes > 0, classes, total, heads, doc_ids=ids)
        fns["flex"] = (lambda f: lambda q, k, v: f(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                   v.transpose(0, 1)[None])[0].transpose(0, 1))(_flex(flex_mask, spec.scale))
        ms = _run(f"{spec.name} varlen total {total} ({len(lengths)} sequences) {'fwd+bwd' if backward else 'fwd'}",
                  fns, (q, k, v), do, backward, log)
        rows.append({"spec": spec.name, "total": total, "sequences": len(lengths), "mode": "fwd+bwd" if backward else "fwd",
                     "ms": ms})
    return rows
