"""Memory questions the entry points ask of the tensors a kernel writes in place (`out=`, a KV cache
being appended to): whether a tensor names one element twice, and whether two tensors overlap."""

from __future__ import annotations

import torch


def internal_overlap(t: torch.Tensor) -> bool:
    """Whether two indices of t may name one element: a stride 0 (an expanded dim) or dims whose
    strides interleave. Conservative: with the dims sorted by stride, each must step past the
    whole extent of those below it."""
    dims = [(st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1]
    extent = 1  # elements spanned by the dims below, plus one
    while dims:  # (by comparisons, not sorted(): torch.compile traces these on symbolic sizes)
        low = 0
        for i in range(1, len(dims)):
            if dims[i][0] < dims[low][0]:
                low = i
        stride, size = dims.pop(low)
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (on one device) may hold a common element. Exact for two views with the same
    strides and dtype, neither overlapping itself (e.g. k and v interleaved in one [pages, 2, page,
    H, D] buffer, or out beside q): an element offset a -> b must then be a sum of strides times
    index differences within both shapes. Otherwise whether their memory spans meet (conservative)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    spans = [(t.data_ptr(), t.data_ptr() + (sum((sz - 1) * st for sz, st in zip(t.shape, t.stride())) + 1)
              * t.element_size()) for t in (a, b)]
    if not (spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]):
        return False
    diff, rest = divmod(b.data_ptr() - a.data_ptr(), a.element_size())
    if (a.stride() != b.stride() or a.dtype != b.dtype or a.dim() != b.dim() or rest
            or internal_overlap(a) or internal_overlap(b)):
        return True
    # index differences c_d in (-b.shape[d], a.shape[d]) with sum c_d stride_d = diff: a common element
    dims = sorted(((st, sa, sb) for st, sa, sb in zip(a.stride(), a.shape, b.shape) if max(sa, sb) > 1), reverse=True)
    below = [sum((max(sa, sb) - 1) * st for st, sa, sb in dims[i + 1:]) for i in range(len(dims))]

    def solve(i: int, r: int) -> bool:
        if i == len(dims):
            return r == 0
        st, sa, sb = dims[i]
        lo, hi = max(-(sb - 1), -((below[i] - r) // st)), min(sa - 1, (r + below[i]) // st)
        if hi - lo > 3:  # strides not nested: give the conservative answer
            return True
        return any(solve(i + 1, r - c * st) for c in range(lo, hi + 1))

    return solve(0, diff)
