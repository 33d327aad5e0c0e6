"""Verification: a generated kernel against the float64 reference, on a matrix of shapes and dtypes.

Tolerance in the manner of FlexAttention's tests: the kernel's error against float64 must be at
most FACTOR x the error of an eager PyTorch computation in the same dtype, plus a tiny absolute
floor; NaN never passes, and rows with no visible key must be exactly zero with LSE = -inf.
Outputs are poisoned with NaN before each run, so an element the kernel never wrote fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import reference
from .loader import load
from .spec import Spec, load_spec

FACTOR = 3.0
FLOOR = {"fp32": 1e-6, "fp16": 1e-5, "bf16": 1e-4}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    layout: str = "bhnd"  # "bnhd": q, k, v are [B, N, H, D] tensors seen through a permute (strided)

    def __str__(self) -> str:
        s = f"B{self.batch} H{self.heads_q}/{self.heads_kv} {self.seq_q}x{self.seq_k}"
        return s + (" strided" if self.layout == "bnhd" else "")


# The interpreter is slow: many small, ragged shapes, Nq != Nk both ways, GQA, strided inputs.
CPU_SHAPES = (
    Shape(1, 2, 1, 37, 53),
    Shape(2, 2, 2, 70, 30, "bnhd"),
    Shape(1, 4, 2, 128, 128),
    Shape(1, 1, 1, 1, 65),
    Shape(1, 2, 1, 150, 300),
)
# Realistic sizes for the GPU, up to 8k tokens.
GPU_SHAPES = (
    Shape(4, 16, 16, 1024, 1024),
    Shape(2, 16, 4, 2048, 2048, "bnhd"),
    Shape(1, 8, 2, 4096, 4096),
    Shape(1, 4, 1, 8192, 8192),
    Shape(2, 8, 8, 1000, 3000),
    Shape(2, 8, 2, 3000, 1000),
    Shape(1, 4, 4, 777, 777),
)


@dataclass(frozen=True)
class Result:
    spec: str
    dtype: str
    shape: Shape
    err: float  # max |o - ref|
    eager_err: float  # max |eager same-dtype - ref|
    lse_err: float
    ok: bool
    why: str = ""


def random_inputs(spec: Spec, shape: Shape, dtype: torch.dtype, device, generator: torch.Generator):
    def make(h: int, n: int, d: int) -> torch.Tensor:
        if shape.layout == "bnhd":
            t = torch.randn(shape.batch, n, h, d, generator=generator, device=device, dtype=torch.float32)
            return t.to(dtype).permute(0, 2, 1, 3)
        return torch.randn(shape.batch, h, n, d, generator=generator, device=device, dtype=torch.float32).to(dtype)

    return (make(shape.heads_q, shape.seq_q, spec.head_dim), make(shape.heads_kv, shape.seq_k, spec.head_dim),
            make(shape.heads_kv, shape.seq_k, spec.head_dim_v))


def _reference(spec: Spec, q, k, v, slopes, dtype):
    """Per (batch, head) to bound memory at 8k tokens; returns (o, lse) on q's device."""
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for b in range(q.shape[0]):
        ob, lb = [], []
        for h in range(q.shape[1]):
            hk = h // group
            o, lse = reference.attention(spec, q[b:b + 1, h:h + 1], k[b:b + 1, hk:hk + 1], v[b:b + 1, hk:hk + 1],
                                         alibi_slopes_=slopes[h:h + 1] if slopes is not None else None, dtype=dtype)
            ob.append(o.double())
            lb.append(lse.double())
        outs.append(torch.cat(ob, dim=1))
        lses.append(torch.cat(lb, dim=1))
    return torch.cat(outs), torch.cat(lses)


def check(spec: Spec, module, shape: Shape, dtype: str, device, seed: int = 0) -> Result:
    g = torch.Generator(device=device).manual_seed(seed)
    tdt = TORCH_DTYPES[dtype]
    q, k, v = random_inputs(spec, shape, tdt, device, g)
    slopes = None
    if spec.score.alibi:  # random slopes exercise the runtime argument; the default is tested too
        slopes = torch.rand(shape.heads_q, generator=g, device=device) if seed % 2 else reference.alibi_slopes(shape.heads_q).to(device)
    out = torch.full((shape.batch, shape.heads_q, shape.seq_q, spec.head_dim_v), float("nan"), dtype=tdt, device=device)
    kwargs = {"alibi_slopes": slopes} if slopes is not None else {}
    o, lse = module.attention(q, k, v, return_lse=True, out=out, **kwargs)
    ref_o, ref_lse = _reference(spec, q, k, v, slopes, torch.float64)
    eager_o, eager_lse = _reference(spec, q, k, v, slopes, tdt)

    def max_err(a, b):
        return float((a.double() - b).abs().max()) if a.numel() else 0.0

    dead = torch.isneginf(ref_lse)  # rows with no visible key
    err, eager_err = max_err(o, ref_o), max_err(eager_o, ref_o)
    lse_err = max_err(lse[~dead], ref_lse[~dead])
    eager_lse_err = max_err(eager_lse[~dead], ref_lse[~dead])
    why = []
    if o.isnan().any() or lse.isnan().any():
        why.append("NaN in output (unwritten or invalid)")
    if err > FACTOR * eager_err + FLOOR[dtype]:
        why.append(f"output error {err:.2e} > {FACTOR} x eager {eager_err:.2e} + {FLOOR[dtype]:.0e}")
    if lse_err > FACTOR * eager_lse_err + FLOOR["fp32"] * 10:
        why.append(f"lse error {lse_err:.2e} > {FACTOR} x eager {eager_lse_err:.2e}")
    if dead.any() and not (bool(torch.isneginf(lse[dead]).all()) and bool((o.transpose(1, 2)[dead.transpose(1, 2)] == 0).all())):
        why.append("rows with no visible key must give zeros and lse = -inf")
    return Result(spec.name, dtype, shape, err, eager_err, lse_err, not why, "; ".join(why))


def verify_spec(path: str | Path, *, device=None, dtypes=None, shapes=None, target: str = "sm90") -> list[Result]:
    spec = load_spec(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = load(path, target=target)
    dtypes = [d for d in (dtypes or spec.dtypes) if d in spec.dtypes]
    if shapes is None:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    return [check(spec, module, s, d, device, seed=i) for d in dtypes for i, s in enumerate(shapes)]


def format_table(results: list[Result]) -> str:
    lines = ["| spec | dtype | shape | max err | eager err | lse err | result |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        verdict = "ok" if r.ok else f"FAIL: {r.why}"
        lines.append(f"| {r.spec} | {r.dtype} | {r.shape} | {r.err:.2e} | {r.eager_err:.2e} | {r.lse_err:.2e} | {verdict} |")
    return "\n".join(lines) + "\n"
