"""Ran on: Triton 3.6.0, torch 2.11.0+cu130 (the device machine; results: data/nsa_<date>_<gpu>.json).

A first timing of NSA modules (specs/nsa.yaml, specs/nsa_linear.yaml) beside the dense causal
generated kernel and torch SDPA (flash, cuDNN) in the same process, bf16, Hq 64, Hkv 4 (or
--heads), at the lengths given: forward, and forward+backward, the selection included; then the NSA forward's
stages alone (compression + compressed branch, selection, selected branch, window branch), to see
where its time goes; the selected branch also at other tokens per program than its automatic choice
("stage selected (T=1)": one token per program, the G query heads alone as rows). Medians of
triton.testing.do_bench (not CUDA graphs: the selection's chunk loop runs on the host).

    PYTHONPATH=. python3 experiments/nsa_gpu.py --seqs 8192,16384 --json $OUT/nsa.json
    PYTHONPATH=. python3 experiments/nsa_gpu.py --seqs 65536 --specs nsa --no-stages --profile $OUT/p.txt
    PYTHONPATH=. python3 experiments/nsa_gpu.py --seqs 65536 --specs nsa --heads 16/16 --no-stages --profile $OUT/g1.txt

--profile writes torch.profiler's kernel table of one forward and one forward+backward per row;
--no-stages skips the stages (the torch selection alone takes half a second a call at 64k).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import attngen
from attngen.bench import environment
from attngen.resources import resolve_spec
from attngen.runtime.nsa import union_lists


def _ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, rep=100, return_mode="median")


def _fwd_bwd(fn, inputs):
    def run():
        for x in inputs:
            x.grad = None
        fn().backward(torch.ones((), device="cuda"))  # a scalar: the sum's gradient is ones
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="8192,16384,32768,65536")
    ap.add_argument("--specs", default="nsa,nsa_linear")
    ap.add_argument("--heads", default="64/4", help="HQ/HKV (the issue's small groups: 16/16, 16/8, 16/4)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, help="a file for torch.profiler's kernel table of one forward "
                    "and one forward+backward per row")
    ap.add_argument("--no-stages", action="store_true", help="skip the stages (the torch selection is slow at 64k)")
    args = ap.parse_args()
    hq, hkv = (int(x) for x in args.heads.split("/"))
    tables = []
    causal = attngen.load(resolve_spec("causal"))
    rows = []
    for name in args.specs.split(","):
        mod = attngen.load(resolve_spec(name))
        rt = mod.RUNTIME
        D, Dv = rt.head_dim, rt.head_dim_v
        for N in (int(s) for s in args.seqs.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            mk = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
            q, k, v = mk(1, hq, N, D), mk(1, hkv, N, D), mk(1, hkv, N, Dv)
            gates = torch.rand(1, hq, N, 3, generator=g, device="cuda").to(torch.bfloat16)
            weights = None
            if rt.kind == "linear":
                weights = tuple(mk(hkv, rt.l * e, e) * (rt.l * e) ** -0.5 for e in (D, Dv))
            row = {"spec": name, "N": N, "D": D, "Dv": Dv, "Hq": hq, "Hkv": hkv}
            ins = [x.requires_grad_() for x in (q, k, v, gates)]
            nsa = lambda: mod.attention(q, k, v, gates=gates, compress_weights=weights)  # noqa: E731
            with torch.no_grad():
                row["nsa fwd"] = _ms(nsa)
            row["nsa fwd+bwd"] = _ms(_fwd_bwd(lambda: nsa().float().sum(), ins))
            if args.profile:  # where the time goes, kernel by kernel (ours and torch's)
                step = _fwd_bwd(lambda: nsa().float().sum(), ins)
                for label, fn in (("forward", lambda: mod.attention(q.detach(), k.detach(), v.detach(), gates=gates.detach(),
                                                                     compress_weights=weights)), ("forward+backward", step)):
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        fn()
                        torch.cuda.synchronize()
                    tables.append(f"## {name} N={N} {label}\n"
                                  + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
            if D == Dv == 128:
                kk, vv = (x.detach().repeat_interleave(hq // hkv, dim=1) for x in (k, v))
                with torch.no_grad():
                    row["causal (ours) fwd"] = _ms(lambda: causal.attention(q, k, v))
                    for label, backend in (("sdpa flash fwd", SDPBackend.FLASH_ATTENTION),
                                           ("sdpa cudnn fwd", SDPBackend.CUDNN_ATTENTION)):
                        try:
                            with sdpa_kernel(backend):
                                row[label] = _ms(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True))
                        except RuntimeError as e:
                            row[label] = f"{type(e).__name__}: {str(e)[:80]}"
                row["causal (ours) fwd+bwd"] = _ms(_fwd_bwd(lambda: causal.attention(q, k, v).float().sum(), ins[:3]))
            # the forward's stages
            if not args.no_stages:
                with torch.no_grad():
                    kc, vc = rt.compress(k, weights and weights[0]), rt.compress(v, weights and weights[1])
                    br = rt.branches()
                    o_c, lse_c = br["cmp"].attention(q, kc, vc, return_lse=True)
                    idx = rt.select(q, kc, lse_c, rt.scale)
                    row["stage compress+cmp"] = _ms(lambda: br["cmp"].attention(q, rt.compress(k, weights and weights[0]),
                                                                                rt.compress(v, weights and weights[1])))
                    row["stage select"] = _ms(lambda: rt.select(q, kc, lse_c, rt.scale))
                    # the top blocks by torch's sort, then by the _nsa_top_blocks kernel (the default)
                    rt.top_blocks_kernel = False
                    try:
                        row["stage select (fused scores, default loop, torch's sort)"] = _ms(
                            lambda: rt.select_fused(q, kc, lse_c, rt.scale))
                        by_sort = rt.select_fused(q, kc, lse_c, rt.scale)[0]
                    finally:
                        rt.top_blocks_kernel = True
                    rt.scores_carry = False  # the scores' loop adding to memory (the default to head dim 128)
                    try:
                        row["stage select (scores added in memory)"] = _ms(lambda: rt.select_fused(q, kc, lse_c, rt.scale))
                        in_memory = rt.select_fused(q, kc, lse_c, rt.scale)
                    finally:
                        rt.scores_carry = True  # carried in registers (the default past head dim 128)
                    try:
                        row["stage select (scores carried, top-blocks kernel)"] = _ms(
                            lambda: rt.select_fused(q, kc, lse_c, rt.scale))
                        row["scores carried vs in memory: same blocks"] = bool(
                            torch.equal(rt.select_fused(q, kc, lse_c, rt.scale)[0], in_memory[0]))
                        row["top-blocks kernel gives the sort's blocks"] = bool(
                            torch.equal(rt.select_fused(q, kc, lse_c, rt.scale)[0], by_sort))
                    finally:
                        rt.top_blocks_kernel, rt.scores_carry = True, None
                    row["stage selected"] = _ms(lambda: rt.selected_forward(q, k, v, idx, rt.scale))
                    # tokens per program: the automatic choice (above) against one token (the old kernel's
                    # tiling) and a few others; the union lists' share and size at the automatic one
                    auto = rt.selected_tokens(hq // hkv, N)  # G = Hq / Hkv
                    row["selected T (auto)"] = auto
                    _, count = union_lists(idx, auto, -(-N // rt.l_sel))
                    row["selected union blocks per tile (auto)"] = round(count.float().mean().item(), 2)
                    row["stage selected union lists (auto)"] = _ms(lambda: union_lists(idx, auto, -(-N // rt.l_sel)))
                    o_auto = rt.selected_forward(q, k, v, idx, rt.scale)[0]
                    try:
                        for T in (1, 2, 4, 8):
                            if T != auto:
                                rt.tokens_per_program = T
                                row[f"stage selected (T={T})"] = _ms(lambda: rt.selected_forward(q, k, v, idx, rt.scale))
                        rt.tokens_per_program = 1
                        o_one = rt.selected_forward(q, k, v, idx, rt.scale)[0]
                    finally:
                        rt.tokens_per_program = None
                    row["selected auto vs T=1 max diff"] = (o_auto.float() - o_one.float()).abs().max().item()
                    row["stage window"] = _ms(lambda: br["swa"].attention(q, k, v))
            print(json.dumps(row), flush=True)
            rows.append(row)
            q = k = v = gates = ins = kk = vv = None
            torch.cuda.empty_cache()
    if args.profile:
        with open(args.profile, "w") as f:
            f.write("\n\n".join(tables))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
