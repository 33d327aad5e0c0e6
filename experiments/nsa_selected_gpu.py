"""Ran on: Triton 3.6.0, torch 2.11.0+cu130 (the device machine; ran on an H100 on 2026-12-07; results: data/nsa_selected_<date>_<gpu>.json).

The selected branch's loop orders and the selection's tiling, A/B in one process, bf16, random
inputs, the selection the module's own: per (spec, Hq/Hkv, N) the selected forward query-major
(its automatic tokens per program) and key-major (its partial rows float32, the default, and
bf16), the selected backward with dQ query-major and key-major, each max difference against the
other; the selection (scores and top blocks) with the scores kernel at 64 rows (8 and 4 warps)
where it takes 128, and with the scores' block sums by the windows' pieces and by the fold
product (their blocks alike but where scores tie);
then the whole NSA forward and forward+backward with the defaults, and our dense causal forward at
the same heads (issue 17's small-group goal: NSA's forward 3x faster at 64k, Hq 16, G 1, 2, 4).
Medians of triton.testing.do_bench.

    PYTHONPATH=. python3 experiments/nsa_selected_gpu.py --cases nsa:64/4:8192,nsa:16/16:32768 --json $OUT/nsa_selected.json
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch
import triton.testing

import attngen
from attngen.bench import environment
from attngen.resources import resolve_spec
from attngen.verify_nsa import priority, selection_agrees

CASES = ("nsa:64/4:8192,nsa:64/4:32768,nsa:16/16:32768,nsa:16/8:32768,nsa:16/4:32768,nsa:16/16:65536,"
         "nsa_linear:64/4:16384")


def _ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, rep=100, return_mode="median")


def _diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=CASES, help="spec:Hq/Hkv:N,...")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    causal = attngen.load(resolve_spec("causal"))
    rows = []
    for case in args.cases.split(","):
        name, heads, n = case.split(":")
        Hq, Hkv = (int(x) for x in heads.split("/"))
        N = int(n)
        mod = attngen.load(resolve_spec(name))
        rt = mod.RUNTIME
        D, Dv = rt.head_dim, rt.head_dim_v
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v = mk(1, Hq, N, D), mk(1, Hkv, N, D), mk(1, Hkv, N, Dv)
        gates = torch.rand(1, Hq, N, 3, generator=g, device="cuda").to(torch.bfloat16)
        weights = None
        if rt.kind == "linear":
            weights = tuple(mk(Hkv, rt.l * e, e) * (rt.l * e) ** -0.5 for e in (D, Dv))
        row = {"spec": name, "Hq": Hq, "Hkv": Hkv, "N": N, "D": D, "Dv": Dv, "auto order": rt.selected_order(Hq // Hkv, N)}
        with torch.no_grad():
            kc, vc = rt.compress(k, weights and weights[0]), rt.compress(v, weights and weights[1])
            _, lse_c = rt.branches()["cmp"].attention(q, kc, vc, return_lse=True)
            idx, _ = rt.select_fused(q, kc, lse_c, rt.scale)
            forced = SimpleNamespace(select_block=rt.l_sel, init_blocks=rt.init, local_blocks=rt.local)
            # the scores' block sums by the windows' pieces (the default where the strides allow) and by the fold product
            sel_scores = lambda: rt.select_fused(q, kc, lse_c, rt.scale)  # noqa: E731
            row["selection"] = _ms(sel_scores)
            row["scores kernel"] = tiling = rt.scores_tiling(Hq // Hkv, D)
            # the tiling before 128 rows, on 8 warps and on 4 (64 rows on 8 warps issue the QK product
            # on both warpgroups: nsa-plan.md, "128 rows for the scores up to G 4")
            if tiling["PIECES"] and tiling["BLOCK_G"] <= 4 and tiling["BLOCK_T"] * tiling["BLOCK_G"] == 128:
                for warps in (8, 4):
                    try:
                        rt.scores_tiling = lambda *a, **kw: {**type(rt).scores_tiling(rt, *a, **kw),  # noqa: B023
                                                             "BLOCK_T": tiling["BLOCK_T"] // 2, "num_warps": warps}
                        row[f"selection, scores at 64 rows, {warps} warps"] = _ms(sel_scores)
                        row[f"selection, scores at 64 rows, {warps} warps: rows that differ"] = int(
                            (sel_scores()[0] != idx).any(-1).sum())
                    finally:
                        del rt.scores_tiling
            try:
                rt.scores_fold = False
                row["selection, fold product"] = _ms(sel_scores)
                fold_idx, fold_scores = sel_scores()
                # the two sum in different orders: blocks may differ only where their scores tie (float32's rounding)
                rank = priority(fold_scores, torch.arange(N, device="cuda"), forced)
                del fold_scores
                row["selection: same blocks up to ties"], row["selection: rows that differ"] = selection_agrees(
                    idx, fold_idx, rank, 1e-5)
                del rank
            finally:
                rt.scores_fold = None
            sel = lambda: rt.selected_forward(q, k, v, idx, rt.scale)  # noqa: E731
            outs = {}
            try:
                for order in ("query", "key"):
                    rt.loop_order = order
                    outs[order] = sel()
                    row[f"selected fwd {order}"] = _ms(sel)
                rt.partials_half = True  # key-major's partial rows in bf16 (the default: float32)
                outs["key, bf16 partials"] = sel()
                row["selected fwd key, bf16 partials"] = _ms(sel)
            finally:
                rt.loop_order, rt.partials_half = None, False
            for name in ("key", "key, bf16 partials"):
                got, want = outs[name][0].float(), outs["query"][0].float()
                row[f"selected fwd {name} vs query max diff"] = (got - want).abs().max().item()
                row[f"selected fwd {name} vs query mean abs diff"] = (got - want).abs().mean().item()
            o, lse = outs["query"]
            do = mk(1, Hq, N, Dv)
            bwd = lambda: rt.selected_backward(q, k, v, idx, o, lse, do, rt.scale)  # noqa: E731
            grads = {}
            try:
                for order in ("query", "key"):  # the dQ's loop order (dK/dV key-major either way)
                    rt.loop_order = order
                    grads[order] = bwd()
                    row[f"selected bwd dq {order}"] = _ms(bwd)
            finally:
                rt.loop_order = None
            row["selected bwd dq key vs query max diff"] = _diff(grads["key"], grads["query"])
        ins = [x.requires_grad_() for x in (q, k, v, gates)]
        nsa = lambda: mod.attention(q, k, v, gates=gates, compress_weights=weights)  # noqa: E731
        with torch.no_grad():
            row["nsa fwd"] = _ms(nsa)
        def fwd_bwd():
            for x in ins:
                x.grad = None
            nsa().float().sum().backward()
        row["nsa fwd+bwd"] = _ms(fwd_bwd)
        if D == Dv == 128:
            with torch.no_grad():
                row["causal (ours) fwd"] = _ms(lambda: causal.attention(q, k, v))
        print(json.dumps(row), flush=True)
        rows.append(row)
        q = k = v = gates = ins = outs = grads = o = lse = do = None
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
