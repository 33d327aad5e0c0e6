"""Unusual strides at the entry points (issue 18): `attention` (and its `out=`), `attention_varlen`
and `attention_with_kvcache` take tensors of any strides the kernels can address (a head dim that
is not innermost, stride 0 from expand, transformers' [B, N, H, D].transpose(1, 2)) and give the
bits of their contiguous copies; what they cannot take is refused with the argument named: an `out=`
with overlapping elements, sharing memory with an input, or of another shape, dtype or device (it is
written in place, never through a copy), and an append into a cache whose elements overlap or that
shares memory with the appended k, v. The append writes into the caller's cache, whatever its
strides, and nowhere else."""

from __future__ import annotations

import pytest
import torch

import attngen
from attngen import reference
from attngen.spec import load_spec
from attngen.verify import paged as as_pages

B, H, N, D = 2, 2, 24, 32
DTYPES = [torch.float32, torch.float16]  # (bf16: not on the interpreter)
SPEC = """name: strides32
description: causal, head dim 32 (tests/test_strides.py)
head_dim: 32
dtypes: [fp16, bf16, fp32]
mask:
  causal: {align: top_left}
"""


@pytest.fixture(scope="module")
def spec_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("strides") / "strides32.yaml"
    path.write_text(SPEC)
    return load_spec(path), attngen.load(path)


def _randn(*shape, dtype, device, g):
    return torch.randn(*shape, generator=g).to(device, dtype)


def _same(got, want):
    """The contiguous copies' bits on the interpreter; on a GPU (other loads, e.g. TMA for contiguous
    tensors only) within a rounding."""
    if got.device.type == "cpu":
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 if got.dtype == torch.float16 else 1e-5)


def _grads(module, tensors, build, do=None):
    """o and the gradients of `tensors` (leaves) of module.attention(*build(*tensors)), backward from do
    (None: o.sum(), whose gradient is an expanded tensor of ones, strides 0)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    o = module.attention(*build(*leaves))
    (o.sum() if do is None else o).backward(None if do is None else do)
    return [o.detach()] + [t.grad for t in leaves]


@pytest.mark.interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_head_dim_that_is_not_innermost_gives_the_contiguous_bits(spec_module, dtype, device):
    """Last-dim strides 2, N and B*H*N (a slice; permutations with D outer): the contiguous copies'
    bits (and those are the reference's); with GQA too."""
    spec, module = spec_module
    g = torch.Generator().manual_seed(0)
    q = _randn(B, H, N, 2 * D, dtype=dtype, device=device, g=g)[..., ::2]  # a slice: D stride 2
    k = _randn(B, H, D, N, dtype=dtype, device=device, g=g).transpose(-1, -2)  # D outermost but batch, heads
    v = _randn(D, B, H, N, dtype=dtype, device=device, g=g).permute(1, 2, 3, 0)  # D outermost of all
    assert q.stride(-1) == 2 and k.stride(-1) == N and v.stride(-1) == B * H * N
    want = module.attention(q.contiguous(), k.contiguous(), v.contiguous())
    _same(module.attention(q, k, v), want)
    ref, _ = reference.attention(spec, q, k, v)
    assert (want.double() - ref).abs().max() < (2e-3 if dtype == torch.float16 else 1e-5)
    # GQA (one KV head for two query heads) from the same strided k, v
    _same(module.attention(q, k[:, :1], v[:, 1:]), module.attention(q.contiguous(), k[:, :1].contiguous(),
                                                                     v[:, 1:].contiguous()))


@pytest.mark.interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_expanded_inputs_forward_and_backward(spec_module, dtype, device):
    """Stride 0: k expanded over heads, v over batch (and sliced along D), q over the sequence; the
    gradients reach the unexpanded tensors summed (autograd's expand), from a strided dO and from
    o.sum()'s all-stride-0 dO."""
    _, module = spec_module
    g = torch.Generator().manual_seed(1)
    q = _randn(B, H, N, D, dtype=dtype, device=device, g=g)
    q_row = _randn(B, H, 1, D, dtype=dtype, device=device, g=g)
    k1 = _randn(B, 1, N, D, dtype=dtype, device=device, g=g)
    v1 = _randn(1, H, N, 2 * D, dtype=dtype, device=device, g=g)
    do = _randn(B, H, N, 3 * D, dtype=dtype, device=device, g=g)[..., ::3]

    def expanded(q, k1, v1):
        return q, k1.expand(B, H, N, D), v1[..., ::2].expand(B, H, N, D)

    def copied(*tensors):
        return [t.contiguous() for t in expanded(*tensors)]
    assert expanded(q, k1, v1)[1].stride(1) == 0 and expanded(q, k1, v1)[2].stride(0) == 0
    for dO in (do, None):
        for got, want in zip(_grads(module, (q, k1, v1), expanded, dO), _grads(module, (q, k1, v1), copied, dO)):
            _same(got, want)
    # every query the same row: q stride 0 along the sequence (and over nothing else)
    row_expanded = lambda q, k1, v1: [q.expand(B, H, N, D), *expanded(q, k1, v1)[1:]]  # noqa: E731
    row_copied = lambda *t: [x.contiguous() for x in row_expanded(*t)]  # noqa: E731
    for got, want in zip(_grads(module, (q_row, k1, v1), row_expanded), _grads(module, (q_row, k1, v1), row_copied)):
        _same(got, want)


@pytest.mark.interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_transformers_layout_backward(spec_module, dtype, device):
    """q, k, v and dO as [B, N, H, D].transpose(1, 2): the contiguous copies' o and gradients (in
    the inputs' own layout), and the float64 reference's."""
    spec, module = spec_module
    g = torch.Generator().manual_seed(2)
    bnhd = [_randn(B, N, H, D, dtype=dtype, device=device, g=g) for _ in range(4)]
    got = _grads(module, bnhd[:3], lambda *t: (x.transpose(1, 2) for x in t), bnhd[3].transpose(1, 2))
    want = _grads(module, bnhd[:3], lambda *t: (x.transpose(1, 2).contiguous() for x in t),
                  bnhd[3].transpose(1, 2).contiguous())
    for a, b in zip(got, want):
        _same(a, b)
    leaves = [t.detach().clone().requires_grad_() for t in bnhd[:3]]
    o, _ = reference.attention(spec, *(t.transpose(1, 2) for t in leaves))
    o.backward(bnhd[3].transpose(1, 2).double())
    tol = 5e-3 if dtype == torch.float16 else 1e-5
    assert (got[0].double() - o).abs().max() < tol
    for mine, ref in zip(got[1:], leaves):
        assert (mine.double() - ref.grad).abs().max() < tol


@pytest.mark.interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_any_non_overlapping_strides_is_written_in_place(spec_module, dtype, device):
    """out= transposed, sliced along D (every other element: the others untouched), and q, k, v of
    one packed buffer with out beside them in another."""
    _, module = spec_module
    g = torch.Generator().manual_seed(3)
    q, k, v = (_randn(B, H, N, D, dtype=dtype, device=device, g=g) for _ in range(3))
    want, want_lse = module.attention(q, k, v, return_lse=True)
    outs = [torch.empty(B, N, H, D, dtype=dtype, device=device).transpose(1, 2),
            torch.zeros(B, H, N, 2 * D, dtype=dtype, device=device)[..., 1::2]]
    for out in outs:
        o, lse = module.attention(q, k, v, out=out, return_lse=True)
        assert o is out
        _same(out, want)
        _same(lse, want_lse)
    assert torch.equal(outs[1]._base[..., ::2], torch.zeros_like(want))  # the interleaved elements: not written
    packed = torch.stack([q, k, v], 3).transpose(1, 2)  # [B, N, H, 3, D], q, k, v views of it
    out = torch.empty(B, N, H, D, dtype=dtype, device=device).transpose(1, 2)
    assert module.attention(*(packed.transpose(1, 2)[..., i, :] for i in range(3)), out=out) is out
    _same(out, want)


@pytest.mark.compiler
def test_bad_out_is_refused_with_the_argument_named(spec_module, device):
    """Nothing is written through a copy, cast or moved: an out= the kernel cannot write in place is
    refused, and left as it was."""
    _, module = spec_module
    g = torch.Generator().manual_seed(4)
    q = _randn(B, H, N, D, dtype=torch.float32, device=device, g=g)
    kv = _randn(B, H, N, 2 * D, dtype=torch.float32, device=device, g=g)  # k, v: views of one buffer
    k, v = kv[..., :D], kv[..., D:]
    other = "meta" if device == "cpu" else "cpu"
    cases = [
        (torch.zeros(B, H, 1, D, device=device).expand(B, H, N, D), ValueError,
         r"out is not supported because it has overlapping elements \(strides \[64, 32, 0, 1\]: a stride 0"),
        (torch.zeros(B, H, N, D, device=device).as_strided((B, H, N, D), (H * N * D, N * D, D // 2, 1)), ValueError,
         "out is not supported because it has overlapping elements"),  # rows overlapping by half
        (q, ValueError, "out is not supported because it shares memory with q"),
        (kv[..., 8:8 + D], ValueError, "out is not supported because it shares memory with k"),
        (kv[..., D:], ValueError, "shares memory with v"),  # v's elements (k, interleaved with it, holds none)
        (torch.zeros(B, H, N - 1, D, device=device), ValueError,
         r"out must be \[2, 2, 24, 32\] \(batch, query heads, Nq, head_dim_v\) on q's device"),
        (torch.zeros(B, H, N + 1, D, device=device), ValueError, r"out must be \[2, 2, 24, 32\]"),
        (torch.zeros(B, H, N, D, dtype=torch.float64, device=device), TypeError,
         r"out must be a tensor of q's dtype \(torch.float32\); got torch.float64"),
        (torch.zeros(B, H, N, D, dtype=torch.float16, device=device), TypeError, "out must be a tensor of q's dtype"),
        (torch.zeros(B, H, N, D, device=other), ValueError, f"on q's device .*; got .* on {other}"),
        ([[0.0]], TypeError, "out must be a tensor of q's dtype .*; got list"),
    ]
    for out, error, fragment in cases:
        before = out.clone() if isinstance(out, torch.Tensor) and out.device.type != "meta" else None
        with pytest.raises(error, match=fragment):
            module.attention(q, k, v, out=out)
        if before is not None:
            assert torch.equal(out, before)
    with pytest.raises(ValueError, match="out= cannot be used when gradients are required"):
        module.attention(q.clone().requires_grad_(), k, v, out=torch.empty_like(q))


@pytest.mark.interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_strided_inputs_forward_and_backward(spec_module, dtype, device):
    """Packed q with D stride 2 and heads outermost, k expanded over heads, v transposed, the cu_seqlens
    views of wider tensors: the contiguous copies' o and gradients."""
    _, module = spec_module
    g = torch.Generator().manual_seed(5)
    total = 30
    cu = torch.tensor([0, 10, 30], dtype=torch.int32, device=device)
    cu_wide = torch.stack([cu, torch.full_like(cu, 10**6)], 1)[:, 0]  # stride 2
    assert cu_wide.stride() == (2,)
    q = _randn(H, total, 2 * D, dtype=dtype, device=device, g=g)
    k1 = _randn(total, 1, D, dtype=dtype, device=device, g=g)
    v = _randn(H, total, D, dtype=dtype, device=device, g=g)
    do = _randn(total, H, D, dtype=dtype, device=device, g=g)

    def run(view, cu_seqlens):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k1, v)]
        o = module.attention_varlen(*view(*leaves), cu_seqlens, cu_seqlens, 20, 20)
        o.backward(do)
        return [o.detach()] + [t.grad for t in leaves]

    def strided(q, k1, v):
        return q[..., ::2].transpose(0, 1), k1.expand(total, H, D), v.transpose(0, 1)
    got = run(strided, cu_wide)
    want = run(lambda *t: [x.contiguous() for x in strided(*t)], cu)
    for a, b in zip(got, want):
        _same(a, b)


def _cache_case(dtype, device, g, Hkv=2, G=2, Nq=2, S=40):
    q = _randn(B, Hkv * G, Nq, D, dtype=dtype, device=device, g=g)
    lengths = torch.tensor([5, S - Nq], dtype=torch.int32, device=device)
    k_new = _randn(B, Nq, Hkv, 2 * D, dtype=dtype, device=device, g=g)[..., :D].transpose(1, 2)  # [B, Hkv, Nq, D]
    v_new = _randn(B, Hkv, D, Nq, dtype=dtype, device=device, g=g).transpose(2, 3)
    assert not k_new.is_contiguous() and not v_new.is_contiguous()
    return q, lengths, k_new, v_new


# Caches as views of bigger ones [B, Hkv + 1, S + 24, 2D]: along S, along the heads, along D (stride 2),
# and [B, S, Hkv, D].transpose(1, 2) (the heads inside the positions).
VIEWS = {"positions": lambda big: big[:, :2, :40, :D], "heads": lambda big: big[:, 1:, :40, D:],
         "head_dim": lambda big: big[:, :2, 8:48, ::2],
         "bshd": lambda big: big[:, 0, :, :2 * D].reshape(B, S_BIG, 2, D)[:, :40].transpose(1, 2)}
S_BIG = 64


@pytest.mark.interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", list(VIEWS))
def test_a_strided_cache_is_read_and_appended_in_place(spec_module, dtype, view, device):
    """The append writes k, v into the caller's cache (a view of a bigger buffer), at the view's
    positions and nowhere else in the buffer; the attention gives the contiguous cache's bits; q
    strided and expanded too."""
    spec, module = spec_module
    g = torch.Generator().manual_seed(6)
    q, lengths, k_new, v_new = _cache_case(dtype, device, g)
    big_k, big_v = (_randn(B, 3, S_BIG, 2 * D, dtype=dtype, device=device, g=g) for _ in range(2))
    want_k, want_v = big_k.clone(), big_v.clone()
    for b, n in enumerate(lengths.tolist()):  # the expected buffers: the new rows at the view's positions
        VIEWS[view](want_k)[b, :, n:n + 2] = k_new[b]
        VIEWS[view](want_v)[b, :, n:n + 2] = v_new[b]
    k_cache, v_cache = VIEWS[view](big_k), VIEWS[view](big_v)
    assert not k_cache.is_contiguous() and tuple(k_cache.shape) == (B, 2, 40, D)
    assert k_cache._base is big_k and v_cache._base is big_v and not torch.equal(want_k, big_k)  # views, to be written
    with torch.no_grad():
        o, lse = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k=k_new, v=v_new,
                                               return_lse=True)
        assert torch.equal(big_k, want_k) and torch.equal(big_v, want_v)
        wk, wv = VIEWS[view](want_k).contiguous(), VIEWS[view](want_v).contiguous()
        want_o, want_lse = module.attention_with_kvcache(q, wk, wv, cache_seqlens=lengths + 2, return_lse=True)
        _same(o, want_o)
        _same(lse, want_lse)
        ref, _ = reference.decode(spec, q, wk, wv, lengths + 2)
        assert (o.double() - ref).abs().max() < (2e-3 if dtype == torch.float16 else 1e-5)
        if view == "head_dim":  # q with D stride 3 and heads outermost; q expanded over its heads
            q_strided = _randn(4, B, 2, 3 * D, dtype=dtype, device=device, g=g)[..., ::3].permute(1, 0, 2, 3)
            q_expanded = q[:, :1].expand(B, 4, 2, D)
            for q_ in (q_strided, q_expanded):
                _same(module.attention_with_kvcache(q_, k_cache, v_cache, cache_seqlens=lengths + 2),
                      module.attention_with_kvcache(q_.contiguous(), wk, wv, cache_seqlens=lengths + 2))


@pytest.mark.interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_pages_expanded_caches_lengths_and_tables(spec_module, dtype, device):
    """Paged caches sliced along the heads and D, appended in place; a cache expanded over the batch
    (read only: no append); cache_seqlens and block_table expanded (stride 0) and strided."""
    _, module = spec_module
    g = torch.Generator().manual_seed(7)
    q, lengths, k_new, v_new = _cache_case(dtype, device, g)
    dense = _randn(B, 2, 40, D, dtype=dtype, device=device, g=g)
    table = torch.randperm(6, generator=g).reshape(B, 3).to(device, torch.int32)
    pages = as_pages(dense, 16, table)  # [6, 16, 2, D]
    big = _randn(6, 16, 4, 2 * D, dtype=dtype, device=device, g=g)
    big[:, :, 1:3, 1::2] = pages
    want_big = big.clone()
    view = lambda t: t[:, :, 1:3, 1::2]  # noqa: E731
    with torch.no_grad():
        ref_pages = pages.clone()
        want = module.attention_with_kvcache(q, ref_pages, ref_pages.clone(), cache_seqlens=lengths, block_table=table,
                                             k=k_new, v=k_new)
        view(want_big).copy_(ref_pages)
        got = module.attention_with_kvcache(q, view(big), pages.clone(), cache_seqlens=lengths, block_table=table,
                                            k=k_new, v=k_new)
        _same(got, want)
        assert torch.equal(big, want_big)  # written in place, the other heads and D's other half untouched
        # one cache for every sequence (stride 0 over the batch): read as it is
        shared = dense[:1].expand(B, 2, 40, D)
        _same(module.attention_with_kvcache(q, shared, shared, cache_seqlens=lengths),
              module.attention_with_kvcache(q, shared.contiguous(), shared.contiguous(), cache_seqlens=lengths))
        # lengths and table: one row expanded, and views of wider tensors
        one = torch.tensor([33], dtype=torch.int32, device=device).expand(B)
        row = table[:1].expand(B, 3)
        wide_table = torch.stack([row, torch.full_like(row, 10**6)], 2).reshape(B, -1)[:, ::2]
        for lens, tab in ((one, row), (one, wide_table)):
            _same(module.attention_with_kvcache(q, pages, pages, cache_seqlens=lens, block_table=tab),
                  module.attention_with_kvcache(q, pages, pages, cache_seqlens=lens.contiguous(),
                                                block_table=tab.contiguous()))


@pytest.mark.compiler
def test_bad_appends_and_index_dtypes_are_refused_with_the_argument_named(spec_module, device):
    """An append into a cache whose elements overlap (stride 0), into k_cache = v_cache, or from a k, v
    sharing the caches' memory, is refused before anything is written; int64 lengths and tables
    are refused, not cast."""
    _, module = spec_module
    g = torch.Generator().manual_seed(8)
    q, lengths, k_new, v_new = _cache_case(torch.float32, device, g)
    k_cache, v_cache = (_randn(B, 2, 40, D, dtype=torch.float32, device=device, g=g) for _ in range(2))
    shared = k_cache[:1].expand(B, 2, 40, D)
    table = torch.arange(6, dtype=torch.int32, device=device).reshape(B, 3)
    pages = as_pages(k_cache, 16, table)
    cases = [
        (dict(k_cache=shared), ValueError, r"appending k, v is not supported because k_cache has overlapping "
                                           r"elements \(strides \[0, 1280, 32, 1\] for shape \[2, 2, 40, 32\]"),
        (dict(v_cache=shared), ValueError, "because v_cache has overlapping elements"),
        (dict(v_cache=k_cache), ValueError, "because k_cache shares memory with v_cache"),
        (dict(k=k_cache[:, :, 10:12]), ValueError, "because k shares memory with k_cache"),
        (dict(v=k_cache[:, :, 10:12]), ValueError, "because v shares memory with k_cache"),
        (dict(k=v_cache[:, :, :2].clone(), v=v_cache[:, :, 30:32]), ValueError, "because v shares memory with v_cache"),
        (dict(cache_seqlens=lengths.long()), TypeError,
         r"cache_seqlens must be int32 \[2\]; got torch.int64"),
        (dict(k_cache=pages, v_cache=pages.clone(), block_table=table.long()), TypeError,
         r"block_table must be int32 \[batch=2, pages per sequence\]; got torch.int64"),
    ]
    for kwargs, error, fragment in cases:
        args = {"k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": lengths, "k": k_new, "v": v_new, **kwargs}
        caches = (k_cache, v_cache, pages)
        before = [t.clone() for t in caches]
        with torch.no_grad(), pytest.raises(error, match=fragment):
            module.attention_with_kvcache(q, args.pop("k_cache"), args.pop("v_cache"), **args)
        assert all(torch.equal(a, b) for a, b in zip(caches, before))  # nothing written


@pytest.mark.interp
def test_interleaved_kv_pages_and_out_beside_q_are_taken(spec_module, device):
    """k and v pages interleaved in one [pages, 2, page, H, D] buffer (FlashInfer's layout) hold no
    common element: the append writes each in place; an out= sharing a buffer with q without
    sharing elements is written in place too."""
    _, module = spec_module
    g = torch.Generator().manual_seed(9)
    q, lengths, k_new, v_new = _cache_case(torch.float32, device, g)
    table = torch.arange(6, dtype=torch.int32, device=device).reshape(B, 3)
    kv = _randn(6, 2, 16, 2, D, dtype=torch.float32, device=device, g=g)  # pages, k|v, page, Hkv, D
    k_pages, v_pages = kv[:, 0], kv[:, 1]
    want_k, want_v = k_pages.clone(), v_pages.clone()
    with torch.no_grad():
        got = module.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, block_table=table,
                                            k=k_new, v=v_new)
        want = module.attention_with_kvcache(q, want_k, want_v, cache_seqlens=lengths, block_table=table,
                                             k=k_new, v=v_new)
    assert torch.equal(got, want) and torch.equal(k_pages, want_k) and torch.equal(v_pages, want_v)
    both = _randn(B, 2, 2 * q.shape[2], D, dtype=torch.float32, device=device, g=g)  # q's rows, then out's
    q2, out = both[:, :, :q.shape[2]], both[:, :, q.shape[2]:]
    k, v = (_randn(B, 2, 30, D, dtype=torch.float32, device=device, g=g) for _ in range(2))
    assert module.attention(q2, k, v, out=out) is out and torch.equal(out, module.attention(q2, k, v))
