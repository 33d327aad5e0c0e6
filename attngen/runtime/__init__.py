"""attngen's runtime: the host code every generated kernel module shares. Plain Python over torch
and Triton (no sympy, jinja or networkx), so a module imports it cheaply, and
`attngen generate --standalone` can inline it into a single file.

    from attngen import runtime
    rt = runtime.of(module)                 # a generated module's KernelModule
    rt.config("fwd", "bf16", 4096, 4096)    # the tiling a call would use
    o, lse = rt.forward(q, k, v, rt.head_param_rows(q, {}), rt.scale, 0, 0.0)
"""

from .block_mask import BlockMask
from .module import KernelModule, default_alibi_slopes
from .sparse import Sparse
from .roles import ROLES, KernelRole
from .tiles import Documents

__all__ = ["BlockMask", "KernelModule", "KernelRole", "ROLES", "Documents", "Sparse", "default_alibi_slopes", "of"]


def of(module) -> KernelModule:
    """The runtime object bound to a generated kernel module."""
    rt = getattr(module, "RUNTIME", None)
    if not isinstance(rt, KernelModule):
        raise TypeError(f"{getattr(module, '__name__', module)!r} is not an attngen kernel module")
    return rt
