"""Launch plans: everything about one kernel launch that its call signature decides (grid, TMA
descriptors, the arguments between the tensors and the per-call scalars, the constexprs), made
once per signature; later calls only re-base the descriptors and launch."""

from __future__ import annotations

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton < 3.4 has no host-side descriptors: no TMA
    TensorDescriptor = None


def native_nvidia(kernel) -> bool:
    """Compiled for an NVIDIA GPU (not the interpreter, whose kernels are not JITFunctions, nor
    ROCm): where PTX inline assembly can run."""
    return isinstance(kernel, triton.runtime.jit.JITFunction) and torch.version.hip is None


def direct_launch(kernel) -> bool:
    """Whether a compiled kernel can be launched directly (see Plan)."""
    return (native_nvidia(kernel) and hasattr(triton.compiler.CompiledKernel, "__getitem__")
            and hasattr(torch._C, "_cuda_getCurrentRawStream") and hasattr(torch._C, "_cuda_getDevice"))


_TMA_CAPABLE: dict = {}


def tma_capable(device: torch.device) -> bool:
    """Hopper (compute capability 9) and later have TMA; the interpreter (CPU tensors) emulates it."""
    if device not in _TMA_CAPABLE:
        _TMA_CAPABLE[device] = TensorDescriptor is not None and (
            device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9)
    return _TMA_CAPABLE[device]


def descriptors(cfg: dict, tensors, blocks: dict[int, tuple[int, int]]):
    """Per tensor argument, a TMA descriptor template where the kernel reads it through TMA, else
    None; and whether it does. `blocks` maps the positions of the tensors the kernel may read
    through TMA to their boxes (rows, columns). TMA is used when the tiling asks for it and every such
    tensor allows it (last dim contiguous, other strides and the base 16-byte aligned)."""
    chosen = [tensors[i] for i in blocks]
    tma = (cfg.get("TMA", False) and tma_capable(chosen[0].device)
           and all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                   and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in chosen))
    if not tma:
        return [None] * len(tensors), False
    out = [None] * len(tensors)
    for i, (rows, cols) in blocks.items():
        desc = TensorDescriptor.from_tensor(tensors[i], [1, 1, rows, cols])
        desc.base = None  # a template (rebased): a plan must not keep its first call's tensors alive
        out[i] = desc
    return out, True


def rebased(desc, t):
    """A copy of TMA descriptor `desc` over tensor t, which has the dtype, shape, strides and
    alignment of the tensor desc was made and checked for (the call signature says so)."""
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(desc.__dict__)
    d.base = t
    return d


def wide_offsets(*tensors) -> bool:
    """Whether, within one (batch, head), some tensor's last row or column lies 2^31 elements or
    more from its first: then the kernels compute addresses in int64 (else in int32)."""
    return any((t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3)) >= 2**31 for t in tensors)


class Plan:
    """One kernel's launch as far as the call's signature decides it. Once Triton has launched the
    kernel on an NVIDIA GPU, later calls launch the compiled kernel directly, on the current
    device's current stream as Triton does, skipping Triton's per-call binding and cache lookup:
    the signature holds everything Triton specializes a kernel on, so it would pick the same
    compiled kernel. (Also skipped: Triton's pre-run hooks, and a change of its debug or
    instrumentation knobs after the first launch.)"""

    def __init__(self, kernel, grid, descs, middle, consts, direct: bool):
        self.kernel, self.grid, self.descs = kernel, grid, descs
        self.middle, self.consts, self.direct = list(middle), consts, direct
        self.runner = self.constexprs = None

    def __call__(self, tensors, scalars):
        args = [t if d is None else rebased(d, t) for d, t in zip(self.descs, tensors)]
        args += self.middle
        args += scalars
        if self.runner is not None:
            self.runner(*args, *self.constexprs, stream=torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice()))
            return
        compiled = self.kernel[self.grid](*args, **self.consts)
        if self.direct and compiled is not None:
            # the launcher takes every parameter in order; the constexprs are the trailing ones
            self.constexprs = [self.consts[name] for name in self.kernel.arg_names[len(args):]]
            self.runner = compiled[self.grid]


def int_kind(x: int) -> int:
    """The integer type Triton gives an unspecialized int argument: 0 i32, 1 i64, 2 u64."""
    return 0 if -2**31 <= x < 2**31 else 1 if -2**63 <= x < 2**63 else 2


def signature(role: str, cfg: dict, tensors, seed: int, flags) -> tuple:
    """What a launch plan depends on: the tiling, the tensors' device and the current CUDA device
    (a compiled kernel is loaded per device), each tensor argument's dtype, shape, strides and
    16-byte alignment, the seed's integer type (the kernels do not specialize on its value), the
    flags."""
    q = tensors[0]
    return (role, tuple(cfg.items()), q.device, torch._C._cuda_getDevice() if q.is_cuda else None, flags,
            int_kind(seed), *[(t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0) for t in tensors])
