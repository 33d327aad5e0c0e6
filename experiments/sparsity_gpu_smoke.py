"""Ran on: Triton 3.6.0, NVIDIA H100 80GB HBM3 (torch 2.11.0+cu130), 2026-12-06; raw: data/gpu_smoke_2026-12-06_h100_sparsity.txt.

GPU smoke of issue 15's new paths on Triton 3.6: varlen (causal, document, dilated) and block_sparse's
runtime layout, bf16 forward and backward against the float64 reference; one timing of block_sparse
at 16k, 10% blocks, against causal at full density (same module family)."""
import sys

import torch
import triton

sys.path.insert(0, ".")
import attngen
from attngen import reference
from attngen.spec import load_spec
from attngen.bench import bench_layout, BenchShape
torch.manual_seed(0)
dev = "cuda"
def cu(l): return torch.tensor([0, *torch.tensor(l).cumsum(0).tolist()], dtype=torch.int32, device=dev)
for name, lq, lk in (("causal", [300, 0, 1000, 7], [300, 0, 1000, 7]), ("causal_bottom_right", [100, 500], [700, 20]),
                     ("dilated", [333, 900], [500, 450]), ("document", [600, 1200], [600, 1200])):
    spec = load_spec(f"specs/{name}.yaml"); m = attngen.load(f"specs/{name}.yaml")
    cq, ck = cu(lq), cu(lk); tq, tk = int(cq[-1]), int(ck[-1])
    q = torch.randn(tq, 8, spec.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tk, 2, spec.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tk, 2, spec.head_dim_v, device=dev, dtype=torch.bfloat16, requires_grad=True)
    kw = {}
    ids = None
    if spec.mask.document:
        ids = torch.cat([torch.arange(n, device=dev) * 3 // n + 10 * i for i, n in enumerate(lq)]).int(); kw["documents"] = ids
    o = m.attention_varlen(q, k, v, cq, ck, max(lq), max(lk), **kw); do = torch.randn_like(o); o.backward(do)
    err = 0.0
    for i in range(len(lq)):
        qs, ks, nq, nk = int(cq[i]), int(ck[i]), lq[i], lk[i]
        c = lambda t, s, n: t.detach()[s:s+n].transpose(0, 1)[None].double().requires_grad_()
        rq, rk, rv = c(q, qs, nq), c(k, ks, nk), c(v, ks, nk)
        rkw = {"documents": (ids[qs:qs+nq][None], ids[ks:ks+nk][None])} if ids is not None else {}
        ro, _ = reference.attention(spec, rq, rk, rv, **rkw); ro.backward(do[qs:qs+nq].transpose(0,1)[None].double())
        for got, want in ((o[qs:qs+nq].transpose(0,1)[None], ro), (q.grad[qs:qs+nq].transpose(0,1)[None], rq.grad),
                          (k.grad[ks:ks+nk].transpose(0,1)[None], rk.grad), (v.grad[ks:ks+nk].transpose(0,1)[None], rv.grad)):
            if want.numel(): err = max(err, (got.double() - want).abs().max().item())
    print(f"varlen {name} {lq} {lk} bf16 max abs err fwd+grads {err:.3e}", flush=True)
spec = load_spec("specs/block_sparse.yaml"); m = attngen.load("specs/block_sparse.yaml")
for B, H, N in ((2, 4, 1000), (1, 16, 16384)):
    shape = BenchShape(B, H, N)
    L = bench_layout(spec, shape, dev)
    q, k, v = (torch.randn(B, H, N, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    if N <= 1000:
        L = L | (torch.rand(B, H, *L.shape[2:], device=dev) < 0.3)
        o = m.attention(q, k, v, layout=L); do = torch.randn_like(o); o.backward(do)
        rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
        ro, _ = reference.attention(spec, rq, rk, rv, layout=L); ro.backward(do.double())
        err = max((a.double() - b).abs().max().item() for a, b in ((o, ro), (q.grad, rq.grad), (k.grad, rk.grad), (v.grad, rv.grad)))
        print(f"block_sparse {B}x{H}x{N} bf16 max abs err fwd+grads {err:.3e}", flush=True)
        continue
    bm = m.BlockMask(L)
    causal = attngen.load("specs/causal.yaml")
    with torch.no_grad():
        t_sparse = triton.testing.do_bench(lambda: m.attention(q, k, v, layout=bm), warmup=25, rep=100, return_mode="median")
        t_full = triton.testing.do_bench(lambda: causal.attention(q, k, v), warmup=25, rep=100, return_mode="median")
    dens = L.float().mean().item()
    print(f"block_sparse fwd 1x16x16384 d128 bf16: {t_sparse:.3f} ms at {dens:.3f} layout density (causal within it); causal module {t_full:.3f} ms; x{t_full / t_sparse:.2f}", flush=True)
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
