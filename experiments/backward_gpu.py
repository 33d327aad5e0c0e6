"""Ran on: Triton 3.6.0, torch 2.11.0+cu130 (the device machine; results: data/backward_<date>_<gpu>.json).

The backward's two forms (issue 20) beside SDPA's cuDNN and flash backends in the same process:
per spec and shape (bf16, 16 heads at d128, 32 at d64), the forward, the backward alone (the
module's rt.backward from saved o and lse: the two-kernel deterministic one and, where the module
has it, the single pass with atomic dQ), and SDPA's backward (forward+backward minus forward).
Medians of triton.testing.do_bench. It runs under an older checkout too (PYTHONPATH=that tree:
then only the two-kernel form), for an A/B of a kernel change in the same session.

    PYTHONPATH=. python3 experiments/backward_gpu.py --json $OUT/bwd.json
    PYTHONPATH=old_tree python3 experiments/backward_gpu.py --label before --json $OUT/bwd_before.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import attngen
from attngen import runtime


def _ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, rep=60, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="dense,causal,document")
    ap.add_argument("--shapes", default="4x4096,1x16384")
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--label", default="now")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for name in args.specs.split(","):
        for d in (int(x) for x in args.dims.split(",")):
            from attngen.spec import load_spec
            spec = load_spec(f"specs/{name}.yaml")
            mod = attngen.load(f"specs/{name}.yaml") if spec.head_dim == d else None
            if mod is None:
                import tempfile, pathlib, yaml  # noqa: E401
                data = yaml.safe_load(open(f"specs/{name}.yaml"))
                data["head_dim"], data["name"] = d, f"{name}_d{d}"
                path = pathlib.Path(tempfile.mkdtemp()) / f"{name}_d{d}.yaml"
                path.write_text(yaml.safe_dump(data))
                mod = attngen.load(path)
            rt = runtime.of(mod)
            for shape in args.shapes.split(","):
                B, N = (int(x) for x in shape.split("x"))
                H = 16 if d == 128 else 32
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v, do = (torch.randn(B, H, N, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                kw = {}
                if spec.mask.document:
                    kw["documents"] = (torch.arange(N, device="cuda") // 1000)[None].expand(B, N).to(torch.int32)
                row = {"label": args.label, "spec": name, "d": d, "B": B, "N": N}
                with torch.no_grad():
                    row["fwd"] = _ms(lambda: mod.attention(q, k, v, **kw))
                    o, lse = mod.attention(q, k, v, return_lse=True, **kw)
                hp = rt.head_param_rows(q, {})
                sparse = runtime.Sparse(runtime.Documents(kw["documents"])) if kw else runtime.Sparse()
                row["bwd two kernels"] = _ms(lambda: rt.backward(do, q, k, v, o, lse, hp, rt.scale, 0, 0.0, sparse))
                if hasattr(rt, "deterministic"):
                    row["bwd single pass"] = _ms(lambda: rt.backward(do, q, k, v, o, lse, hp, rt.scale, 0, 0.0, sparse,
                                                                     deterministic=False))
                    a = rt.backward(do, q, k, v, o, lse, hp, rt.scale, 0, 0.0, sparse, deterministic=False)
                    b = rt.backward(do, q, k, v, o, lse, hp, rt.scale, 0, 0.0, sparse)
                    row["single vs two max diff (dq, dk, dv)"] = [float((x.float() - y.float()).abs().max())
                                                                  for x, y in zip(a[:3], b[:3])]
                if not kw:
                    causal = name == "causal"
                    for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                        try:
                            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                            with sdpa_kernel(backend):
                                f = lambda: F.scaled_dot_product_attention(*leaves, is_causal=causal)  # noqa: E731
                                with torch.no_grad():
                                    t_f = _ms(f)
                                t_fb = _ms(lambda: f().backward(do))
                            row[f"sdpa {label} bwd"] = t_fb - t_f
                        except RuntimeError as e:
                            row[f"sdpa {label} bwd"] = f"{type(e).__name__}: {str(e)[:60]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "device": torch.cuda.get_device_name()}, f, indent=1)


if __name__ == "__main__":
    main()
