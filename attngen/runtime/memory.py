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
    """Whether the memory spans of a and b (first to last element, on one device) meet. Conservative:
    interleaved views of one buffer count as sharing."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    spans = [(t.data_ptr(), t.data_ptr() + (sum((sz - 1) * st for sz, st in zip(t.shape, t.stride())) + 1)
              * t.element_size()) for t in (a, b)]
    return spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]
