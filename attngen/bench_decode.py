"""Decoding benchmarks (issue 16), on a GPU, peers in the same process: attention_with_kvcache
beside torch SDPA's backends with enable_gqa (full caches: SDPA takes no per-sequence lengths, so
every sequence is the cache's length here) and FlexAttention (compiled). Each step is captured in a
CUDA graph and replayed (triton.testing.do_bench_cudagraph, median), as an inference server runs it;
each peer's output is checked against ours first. Bandwidth is the bytes of K and V read over the
time.

A case is BATCHxCONTEXT[xNQ][pPAGE]: NQ queries (default 1) at the end of CONTEXT keys (for a
causal spec the peers get a bottom-right causal mask), and with pPAGE ours also runs on a paged copy
of the cache (pages shuffled) beside the contiguous run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import runtime
from .loader import load
from .runtime import decode as dec
from .spec import load_spec
from .verify import paged

DT = torch.bfloat16


@dataclass(frozen=True)
class Case:
    batch: int
    context: int
    n_q: int = 1
    page: int = 0

    @staticmethod
    def parse(text: str) -> "Case":
        m = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?(?:p(\d+))?", text.strip())
        if not m:
            raise ValueError(f"a decode case is BATCHxCONTEXT[xNQ][pPAGE], e.g. 32x8192, 8x8192x4, 32x8192p16; "
                             f"got {text!r}")
        b, c, n, p = m.groups()
        return Case(int(b), int(c), int(n or 1), int(p or 0))

    def __str__(self) -> str:
        return f"{self.batch}x{self.context}" + (f"x{self.n_q}" if self.n_q > 1 else "") + \
            (f"p{self.page}" if self.page else "")


# The matrix (B128 x 128k needs 69 GB of cache: left out), speculative decoding, chunked
# prefill, and paged caches.
DEFAULT = ",".join(f"{b}x{c}" for b in (1, 8, 32, 128) for c in (2048, 8192, 32768, 131072) if b * c < 128 * 131072) \
    + ",8x8192x4,8x8192x8,32x8192x4,1x8192x512,1x32768x512,4x16384x512,32x8192p16,32x8192p64,32x8192p256,1x131072p16"


def _time(fn) -> float:
    import triton

    fn()  # compile outside the graph
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def _peers(spec, q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    n_q, ctx = q.shape[2], k.shape[2]
    # one query at the end sees every key under a causal mask; more need the bottom-right one
    mask = causal_lower_right(n_q, ctx) if spec.mask.causal is not None and n_q > 1 else None
    peers = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale, enable_gqa=True)
        peers[name] = run
    return peers


def _flex(spec, q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_q, ctx = q.shape[2], k.shape[2]
    block_mask = None
    if spec.mask.causal is not None and n_q > 1:
        block_mask = create_block_mask(lambda b, h, i, j: i + (ctx - n_q) >= j, None, None, n_q, ctx, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return lambda: compiled(q, k, v, block_mask=block_mask, scale=spec.scale, enable_gqa=True)


def bench(path, cases=DEFAULT, heads_q: int = 32, heads_kv: int = 8, flex_at=(), variants=(), log=print) -> list[dict]:
    """Rows per case: ms and TB/s per implementation. `flex_at`: the cases Flex runs at (each
    compiles for a minute); `variants`: (name, decode_plan's overrides: splits, block_n, stages)
    run beside ours."""
    spec, module = load_spec(path), load(path)
    rt = runtime.of(module)
    cases = [Case.parse(c) if isinstance(c, str) else c for c in (cases.split(",") if isinstance(cases, str) else cases)]
    flex_at = {str(Case.parse(c)) if isinstance(c, str) else str(c) for c in flex_at}
    rows = []
    for case in cases:
        B, ctx, n_q = case.batch, case.context, case.n_q
        gb = 2 * B * heads_kv * ctx * spec.head_dim * 2 / 1e9
        row = {"spec": spec.name, "case": str(case), "batch": B, "context": ctx, "n_q": n_q, "page": case.page,
               "heads_q": heads_q, "heads_kv": heads_kv, "gb": gb}
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, heads_q, n_q, spec.head_dim, generator=g, device="cuda", dtype=DT)
            k = torch.randn(B, heads_kv, ctx, spec.head_dim, generator=g, device="cuda", dtype=DT)
            v = torch.randn(B, heads_kv, ctx, spec.head_dim_v, generator=g, device="cuda", dtype=DT)
        except torch.OutOfMemoryError:
            log(f"{spec.name} decode {case}: the cache does not fit")
            row["results"] = {"attngen": "out of memory"}
            rows.append(row)
            continue
        lengths = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        plan = rt.decode_plan(B, heads_q, heads_kv, n_q, ctx, dec.sms(q.device))
        row["plan"] = plan.describe()
        fns = {"attngen": lambda: module.attention_with_kvcache(q, k, v, cache_seqlens=lengths)}
        if case.page:
            per_seq = -(-ctx // case.page)
            table = torch.randperm(B * per_seq, generator=g, device="cuda").to(torch.int32).reshape(B, per_seq)
            kp, vp = paged(k, case.page, table), paged(v, case.page, table)
            fns[f"attngen_paged{case.page}"] = lambda: module.attention_with_kvcache(
                q, kp, vp, cache_seqlens=lengths, block_table=table)
        hp = rt.head_param_rows(q, {})
        for name, fields in variants:
            p = rt.decode_plan(B, heads_q, heads_kv, n_q, ctx, dec.sms(q.device), **fields)
            kv = (kp, vp, table) if case.page else (k, v, None)  # variants run on the paged cache when there is one
            fns[name] = lambda p=p, kv=kv: dec.run(rt.decode_kernel, q, kv[0], kv[1], hp, lengths, kv[2], rt.scale, p,
                                                   heads_kv, spec.head_dim_v, rt.native)[0]
        if not case.page:
            fns.update(_peers(spec, q, k, v))
            if str(case) in flex_at:
                fns["flex"] = _flex(spec, q, k, v)
        out, ref = {}, None
        for name, fn in fns.items():
            try:
                with torch.no_grad():
                    got = fn().float()
                if ref is None:
                    ref = got
                elif not (got - ref).abs().max().item() < 2e-2:
                    out[name] = "differs from ours"
                    continue
                with torch.no_grad():
                    ms = _time(fn)
                out[name] = {"ms": ms, "tb_s": gb / ms}
            except Exception as e:  # a peer that cannot run this case is reported, not fatal
                out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        log(f"{spec.name} decode {case} ({plan.describe()}): " + ", ".join(
            f"{n} {v['ms'] * 1e3:.0f} us {v['tb_s']:.2f} TB/s" if isinstance(v, dict) else f"{n} {v}"
            for n, v in out.items()))
        row["results"] = out
        rows.append(row)
        q = k = v = fns = kp = vp = None  # free the caches before the next case
        torch.cuda.empty_cache()
    return rows
