"""attention_varlen: packed sequences (FlashAttention's varlen layout) against the float64 reference
run sequence by sequence; lengths 0 and 1, Nq_i != Nk_i, GQA, tile-table specs, document ids of the
packed tokens; and the checks on cu_seqlens and max_seqlen."""

from __future__ import annotations

import re

import pytest
import torch

import attngen
from attngen import reference, runtime
from attngen.resources import resolve_spec
from attngen.spec import load_spec


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _check(name, lens_q, lens_k, Hq=2, Hkv=1, dtype=torch.float32, seed=0, tol=2e-5):
    path = resolve_spec(name)
    spec, module = load_spec(path), attngen.load(path)
    g = torch.Generator().manual_seed(seed)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    mk = lambda n, h, d: torch.randn(n, h, d, generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(tq, Hq, spec.head_dim), mk(tk, Hkv, spec.head_dim), mk(tk, Hkv, spec.head_dim_v)
    kw, ids = {}, None
    if spec.mask.document:  # two documents per sequence, as ids of the packed tokens
        ids = torch.cat([(torch.arange(n) * 2 // max(n, 1)) + 10 * i for i, n in enumerate(lens_q)]).to(torch.int32)
        kw["documents"] = ids
    if spec.score.temperature:
        kw["temperature"] = (torch.rand(Hq, generator=g) + 0.5).requires_grad_()
    layout = None
    if spec.sparsity is not None and spec.sparsity.runtime:  # per sequence and head, in its own block coordinates
        bq, bk = spec.sparsity.block
        layout = kw["layout"] = torch.rand(len(lens_q), Hq, -(-max(lens_q) // bq), -(-max(lens_k) // bk),
                                           generator=g) < 0.6
    o, lse = module.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, **kw)
    assert o.shape == (tq, Hq, spec.head_dim_v) and o.is_contiguous() and lse.shape == (Hq, tq)
    do = torch.randn(o.shape, generator=g).to(dtype)
    o.backward(do)
    dtemp = torch.zeros(Hq, dtype=torch.float64)
    for i, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        qs, ks = int(cu_q[i]), int(cu_k[i])
        cut = lambda t, s, n: t.detach()[s:s + n].transpose(0, 1)[None].double().requires_grad_()  # noqa: E731
        rq, rk, rv = cut(q, qs, nq), cut(k, ks, nk), cut(v, ks, nk)
        rkw = {}
        if ids is not None:
            rkw["documents"] = (ids[qs:qs + nq][None], ids[ks:ks + nk][None])
        if "temperature" in kw:
            rkw["temperature"] = kw["temperature"].detach().double().requires_grad_()
        if layout is not None:
            rkw["layout"] = layout[i:i + 1, :, :-(-nq // bq), :-(-nk // bk)]
        ro, rlse = reference.attention(spec, rq, rk, rv, **rkw)
        ro.backward(do[qs:qs + nq].transpose(0, 1)[None].double())
        got_lse = lse[:, qs:qs + nq][None].double()
        assert torch.equal(torch.isneginf(got_lse), torch.isneginf(rlse)), (name, i)
        fin = torch.isfinite(rlse)
        pairs = [(o[qs:qs + nq].transpose(0, 1)[None], ro), (got_lse[fin], rlse[fin]),
                 (q.grad[qs:qs + nq].transpose(0, 1)[None], rq.grad), (k.grad[ks:ks + nk].transpose(0, 1)[None], rk.grad),
                 (v.grad[ks:ks + nk].transpose(0, 1)[None], rv.grad)]
        for got, want in pairs:
            if want.numel():
                err = (got.double() - want).abs().max().item()
                assert err < tol * max(1.0, want.abs().max().item()), (name, i, err)
        if "temperature" in rkw and rkw["temperature"].grad is not None:
            dtemp = dtemp + rkw["temperature"].grad
    if "temperature" in kw:  # the learned temperature's gradient, summed over the sequences
        err = (kw["temperature"].grad.double() - dtemp).abs().max().item()
        assert err < tol * max(1.0, dtemp.abs().max().item()), (name, "dtemperature", err)


@pytest.mark.interp
@pytest.mark.parametrize("name, lens_q, lens_k, heads", [
    ("causal", [5, 0, 70, 33], [5, 0, 70, 33], (2, 1)),           # an empty sequence
    ("causal_bottom_right", [5, 1, 20, 33], [40, 7, 0, 100], (2, 2)),  # Nq_i != Nk_i, no keys, one query
    ("gqa", [17, 64], [30, 50], (4, 2)),
    ("dilated", [40, 90], [60, 45], (2, 1)),                      # a tile table per sequence
    ("prefix_lm", [40, 90], [60, 45], (2, 1)),
    ("document", [40, 90, 3], [40, 90, 3], (2, 1)),               # ids of the packed tokens
    ("temperature", [40, 9], [60, 45], (2, 1)),
    ("longformer", [300, 9], [200, 145], (2, 1)),                 # static block layout per sequence
    ("block_sparse", [300, 0, 140], [260, 50, 0], (2, 1)),        # a layout per sequence and head
])
def test_varlen_matches_the_reference_per_sequence(name, lens_q, lens_k, heads):
    _check(name, lens_q, lens_k, *heads)


@pytest.mark.interp
def test_varlen_fp16():
    _check("causal", [30, 1, 65], [30, 1, 65], dtype=torch.float16, tol=2e-2)


@pytest.mark.interp
def test_varlen_all_empty_and_no_sequences():
    module = attngen.load(resolve_spec("causal"))
    q = torch.randn(0, 2, 128)
    o, lse = module.attention_varlen(q, q, q, _cu([0, 0]), _cu([0, 0]), 0, 0, return_lse=True)
    assert o.shape == (0, 2, 128) and lse.shape == (2, 0)
    o = module.attention_varlen(q, q, q, _cu([]), _cu([]), 0, 0)
    assert o.shape == (0, 2, 128)


@pytest.mark.interp
@pytest.mark.parametrize("change, error, fragment", [
    (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].long()}, TypeError, "cu_seqlens_q must be an int32 tensor"),
    (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 40, 30, 70], dtype=torch.int32)}, ValueError, "non-decreasing"),
    (lambda a: {**a, "cu_seqlens_q": torch.tensor([0, 30, 40, 60], dtype=torch.int32)}, ValueError,
     "last entry must be the total number of rows, 70; got 60"),
    (lambda a: {**a, "cu_seqlens_q": torch.tensor([5, 30, 40, 70], dtype=torch.int32)}, ValueError, "start at 0"),
    (lambda a: {**a, "max_seqlen_q": 20}, ValueError, "max_seqlen_q = 20 is below the longest sequence, 30"),
    (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 30, 70], dtype=torch.int32), "max_seqlen_k": 40}, ValueError,
     "one length"),
    (lambda a: {**a, "q": a["q"][None]}, ValueError, "3-d [total, heads, head_dim]"),
])
def test_varlen_bad_input_is_refused(change, error, fragment):
    module = attngen.load(resolve_spec("causal"))
    q = torch.randn(70, 2, 128)
    cu = torch.tensor([0, 30, 40, 70], dtype=torch.int32)
    args = dict(q=q, k=q, v=q, cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=30, max_seqlen_k=30)
    with pytest.raises(error, match=re.escape(fragment)):
        module.attention_varlen(**change(args))


@pytest.mark.interp
def test_varlen_keeps_the_checked_lengths_per_tensor_pair():
    """One read of cu_seqlens per batch: the same tensors, unchanged, reuse the Seqlens (and its
    tables); a changed tensor is read again."""
    from attngen.runtime import sparse as rt_module

    module = attngen.load(resolve_spec("dilated"))
    q = torch.randn(70, 2, 64)
    cu = torch.tensor([0, 30, 40, 70], dtype=torch.int32)
    module.attention_varlen(q, q, q, cu, cu, 30, 30)
    first = rt_module._SEQLENS[cu][3]
    module.attention_varlen(q, q, q, cu, cu, 30, 30)
    assert rt_module._SEQLENS[cu][3] is first and first._tables
    cu[1] = 20
    module.attention_varlen(q, q, q, cu, cu, 30, 30)
    assert rt_module._SEQLENS[cu][3] is not first


@pytest.mark.compiler
@pytest.mark.parametrize("name", sorted(p.stem for p in resolve_spec("causal").parent.glob("*.yaml")
                                         if load_spec(p).nsa is None))  # fa2 specs
def test_static_classes_follow_the_spec_mask(name):
    """The runtime's per-shape tile classes (which varlen's per-sequence tables, block layouts and
    the benchmarks' Flex block masks start from) against the reference's dense mask, for every
    shipped spec, at a ragged shape: no tile FULL unless all its pairs are visible, none EMPTY that
    holds a visible pair (a module without its host mask once reported every tile FULL)."""
    spec, module = load_spec(resolve_spec(name)), attngen.load(resolve_spec(name))
    rt = runtime.of(module)
    Nq, Nk, bm, bn = 200, 150, 32, 64
    by_keys, _ = rt.static_classes(Nq, Nk, bm, bn, "cpu", with_layout=False)
    vis = reference.dense_mask(spec, Nq, Nk)
    pad = torch.nn.functional.pad(vis, (0, -(-Nk // bn) * bn - Nk, 0, -(-Nq // bm) * bm - Nq))
    inb = torch.nn.functional.pad(torch.ones(Nq, Nk, dtype=torch.bool), (0, pad.shape[1] - Nk, 0, pad.shape[0] - Nq))
    cells = lambda t, f: f(f(t.reshape(-1, bm, pad.shape[1] // bn, bn), 3), 1)  # noqa: E731
    any_vis = cells(pad, torch.Tensor.any)
    all_vis = cells(pad | ~inb, torch.Tensor.all)
    classes = by_keys[0, 0]
    assert not ((classes == 2) & ~all_vis).any() and not ((classes == 0) & any_vis).any(), name


@pytest.mark.interp
def test_verify_varlen_checks_every_quantity(monkeypatch):
    """`attngen verify --varlen`: packed cases against the reference run per sequence, dropout's
    keep-mask included; and a kernel that is off is caught."""
    from attngen.verify import verify_spec

    results = verify_spec(resolve_spec("causal_dropout"), dtypes=["fp32"], backward=True, varlen=True)
    assert len(results) == 4 and all(r.ok for r in results), [r.why for r in results]  # 2 cases x 2 backward forms
    assert [r.spec for r in results] == ["causal_dropout (two kernels)"] * 2 + ["causal_dropout (single pass)"] * 2
    assert [name for name, _, _ in results[0].errors] == ["o", "lse", "dq", "dk", "dv"]
    real = runtime.KernelModule.attention_varlen  # what verify calls, for whichever module object it loads
    monkeypatch.setattr(runtime.KernelModule, "attention_varlen",
                        lambda self, *a, **kw: (lambda o, lse: (o * 1.01, lse))(*real(self, *a, **kw)))
    results = verify_spec(resolve_spec("causal"), dtypes=["fp32"], varlen=True)
    assert not any(r.ok for r in results) and "o error" in results[0].why


@pytest.mark.interp
def test_varlen_reuses_lengths_across_head_counts():
    """bigbird's random term gives per-head tables: the same cu_seqlens with another head count
    must get tables for that head count (a kept table of the first once made the kernel read past
    its end)."""
    path = resolve_spec("bigbird")
    spec, module = load_spec(path), attngen.load(path)
    cu = torch.tensor([0, 150, 290], dtype=torch.int32)
    for heads in (2, 4):
        q = torch.randn(290, heads, spec.head_dim, generator=torch.Generator().manual_seed(heads))
        o = module.attention_varlen(q, q, q, cu, cu, 150, 150)
        for s0, n in ((0, 150), (150, 140)):
            x = q[s0:s0 + n].transpose(0, 1)[None].double()
            want, _ = reference.attention(spec, x, x, x)
            assert (o[s0:s0 + n].transpose(0, 1)[None].double() - want).abs().max() < 2e-5, heads


@pytest.mark.interp
def test_varlen_grid_limit_is_a_clear_error():
    module = attngen.load(resolve_spec("causal"))
    q = torch.randn(4200, 16, 128)
    cu = torch.arange(4201, dtype=torch.int32)  # 4200 sequences of one token, x 16 heads > 65535
    with pytest.raises(ValueError, match="over 65535"):
        module.attention_varlen(q, q, q, cu, cu, 1, 1)
