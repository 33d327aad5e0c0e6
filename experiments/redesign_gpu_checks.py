"""Ran on: Triton 3.6.0, NVIDIA H100 80GB HBM3 (torch 2.11.0+cu130), 2026-12-06; raw: data/gpu_checks_2026-12-06_h100_redesign.txt.

The redesign's GPU checks: direct launches against launches through Triton, bit for bit (document and
temperature included), and the host time of a small step for the new runtime against the previous
self-contained modules (git show 8703eea:generated/causal.py > .gpu/baseline/causal.py).

    PYTHONPATH=. python experiments/redesign_gpu_checks.py
"""
import time, torch, triton, importlib.util, sys
import attngen
from attngen import runtime
from attngen.spec import load_spec
from attngen.verify import Shape, random_documents

def inputs(spec, hq, hkv, nq, nk, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h, n, d: torch.randn(2, h, n, d, generator=g, device="cuda").bfloat16()
    q, k, v = mk(hq, nq, spec.head_dim), mk(hkv, nk, spec.head_dim), mk(hkv, nk, spec.head_dim_v)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mk(hq, nq, spec.head_dim_v)

for name in ["causal", "dilated", "document", "temperature", "causal_dropout"]:
    spec = load_spec(f"specs/{name}.yaml"); mod = attngen.load(f"specs/{name}.yaml"); rt = runtime.of(mod)
    rt.plans.clear()
    q, k, v, do = inputs(spec, 8, 2, 1000, 1000 if name == "document" else 1500, 1)
    kw = {}
    if spec.mask.document:
        kw["documents"] = mod.Documents(random_documents(Shape(2, 8, 2, 1000, 1000), "cuda", torch.Generator(device="cuda").manual_seed(2))[0])
    if spec.score.temperature:
        kw["temperature"] = (torch.rand(8, device="cuda") + 0.5).requires_grad_()
    runs = []
    for i in range(3):
        for t in (q, k, v, *kw.values()):
            if isinstance(t, torch.Tensor): t.grad = None
        o = mod.attention(q, k, v, dropout_seed=5, **kw); o.backward(do)
        runs.append([o.detach().clone()] + [t.grad.clone() for t in (q, k, v)] + ([kw["temperature"].grad.clone()] if "temperature" in kw else []))
        if i == 0:
            direct = all(p.runner is not None for p in rt.plans.values())
    same = all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))
    print(f"{name}: plans {len(rt.plans)}, direct after first call {direct}, bitwise equal {same}")

def load_file(path, name):
    s = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(s); sys.modules[name] = m; s.loader.exec_module(m); return m

# host time of a small step: 1x16x256, d128 causal; wall time per step, GPU-synchronized at the end
for label, mod in [("new", attngen.load("specs/causal.yaml")), ("before", load_file(".gpu/baseline/causal.py", "before_causal")),
                   ("new", attngen.load("specs/causal.yaml")), ("before", sys.modules["before_causal"])]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 16, 256, 128, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 16, 256, 128, device="cuda", dtype=torch.bfloat16)
    for mode in ("fwd", "fwd+bwd"):
        def step():
            if mode == "fwd":
                with torch.no_grad(): mod.attention(q, k, v)
            else:
                mod.attention(q, k, v).backward(do)
        for _ in range(50): step()
        torch.cuda.synchronize()
        ts = []
        for rep in range(7):
            t0 = time.perf_counter()
            for _ in range(200): step()
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) / 200 * 1e6)
        ts.sort()
        print(f"host step {label:6} {mode:8} 1x16x256 d128: median {ts[3]:.1f} us per call (min {ts[0]:.1f})")
