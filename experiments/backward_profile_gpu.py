"""Ran on: Triton 3.9.0's interpreter only (the backward call, on CPU tensors); not yet on a GPU.

Where the two-kernel backward's time goes (issue 20): per spec, head dim and shape (bf16, 16 heads
at d128, 32 at d64), each kernel of `rt.backward` (the module's default form, from saved o and LSE)
timed by torch.profiler over repeated calls (the median per kernel name), its TFLOP/s from the
products it issues (dQ: 3 a tile pair, dK/dV: 4), the kernel's registers and shared memory, and
SDPA cuDNN's backward (forward+backward minus forward) in the same process.

    PYTHONPATH=. python3 experiments/backward_profile_gpu.py --json $OUT/bwd_profile.json
    # one backward per case, for Nsight Compute's sampling of the two kernels:
    ncu --set full --import-source yes -k regex:_attn_bwd -c 2 -o F python3 experiments/backward_profile_gpu.py --once
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import attngen
from attngen import runtime

PRODUCTS = {"_attn_bwd_dq": 3, "_attn_bwd_dkdv": 4}  # matrix products a tile pair issues (D = Dv)


def module(name: str, d: int):
    """The shipped spec at head dim d (a copy of it when d differs)."""
    import pathlib
    import tempfile

    import yaml

    from attngen.spec import load_spec

    path = f"specs/{name}.yaml"
    if load_spec(path).head_dim != d:
        data = yaml.safe_load(open(path))
        data["head_dim"], data["name"] = d, f"{name}_d{d}"
        path = pathlib.Path(tempfile.mkdtemp()) / f"{name}_d{d}.yaml"
        path.write_text(yaml.safe_dump(data))
    return attngen.load(path)


def kernel_times(fn, reps: int) -> dict[str, float]:
    """Median CUDA time (ms) per kernel name over `reps` calls of fn."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0)  # renamed across torch versions
            times.setdefault(e.name, []).append(us / 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="causal,dense")
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--shapes", default="4x4096")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--once", action="store_true", help="one backward per case, nothing timed (for ncu)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for name in args.specs.split(","):
        for d in (int(x) for x in args.dims.split(",")):
            mod = module(name, d)
            rt = runtime.of(mod)
            for shape in args.shapes.split(","):
                B, N = (int(x) for x in shape.split("x"))
                H = 16 if d == 128 else 32
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v, do = (torch.randn(B, H, N, d, generator=g, device="cuda", dtype=torch.bfloat16)
                               for _ in range(4))
                with torch.no_grad():
                    o, lse = mod.attention(q, k, v, return_lse=True)
                hp = rt.head_param_rows(q, {})

                def bwd():
                    return rt.backward(do, q, k, v, o, lse, hp, rt.scale, 0, 0.0, runtime.Sparse())

                if args.once:
                    bwd()
                    torch.cuda.synchronize()
                    continue
                pairs = B * H * N * N * (0.5 if name == "causal" else 1.0)  # score elements
                row = {"spec": name, "d": d, "B": B, "H": H, "N": N, "form": rt.last_backward,
                       "bwd ms": triton.testing.do_bench(bwd, rep=60, return_mode="median"), "kernels": {}}
                for kname, ms in kernel_times(bwd, args.reps).items():
                    entry = {"ms": round(ms, 4)}
                    base = next((p for p in PRODUCTS if kname.startswith(p)), None)
                    if base:
                        entry["TFLOP/s"] = round(2 * d * PRODUCTS[base] * pairs / ms / 1e9, 1)
                        fn = rt.kernels["bwd_dq" if base == "_attn_bwd_dq" else "bwd_dkdv"]
                        from attngen.tools.inspect_kernels import compiled_kernels

                        for ck in compiled_kernels(fn):
                            entry.setdefault("compiled", []).append(
                                {"regs": getattr(ck, "n_regs", None), "spills": getattr(ck, "n_spills", None),
                                 "smem": getattr(ck.metadata, "shared", None), "warps": ck.metadata.num_warps,
                                 "stages": ck.metadata.num_stages})
                    row["kernels"][kname] = entry
                row["tilings"] = {r: rt.config(r, "bf16", N, N) for r in ("bwd_dq", "bwd_dkdv")}
                qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))

                def sdpa(fwd_only: bool):
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=name == "causal")
                        if not fwd_only:
                            out.backward(do)

                try:
                    row["cudnn bwd ms"] = (triton.testing.do_bench(lambda: sdpa(False), rep=60, return_mode="median")
                                           - triton.testing.do_bench(lambda: sdpa(True), rep=60, return_mode="median"))
                except RuntimeError as e:
                    row["cudnn bwd ms"] = f"failed: {str(e).splitlines()[0][:120]}"
                row["backward TFLOP/s (5 products), ours / cuDNN"] = [
                    round(10 * d * pairs / row["bwd ms"] / 1e9, 1),
                    round(10 * d * pairs / row["cudnn bwd ms"] / 1e9, 1) if isinstance(row["cudnn bwd ms"], float) else None]
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "triton": triton.__version__,
                       "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
