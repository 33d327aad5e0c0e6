"""Ran on: Triton 3.6.0, torch 2.11.0+cu130 (the device machine; H100 on 2026-12-07: data/decode_ab_2026-12-07_h100_cb34305.json, docs/decisions/decode-plan.md).

Decoding, the current causal module beside a baseline module file (an earlier commit's
`attngen generate specs/causal.yaml --standalone`, which carries its own runtime) in one process:
contiguous and paged caches (pages shuffled), and plan variants of the current kernel
(NAME:field=value:..., decode_plan's overrides, on the paged cache when the case has one). bf16,
Hq 32, Hkv 8, d128, every sequence full; each step replayed as a CUDA graph (median, us).

    python experiments/baseline_module.py REV causal   # out/baselines/causal_REV.py (53b5bfd: the 2026-12-06 decode table's)
    PYTHONPATH=. python3 experiments/decode_ab_gpu.py --baseline out/baselines/causal_REV.py --json $OUT/decode_ab.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import torch

import attngen
from attngen import runtime
from attngen.bench import environment
from attngen.bench_decode import Case, _time
from attngen.runtime import decode as dec
from attngen.verify import paged

CASES = "1x2048,1x8192,1x32768,8x2048,1x131072p16,1x131072p64,32x8192p16,8x32768p16,1x32768p16"
VARIANTS = "same_step:pages_ahead=0;pdl:pdl=1;s4:stages=4;same_step_s4:pages_ahead=0:stages=4"


def _baseline(path: str):
    spec = importlib.util.spec_from_file_location("attngen_decode_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    module = attngen.load("specs/causal.yaml")
    rt = runtime.of(module)
    base = _baseline(args.baseline) if args.baseline else None
    variants = []
    for item in filter(None, args.variants.split(";")):
        name, *fields = item.split(":")
        variants.append((name, {k: int(v) for k, v in (f.split("=") for f in fields)}))
    hq, hkv, d = 32, 8, 128
    rows = []
    for text in args.cases.split(","):
        case = Case.parse(text)
        B, ctx = case.batch, case.context
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, hq, 1, d, generator=g, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, hkv, ctx, d, generator=g, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, hkv, ctx, d, generator=g, device="cuda", dtype=torch.bfloat16)
        lengths = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        fns, table = {}, None
        if case.page:
            per_seq = ctx // case.page
            table = torch.randperm(B * per_seq, generator=g, device="cuda").to(torch.int32).reshape(B, per_seq)
            kc, vc = paged(k, case.page, table), paged(v, case.page, table)
        else:
            kc, vc = k, v
        for name, mod in (("base", base), ("new", module)):
            if mod is None:
                continue
            fns[f"{name}_contiguous"] = lambda mod=mod: mod.attention_with_kvcache(q, k, v, cache_seqlens=lengths)
            if case.page:
                fns[f"{name}_paged"] = lambda mod=mod: mod.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths,
                                                                                 block_table=table)
        hp = rt.head_param_rows(q, {})
        plan = rt.decode_plan(B, hq, hkv, 1, ctx, dec.sms(q.device))
        for name, fields in variants:
            p = rt.decode_plan(B, hq, hkv, 1, ctx, dec.sms(q.device), **fields)
            fns[name] = lambda p=p: dec.run(rt.decode_kernel, q, kc, vc, hp, lengths, table, rt.scale, p, hkv, d,
                                            rt.native)[0]
        out, ref = {}, None
        for name, fn in fns.items():
            try:
                with torch.no_grad():
                    got = fn().float()
                if ref is None:
                    ref = got
                elif not torch.equal(got, ref) and not (got - ref).abs().max().item() < 2e-2:
                    out[name] = "differs"
                    continue
                with torch.no_grad():
                    out[name] = _time(fn) * 1e3
            except Exception as e:
                out[name] = f"{type(e).__name__}: {str(e)[:160]}"
        print(f"{case} ({plan.describe()}): " + ", ".join(f"{n} {v:.1f}" if isinstance(v, float) else f"{n} {v}"
                                                         for n, v in out.items()), flush=True)
        rows.append({"case": str(case), "plan": plan.describe(), "us": out})
        q = k = v = kc = vc = fns = None
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "baseline": args.baseline, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
