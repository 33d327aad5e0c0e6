"""The integer helpers a rendered host-side mask (`_visible_host`, symbolic.render(..., "torch"))
calls: Python's floor semantics, for Python ints and tensors alike."""

from __future__ import annotations

import torch


def host_floordiv(a, c):
    return torch.div(a, c, rounding_mode="floor") if isinstance(a, torch.Tensor) else a // c


def host_mod(a, c):  # Python's sign convention, for ints and tensors alike
    return a % c


def host_min(a, b):  # either may be a Python int
    return torch.where(a <= b, a, b) if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else min(a, b)


def host_max(a, b):
    return torch.where(a >= b, a, b) if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else max(a, b)
