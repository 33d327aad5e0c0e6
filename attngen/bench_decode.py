"""Decoding benchmarks (issue 16), on a GPU, peers in the same process: attention_with_kvcache
beside torch SDPA's backends with enable_gqa (full caches: SDPA takes no per-sequence lengths, so
every sequence is the cache's length here) and FlexAttention's decoding (a 1-token query, compiled).
Each step is captured in a CUDA graph and replayed (triton.testing.do_bench_cudagraph, median), as an
inference server runs it; each peer's output is checked against ours first. Bandwidth is the bytes
of K and V read over the time.
"""

from __future__ import annotations

import torch

from . import runtime
from .loader import load
from .runtime import decode as dec
from .spec import load_spec

DT = torch.bfloat16


def _time(fn) -> float:
    import triton

    fn()  # compile outside the graph
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def _peers(spec, q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    causal = spec.mask.causal is not None  # one query at the end: causal sees every key
    peers = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=spec.scale, enable_gqa=True,
                                                      is_causal=causal and q.shape[2] > 1)
        peers[name] = run
    return peers


def _flex(spec, q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return lambda: compiled(q, k, v, scale=spec.scale, enable_gqa=True)


def bench(path, shapes=((1, 2048), (1, 32768), (1, 131072), (8, 8192), (32, 8192), (128, 2048)),
          heads_q: int = 32, heads_kv: int = 8, flex_at=(), variants=(), log=print) -> list[dict]:
    """Rows per (batch, context): ms and TB/s per implementation. `flex_at`: the shapes Flex runs at
    (each compiles for a minute); `variants`: (name, decode_plan's overrides: splits, block_n, stages)
    run beside ours."""
    spec, module = load_spec(path), load(path)
    rt = runtime.of(module)
    rows = []
    for batch, ctx in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(batch, heads_q, 1, spec.head_dim, generator=g, device="cuda", dtype=DT)
        k = torch.randn(batch, heads_kv, ctx, spec.head_dim, generator=g, device="cuda", dtype=DT)
        v = torch.randn(batch, heads_kv, ctx, spec.head_dim_v, generator=g, device="cuda", dtype=DT)
        lengths = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        fns = {"attngen": lambda: module.attention_with_kvcache(q, k, v, cache_seqlens=lengths)}
        plan = dec.decode_plan(batch, heads_kv, heads_q // heads_kv, ctx, spec.head_dim, dec.sms(q.device))
        hp = rt.head_param_rows(q, {})
        for name, fields in variants:
            p = dec.decode_plan(batch, heads_kv, heads_q // heads_kv, ctx, spec.head_dim, dec.sms(q.device), **fields)
            fns[name] = lambda p=p: dec.run(rt.decode_kernel, q, k, v, hp, lengths, None, rt.scale, p, heads_kv,
                                            spec.head_dim_v, rt.native)[0]
        fns.update(_peers(spec, q, k, v))
        if (batch, ctx) in flex_at:
            fns["flex"] = _flex(spec, q, k, v)
        gb = 2 * batch * heads_kv * ctx * spec.head_dim * 2 / 1e9
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
                out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        log(f"{spec.name} decode B{batch} ctx {ctx} ({plan.describe()}): " + ", ".join(
            f"{n} {v['ms'] * 1e3:.0f} us {v['tb_s']:.2f} TB/s" if isinstance(v, dict) else f"{n} {v}"
            for n, v in out.items()))
        rows.append({"spec": spec.name, "batch": batch, "context": ctx, "heads_q": heads_q, "heads_kv": heads_kv,
                     "plan": plan.describe(), "gb": gb, "results": out})
        del q, k, v
        torch.cuda.empty_cache()
    return rows
