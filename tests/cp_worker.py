"""One rank of tests/test_distributed.py: runs context_parallel_attention on its shards for each
case and gathers outputs and gradients to rank 0, which compares them with the single-process call
on the whole tensors and prints one JSON line per case.

    python tests/cp_worker.py SPEC_DIR CASES_JSON   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import attngen  # noqa: E402
from attngen import distributed as cp  # noqa: E402


def inputs(case: dict):
    g = torch.Generator().manual_seed(case.get("seed", 0))
    B, Hq, Hkv, N, D = case["B"], case["Hq"], case["Hkv"], case["N"], case["D"]
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[case.get("dtype", "fp32")]
    q = (torch.randn(B, Hq, N, D, generator=g) * case.get("q_scale", 1.0)).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    do = torch.randn(B, Hq, N, D, generator=g).to(dtype)
    extra = {}
    if case.get("documents"):
        cuts = torch.sort(torch.randint(1, N, (B, 3), generator=g), dim=1).values
        extra["documents"] = (torch.arange(N)[None, :, None] >= cuts[:, None, :]).sum(-1)
    if case.get("temperature"):
        extra["temperature"] = (torch.rand(Hq, generator=g) + 0.5).requires_grad_()
    if case.get("dropout_seed") is not None:
        extra["dropout_seed"] = case["dropout_seed"]
    return q, k, v, do, extra


def run(case: dict, mod, world: int, rank: int) -> dict | None:
    q, k, v, do, extra = inputs(case)
    layout, strategy = case["layout"], case["strategy"]
    local = [cp.shard(x, world, rank, layout).requires_grad_() for x in (q, k, v)]
    kw = dict(extra)
    if "documents" in kw:
        kw["documents"] = cp.shard(kw["documents"], world, rank, layout, dim=1)
    if "temperature" in kw:
        kw["temperature"] = kw["temperature"].detach().clone().requires_grad_()
    o = cp.context_parallel_attention(mod, *local, seq_len=q.shape[2], strategy=strategy, layout=layout, **kw)
    o.backward(cp.shard(do, world, rank, layout))
    grads = [x.grad for x in local]
    if case.get("twice"):  # determinism: the same gradients bit for bit
        again = [x.detach().clone().requires_grad_() for x in local]
        o2 = cp.context_parallel_attention(mod, *again, seq_len=q.shape[2], strategy=strategy, layout=layout, **kw)
        o2.backward(cp.shard(do, world, rank, layout))
        same = all(torch.equal(a.grad, b) for a, b in zip(again, grads)) and torch.equal(o2, o)
        flag = torch.tensor([int(same)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        same = bool(flag.item())
    mine = [o.detach(), *grads]
    gathered = [[torch.empty_like(t) for _ in range(world)] for t in mine] if rank == 0 else None
    for i, t in enumerate(mine):  # shards differ in length: gather rank by rank
        if rank == 0:
            gathered[i][0] = t
            for r in range(1, world):
                n = cp.shard_length(q.shape[2], world, r, layout)
                buf = t.new_empty(*t.shape[:2], n, t.shape[3])
                dist.recv(buf, src=r)
                gathered[i][r] = buf
        else:
            dist.send(t.contiguous(), dst=0)
    dhp = None
    if "temperature" in kw:  # each rank holds its share of a head parameter's gradient: summed here
        dhp = kw["temperature"].grad.clone()
        dist.all_reduce(dhp)
    if rank != 0:
        return None
    whole = [cp.unshard(parts, layout) for parts in gathered]
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    kw0 = dict(extra)
    if "temperature" in kw0:
        kw0["temperature"] = kw0["temperature"].detach().clone().requires_grad_()
    o_ref = mod.attention(*full, **kw0)
    o_ref.backward(do)
    want = [o_ref.detach(), *(x.grad for x in full)]
    def rel(a, b):  # the largest error over the largest value, in fp32
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))

    errs = {name: rel(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), whole, want)}
    if dhp is not None:
        errs["dtemperature"] = rel(dhp, kw0["temperature"].grad)
    out = {"case": case["name"], "errors": errs}
    if case.get("twice"):
        out["deterministic"] = bool(same)
    return out


def main() -> None:
    spec_dir, cases = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mods = {}
    for case in cases:
        spec = case["spec"]
        if spec not in mods:
            mods[spec] = attngen.load(os.path.join(spec_dir, spec + ".yaml"))
        result = run(case, mods[spec], world, rank)
        if result is not None:
            print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
