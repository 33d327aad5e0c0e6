"""Ran on: Triton 3.6.0, torch 2.11.0+cu130, an NVIDIA H100 80GB HBM3 (2026-12-07, tree 4b088c0).

Do the selection scores' block sums by the windows' pieces (the default) and by the fold product
(`scores_fold = False`) choose the same blocks? They sum in different orders, so rows may differ
where two blocks' scores tie in float32: per case, the rows that differ and, over them, the largest
gap between the two chosen sets' summed scores (by the fold's scores), absolute and relative to the
row's largest score. Results: BENCHMARKS.md, "The sixteenth session's runs".

    PYTHONPATH=. python3 experiments/nsa_pieces_ties.py   # writes $OUT/tie_check.json
"""
import json, os, torch, attngen
from attngen.resources import resolve_spec
out = []
for name, Hq, Hkv, N in [("nsa", 16, 16, 65536), ("nsa", 16, 4, 65536), ("nsa", 64, 4, 65536), ("nsa", 64, 4, 8192)]:
    rt = attngen.load(resolve_spec(name)).RUNTIME
    D, Dv = rt.head_dim, rt.head_dim_v
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)
    q, k = mk(1, Hq, N, D), mk(1, Hkv, N, D)
    with torch.no_grad():
        kc = rt.compress(k, None)
        _, lse_c = rt.branches()["cmp"].attention(q, kc, kc, return_lse=True)
        rt.scores_fold = None
        i1, s1 = rt.select_fused(q, kc, lse_c, rt.scale)
        rt.scores_fold = False
        i2, s2 = rt.select_fused(q, kc, lse_c, rt.scale)
        rt.scores_fold = None
    # the scores past the blocks before a row's own are left unset (never read by the selection)
    before = torch.arange(s1.shape[-1], device="cuda") < (torch.arange(N, device="cuda") // rt.l_sel)[:, None]
    s1, s2 = s1.where(before, 0.0), s2.where(before, 0.0)
    row = {"case": f"{name} {Hq}/{Hkv} {N}", "max |s1-s2|": (s1 - s2).abs().max().item(), "max s": s2.abs().max().item()}
    a1, _ = i1.sort(-1); a2, _ = i2.sort(-1)
    diff = (a1 != a2).any(-1)
    row["rows"] = diff.numel(); row["rows differing"] = int(diff.sum())
    if diff.any():
        r1, r2, S = a1[diff].long(), a2[diff].long(), s2[diff]
        # the chosen sets' summed fold scores: near equal if only ties flipped
        g1 = torch.where(r1 >= 0, S.gather(1, r1.clamp(min=0)), 0.).double().sum(1)
        g2 = torch.where(r2 >= 0, S.gather(1, r2.clamp(min=0)), 0.).double().sum(1)
        row["max set-score gap"] = (g1 - g2).abs().max().item()
        row["max set-score gap / row max"] = ((g1 - g2).abs() / S.abs().amax(1).double()).max().item()
        row["sizes equal"] = bool(((r1 >= 0).sum(1) == (r2 >= 0).sum(1)).all())
    print(json.dumps(row), flush=True); out.append(row)
    del s1, s2, i1, i2; torch.cuda.empty_cache()
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/tie_check.json", "w"), indent=1)
