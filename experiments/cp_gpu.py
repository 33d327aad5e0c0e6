"""Ran on: Triton 3.6.0, torch 2.11.0+cu130 (2 GPUs of one host, NCCL; results: data/cp_<date>_<gpu>.json).

Context parallelism (attngen/distributed.py) on the GPUs of one host, one process per GPU:
1. correctness in bf16: ring and allgather against the single-GPU call on the whole tensors, for
   causal, sliding_window and document at ragged lengths, outputs and gradients (max error over
   the max of the reference);
2. timing, bf16, B1, 16 heads, d128, causal, zigzag: ours (ring, allgather) forward and
   forward+backward at each length, beside our single-GPU kernel at the same and at half the length,
   PyTorch's context_parallel over SDPA (rotate methods allgather and alltoall) and one K/V shard's
   exchange alone. Medians over repeats of CUDA-event times on rank 0, each repeat after a barrier.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. torchrun --nproc_per_node 2 experiments/cp_gpu.py --json $OUT/cp.json

With --simulate, on one GPU and without torch.distributed: every rank's ring steps run one after
another (the same windowed kernel calls and LSE merges as attngen.distributed's ring, no
transfers): the bf16 check of 1. against the single-GPU call, and each ring step's compute time per
rank at 2, 4 and 8 ranks with the K/V bytes each step sends, for when no multi-GPU host is lent.

    PYTHONPATH=. python3 experiments/cp_gpu.py --simulate --json $OUT/cp_sim.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attngen
from attngen import distributed as cp
from attngen.bench import environment
from attngen.resources import resolve_spec


def timed(fn, reps: int, barrier: bool = True) -> float:
    """Median ms of fn over reps (after warming up), each start after a barrier (all ranks)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if barrier:
            dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def fwd_bwd(fn, leaves, do):
    def run():
        for x in leaves:
            x.grad = None
        fn().backward(do)
    return run


def check(mods, world, rank, out):
    for name, N, docs in (("causal", 4099, False), ("sliding_window", 3001, False), ("document", 2999, True)):
        mod = mods[name]
        g = torch.Generator(device="cuda").manual_seed(1)
        q, k, v, do = (torch.randn(1, h, N, 128, generator=g, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2, 8))
        kw = {}
        if docs:
            kw["documents"] = (torch.arange(N, device="cuda") // 700)[None].to(torch.int32)
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        o_ref = mod.attention(*full, **kw)
        o_ref.backward(do)
        want = [o_ref.detach(), *(x.grad for x in full)]
        for strategy in cp.STRATEGIES:
            local = [cp.shard(x, world, rank).requires_grad_() for x in (q, k, v)]
            lkw = {"documents": cp.shard(kw["documents"], world, rank, dim=1)} if docs else {}
            o = cp.context_parallel_attention(mod, *local, seq_len=N, strategy=strategy, **lkw)
            o.backward(cp.shard(do, world, rank))
            errs = {}
            lens = [cp.shard_length(N, world, r) for r in range(world)]
            for label, mine, ref in zip(("o", "dq", "dk", "dv"), (o.detach(), *(x.grad for x in local)), want):
                padded = torch.cat([mine, mine.new_zeros(*mine.shape[:2], max(lens) - mine.shape[2], mine.shape[3])], 2)
                parts = [torch.empty_like(padded) for _ in range(world)]
                dist.all_gather(parts, padded)
                whole = cp.unshard([p[:, :, :n] for p, n in zip(parts, lens)])
                errs[label] = float((whole.float() - ref.float()).abs().max() / ref.float().abs().max())
            if rank == 0:
                out.append({"check": name, "N": N, "strategy": strategy, **errs})
                print(json.dumps(out[-1]), flush=True)


def ms(fn, reps: int = 5) -> float:
    return timed(fn, reps, barrier=False)  # one process: no group


def simulated_ring(rt, q, k, v, world: int, rank: int, documents=None):
    """Rank `rank`'s ring forward of the whole tensors' zigzag shards, on one device: per step, the
    (source rank, [(window, rows, keys, sparse)]) pairs, and the merged (o, lse) of its shard."""
    N = q.shape[2]
    ctx = cp._Context(rt, None, world, rank, N, "zigzag", "ring", documents, rt.scale, 0, 0.0)
    ctx.device = q.device
    qs = cp.shard(q, world, rank)
    o_acc = torch.zeros(*qs.shape[:3], rt.head_dim_v, device=q.device)
    lse_acc = torch.full(qs.shape[:3], float("-inf"), device=q.device)
    hp = rt.head_param_rows(q, {})
    steps = []
    for step in range(world):
        src = (rank - step) % world
        ks, vs = cp.shard(k, world, src), cp.shard(v, world, src)
        cp.ring_step_forward(ctx, qs, ks, vs, hp, src, o_acc, lse_acc)  # what the ring runs, minus the transfers
        steps.append((src, qs, ks, vs, hp, list(ctx.pairs(src))))
    return steps, o_acc.to(q.dtype), lse_acc


def simulate(mods, reps: int, seqs, out):
    for name, N, docs in (("causal", 4099, False), ("sliding_window", 3001, False), ("document", 2999, True)):
        rt = mods[name].RUNTIME
        g = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(1, h, N, 128, generator=g, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
        ids = (torch.arange(N, device="cuda") // 700)[None].to(torch.int32) if docs else None
        want = mods[name].attention(q, k, v, **({"documents": ids} if docs else {}))
        for world in (2, 4):
            shards = [simulated_ring(rt, q, k, v, world, r, ids)[1] for r in range(world)]
            err = float((cp.unshard(shards).float() - want.float()).abs().max() / want.float().abs().max())
            out.append({"check": name, "N": N, "world": world, "simulated ring fwd err": err})
            print(json.dumps(out[-1]), flush=True)
    causal = mods["causal"]
    for N in seqs:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 16, N, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        row = {"N": N, "single GPU fwd": ms(lambda: causal.attention(q, k, v), reps)}
        for world in (2, 4, 8):
            per_step = [[0.0] * world for _ in range(world)]  # [step][rank] ms
            for rank in range(world):
                steps, _, _ = simulated_ring(causal.RUNTIME, q, k, v, world, rank)
                for step, (src, qs, ks, vs, hp, pairs) in enumerate(steps):
                    def run():
                        for w, rows, keys, sparse in pairs:
                            causal.RUNTIME.forward(qs[:, :, rows], ks[:, :, keys], vs[:, :, keys], hp, causal.RUNTIME.scale,
                                                   0, 0.0, sparse=sparse, window=w)
                    per_step[step][rank] = ms(run, reps) if pairs else 0.0
            row[f"W{world} fwd step ms (max over ranks)"] = [round(max(s), 3) for s in per_step]
            row[f"W{world} fwd compute ms (sum of step maxima)"] = sum(max(s) for s in per_step)
            row[f"W{world} half/whole GPU at N/W fwd"] = ms(lambda: causal.attention(*(x[:, :, :N // world] for x in (q, k, v))), reps)
            row[f"W{world} k+v MiB sent per step"] = 2 * 16 * (N // world) * 128 * 2 / 2**20
        print(json.dumps(row), flush=True)
        out.append(row)
        q = k = v = None
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--seqs", default="65536,131072")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.simulate:
        mods = {n: attngen.load(resolve_spec(n)) for n in ("causal", "sliding_window", "document")}
        rows: list = []
        simulate(mods, args.reps, [int(s) for s in args.seqs.split(",")], rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": environment(), "rows": rows}, f, indent=1)
        return
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    mods = {n: attngen.load(resolve_spec(n)) for n in ("causal", "sliding_window", "document")}
    rows: list = []
    check(mods, world, rank, rows)
    causal = mods["causal"]
    for N in (int(s) for s in args.seqs.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda n: torch.randn(1, 16, n, 128, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v, do = mk(N), mk(N), mk(N), mk(N)
        row = {"N": N, "world": world}
        local = [cp.shard(x, world, rank).requires_grad_() for x in (q, k, v)]
        ldo = cp.shard(do, world, rank)
        for strategy in cp.STRATEGIES:
            call = lambda: cp.context_parallel_attention(causal, *local, seq_len=N, strategy=strategy)  # noqa: E731
            with torch.no_grad():
                row[f"ours {strategy} fwd"] = timed(call, args.reps)
            row[f"ours {strategy} fwd+bwd"] = timed(fwd_bwd(call, local, ldo), args.reps)
        # one K/V shard's exchange alone (what a ring step overlaps with its compute)
        kv = [x.detach().contiguous() for x in local[1:]]
        recv = [torch.empty_like(x) for x in kv]
        row["exchange k,v shard"] = timed(lambda: [r.wait() for r in cp._exchange(dist.group.WORLD, world, rank, kv, recv)],
                                          args.reps)
        row["shard MiB (k+v)"] = sum(x.numel() * x.element_size() for x in kv) / 2**20
        for n, label in ((N // world, "single GPU N/world"), (N, "single GPU N")):
            leaves = [x[:, :, :n].detach().clone().requires_grad_() for x in (q, k, v)]
            with torch.no_grad():
                row[f"{label} fwd"] = timed(lambda: causal.attention(*leaves), args.reps)
            row[f"{label} fwd+bwd"] = timed(fwd_bwd(lambda: causal.attention(*leaves), leaves, do[:, :, :n]), args.reps)
            leaves = None
        try:  # PyTorch's context parallelism over SDPA (it shards the buffers in place: copies given)
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor.experimental import context_parallel
            from torch.distributed.tensor.experimental._attention import set_rotate_method
            mesh = init_device_mesh("cuda", (world,))
            for method in ("allgather", "alltoall"):
                set_rotate_method(method)
                bufs = [x.clone() for x in (q, k, v, do)]
                with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2]):
                    leaves = [x.detach().requires_grad_() for x in bufs[:3]]
                    sdpa = lambda: F.scaled_dot_product_attention(*leaves, is_causal=True)  # noqa: E731
                    with torch.no_grad():
                        row[f"torch CP sdpa {method} fwd"] = timed(sdpa, args.reps)
                    row[f"torch CP sdpa {method} fwd+bwd"] = timed(fwd_bwd(sdpa, leaves, bufs[3]), args.reps)
                bufs = leaves = None
        except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a crash
            row["torch CP sdpa"] = f"{type(e).__name__}: {str(e)[:160]}"
        if rank == 0:
            print(json.dumps(row), flush=True)
        rows.append(row)
        q = k = v = do = local = None
        torch.cuda.empty_cache()
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
