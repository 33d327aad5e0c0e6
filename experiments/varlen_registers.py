"""Ran on: Triton 3.9.0 (offline sm90 compile, no GPU), 2026-12-06; raw: data/registers_varlen_2026-12-06_sm90_offline.txt.

Registers per thread of causal's kernels with TMA loads (attention) and with the pointer loads packed
sequences use (attention_varlen), at the tiling the module picks for 1k, 4k and 16k tokens: the
evidence behind docs/decisions/sparsity-tables.md's note that varlen spills at TMA tilings.
"""
import torch
from attngen.loader import load
from attngen import runtime
from attngen.tools.inspect_kernels import offline_run, registers
mod = load("specs/causal.yaml"); rt = runtime.of(mod)
def compile_regs(fn_call):
    sink = []
    for role, fn in rt.kernels.items():
        fn.device_caches.clear(); fn.run = offline_run(fn, sink)
    rt.plans.clear()
    fn_call()
    return [(registers(k), k.metadata.num_warps) for k in sink]
for n in (1024, 4096, 16384):
    H, D = 16, 128
    cfg = {r: rt.config(r, "bf16", n, n) for r in ("fwd", "bwd_dq", "bwd_dkdv")}
    cu = torch.tensor([0, n], dtype=torch.int32)
    def varlen():
        q = torch.empty(n, H, D, dtype=torch.bfloat16, requires_grad=True)
        o = mod.attention_varlen(q, q, q, cu, cu, n, n); o.backward(torch.empty_like(o))
    def dense():
        q = torch.empty(1, H, n, D, dtype=torch.bfloat16, requires_grad=True)
        o = mod.attention(q, q, q); o.backward(torch.empty_like(o))
    print(n, {r: f'{c["BLOCK_M"]}x{c["BLOCK_N"]} w{c["num_warps"]} tma={c["TMA"]}' for r, c in cfg.items()})
    print("  dense (fwd, dq, dkdv) regs:", compile_regs(dense), " varlen:", compile_regs(varlen))
