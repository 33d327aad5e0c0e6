"""Ran on: Triton 3.6.0, torch 2.11.0+cu130 (the device machine; results: data/single_pass_<date>_<gpu>.json).

The single-pass backward (issue 20) over every legal TMA tiling (the bwd_single ranking's, then
those only bwd_dkdv's admits), with the cost model's predicted times, beside the
two-kernel backward at the cost model's tilings and the single pass with per-element atomics (no
TMA) at the model's dK/dV tiling, and SDPA's cuDNN backward, in one process: --dtype (bf16), 16 heads at
d128, 32 at d64. Each candidate's gradients are compared with the two kernels'. A candidate whose
kernel does not fit falls back to the two kernels; that is recorded, not timed as the single pass.
Predicted times are the cost model's at the timed shape. With --warm N, N processes first compile the candidates (Triton's cache is shared), then one
process times them.

    PYTHONPATH=. python3 experiments/single_pass_gpu.py --warm 8 --json $OUT/single_pass.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
import triton.testing
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

import attngen
from attngen import runtime
from attngen.exhaustive import tiling_of
from attngen.calibrate import predicted_ms
from attngen.cost_model import CONSTANTS
from attngen.pipeline import compile_spec
from attngen.tiling import TileConfig
from backward_gpu import _ms  # (this folder: run as a script)

TILE_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "HEAD_DIM_PAD", "HEAD_DIM_V_PAD", "TMA")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _module(name: str, d: int):
    data = yaml.safe_load(open(f"specs/{name}.yaml"))
    data["head_dim"], data["name"] = d, f"{name}_d{d}"
    path = pathlib.Path(tempfile.gettempdir()) / f"single_pass_{name}_d{d}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, attngen.load(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="causal,dense")
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--shape", default="4x4096")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--warm", type=int, default=0)
    ap.add_argument("--top", type=int, default=None, help="only the N best-ranked single-pass tilings")
    ap.add_argument("--part", default=None, help="i/n: only compile every n-th candidate from i (warm-up worker)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.warm:
        workers = [subprocess.Popen([sys.executable, __file__, "--specs", args.specs, "--dims", args.dims,
                                     "--shape", args.shape, "--dtype", args.dtype, "--part", f"{i}/{args.warm}"]
                                    + (["--top", str(args.top)] if args.top else []),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(args.warm)]
        for w in workers:
            w.wait()
    part = tuple(int(x) for x in args.part.split("/")) if args.part else None
    B, N = (int(x) for x in args.shape.split("x"))
    rows, count = [], 0
    for name in args.specs.split(","):
        for d in (int(x) for x in args.dims.split(",")):
            path, mod = _module(name, d)
            rt = runtime.of(mod)
            H = 16 if d == 128 else 32
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, do = (torch.randn(B, H, N, d, generator=g, device="cuda", dtype=DTYPES[args.dtype]) for _ in range(4))
            with torch.no_grad():
                o, lse = mod.attention(q, k, v, return_lse=True)
            hp = rt.head_param_rows(q, {})

            def bwd(det):
                return rt.backward(do, q, k, v, o, lse, hp, rt.scale, 0, 0.0, deterministic=det)

            ranks = compile_spec(path, stop="tiling").rankings
            single = ranks["bwd_single"][args.dtype]
            model = ranks["bwd_dkdv"][args.dtype].ranked[0].config

            def predicted(role, cfg):  # the cost model's ms at the timed shape (None: not legal for it)
                return predicted_ms({"shape": [B, H, N], "config": asdict(cfg), "spec_path": str(path), "role": role,
                                     "dtype": args.dtype}, CONSTANTS)

            legal = {p.config for p in single.ranked}
            # the single pass's legal TMA tilings, in its ranking's order, then those only the
            # dK/dV kernel's estimate admits (the single pass's may be too strict)
            tma = args.dtype != "fp32"  # fp32 has no TMA tilings: then all of them
            configs = [p.config for p in single.ranked if p.config.tma or not tma]
            configs += [p.config for p in ranks["bwd_dkdv"][args.dtype].ranked
                        if (p.config.tma or not tma) and p.config not in configs]
            configs = configs[:args.top]
            cands = [("single pass, dK/dV kernel's tiling, no TMA", replace(model, tma=False))]
            cands += [(f"single pass, {'model rank %d' % (i + 1) if c in legal else 'not legal for the model'}", c)
                      for i, c in enumerate(configs)]
            if part:
                for label, cfg in cands:
                    if count % part[1] == part[0]:
                        with tiling_of(mod, "bwd_single", args.dtype, cfg):
                            try:
                                bwd(False)
                            except Exception:
                                pass
                    count += 1
                continue
            want = bwd(True)
            base = {"spec": name, "d": d, "B": B, "H": H, "N": N}
            two = sum(predicted(r, TileConfig(*(rt.config(r, args.dtype, N, N)[f] for f in TILE_FIELDS)))
                      for r in ("bwd_dq", "bwd_dkdv"))
            rows.append({**base, "form": "two kernels (model's tilings)", "predicted ms": two, "ms": _ms(lambda: bwd(True))})
            print(json.dumps(rows[-1]), flush=True)
            for label, cfg in cands:
                row = {**base, "form": label, "tiling": cfg.short(), "predicted ms": predicted("bwd_single", cfg)}
                with tiling_of(mod, "bwd_single", args.dtype, cfg):
                    try:
                        got = bwd(False)
                        row["ran"] = rt.last_backward
                        row["max rel diff vs two kernels"] = max(
                            float((x.float() - y.float()).abs().max() / y.float().abs().max()) for x, y in zip(got[:3], want[:3]))
                        if rt.last_backward == "single pass":
                            row["ms"] = _ms(lambda: bwd(False))
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    f = lambda: F.scaled_dot_product_attention(*leaves, is_causal=name == "causal")  # noqa: E731
                    with torch.no_grad():
                        t_f = _ms(f)
                    rows.append({**base, "form": "sdpa cudnn bwd", "ms": _ms(lambda: f().backward(do)) - t_f})
            except RuntimeError as e:
                rows.append({**base, "form": "sdpa cudnn bwd", "error": str(e)[:120]})
            print(json.dumps(rows[-1]), flush=True)
    if args.json and not part:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "triton": triton.__version__,
                       "device": torch.cuda.get_device_name()}, f, indent=1)


if __name__ == "__main__":
    main()
