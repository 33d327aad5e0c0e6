"""What the compiler made of a spec's kernels: registers, spills, shared memory and the instruction
mix of the SASS (HGMMA = Hopper warpgroup MMA, HMMA = the older mma.sync path, UTMALDG = TMA loads,
LDL/STL = local-memory spills), for the cost model's tiling with pointer loads and with TMA loads.

    attngen inspect specs/dense.yaml [--out DIR]            # on a GPU: the kernels as they run
    attngen inspect specs/causal.yaml --offline             # no GPU: compiled for sm90

With offline=True no GPU is needed: each kernel launch is replaced by a compilation for an sm90
target (Triton's own binder decides the specialization, as on a GPU; inputs are CPU tensors), and
the SASS comes from the cubin, through the ptxas and cuobjdump that Triton's NVIDIA backend bundles.
Run it under the Triton the GPU machines have (3.6) to see what they run, e.g. unpacked beside the
installed one:

    pip download triton==3.6.0 --no-deps -d /tmp/w && python -m zipfile -e /tmp/w/triton-3.6.0-*.whl /tmp/t36
    chmod +x /tmp/t36/triton/backends/nvidia/bin/* && PYTHONPATH=/tmp/t36 attngen inspect specs/causal.yaml --offline

Offline differs from a GPU run in the inputs' alignment (CPU allocations, also 16-byte aligned)
and in FAST_TANH, which the host code sets only for CUDA tensors (softcap specs).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

OPS = ("HGMMA", "HMMA", "UTMALDG", "UTMAREDG", "REDG", "LDGSTS", "LDG", "LDL", "STL", "MUFU.EX2", "MUFU.TANH", "BAR.SYNC", "SYNCS")
DTYPES = ("bf16", "fp16", "fp32")


class InspectError(RuntimeError):
    """This machine cannot inspect the kernels as asked; says why and what to do."""


def compiled_kernels(fn):
    """Every CompiledKernel in a JITFunction's caches (the layout of the cache varies by version)."""
    out = []
    for entry in getattr(fn, "device_caches", {}).values():
        for part in entry if isinstance(entry, tuple) else (entry,):
            if isinstance(part, dict):
                out += [k for k in part.values() if hasattr(k, "asm")]
    return out


def _nvidia_tool(name: str) -> str | None:
    """Triton's bundled copy of an NVIDIA tool, else the one on PATH, else None."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def cuobjdump(kernel, flag: str) -> str:
    """cuobjdump's output for the kernel's cubin."""
    tool = _nvidia_tool("cuobjdump") or "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def sass(kernel) -> str:
    try:
        return kernel.asm["sass"]
    except Exception:  # older versions, and offline: disassemble the cubin ourselves
        return cuobjdump(kernel, "-sass")


def offline_run(fn, sink: list, arch: int = 90):
    """A stand-in for JITFunction.run that compiles the launch for an NVIDIA `arch` target instead
    of running it: the installed Triton's binder and argument packing, as a launch would use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)

    def run(*args, grid, warmup, **kwargs):
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        sink.append(triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__))
    return run


def gluon_sm90(fn, args, num_warps: int = 8):
    """A @gluon.jit function compiled for sm90 at these launch arguments, without a GPU (the Gluon
    counterpart of offline_run, which Gluon's binder does not go through)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental import gluon
    from triton.runtime.jit import mangle_type

    consts = {i: a for i, a in enumerate(args) if fn.params[i].is_constexpr}
    sig = {name: "constexpr" if i in consts else mangle_type(a) for i, (name, a) in enumerate(zip(fn.arg_names, args))}
    src = gluon._runtime.GluonASTSource(fn, signature=sig, constexprs={(i,): a for i, a in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": num_warps})


def gluon_dkdv_sm90(head_dim: int, head_dim_v: int, causal: str | None, dtype=None, tiles=None):
    """The runtime's Gluon dK/dV kernel (attngen/runtime/gluon_dkdv.py) compiled for sm90 without a
    GPU, CPU tensors standing in for the launch's (no TRITON_INTERPRET: it compiles, never runs)."""
    import torch

    from attngen.runtime import gluon_dkdv

    dtype = dtype or torch.bfloat16
    q, k = (torch.empty(1, 2, 256, head_dim, dtype=dtype) for _ in range(2))
    v, do = (torch.empty(1, 2, 256, head_dim_v, dtype=dtype) for _ in range(2))
    rows = torch.empty(1, 2, 256)
    return gluon_sm90(gluon_dkdv.kernel(), gluon_dkdv.launch_args(q, k, v, do, rows, rows, k, v, 0.1, causal, tiles))


def registers(kernel) -> int | None:
    """Registers per thread: the loaded kernel's count, or offline the cubin's resource usage."""
    regs = getattr(kernel, "n_regs", None)
    if regs is None:
        found = re.findall(r"REG:(\d+)", cuobjdump(kernel, "-res-usage"))
        regs = int(found[-1]) if found else None
    return regs


def describe(kernel) -> str:
    text = sass(kernel)
    counts = collections.Counter()
    for op in OPS:
        counts[op] = len(re.findall(rf"\b{re.escape(op)}\b", text))
    meta = kernel.metadata
    regs = registers(kernel)
    return (f"regs {'?' if regs is None else regs} spills {getattr(kernel, 'n_spills', '?')} "
            f"smem {getattr(meta, 'shared', '?')} warps {meta.num_warps} stages {meta.num_stages} | "
            + " ".join(f"{op} {counts[op]}" for op in OPS))


def check_offline() -> None:
    """Raises InspectError unless this process can compile kernels for sm90 without a GPU."""
    import triton

    knobs = getattr(triton, "knobs", None)
    interpret = getattr(getattr(knobs, "runtime", None), "interpret", False)
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off") or interpret:
        raise InspectError("--offline compiles the kernels for sm90, which Triton's interpreter cannot: "
                           "unset TRITON_INTERPRET and run again")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 90, 32))
    except Exception as e:
        raise InspectError(f"--offline needs Triton's NVIDIA backend, which this Triton lacks: "
                           f"{type(e).__name__}: {e}") from e
    missing = [tool for tool in ("ptxas", "cuobjdump") if _nvidia_tool(tool) is None]
    if missing:
        raise InspectError(f"--offline needs {' and '.join(missing)} (bundled with Triton's NVIDIA backend, or on "
                           "PATH), to compile for sm90 and read the SASS; none found")


def inspect_spec(spec_path: str | Path, shape: str = "4x16x4096", *, offline: bool = False, out: Path | None = None,
                 roles: Iterable[str] | None = None, dtype: str = "bf16", options: Iterable[str] = (),
                 log: Callable[[str], None] = print) -> list[str]:
    """Prints (through log) and returns one line per kernel role and load path (pointers, TMA): the
    kernel at the cost model's tiling for `dtype`, launched (or, offline, compiled) at `shape`
    (BxHxN), the module compiled with the PassOptions flags in `options` (NAME on, NAME=false off). With `out`, also
    writes each kernel's SASS there."""
    import torch

    import attngen
    from attngen import runtime
    from attngen.bench import parse_shapes
    from attngen.exhaustive import tiling_of, workload
    from attngen.pipeline import compile_spec
    from attngen.runtime import module as runtime_module
    from attngen.runtime.roles import COSTED, ROLES, VARIANTS
    from attngen.spec import load_spec

    if offline:
        check_offline()
    elif not torch.cuda.is_available():
        raise InspectError("attngen inspect needs a CUDA GPU; --offline compiles for sm90 without one")
    roles = list(roles or ROLES)  # bwd_single (the single pass) when asked for
    unknown = [r for r in roles if r not in COSTED]
    if unknown:
        raise InspectError(f"unknown role {unknown[0]!r}; roles: {', '.join(COSTED)}")
    if dtype not in DTYPES:
        raise InspectError(f"unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    spec = load_spec(spec_path)
    if dtype not in spec.dtypes:
        raise InspectError(f"spec {spec.name!r} is built for {', '.join(spec.dtypes)}, not {dtype}: pass --dtype")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    device = "cpu" if offline else "cuda"
    bench_shape = parse_shapes(shape)[0]
    from attngen.passes import PassOptions

    from attngen.tools.ab import flag_values

    flags = flag_values(options)
    compiled = compile_spec(spec_path, options=PassOptions(**flags), stop="tiling")
    module = attngen.load(spec_path, **flags)
    rt = runtime.of(module)
    lines = []
    for role in roles:
        kernel_role = VARIANTS[role][1] if role in VARIANTS else role  # the single pass runs bwd_dkdv's kernel
        fn = rt.kernels[kernel_role]
        if role in VARIANTS:
            found = [v for v in (compiled.kernel(kernel_role).attr("variants").items
                                 if compiled.kernel(kernel_role).attr("variants") else ()) if v.role == role]
            if not found or dtype not in dict(found[0].tiling.by_dtype):
                raise InspectError(f"spec {spec.name!r} has no {role} tiling in {dtype} (a learnable head parameter "
                                   f"keeps the two kernels; or no tiling fits)")
            base = found[0].tiling[dtype]
        else:
            base = compiled.kernel(role).attr("tiling")[dtype]
        for cfg in (replace(base, tma=False), replace(base, tma=True)):
            if hasattr(fn, "device_caches"):
                fn.device_caches.clear()  # so that only this variant is in the cache
            rt.plans.clear()  # a plan may hold a compiled kernel's launcher: launch through Triton again
            sink, saved = [], {}
            if offline:  # every kernel compiles instead of running; only this role's is kept
                for other, kernel in rt.kernels.items():
                    saved[other] = kernel.__dict__.get("run")
                    kernel.run = offline_run(kernel, sink if other == kernel_role else [])
            reductions = runtime_module.tma_reductions
            if offline:  # CPU tensors stand in for the GPU's: compile the single pass's TMA reductions too,
                runtime_module.tma_reductions = lambda device: True
                rt._delta = lambda *args: None  # and not its delta kernel (not a module kernel: it would launch)
            try:
                with tiling_of(module, role, dtype, cfg):
                    workload(module, spec, bench_shape, role, torch_dtype, device)()
                    if not offline:
                        torch.cuda.synchronize()
            except Exception as e:
                line = f"{spec.name} {role} {cfg.short()}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                lines.append(line)
                log(line)
                continue
            finally:
                runtime_module.tma_reductions = reductions
                rt.__dict__.pop("_delta", None)
                for other, run in saved.items():  # the module's kernels launch normally again
                    kernel = rt.kernels[other]
                    if run is None:
                        del kernel.run
                    else:
                        kernel.run = run
                if saved:
                    rt.plans.clear()
            for k in sink or compiled_kernels(fn):
                line = f"{spec.name} {role} {cfg.short()}: {describe(k)}"
                lines.append(line)
                log(line)
                if out:
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"{spec.name}_{role}_{cfg.short().replace(' ', '_')}.sass").write_text(sass(k))
    return lines
