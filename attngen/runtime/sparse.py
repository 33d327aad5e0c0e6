"""A call's data-dependent sparsity (documents, a block mask, packed sequences), which its tile
tables are built from, and the objects made once from a call's tensors and kept while they hold the
same values (a model passes one batch's ids, one step's layout to every layer)."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .block_mask import BlockMask
from .tiles import Documents
from .varlen import Seqlens


class Sparse(NamedTuple):
    """A call's data-dependent sparsity, which its tile tables are built from."""
    documents: Documents | None = None
    block_mask: BlockMask | None = None
    seqlens: Seqlens | None = None  # packed sequences: q, k, v are [1, H, total, D] views


NO_SPARSE = Sparse()


_MADE = {"documents": WeakIdKeyDictionary(), "layout": WeakIdKeyDictionary()}  # first tensor -> (a weak
# reference to the second, their versions, the object made from them)


def made_for(kind: str, a: torch.Tensor, b: torch.Tensor, make):
    """make(), kept while the same tensors hold the same values (a model passes one batch's ids or
    one step's layout to every layer), so the tile tables made from them are built once."""
    if torch.compiler.is_compiling():
        return make()  # traced: the op keeps its own per tensor at run time (library.py)
    if a.is_cuda and torch.cuda.is_current_stream_capturing():
        return make()  # built inside the CUDA graph on every replay; a kept one would leak its pool
    made = _MADE[kind]
    hit = made.get(a)
    if hit is not None and hit[0]() is b and hit[1] == (a._version, b._version):
        return hit[2]
    obj = make()  # copies the tensors: holds neither
    made[a] = (weakref.ref(b), (a._version, b._version), obj)
    return obj


_SEQLENS = WeakIdKeyDictionary()  # cu_seqlens_q -> (a weak reference to cu_seqlens_k, versions, arguments, Seqlens)


def kept_seqlens(cu_q, cu_k, max_q: int, max_k: int, total_q: int, total_k: int) -> Seqlens:
    """The Seqlens of these tensors, kept while they hold the same values (a model passes one
    batch's to every layer), so the lengths are read and checked once."""
    if not isinstance(cu_q, torch.Tensor) or not isinstance(cu_k, torch.Tensor):
        return Seqlens(cu_q, cu_k, max_q, max_k, total_q, total_k)  # raises the type error
    args = (int(max_q), int(max_k), total_q, total_k)
    hit = _SEQLENS.get(cu_q)
    if hit is not None and hit[0]() is cu_k and hit[1] == (cu_q._version, cu_k._version) and hit[2] == args:
        return hit[3]
    made = Seqlens(cu_q, cu_k, *args)
    _SEQLENS[cu_q] = (weakref.ref(cu_k), (cu_q._version, cu_k._version), args, made)
    return made
