"""A/B of one lowering option (a boolean PassOptions flag): the module compiled with it on against
off, same tilings, bf16: the forward and the backward alone (forward outputs computed once)
replayed as CUDA graphs (GPU time, no host overhead), and forward+backward through autograd as
`bench` times it. For an option the passes set per role (split_loops, nested_runs,
shallow_partial), on and off force it for every kernel: neither arm is the shipped per-role
default. GPU only.

    attngen bench specs/causal.yaml --ab longest_first --shapes 4x16x4096
    attngen bench sliding_window:128 softcap:64 --ab split_loops --shapes 16x16x1024
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Callable, Iterable


def options() -> list[str]:
    """The PassOptions flags an A/B can switch: those that take True and False."""
    from attngen.passes import PassOptions

    hints = typing.get_type_hints(PassOptions)
    return [f.name for f in dataclasses.fields(PassOptions)
            if hints[f.name] is bool or bool in typing.get_args(hints[f.name])]


def check_option(option: str, flag: str = "--ab") -> None:
    """Raises naming the command-line `flag` and the allowed options unless `option` is one."""
    if option not in options():
        raise ValueError(f"{flag}: expected one of {', '.join(options())}, got {option!r}")


SWITCH = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}


def flag_values(names: Iterable[str], flag: str = "--option") -> dict[str, bool]:
    """PassOptions flags from `NAME` (on) or `NAME=false` / `NAME=true` (off / on: a flag that is on
    by default, such as chunked_head_dims, turned off); raises naming `flag` on anything else."""
    out = {}
    for item in names:
        name, _, value = item.partition("=")
        check_option(name, flag)
        if value and value.lower() not in SWITCH:
            raise ValueError(f"{flag}: {item!r}: expected {name} or {name}=true|false")
        out[name] = SWITCH[value.lower()] if value else True
    return out


def option_ab(cases: Iterable[str], option: str, shapes, log: Callable[[str], None] = print) -> list[dict]:
    """For each case (a spec file, or 'name:head_dim' of a shipped spec) and shape: median ms of
    fwd, bwd and fwd+bwd with `option` on and off; logs one line per row and returns the rows."""
    import torch
    import triton

    import attngen
    from attngen import runtime
    from attngen.bench import bench_documents, parse_case
    from attngen.exhaustive import workload
    from attngen.spec import load_spec

    check_option(option)
    bench = lambda fn, **kw: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median", **kw)  # noqa: E731
    graph = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")  # noqa: E731
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; bf16; "
        f"median ms (fwd, bwd: CUDA graphs; fwd+bwd: do_bench); {option} on / off")
    rows = []
    for case in cases:
        path, _ = parse_case(str(case))
        spec = load_spec(path)
        for shape in shapes:
            g = torch.Generator(device="cuda").manual_seed(0)
            mk = lambda d: torch.randn(shape.batch, shape.heads, shape.seq, d, generator=g, device="cuda",  # noqa: E731
                                       dtype=torch.bfloat16)
            q, k, v, do = mk(spec.head_dim), mk(spec.head_dim), mk(spec.head_dim_v), mk(spec.head_dim_v)
            ids = bench_documents(shape, g) if spec.mask.document else None  # the benchmark's documents
            out = {}
            for value in (True, False):
                module = attngen.load(path, **{option: value})
                extra = {"documents": runtime.Documents(ids)} if ids is not None else {}
                fwd = lambda: module.attention(q, k, v, training=False, **extra)  # noqa: E731
                bwd = workload(module, spec, shape, "bwd_dq", torch.bfloat16, "cuda")  # the dQ and dK/dV kernels
                qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
                step = lambda: module.attention(qg, kg, vg, training=False, **extra).backward(do)  # noqa: E731
                out[value] = (graph(fwd), graph(bwd), bench(step, grad_to_none=[qg, kg, vg]))
            on, off = out[True], out[False]
            rows.append({"spec": spec.name, "shape": str(shape), "option": option,
                         **{f"{what}_on_ms": a for what, a in zip(("fwd", "bwd", "fwd+bwd"), on)},
                         **{f"{what}_off_ms": b for what, b in zip(("fwd", "bwd", "fwd+bwd"), off)}})
            log(f"{spec.name:<18} {str(shape):<16} " + " | ".join(
                f"{what} {a:.3f} / {b:.3f} ms ({b / a:.3f}x)" for what, a, b in zip(("fwd", "bwd", "fwd+bwd"), on, off)))
    return rows
