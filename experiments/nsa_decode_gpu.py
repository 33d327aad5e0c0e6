"""Ran on: Triton 3.6.0, torch 2.11.0+cu130 (the device machine; ran on an H100 on 2026-12-07; results: data/nsa_decode_<date>_<gpu>.json).

Issue 17's decoding benchmark: one NSA decode step (attention_with_kvcache, Nq 1: the compressed
cache's update, the compressed branch and the selection in torch, the selected branch's kernel,
the window branch's decode kernel, the gates' mix) against torch SDPA's backends over the whole
dense cache (enable_gqa; one query sees every key, so no mask) and our dense causal decode (d128),
in one process; the NSA step also with `fused_decode` (the step in kernels: the default) and under
torch.compile(fullgraph=True), whose Inductor fuses the torch ops between the kernels. bf16, Hq 64,
Hkv 4, every sequence full; each step replayed as a CUDA graph (median, us). The goal: at 64k, NSA at least 5x SDPA's best backend.
A case BxCONTEXTx4 decodes 4 queries a step (speculative decoding: the fused step's selected items
are the union of their blocks); SDPA's peers there attend every key from each (no mask). The fused
step is timed again with `decode_top_kernel` forced off and on (the top blocks in the selection
kernel, or by `_nsa_top_blocks`, a row to a warp; the default picks by the rows), after checking
that both give the same bits.

    PYTHONPATH=. python3 experiments/nsa_decode_gpu.py --json $OUT/nsa_decode.json [--kernels]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attngen
from attngen.bench import environment
from attngen.bench_decode import _time
from attngen.resources import resolve_spec

CASES = "nsa:1x65536,nsa:8x65536,nsa:1x16384,nsa_linear:1x65536,nsa:8x65536x4"
HQ, HKV = 64, 4


def _sdpa(q, k, v, scale):
    out = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        out[name] = run
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=CASES, help="spec:BxCONTEXT[xNQ],... (NQ > 1: speculative decoding's queries)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels", action="store_true", help="also the fused step's GPU us per kernel")
    args = ap.parse_args()
    causal = attngen.load(resolve_spec("causal"))
    rows = []
    for case in args.cases.split(","):
        name, shape = case.split(":")
        B, ctx, n_q = (*(int(x) for x in shape.split("x")), 1)[:3]
        nsa = attngen.load(resolve_spec(name)).RUNTIME
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
        q = mk(B, HQ, n_q, nsa.head_dim)
        k, v = mk(B, HKV, ctx, nsa.head_dim), mk(B, HKV, ctx, nsa.head_dim_v)
        gates = torch.rand(B, HQ, n_q, 3, generator=g, device="cuda").to(torch.bfloat16)
        lengths = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        weights = None
        if nsa.kind == "linear":
            weights = tuple(mk(HKV, nsa.l * e, e) * (1.0 / nsa.l) for e in (nsa.head_dim, nsa.head_dim_v))
        row = {"spec": name, "case": shape}
        with torch.no_grad():
            cmp = nsa.compressed_cache(k, v, lengths, compress_weights=weights)
            step = lambda: nsa.attention_with_kvcache(q, k, v, cache_seqlens=lengths, gates=gates,  # noqa: E731
                                                      cmp_cache=cmp, compress_weights=weights)
            nsa.fused_decode = False  # the torch path
            try:
                out = step()
                assert torch.isfinite(out.float()).all(), case
                row["nsa"] = _time(step) * 1e3
            finally:
                nsa.fused_decode = True  # the step in kernels (the default)
            fused = step()
            row["nsa fused_decode vs torch max diff"] = (fused.float() - out.float()).abs().max().item()
            row["nsa fused_decode"] = _time(step) * 1e3
            if args.kernels:  # torch.profiler, outside a graph: where the fused step's time goes
                from attngen.tools.profile_step import kernel_times

                row["nsa fused_decode kernels"] = {k: t * 1e3 for k, t in kernel_times(step).items()}
            # the top blocks in the selection kernel and apart (decode_top_kernel False, True: the
            # default picks by the rows, top_apart()): the same bits, each timed
            try:
                with_blocks = lambda: nsa.attention_with_kvcache(  # noqa: E731
                    q, k, v, cache_seqlens=lengths, gates=gates, cmp_cache=cmp, compress_weights=weights,
                    return_indices=True)
                runs = {}
                for forced in (False, True):
                    nsa.decode_top_kernel = forced
                    runs[forced] = with_blocks()
                    row[f"nsa fused_decode, decode_top_kernel {forced}"] = _time(step) * 1e3
                    if args.kernels:
                        row[f"nsa decode_top_kernel {forced} kernels"] = {
                            k: t * 1e3 for k, t in kernel_times(step).items()}
                row["nsa decode_top_kernel: same bits"] = all(torch.equal(a, b) for a, b in zip(*runs.values()))
            finally:
                nsa.decode_top_kernel = None
            # the same step under torch.compile (Inductor fuses the torch ops between the kernels)
            mod = attngen.load(resolve_spec(name))
            compiled = torch.compile(lambda q, k, v, lengths, gates, kc, vc: mod.attention_with_kvcache(
                q, k, v, cache_seqlens=lengths, gates=gates, cmp_cache=(kc, vc), compress_weights=weights),
                fullgraph=True)
            try:
                got = compiled(q, k, v, lengths, gates, *cmp)
                row["nsa compiled vs eager max diff"] = (got.float() - out.float()).abs().max().item()
                row["nsa compiled"] = _time(lambda: compiled(q, k, v, lengths, gates, *cmp)) * 1e3
            except Exception as e:  # noqa: BLE001 (a compile failure is a result to report)
                row["nsa compiled"] = None
                row["nsa compiled_why"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            calls = _sdpa(q, k, v, nsa.scale)
            if nsa.head_dim == 128:
                calls["ours_causal"] = lambda: causal.attention_with_kvcache(q, k, v, cache_seqlens=lengths,
                                                                            scale=nsa.scale)
            for peer, fn in calls.items():
                try:
                    row[peer] = _time(fn) * 1e3
                except RuntimeError as e:  # a backend that does not take the shape
                    row[peer] = None
                    row[f"{peer}_why"] = str(e).splitlines()[0][:160]
        sdpa = [row[p] for p in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient") if row.get(p)]
        row["best_sdpa_over_nsa"] = min(sdpa) / row["nsa"] if sdpa else None
        print(row, flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
