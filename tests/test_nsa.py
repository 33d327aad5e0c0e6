"""NSA modules (specs with an `nsa:` section; runtime/nsa.py, templates/nsa/) against the float64
reference of NSA's math (attngen/reference_nsa.py): the selection exactly, the output and every
gradient, with small counts and windows so that the top-n chooses and the window binds at lengths
the interpreter runs; the spec's checks; the shipped specs' module."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

import attngen
from attngen import reference_nsa
from attngen.errors import SpecError
from attngen.spec import parse_spec
from attngen.verify_nsa import NSACase, check_nsa, priority, selection_agrees

SMALL = {"select": {"block": 32, "count": 3, "init_blocks": 1, "local_blocks": 1}, "window": 40}


def _module(tmp_path, kind="mean", block=32, stride=16, D=32, Dv=16):
    data = {"name": f"tiny_nsa_{kind}", "head_dim": D, "head_dim_v": Dv, "dtypes": ["fp32", "fp16"],
            "nsa": {"compress": {"block": block, "stride": stride, "kind": kind}, **SMALL}}
    path = tmp_path / f"tiny_nsa_{kind}_{block}_{stride}.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_spec(data, str(path)), attngen.load(path)


@pytest.mark.interp
@pytest.mark.parametrize("kind, block, stride, G, N", [("mean", 32, 16, 3, 150), ("linear", 32, 32, 1, 130),
                                                       ("mean", 32, 16, 4, 20)])
def test_nsa_matches_reference_with_gradients(tmp_path, kind, block, stride, G, N):
    """N 150: 5 blocks of 32, 3 chosen, a window of 40; N 20: no compressed token yet (o_cmp = 0)."""
    spec, module = _module(tmp_path, kind, block, stride)
    result = check_nsa(spec, module, NSACase(2, 2 * G, 2, N), "fp32", "cpu")
    assert result.ok, result.why


@pytest.mark.interp
@pytest.mark.parametrize("kernel", [False, True])
def test_nsa_selection_is_the_references_exactly(tmp_path, kernel):
    """The selection (the top blocks by torch's sort, or by the _nsa_top_blocks kernel)."""
    spec, module = _module(tmp_path)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 200, 32, generator=g), torch.randn(1, 2, 200, 32, generator=g), \
        torch.randn(1, 2, 200, 16, generator=g)
    gates = torch.rand(1, 4, 200, 3, generator=g)
    saved, module.RUNTIME.top_blocks_kernel = module.RUNTIME.top_blocks_kernel, kernel
    try:
        with torch.no_grad():
            _, indices = module.attention(q, k, v, gates=gates, return_indices=True)
    finally:
        module.RUNTIME.top_blocks_kernel = saved
    ref = reference_nsa.nsa_attention(q, k, v, gates, compress_block=32, compress_stride=16, select_block=32,
                                      select_count=3, init_blocks=1, local_blocks=1, window=40, return_parts=True)
    assert torch.equal(indices, ref["indices"])
    assert indices.shape == (1, 2, 200, 3) and (indices[:, :, :32] == -1).sum() > 0  # early rows: fewer blocks


@pytest.mark.interp
@pytest.mark.parametrize("n_blocks, count, init, local", [(7, 3, 1, 2), (40, 16, 1, 2), (3, 16, 1, 2), (2, 16, 1, 2),
                                                     (9, 5, 0, 3), (9, 6, 2, 1), (9, 4, 2, 0)])
def test_top_blocks_kernel_gives_the_sorts_blocks(tmp_path, n_blocks, count, init, local):
    """_nsa_top_blocks (the forced blocks placed, then rounds of a max per row) against the torch
    path's stable sort, bit for bit: scores with many ties (a few distinct values), zeros, rows whose
    own block is early (forced blocks that overlap; fewer eligible blocks than count), fewer blocks
    than count or than the forced ones, no initial or several, positions broadcast as decoding gives
    them (some before the sequence's start)."""
    spec, module = _module(tmp_path)
    rt = module.RUNTIME
    rt.count, rt.init, rt.local, saved = count, init, local, rt.top_blocks_kernel
    g = torch.Generator().manual_seed(n_blocks)
    scores = torch.randint(0, 4, (2, 3, 50, n_blocks), generator=g).float() / 4
    scores[0, 0, :5] = 0.0
    t = torch.randint(0, n_blocks * rt.l_sel, (50,), generator=g)
    t[:3] = torch.tensor([0, rt.l_sel, 2 * rt.l_sel + 1]).clamp(max=n_blocks * rt.l_sel - 1)  # own blocks 0, 1, 2
    cases = [(scores, t),  # training: t [N]
             (scores[:, :, :4], torch.randint(-rt.l_sel, n_blocks * rt.l_sel, (2, 1, 4), generator=g))]  # decoding: [B, 1, Nq]
    try:
        for s, t in cases:
            rt.top_blocks_kernel = False
            want = rt._top_blocks(s, t)
            rt.top_blocks_kernel = True
            assert torch.equal(rt._top_blocks(s, t), want)
        if (count, init) != (3, 1):  # (the interpreter's time)
            return
        # rows at consecutive positions from `first`, in runs by their last own block (top_buckets():
        # 128 blocks wide, then 64)
        first, L = 5, 2100
        wide = torch.randint(0, 4, (1, 2, L, -(-(first + L) // rt.l_sel)), generator=g).float() / 4
        t = torch.arange(first, first + L)
        rt.top_blocks_kernel = False
        want = rt._top_blocks(wide, t)
        rt.top_blocks_kernel = True
        assert torch.equal(rt._top_blocks(wide, t, first=first), want)
    finally:
        rt.top_blocks_kernel = saved
        rt.count, rt.init, rt.local = spec.nsa.select_count, spec.nsa.init_blocks, spec.nsa.local_blocks


def _check_decode_selection(rt, q, cmp, pos, S, got, want):
    """The fused decode's (o_cmp, blocks, scores) against the torch path's (o_cmp, blocks) and float64
    scores, for 4 sequences of lengths 0, 20, 192 (or 193) and S: o_cmp within fp32 rounding, the scores, the
    same blocks but where scores tie; no block without a key, the forced ones alone at length 20."""
    (got_o, got_idx, got_scores), (want_o, want_idx) = got, want
    B, Hq, Nq, D = q.shape
    Hkv = cmp[0].shape[1]
    assert (got_o - want_o).abs().max() < 1e-5
    n_cmp, n_blocks = cmp[0].shape[2], -(-S // rt.l_sel)
    s = (q.double().view(B, Hkv, Hq // Hkv, Nq, D) @ cmp[0].double()[:, :, None].transpose(-1, -2)) * rt.scale
    visible = (torch.arange(n_cmp) * rt.d + rt.l - 1) <= pos[:, None, None, :, None]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    scores = p.sum(2) @ rt._overlap(n_cmp, n_blocks, q.device).double()
    assert (got_scores.double() - scores).abs().max() < 1e-5
    ok, _ = selection_agrees(got_idx, want_idx, scores.float())
    assert ok and got_idx.shape == want_idx.shape
    assert (got_idx[0] == -1).all() and torch.equal(got_idx[1], want_idx[1])  # no key / only forced blocks


@pytest.mark.interp
@pytest.mark.parametrize("G, Nq, block_c, splits, block, stride, S", [
    (2, 1, 16, None, 32, 16, 300), (3, 3, 16, 1, 32, 16, 300), (16, 1, 32, None, 32, 16, 300),
    (1, 2, 16, 3, 32, 16, 300), (2, 1, 64, None, 32, 16, 300),
    (2, 3, 16, 3, 5, 3, 600),  # splits of 80 tokens of stride 3: they start inside a selection block
    (2, 1, 64, 2, 32, 16, 2100)])  # a split's windows touch 66 blocks: its sums need their full width
def test_fused_decode_selection_matches_the_torch_path(tmp_path, G, Nq, block_c, splits, block, stride, S):
    """NSA decoding's compressed branch and selection in two kernels (fused_decode, the default) against the
    torch path and float64 scores: o_cmp within fp32 rounding, the block scores, and the same blocks
    but where scores tie (as the selection check allows); lengths 0, below one window (nothing
    compressed is visible), 192 (with Nq 3, a window ends at the last row: rows see different
    counts), and the whole cache; splits of one or several steps, meeting inside a selection block;
    6 blocks chosen. (The ties' order, lower index first, is the GPU's to check: the interpreter's
    max ignores its tie-break flag.)"""
    spec, module = _module(tmp_path, block=block, stride=stride)
    rt = module.RUNTIME
    g = torch.Generator().manual_seed(G * 10 + Nq)
    B, Hkv = 4, 2 if G < 16 else 1
    k_cache, v_cache = torch.randn(B, Hkv, S, 32, generator=g), torch.randn(B, Hkv, S, 16, generator=g)
    lengths = torch.tensor([0, 20, 192, S])
    cmp = rt.compressed_cache(k_cache, v_cache, lengths.int())
    q = torch.randn(B, Hkv * G, Nq, 32, generator=g)
    pos = lengths[:, None] - Nq + torch.arange(Nq)
    rt.count = 6
    try:
        want_o, want_idx = rt._decode_compressed(q, cmp, pos, rt.scale, S)
        got_o, got_idx, got_scores = rt._decode_compressed_fused(q, cmp, lengths, rt.scale, S, block_c=block_c,
                                                                 splits=splits)
    finally:
        rt.count = spec.nsa.select_count
    _check_decode_selection(rt, q, cmp, pos, S, (got_o, got_idx, got_scores), (want_o, want_idx))


@pytest.mark.interp
@pytest.mark.parametrize("G, Hkv, Nq, block_c, splits, block, stride, sel, S, Dv", [
    (3, 2, 2, 16, 40, 16, 1, 32, 600, 16),  # 37 splits of 16 tokens at stride 1: 3 splits touch a block (MEET 4)
    (5, 1, 3, 16, 33, 5, 3, 32, 17000, 80),  # 33 splits meeting inside blocks; 532 blocks: the row in 3
    # chunks; o_cmp over 3 programs of 2 heads (the last half empty), 32 splits a step (one KV head: the
    # interpreter's time goes by programs)
    (3, 2, 2, 16, 5, 64, 64, 64, 4200, 16),  # l = d = l' = 64: splits start on a block's first token
    (16, 1, 1, 16, None, 32, 16, 32, 4500, 16)])  # G 16: the row of 141 blocks in 2 chunks
def test_fused_decode_selection_gathers_every_split_touching_a_block(tmp_path, G, Hkv, Nq, block_c, splits, block,
                                                                      stride, sel, S, Dv):
    """_nsa_decode_select's gathered block scores (each block from the splits whose windows touch
    it) and its o_cmp (programs over the group's heads) against the torch path and float64 scores:
    more splits than one LSE chunk of 32, several splits a block, G not a power of two, Nq > 1, the
    row of scores in chunks; the same bits on a second run."""
    data = {"name": "tiny_nsa_gather", "head_dim": 32, "head_dim_v": Dv, "dtypes": ["fp32"],
            "nsa": {"compress": {"block": block, "stride": stride, "kind": "mean"},
                    "select": {**SMALL["select"], "block": sel}, "window": SMALL["window"]}}
    path = tmp_path / f"tiny_nsa_gather_{block}_{stride}_{sel}.yaml"
    path.write_text(yaml.safe_dump(data))
    spec, module = parse_spec(data, str(path)), attngen.load(path)
    rt = module.RUNTIME
    g = torch.Generator().manual_seed(G * 10 + Nq)
    B = 4
    k_cache, v_cache = torch.randn(B, Hkv, S, 32, generator=g), torch.randn(B, Hkv, S, Dv, generator=g)
    lengths = torch.tensor([0, 20, 193, S])  # 193: the rows of Nq > 1 straddle a block's start
    cmp = rt.compressed_cache(k_cache, v_cache, lengths.int())
    q = torch.randn(B, Hkv * G, Nq, 32, generator=g)
    pos = lengths[:, None] - Nq + torch.arange(Nq)
    rt.decode_top_kernel, rt.count = False, 6  # the top blocks in the selection kernel, a program a row
    try:
        want_o, want_idx = rt._decode_compressed(q, cmp, pos, rt.scale, S)
        runs = [rt._decode_compressed_fused(q, cmp, lengths, rt.scale, S, block_c=block_c, splits=splits)
                for _ in range(2)]
        rt.decode_top_kernel = True  # the row gathered by several programs, the top blocks apart
        apart = rt._decode_compressed_fused(q, cmp, lengths, rt.scale, S, block_c=block_c, splits=splits)
    finally:
        rt.decode_top_kernel, rt.count = None, spec.nsa.select_count
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    _check_decode_selection(rt, q, cmp, pos, S, runs[0], (want_o, want_idx))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], apart))


@pytest.mark.interp
def test_decode_top_blocks_apart_while_the_rows_fill_half_the_sms(tmp_path, monkeypatch):
    """fused_decode's top blocks by _nsa_top_blocks (decode_top_kernel None: at most SMs / 2 rows of
    B Hkv Nq, where it was measured faster); True and False force either; the selection asks with
    its B Hkv Nq rows (3 sequences, 2 KV heads, 5 queries: 30) and launches the top kernel then only."""
    rt = _module(tmp_path)[1].RUNTIME
    assert rt.decode_top_kernel is None
    assert [rt.top_apart(rows, 132) for rows in (1, 66, 67, 128)] == [True, True, False, False]
    try:
        rt.decode_top_kernel = False
        assert not rt.top_apart(1, 132)
        rt.decode_top_kernel = True
        assert rt.top_apart(4096, 132)
    finally:
        rt.decode_top_kernel = None
    asked, launched, top = [], [], rt.top_kernel
    monkeypatch.setattr(rt, "top_apart", lambda rows, sms: asked.append(rows) or rows == 30)
    monkeypatch.setattr(rt, "top_kernel", type("Spy", (), {"__getitem__": lambda _, grid: launched.append(grid)
                                                             or top[grid]})())
    g = torch.Generator().manual_seed(0)
    B, Hkv, Nq, S = 3, 2, 5, 150
    k_cache, v_cache = torch.randn(B, Hkv, S, 32, generator=g), torch.randn(B, Hkv, S, 16, generator=g)
    lengths = torch.tensor([40, 90, S])
    cmp = rt.compressed_cache(k_cache, v_cache, lengths.int())
    q = torch.randn(B, Hkv * 2, Nq, 32, generator=g)
    rt._decode_compressed_fused(q, cmp, lengths, rt.scale, S)
    assert asked == [30] and launched == [(2,)]  # rows of 5 blocks: 16 a warp's program


@pytest.mark.interp
@pytest.mark.parametrize("G, Nq, splits, paged, merge_chunk", [(2, 1, 1, False, None), (3, 3, 5, False, 2),
                                                               (1, 2, None, True, 4), (16, 1, 4, True, None)])
def test_fused_decode_attend_matches_the_branches(tmp_path, G, Nq, splits, paged, merge_chunk):
    """The selected and window branches with the gates' mix in two kernels (fused_decode's
    _decode_attend_fused) against the selected kernel, the window branch's decode and the torch mix:
    one split for every item, splits whose items straddle the two branches, one item each; lengths
    0, 1 (fewer keys than queries), inside the first block, 71 and 72 (the first query's window
    starts a tile before the last's; the window over the most tiles), and full; contiguous and paged
    caches; gates as a permuted view (its gate stride not 1); the merge's splits in one round of
    loads and in several (chunks of 2 of 5 splits: the online rescaling, a partial chunk)."""
    from attngen.runtime.nsa_mix import _mix_torch
    from attngen.verify import paged as as_pages

    spec, module = _module(tmp_path)
    rt = module.RUNTIME
    g = torch.Generator().manual_seed(G + Nq)
    B, Hkv, S = 6, 2 if G < 16 else 1, 192
    k_cache, v_cache = torch.randn(B, Hkv, S, 32, generator=g), torch.randn(B, Hkv, S, 16, generator=g)
    lengths = torch.tensor([0, 1, 20, 71, 72, S])
    q = torch.randn(B, Hkv * G, Nq, 32, generator=g)
    gates = torch.rand(B, 3, Hkv * G, Nq, generator=g).permute(0, 2, 3, 1)  # no unit stride but the batch's
    table = None
    if paged:
        table = torch.randperm(B * S // 16, generator=g).reshape(B, S // 16).to(torch.int32)
        k_cache, v_cache = as_pages(k_cache, 16, table), as_pages(v_cache, 16, table)
    cmp = rt.compressed_cache(k_cache, v_cache, lengths.int(), block_table=table)
    pos = lengths[:, None] - Nq + torch.arange(Nq)
    o_cmp, indices = rt._decode_compressed(q, cmp, pos, rt.scale, S)
    o_slc = rt.selected_forward(q, k_cache, v_cache, indices, rt.scale, (lengths - Nq).int(), table)[0]
    o_swa = rt.branches()["swa"].attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths.int(),
                                                        block_table=table, scale=rt.scale)
    want = _mix_torch(gates, o_cmp, o_slc, o_swa, q.dtype)
    got = rt._decode_attend_fused(q, k_cache, v_cache, indices, lengths, rt.scale, table, o_cmp, gates, splits=splits,
                                  merge_chunk=merge_chunk)
    assert (got - want).abs().max() < 1e-5
    assert (got[0] == 0).all()  # no key: every branch gives zeros


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _mix_inputs(dtype, Dv, strided, seed=0, B=2, Hq=3, N=23):
    """gates [B, Hq, N, 3] and o_cmp, o_slc, o_swa [B, Hq, N, Dv] in dtype, random. strided: views
    the mix must read through their strides: the gates permuted (gate stride not 1), o_cmp every
    other column of a wider tensor, o_slc a transposed [.., Dv, N] (value stride N), o_swa [B, N,
    Hq, Dv] with heads and tokens swapped."""
    g = torch.Generator().manual_seed(seed)
    dt = _DTYPES[dtype]
    if not strided:
        return torch.rand(B, Hq, N, 3, generator=g).to(dt), \
            *(torch.randn(B, Hq, N, Dv, generator=g).to(dt) for _ in range(3))
    gates = torch.rand(B, 3, Hq, N, generator=g).to(dt).permute(0, 2, 3, 1)
    o_cmp = torch.randn(B, Hq, N, 2 * Dv, generator=g).to(dt)[..., ::2]
    o_slc = torch.randn(B, Hq, Dv, N, generator=g).to(dt).transpose(-1, -2)
    o_swa = torch.randn(B, N, Hq, Dv, generator=g).to(dt).transpose(1, 2)
    return gates, o_cmp, o_slc, o_swa


def _launches(monkeypatch, rt, attr: str) -> list:
    """The keyword arguments (the constexprs) of each launch of the module's kernel rt.<attr> from
    now on (each still runs)."""
    launches, kernel = [], getattr(rt, attr)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(rt, attr, Spy())
    return launches


@pytest.mark.interp
@pytest.mark.parametrize("dtype, Dv, strided, cmp_fp32", [("fp32", 16, False, False), ("fp32", 48, True, False),
                                                          ("fp16", 48, False, False), ("bf16", 16, True, False),
                                                          ("fp16", 48, True, True)])
def test_mix_kernel_matches_the_torch_form(tmp_path, monkeypatch, dtype, Dv, strided, cmp_fp32):
    """The gates' mix by the _nsa_mix kernel (_mix with the module: one launch) against the torch
    form (_mix_torch): fp32 to a float32 rounding, 16-bit to one unit in the last place of the
    output (the interpreter's bfloat16 cast truncates); Dv 48 (padded to 64, masked), several
    programs with a partial last one, views read through their strides, and decoding's float32
    o_cmp beside 16-bit branches."""
    from attngen.runtime.nsa_mix import _mix, _mix_torch

    _, module = _module(tmp_path, Dv=Dv)
    launches = _launches(monkeypatch, module.RUNTIME, "mix_kernel")
    gates, o_cmp, o_slc, o_swa = _mix_inputs(dtype, Dv, strided)
    if cmp_fp32:
        o_cmp = o_cmp.float()
    assert strided == (not o_slc.is_contiguous())
    want = _mix_torch(gates, o_cmp, o_slc, o_swa, _DTYPES[dtype])
    got = _mix(gates, o_cmp, o_slc, o_swa, _DTYPES[dtype], module.RUNTIME)
    assert len(launches) == 1 and got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    tol = 1e-6 if dtype == "fp32" else torch.finfo(_DTYPES[dtype]).eps
    assert ((got.float() - want.float()).abs() <= tol * want.float().abs() + 1e-6).all()


@pytest.mark.interp
@pytest.mark.parametrize("dtype, Dv, needs", [("fp32", 48, "gates cmp slc swa"), ("fp32", 16, "gates slc"),
                                              ("fp32", 48, "cmp swa"), ("bf16", 16, "gates cmp slc swa")])
def test_mix_kernel_gradients_match_autograd_through_the_torch_form(tmp_path, monkeypatch, dtype, Dv, needs):
    """_nsa_mix_bwd through _Mix (one launch) against autograd through _mix_torch, for the inputs
    that need a gradient (the launch computes only those; the others get none): strided inputs
    (_mix_inputs), a random dO as a transposed view, Dv 48 (masked). d o_x = dO g_x exactly in
    fp32, d g_x (a sum over Dv) to a float32 rounding; bf16: every gradient in its input's dtype,
    within one unit in the last place."""
    from attngen.runtime.nsa_mix import _mix, _mix_torch

    _, module = _module(tmp_path, Dv=Dv)
    launches = _launches(monkeypatch, module.RUNTIME, "mix_bwd_kernel")
    dt = _DTYPES[dtype]
    inputs = _mix_inputs(dtype, Dv, strided=True, seed=1)
    names = ("gates", "cmp", "slc", "swa")
    ours = [x.detach().clone().requires_grad_(n in needs.split()) for n, x in zip(names, inputs)]
    theirs = [x.detach().clone().requires_grad_(n in needs.split()) for n, x in zip(names, inputs)]
    g = torch.Generator().manual_seed(2)
    do = torch.randn(2, 3, Dv, 23, generator=g).to(dt).transpose(-1, -2)
    _mix(*ours, dt, module.RUNTIME).backward(do)
    _mix_torch(*theirs, dt).backward(do)
    assert len(launches) == 1  # asked for the gradients needed, no more
    assert [launches[0][f"NEED_{n.upper()}"] for n in names] == [n in needs.split() for n in names]
    for name, a, b in zip(names, ours, theirs):
        if name not in needs.split():
            assert a.grad is None and b.grad is None
            continue
        assert a.grad.dtype == b.grad.dtype == a.dtype and a.grad.shape == a.shape
        exact = dtype == "fp32" and name != "gates"
        tol = 0.0 if exact else 1e-6 if dtype == "fp32" else torch.finfo(dt).eps
        err = (a.grad.float() - b.grad.float()).abs()
        assert (err <= tol * b.grad.float().abs() + (0.0 if exact else 1e-5)).all(), (name, err.max())


@pytest.mark.interp
def test_mix_without_gradients_launches_no_backward(tmp_path, monkeypatch):
    """mix_backward makes only the gradients asked for, and with none asked returns none and
    launches nothing; under no_grad the kernel's output needs none; fused_mix off: the torch form,
    no launch; an empty batch mixes and differentiates to empty tensors."""
    from attngen.runtime.nsa_mix import _mix, _mix_torch

    _, module = _module(tmp_path)
    rt = module.RUNTIME
    gates, o_cmp, o_slc, o_swa = _mix_inputs("fp32", 16, strided=False)
    launches = _launches(monkeypatch, rt, "mix_bwd_kernel")
    assert rt.mix_backward(o_slc, gates, o_cmp, o_slc, o_swa, (False,) * 4) == (None,) * 4 and not launches
    dg, dc, ds, dw = rt.mix_backward(o_slc, gates, o_cmp, o_slc, o_swa, (False, False, True, False))
    assert dg is None and dc is None and dw is None and torch.equal(ds, o_slc * gates[..., 1:2])
    forward = _launches(monkeypatch, rt, "mix_kernel")
    monkeypatch.setattr(rt, "fused_mix", False)
    assert torch.equal(_mix(gates, o_cmp, o_slc, o_swa, torch.float32, rt),
                       _mix_torch(gates, o_cmp, o_slc, o_swa, torch.float32)) and not forward
    monkeypatch.setattr(rt, "fused_mix", True)
    with torch.no_grad():
        assert not _mix(gates.requires_grad_(), o_cmp, o_slc, o_swa, torch.float32, rt).requires_grad
    empty = [x[:0].detach().requires_grad_() for x in (gates, o_cmp, o_slc, o_swa)]
    o = _mix(*empty, torch.float32, rt)
    assert o.shape == (0, 3, 23, 16)
    o.sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in empty)


def _branches_reference(q, k, v, indices, lengths, scale, window, l_sel, o_cmp, gates):
    """float64 [B, Hq, Nq, Dv]: the decode's selected and window branches, straight from the math
    (query t at position L - Nq + t sees its chosen blocks' keys up to it, and the window's keys
    pos - w < j <= pos), mixed with o_cmp by the gates; contiguous caches [B, Hkv, S, *]."""
    B, Hq, Nq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    n_blocks, keys = -(-S // l_sel), torch.arange(S)
    pos = lengths[:, None, None, None].long() - Nq + torch.arange(Nq)[:, None]  # [B, 1, Nq, 1]
    idx = torch.where(indices >= 0, indices.long(), n_blocks)
    chose = torch.zeros(B, Hkv, Nq, n_blocks + 1, dtype=torch.bool).scatter_(-1, idx, True)[..., keys // l_sel]
    causal = keys <= pos
    s = (q.double().view(B, Hkv, Hq // Hkv, Nq, D) @ k.double()[:, :, None].transpose(-1, -2)) * scale
    out = o_cmp.double() * gates.double()[..., :1]
    for i, mask in enumerate((chose & causal, causal & (keys > pos - window)), 1):
        p = torch.softmax(s.masked_fill(~mask[:, :, None], float("-inf")), -1).nan_to_num(0.0)
        out = out + (p @ v.double()[:, :, None]).reshape(B, Hq, Nq, -1) * gates.double()[..., i:i + 1]
    return out


@pytest.mark.interp
@pytest.mark.parametrize("Nq, G, n, splits, paged", [(2, 1, 3, None, False), (4, 3, 2, 5, True), (5, 8, 3, 2, False),
                                                     (16, 8, 3, 7, True), (11, 2, 1, 1, False), (1, 4, 3, 3, True)])
def test_fused_decode_attend_reads_the_union_of_random_choices(tmp_path, Nq, G, n, splits, paged):
    """_decode_attend_fused against the branches' float64 math with random choices (distinct and
    ascending per query, -1 after; disjoint between queries, some none, some past the query's own
    block): the union of the queries' blocks (_nsa_decode_union), each row seeing only its query's;
    Nq up to 16 (two row tiles at G 8), lengths 0, below Nq, random and full, contiguous and paged,
    1 to 7 splits; opcheck of its op at Nq > 1."""
    from attngen.verify import paged as as_pages

    spec, module = _module(tmp_path)
    rt = module.RUNTIME
    g = torch.Generator().manual_seed(Nq * 10 + G)
    B, Hkv, S = 4, 2 if G < 8 else 1, 160
    n_blocks = -(-S // rt.l_sel)
    k_cache, v_cache = torch.randn(B, Hkv, S, 32, generator=g), torch.randn(B, Hkv, S, 16, generator=g)
    lengths = torch.tensor([0, Nq - 1, int(torch.randint(Nq, S, (1,), generator=g)), S], dtype=torch.int32)
    q = torch.randn(B, Hkv * G, Nq, 32, generator=g)
    gates, o_cmp = torch.rand(B, Hkv * G, Nq, 3, generator=g), torch.randn(B, Hkv * G, Nq, 16, generator=g)
    indices = torch.full((B, Hkv, Nq, n), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for t in range(Nq):
                chosen = torch.randperm(n_blocks, generator=g)[:int(torch.randint(0, n + 1, (1,), generator=g))]
                indices[b, h, t, :len(chosen)] = chosen.sort().values.int()
    want = _branches_reference(q, k_cache, v_cache, indices, lengths, rt.scale, rt.window, rt.l_sel, o_cmp, gates)
    table = None
    if paged:
        table = torch.randperm(B * S // 16, generator=g).reshape(B, S // 16).to(torch.int32)
        k_cache, v_cache = as_pages(k_cache, 16, table), as_pages(v_cache, 16, table)
    got = rt._decode_attend_fused(q, k_cache, v_cache, indices, lengths, rt.scale, table, o_cmp, gates, splits=splits)
    assert (got.double() - want).abs().max() < 1e-5
    if Nq == 2:
        torch.library.opcheck(rt.ops.attend_decode, (q, k_cache, v_cache, indices, lengths, rt.scale, table, o_cmp,
                                                     gates))


@pytest.mark.interp
@pytest.mark.parametrize("kind, block, stride, paged, D, Dv", [
    ("mean", 5, 3, False, 32, 16), ("linear", 24, 7, True, 32, 16), ("mean", 24, 7, True, 32, 16),
    ("linear", 5, 3, False, 32, 16), ("linear", 5, 3, True, 48, 72)])
def test_compressed_cache_update_kernel_matches_torch(tmp_path, kind, block, stride, paged, D, Dv):
    """fused_decode's _nsa_compress_update against the torch path's update: windows of 5 and 24 rows
    (no power of two) every 3 and 7, so that 7 appended positions end two windows (one); lengths
    below one window, 0, and a window ending at the last row; contiguous and paged (pages of 16);
    linear with head dims 48 and 72 (W's 72 columns over two programs, its 240 rows in chunks of
    128)."""
    from attngen.verify import paged as as_pages

    spec, module = _module(tmp_path, kind, block, stride, D, Dv)
    rt = module.RUNTIME
    g = torch.Generator().manual_seed(block + stride)
    B, Hkv, S, Nq = 4, 2, 96, 7
    k_cache, v_cache = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, Dv, generator=g)
    weights = None
    if kind == "linear":
        weights = (torch.randn(Hkv, block * D, D, generator=g) / 20, torch.randn(Hkv, block * Dv, Dv, generator=g) / 20)
    lengths = torch.tensor([3, 0, 40, 96])
    table = None
    if paged:
        table = torch.randperm(B * S // 16, generator=g).reshape(B, S // 16).to(torch.int32)
        k_cache, v_cache = as_pages(k_cache, 16, table), as_pages(v_cache, 16, table)
    base = rt.compressed_cache(k_cache, v_cache, (lengths - Nq).clamp(min=0).int(), weights, block_table=table)
    got, want = [c.clone().zero_() for c in base], [c.clone().zero_() for c in base]
    rt._update_compressed_kernel(k_cache, v_cache, got, lengths.int(), Nq, weights, table)
    rt._update_compressed(k_cache, v_cache, want, lengths[:, None] - Nq + torch.arange(Nq), weights, table)
    assert all((a - b).abs().max() <= 1e-6 * b.abs().max().clamp(min=1) for a, b in zip(got, want))
    n_cmp = want[0].shape[2]
    ends = [j for j in range(n_cmp) if 96 - Nq <= j * stride + block - 1 <= 95]  # of the full sequence
    assert (want[0][3] != 0).any(dim=-1).sum() == Hkv * len(ends) and len(ends) == (2 if stride == 3 else 1)


@pytest.mark.interp
@pytest.mark.parametrize("paged, splits, D, Dv, Hkv, lengths", [
    (False, 1, 48, 80, 1, [0, 40, 94]), (True, 2, 48, 80, 1, [0, 40, 94]), (True, None, 48, 80, 2, [40, 94]),
    (False, 36, 192, 16, 1, [94])])
def test_linear_cache_update_splits_the_window_over_programs(tmp_path, paged, splits, D, Dv, Hkv, lengths):
    """The linear update's flattened window (24 rows of D or Dv) over programs in splits of tiles of
    128 of W's rows against the torch path's einsum in float64: one split walking every tile, two
    (the last past the window's end), the count the shapes give, and 36 (more than the second launch
    sums at once); W's columns over one or two programs; Nq 15 at stride 7, so that one step ends
    three windows (length 94) or two; contiguous and paged; the same bits on a second run."""
    from attngen.verify import paged as as_pages

    block, stride, Nq, S = 24, 7, 15, 96
    spec, module = _module(tmp_path, "linear", block, stride, D, Dv)
    rt = module.RUNTIME
    g = torch.Generator().manual_seed(D + Dv)
    B, lengths = len(lengths), torch.tensor(lengths)
    k_cache, v_cache = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, Dv, generator=g)
    weights = tuple(torch.randn(Hkv, block * e, e, generator=g) / (block * e) ** 0.5 for e in (D, Dv))
    table = None
    if paged:
        table = torch.randperm(B * S // 16, generator=g).reshape(B, S // 16).to(torch.int32)
        k_cache, v_cache = as_pages(k_cache, 16, table), as_pages(v_cache, 16, table)
    base = rt.compressed_cache(k_cache, v_cache, (lengths - Nq).clamp(min=0).int(), weights, block_table=table)
    got, again, want = ([c.clone().zero_() for c in base] for _ in range(3))
    rt._update_compressed_kernel(k_cache, v_cache, got, lengths.int(), Nq, weights, table, splits=splits)
    rt._update_compressed_kernel(k_cache, v_cache, again, lengths.int(), Nq, weights, table, splits=splits)
    want = [c.double() for c in want]  # the torch path in float64: its float32 sums of 4608 terms stray more
    rt._update_compressed(k_cache.double(), v_cache.double(), want, lengths[:, None] - Nq + torch.arange(Nq),
                          tuple(w.double() for w in weights), table)
    assert all((a.double() - b).abs().max() <= 1e-6 * b.abs().max().clamp(min=1) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    n_cmp = want[0].shape[2]
    ends = [[j for j in range(n_cmp) if n - Nq <= j * stride + block - 1 < n] for n in lengths.tolist()]
    assert max(len(e) for e in ends) == 3
    for c in want:
        assert [(c[b] != 0).any(dim=-1).nonzero()[:, 1].unique().tolist() for b in range(B)] == ends


@pytest.mark.interp
def test_a_cache_shorter_than_one_window_decodes(tmp_path):
    """A cache of 24 positions under windows of 32: no compressed token exists, the compressed branch
    gives zeros and the forced blocks are chosen, in both paths (the torch path raised before)."""
    spec, module = _module(tmp_path)
    rt = module.RUNTIME
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 1, 24, 32, generator=g), torch.randn(2, 1, 24, 16, generator=g)
    lengths = torch.tensor([3, 24], dtype=torch.int32)
    cmp = rt.compressed_cache(k_cache, v_cache, lengths)
    q, gates = torch.randn(2, 2, 1, 32, generator=g), torch.rand(2, 2, 1, 3, generator=g)
    runs = []
    for fused in (False, True):
        saved, rt.fused_decode = rt.fused_decode, fused
        try:
            runs.append(module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, gates=gates,
                                                      cmp_cache=cmp, return_indices=True))
        finally:
            rt.fused_decode = saved
    assert cmp[0].shape[2] == 0 and torch.equal(runs[0][1], runs[1][1]) and (runs[0][0] - runs[1][0]).abs().max() < 1e-5
    assert runs[0][1][:, :, 0, 0].tolist() == [[0], [0]] and torch.isfinite(runs[0][0]).all()


@pytest.mark.interp
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("paged", [False, True])
def test_an_empty_batch_decodes_to_empty_outputs(tmp_path, fused, paged):
    """B = 0, with tokens to append: empty outputs of the right shapes, nothing written (both
    paths raised before: a reshape of 0 elements, a division by B)."""
    spec, module = _module(tmp_path)
    rt = module.RUNTIME
    g = torch.Generator().manual_seed(0)
    if paged:
        k_cache, v_cache = torch.randn(3, 16, 2, 32, generator=g), torch.randn(3, 16, 2, 16, generator=g)
        table = torch.zeros(0, 3, dtype=torch.int32)
    else:
        k_cache, v_cache, table = torch.randn(0, 2, 48, 32, generator=g), torch.randn(0, 2, 48, 16, generator=g), None
    before = (k_cache.clone(), v_cache.clone())
    lengths = torch.zeros(0, dtype=torch.int32)
    cmp = rt.compressed_cache(k_cache, v_cache, lengths, block_table=table)
    saved, rt.fused_decode = rt.fused_decode, fused
    try:
        o, indices = module.attention_with_kvcache(
            torch.randn(0, 4, 2, 32), k_cache, v_cache, cache_seqlens=lengths, gates=torch.rand(0, 4, 2, 3),
            cmp_cache=cmp, k=torch.randn(0, 2, 2, 32), v=torch.randn(0, 2, 2, 16), block_table=table,
            return_indices=True)
    finally:
        rt.fused_decode = saved
    assert o.shape == (0, 4, 2, 16) and indices.shape == (0, 2, 2, 2) and indices.dtype == torch.int32
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.interp
def test_opcheck_of_the_fused_decode_op(tmp_path):
    """torch.library.opcheck of ops.compressed_decode (fused_decode under torch.compile): schema,
    fake tensors and dispatch."""
    spec, module = _module(tmp_path)
    rt = module.RUNTIME
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 1, 100, 32, generator=g), torch.randn(2, 1, 100, 16, generator=g)
    lengths = torch.tensor([40, 100])
    k_cmp, v_cmp = rt.compressed_cache(k_cache, v_cache, lengths.int())
    torch.library.opcheck(rt.ops.compressed_decode, (torch.randn(2, 2, 1, 32, generator=g), k_cmp, v_cmp, lengths,
                                                     rt.scale, 100))


@pytest.mark.compiler
def test_selection_check_allows_only_equal_scores():
    scores = torch.tensor([[[[5.0, 2.0, 2.0, 1.0]]]])
    ref = torch.tensor([[[[0, 1, -1]]]], dtype=torch.int32)
    assert selection_agrees(torch.tensor([[[[0, 2, -1]]]], dtype=torch.int32), ref, scores) == (True, 1)
    assert selection_agrees(torch.tensor([[[[0, 3, -1]]]], dtype=torch.int32), ref, scores) == (False, 1)
    assert selection_agrees(ref.clone(), ref, scores) == (True, 0)


@pytest.mark.compiler
@pytest.mark.parametrize("nsa, fragment", [
    ({"select": {"count": 2}}, "nsa.select.count: must cover the forced blocks"),
    ({"compress": {"kind": "max"}}, "nsa.compress.kind: expected one of mean, linear"),
    ({"compress": {"block": 16, "stride": 32}}, "nsa.compress.stride: must be at most the block"),
    ({"select": {"block": 48}}, "nsa.select.block: expected a power of two"),
    ({"windw": 3}, "nsa.windw"),
])
def test_bad_nsa_sections_are_refused_by_field(nsa, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse_spec({"name": "n", "head_dim": 64, "nsa": nsa}, "n.yaml")
    with pytest.raises(SpecError, match="takes no other attention section"):
        parse_spec({"name": "n", "head_dim": 64, "mask": {"causal": True}, "nsa": {}}, "n.yaml")


@pytest.mark.interp
def test_bad_calls_name_the_argument(tmp_path):
    spec, module = _module(tmp_path, "linear", 32, 32)
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 1, 40, 32), torch.randn(1, 1, 40, 16)
    gates = torch.rand(1, 2, 40, 3)
    with pytest.raises(ValueError, match=r"pass compress_weights=\(w_k \[1, 1024, 32\]"):
        module.attention(q, k, v, gates=gates)
    with pytest.raises(ValueError, match=r"gates must be a floating tensor \[1, 2, 40, 3\]"):
        module.attention(q, k, v, gates=gates[..., :2], compress_weights=(torch.zeros(1, 1024, 32),
                                                                          torch.zeros(1, 512, 16)))
    with pytest.raises(ValueError, match="as many keys as queries"):
        module.attention(q, k[:, :, :30], v[:, :, :30], gates=gates)
    rt = module.RUNTIME
    for knob, value, message in (("backward_steps", 0, "backward_steps must be None or an int >= 1"),
                                 ("loop_order", "keys", "loop_order must be None, 'query' or 'key'")):
        setattr(rt, knob, value)
        try:
            with pytest.raises(ValueError, match=message):
                idx = torch.zeros(1, 1, 40, 3, dtype=torch.int32)
                o, lse = torch.zeros(1, 2, 40, 16), torch.zeros(1, 2, 40)
                rt.selected_backward(q, k, v, idx, o, lse, o, rt.scale)
        finally:
            setattr(rt, knob, None)
    rt.partials_half, rt.loop_order = "yes", "key"
    try:
        with pytest.raises(ValueError, match="partials_half must be True or False; got 'yes'"):
            rt.selected_forward(q, k, v, torch.zeros(1, 1, 40, 3, dtype=torch.int32), rt.scale)
    finally:
        rt.partials_half, rt.loop_order = False, None


@pytest.mark.compiler
def test_shipped_nsa_specs_generate_a_module_with_their_branches():
    from attngen.pipeline import compile_spec
    from attngen.resources import resolve_spec

    c = compile_spec(resolve_spec("nsa"))
    assert "def _nsa_select_fwd" in c.source and "kv_idx * 16 + 31 <= q_idx" in c.source
    assert {"cmp.fwd", "swa.bwd_dq"} <= set(c.stages)


@pytest.mark.interp
@pytest.mark.parametrize("name", ["nsa", "nsa_linear"])
def test_shipped_nsa_specs_verify(name):
    from attngen.resources import resolve_spec
    from attngen.verify import verify_spec

    results = verify_spec(resolve_spec(name), dtypes=["fp32"], shapes=[NSACase(1, 2, 1, 70)], backward=True)
    assert len(results) == 1 and results[0].ok, results[0].why


@pytest.mark.interp
@pytest.mark.parametrize("kind, page", [("mean", 0), ("linear", 16)])
def test_nsa_chunked_prefill_gives_the_references_rows(tmp_path, kind, page):
    """A chunk of 20 queries appended at once (chunked prefill) through fused_decode: to an empty
    sequence and to ones of 30 and 70 tokens, so that several windows and selection blocks end among
    the new rows (the cache's update takes every window ending there, the union of the rows' blocks
    spans blocks no single row chose); each row the reference's row of its whole sequence."""
    from attngen.verify_nsa import NSADecode, check_nsa_decode

    spec, module = _module(tmp_path, kind)
    result = check_nsa_decode(spec, module, NSADecode(2, 1, 20, (0, 30, 70), 96 + page, page=page, fused=True),
                              "fp32", torch.device("cpu"))
    assert result.ok, result.why


@pytest.mark.compiler
@pytest.mark.parametrize("int32_keys", [True, False])
def test_entry_lists_give_each_block_the_choices_that_chose_it(monkeypatch, int32_keys):
    """Each (batch, KV head)'s choices by block, then token; the sort's keys int32 where they fit,
    else int64 (forced here by a limit of 0)."""
    from attngen.runtime import nsa as nsa_runtime
    from attngen.runtime.nsa import entry_lists

    if not int32_keys:
        monkeypatch.setattr(nsa_runtime, "_INT32_KEYS", 0)

    g = torch.Generator().manual_seed(0)
    B, Hkv, N, n, n_blocks = 2, 3, 40, 4, 7
    indices = torch.randint(-1, n_blocks, (B, Hkv, N, n), generator=g)
    indices = torch.where(indices >= 0, indices, -1)
    indices = torch.stack([torch.stack([torch.stack([torch.tensor(sorted(set(r.tolist()) - {-1}) + [-1] * (n - len(set(r.tolist()) - {-1})))
                                                     for r in indices[b, h]]) for h in range(Hkv)]) for b in range(B)])
    entries, blocks, starts = entry_lists(indices.to(torch.int32), n_blocks)
    flat = entries.flatten()
    for b in range(B):
        for h in range(Hkv):
            r = b * Hkv + h
            for blk in range(n_blocks + 1):  # n_blocks: the slots that chose none, last
                want = [t * n + s for t in range(N) for s in range(n) if indices[b, h, t, s] == (-1 if blk == n_blocks else blk)]
                lo, hi = starts[r, blk].item(), (starts[r, blk + 1].item() if blk < n_blocks else (r + 1) * N * n)
                assert flat[lo:hi].tolist() == want and (blocks[r, lo - r * N * n:hi - r * N * n] == blk).all()


@pytest.mark.interp
@pytest.mark.parametrize("kind, block, stride, fused", [("mean", 32, 16, False), ("linear", 32, 32, False),
                                                      ("linear", 32, 32, True)])
def test_nsa_decoding_is_the_last_rows_of_the_whole_sequence(tmp_path, kind, block, stride, fused):
    """Three tokens appended to caches of 30, 63 and 140 tokens: windows end among them (the
    compressed cache updated in place equals compressing the whole cache); each row equals the
    reference's row at that position of its whole sequence, its selected blocks the reference's.
    The selected branch takes the three tokens in one program (four, the last masked). `fused`:
    the compressed branch and the selection by the two decode kernels (fused_decode)."""
    spec, module = _module(tmp_path, kind, block, stride)
    rt = module.RUNTIME
    saved, rt.fused_decode = rt.fused_decode, fused
    try:
        _decoding_checks(module, rt, kind, block, stride)
    finally:
        rt.fused_decode = saved


def _decoding_checks(module, rt, kind, block, stride):
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, S, Nq, D, Dv = 3, 2, 2, 160, 3, 32, 16
    k_cache, v_cache = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, Dv, generator=g)
    weights = None
    if kind == "linear":
        weights = (torch.randn(Hkv, block * D, D, generator=g) / 20, torch.randn(Hkv, block * Dv, Dv, generator=g) / 20)
    before = torch.tensor([30, 63, 140], dtype=torch.int32)
    cmp_cache = rt.compressed_cache(k_cache, v_cache, before, weights)
    q = torch.randn(B, Hkv * G, Nq, D, generator=g)
    k_new, v_new = torch.randn(B, Hkv, Nq, D, generator=g), torch.randn(B, Hkv, Nq, Dv, generator=g)
    gates = torch.rand(B, Hkv * G, Nq, 3, generator=g)
    o, indices = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=before, gates=gates,
                                               cmp_cache=cmp_cache, k=k_new, v=v_new, compress_weights=weights,
                                               return_indices=True)
    assert torch.equal(k_cache[1, :, 63:66], k_new[1])  # appended in place
    whole = rt.compressed_cache(k_cache, v_cache, before + Nq, weights)
    for b, L in enumerate((33, 66, 143)):
        n = (L - block) // stride + 1
        assert all((c[b, :, :n] - w[b, :, :n]).abs().max() < 1e-5 for c, w in zip(cmp_cache, whole)), b
        q_full = torch.randn(1, Hkv * G, L, D, generator=g)
        q_full[:, :, -Nq:] = q[b]
        gates_full = torch.rand(1, Hkv * G, L, 3, generator=g)
        gates_full[:, :, -Nq:] = gates[b]
        ref = reference_nsa.nsa_attention(q_full, k_cache[b:b + 1, :, :L], v_cache[b:b + 1, :, :L], gates_full,
                                          compress_block=block, compress_stride=stride, compress_kind=kind,
                                          w_k=weights and weights[0], w_v=weights and weights[1], select_block=32,
                                          select_count=3, init_blocks=1, local_blocks=1, window=40,
                                          return_parts=True)
        assert (o[b].double() - ref["o"][0, :, -Nq:]).abs().max() < 2e-5, b
        for h in range(Hkv):
            for t in range(Nq):
                ours = set(indices[b, h, t].tolist()) - {-1}
                assert ours == set(ref["indices"][0, h, L - Nq + t].tolist()) - {-1}, (b, h, t)
    # without appending, a sequence shorter than Nq: its rows before position 0 give zeros
    o = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([1, 66, 143], dtype=torch.int32),
                                      gates=gates, cmp_cache=cmp_cache, compress_weights=weights)
    assert (o[0, :, :2] == 0).all() and (o[0, :, 2] != 0).any()


@pytest.mark.interp
@pytest.mark.parametrize("kind, page_size, fused", [("mean", 16, False), ("linear", 48, False), ("mean", 48, True),
                                                    ("linear", 16, True)])
def test_nsa_decoding_a_paged_cache_gives_the_contiguous_bits(tmp_path, kind, page_size, fused):
    """Paged caches [pages, page_size, Hkv, *] with shuffled pages and a block table (pages of 16:
    smaller than a selected block of 32; 48: straddling them): the compressed cache made from them,
    the append, its compressed update, the selected blocks and the output equal the contiguous
    run's bit for bit; a block table entry past the pool is refused. `fused`: the decode kernels
    (fused_decode), whose compressed update also equals the torch path's within fp32 rounding."""
    spec, module = _module(tmp_path, kind, 32, 16 if kind == "mean" else 32)
    rt = module.RUNTIME
    saved, rt.fused_decode = rt.fused_decode, fused
    try:
        _paged_checks(module, rt, kind, page_size, fused)
    finally:
        rt.fused_decode = saved


def _paged_checks(module, rt, kind, page_size, fused):
    from attngen.verify import paged as as_pages

    g = torch.Generator().manual_seed(5)
    B, Hkv, G, S, Nq, D, Dv = 3, 2, 2, 144, 2, 32, 16
    k_cache, v_cache = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, Dv, generator=g)
    weights = None
    if kind == "linear":
        weights = (torch.randn(Hkv, 32 * D, D, generator=g) / 20, torch.randn(Hkv, 32 * Dv, Dv, generator=g) / 20)
    table = torch.randperm(B * (S // page_size), generator=g).reshape(B, S // page_size).to(torch.int32)
    k_pages, v_pages = as_pages(k_cache, page_size, table), as_pages(v_cache, page_size, table)
    before = torch.tensor([0, 47, 126], dtype=torch.int32)  # windows end at 47 (d 16) and 127 (d 16, 32)
    cmp = rt.compressed_cache(k_cache, v_cache, before, weights)
    cmp_paged = rt.compressed_cache(k_pages, v_pages, before, weights, block_table=table)
    cmp_torch, cmp_before = [c.clone() for c in cmp], cmp[0].clone()
    assert all(torch.equal(a, b) for a, b in zip(cmp, cmp_paged))
    q = torch.randn(B, Hkv * G, Nq, D, generator=g)
    k_new, v_new = torch.randn(B, Hkv, Nq, D, generator=g), torch.randn(B, Hkv, Nq, Dv, generator=g)
    gates = torch.rand(B, Hkv * G, Nq, 3, generator=g)
    kw = dict(cache_seqlens=before, gates=gates, k=k_new, v=v_new, compress_weights=weights, return_indices=True)
    o, indices = module.attention_with_kvcache(q, k_cache, v_cache, cmp_cache=cmp, **kw)
    o_p, indices_p = module.attention_with_kvcache(q, k_pages, v_pages, cmp_cache=cmp_paged, block_table=table, **kw)
    assert torch.equal(o, o_p) and torch.equal(indices, indices_p)
    assert torch.equal(k_pages, as_pages(k_cache, page_size, table))  # the same rows appended
    assert all(torch.equal(a, b) for a, b in zip(cmp, cmp_paged))  # the same compressed tokens written
    if fused:  # the kernel's update against the torch path's
        rt._update_compressed(k_cache, v_cache, cmp_torch, before.long()[:, None] + torch.arange(Nq), weights)
        assert all((a - b).abs().max() < 1e-6 * b.abs().max().clamp(min=1) for a, b in zip(cmp, cmp_torch))
        assert not torch.equal(cmp_torch[0], cmp_before)  # a window ended among the appended rows
    with pytest.raises(ValueError, match="block_table entries"):
        module.attention_with_kvcache(q, k_pages, v_pages, cmp_cache=cmp_paged, block_table=table + 1000,
                                      cache_seqlens=before, gates=gates, compress_weights=weights)
    with pytest.raises(ValueError, match="hold no page"):
        module.attention_with_kvcache(q, k_pages[:0], v_pages[:0], cmp_cache=cmp_paged, block_table=table,
                                      cache_seqlens=before, gates=gates, compress_weights=weights)


@pytest.mark.compiler
def test_selection_check_wants_forced_blocks_exactly():
    from attngen.verify_nsa import priority

    nsa = parse_spec({"name": "n", "head_dim": 64, "nsa": {"select": {"block": 32, "count": 3, "init_blocks": 1,
                                                                      "local_blocks": 1}}}).nsa
    scores = torch.tensor([[[[0.1, 5.0, 4.0, 0.2]]]], dtype=torch.float64)  # row at position 100: own block 3
    rank = priority(scores, torch.tensor([100]), nsa)
    ref = torch.tensor([[[[0, 1, 3]]]], dtype=torch.int32)
    assert selection_agrees(torch.tensor([[[[0, 2, 3]]]], dtype=torch.int32), ref, rank) == (False, 1)  # 4.0 < 5.0
    assert selection_agrees(torch.tensor([[[[1, 2, 3]]]], dtype=torch.int32), ref, rank) == (False, 1)  # block 0 forced
    assert selection_agrees(ref.clone(), ref, rank) == (True, 0)


@pytest.mark.interp
@pytest.mark.parametrize("block, stride, G, N, block_c, pieces, local, D", [
    (32, 16, 3, 300, 64, 2, 1, 32), (64, 64, 1, 200, 64, 0, 1, 32), (32, 16, 16, 150, 64, 2, 1, 32),
    (32, 16, 2, 300, 16, 0, 1, 32), (64, 64, 1, 1100, 16, 0, 1, 32), (24, 7, 1, 300, 16, 0, 1, 32),
    (32, 32, 1, 600, 16, 1, 1, 32), (48, 16, 2, 550, 32, 2, 1, 32), (16, 8, 1, 600, None, 4, 1, 32),
    (16, 16, 1, 260, 16, 2, 0, 32), (32, 16, 1, 300, None, 2, 1, 128)])
def test_fused_scores_kernel_gives_the_reference_scores_and_the_same_blocks(tmp_path, monkeypatch, block, stride, G,
                                                                           N, block_c, pieces, local, D):
    """The _nsa_scores kernel against the float64 reference and the torch selection: one step of
    block_c compressed tokens and several; block sums by the windows' pieces where the strides allow
    (l' = 32 a multiple of d: l = d, a window within its block; l = 2 d or 3 d, spilling into the
    next block, carried across steps; l = 2 d, l' = 4 d, the shipped nsa's ratio, over two steps),
    else by the fold product: with the blocks a step shares with the next carried in registers
    (steps of 16) or none shared (l = d), and steps that start inside a block (stride 7: each step
    adds to OUT in turn); d128 at G 1 (tiles of 128 tokens); each way, the same scores. The pieces'
    buffer starts as 1e30 where it is left unset: every block before a row's own must be stored,
    and no other may reach the blocks (with local_blocks 0 the own block competes: the buffer is
    zeros then, l = d leaving it unset)."""
    data = {"name": "fs", "head_dim": D, "dtypes": ["fp32"],
            "nsa": {"compress": {"block": block, "stride": stride, "kind": "mean"},
                    **SMALL, "select": {**SMALL["select"], "local_blocks": local}}}
    path = tmp_path / "fs.yaml"
    path.write_text(yaml.safe_dump(data))
    rt = attngen.load(path).RUNTIME
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2 * G, N, D, generator=g), torch.randn(2, 2, N, D, generator=g)
    k_cmp = rt.compress(k)
    _, lse = rt.branches()["cmp"].attention(q, k_cmp, k_cmp, return_lse=True)
    assert rt.scores_carry is None and rt.scores_fold is None  # the defaults: the carry past head dim 128 only
    if D == 128:  # 64 rows of d128 take 8 warps, then 128 token rows (two selection blocks and more a tile)
        assert rt.scores_tiling(G, D, block_c)["BLOCK_T"] == 128
    assert [rt.scores_carried(d) for d in (32, 128, 192, 256)] == [False, False, True, True]
    assert rt.scores_pieces(block_c or 64) == pieces
    from attngen.runtime import nsa as nsa_runtime

    def unset(shape, device, zeros):  # a score that would be chosen, for what the kernel leaves unset
        return torch.zeros(shape, device=device) if zeros else torch.full(shape, 1e30, device=device)
    monkeypatch.setattr(nsa_runtime, "_scores_out", unset)
    runs = {}
    try:
        # the pieces take no carry; without them the default is the fold product (in memory: the cases
        # without pieces, whose strides include the shipped ones at steps of 16)
        for fold, carry in (((None, True), (False, True)) if pieces else ((False, True), (False, False))):
            rt.scores_fold, rt.scores_carry = fold, carry
            runs[fold, carry] = rt.select_fused(q, k_cmp, lse, rt.scale, block_c=block_c)
    finally:
        rt.scores_carry = rt.scores_fold = None
    want = reference_nsa.selection_scores(q, k_cmp, block=block, stride=stride, select_block=32)
    before_own = torch.arange(want.shape[-1]) < (torch.arange(N) // 32)[:, None]  # [N, n_blocks]
    blocks, scores = next(iter(runs.values()))
    assert scores[..., before_own].isfinite().all()
    assert (scores.double() - want)[..., before_own].abs().max() < 1e-5
    assert torch.equal(blocks, rt.select(q, k_cmp, lse, rt.scale))
    ref_blocks = reference_nsa.select_blocks(want, select_block=32, count=rt.count, init_blocks=rt.init,
                                             local_blocks=local)
    rank = priority(want, torch.arange(N), SimpleNamespace(select_block=32, init_blocks=rt.init, local_blocks=local))
    assert selection_agrees(blocks, ref_blocks, rank)[0]  # the reference's, up to float32 ties
    for other_blocks, other in runs.values():
        diff = (other - scores)[..., before_own].abs().max()
        assert diff < 1e-6 * max(1.0, scores[..., before_own].abs().max().item())  # fp32 rounding
        assert torch.equal(other_blocks, blocks)
    if not pieces:  # the fold product adds to zeros: every score set
        assert (scores.double() - want).abs().max() < 1e-5


@pytest.mark.compiler
def test_scores_tiling_keeps_the_fold_of_a_small_group_in_registers():
    """The scores kernel's tiling: 64 token rows at G 1 on 8 warps (128 with the pieces); the windows' pieces where the
    strides allow, else the fold product, nsa_linear's carried in steps of 32 compressed tokens at G 1
    (4 warps, or steps of 64, spill offline on sm90)."""
    from attngen.resources import resolve_spec

    nsa, linear = (attngen.load(resolve_spec(name)).RUNTIME for name in ("nsa", "nsa_linear"))
    pick = lambda rt, G, D, c=None: {k: rt.scores_tiling(G, D, c)[k]  # noqa: E731
                                     for k in ("BLOCK_T", "BLOCK_G", "BLOCK_C", "SHIFT", "PIECES", "num_warps")}
    # the windows' pieces (nsa: l' = 4 d, l = 2 d; nsa_linear: l = l' = d): no fold product, 8 warps from 64 rows of
    # d128, and then 128 rows up to d128 (a warpgroup's 64 each)
    assert pick(nsa, 1, 128) == dict(BLOCK_T=128, BLOCK_G=1, BLOCK_C=64, SHIFT=0, PIECES=4, num_warps=8)
    assert pick(nsa, 4, 128) == dict(BLOCK_T=32, BLOCK_G=4, BLOCK_C=64, SHIFT=0, PIECES=4, num_warps=8)
    assert pick(nsa, 8, 128)["BLOCK_T"] == 16 and pick(nsa, 1, 64)["num_warps"] == 4  # 128 rows; 4 warps at d64
    assert pick(nsa, 16, 128) == dict(BLOCK_T=16, BLOCK_G=16, BLOCK_C=64, SHIFT=0, PIECES=4, num_warps=8)
    assert pick(linear, 1, 192) == dict(BLOCK_T=64, BLOCK_G=1, BLOCK_C=64, SHIFT=0, PIECES=1, num_warps=8)
    try:
        nsa.scores_fold = linear.scores_fold = False  # the fold product
        assert pick(nsa, 1, 128) == dict(BLOCK_T=64, BLOCK_G=1, BLOCK_C=64, SHIFT=0, PIECES=0, num_warps=8)
        assert pick(linear, 1, 192) == dict(BLOCK_T=64, BLOCK_G=1, BLOCK_C=32, SHIFT=32, PIECES=0, num_warps=8)
        assert pick(linear, 16, 192)["BLOCK_C"] == 64 and pick(linear, 16, 192)["SHIFT"] == 64
        assert pick(linear, 1, 192, 64)["BLOCK_C"] == 64  # a caller's step stands
    finally:
        nsa.scores_fold = linear.scores_fold = None
    assert nsa.scores_pieces(64) == 4 and nsa.scores_pieces(32) == 0  # the spill's shift wants 16 blocks a step


@pytest.mark.interp
def test_nsa_with_torch_selection_matches_reference(tmp_path):
    """fused_selection = False: the chunked torch scoring, kept beside the default kernel."""
    spec, module = _module(tmp_path)
    module.RUNTIME.fused_selection = False
    try:
        result = check_nsa(spec, module, NSACase(1, 4, 2, 100), "fp32", "cpu")
    finally:
        module.RUNTIME.fused_selection = True
    assert result.ok, result.why


def _selected_reference(q, k, v, indices, block, scale):
    """The selected branch in float64 from reference_nsa's pieces: (o, lse), LSE -inf where a row
    sees nothing."""
    Hq = q.shape[1]
    visible = reference_nsa._expand_heads(reference_nsa._selected_visible(indices, q.shape[2], block), Hq)
    k, v = (reference_nsa._expand_heads(x.double(), Hq) for x in (k, v))
    o, _ = reference_nsa._attend(q.double(), k, v, visible, scale)
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    return o, torch.logsumexp(s, -1)


@pytest.mark.interp
@pytest.mark.parametrize("G, dtype, forced", [(1, "fp32", 4), (2, "fp32", None), (4, "fp32", 8), (16, "fp32", None),
                                              (4, "fp16", None)])
def test_selected_forward_over_token_tiles_matches_reference(tmp_path, G, dtype, forced):
    """The selected forward with several tokens per program (rows tokens x G, walking the union of
    their blocks), and key-major (each choice its block's partial row, merged by LSE; the rows
    float32, or fp16 for fp16 inputs with partials_half), against the
    float64 reference, and equal to one token per program within fp32 rounding; N = 99 is no multiple of the tile's tokens nor of a block, the selection random per
    token (so a tile's tokens choose differently), one token choosing nothing (zeros, LSE -inf)."""
    spec, module = _module(tmp_path)
    rt = module.RUNTIME
    tdt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    g = torch.Generator().manual_seed(G)
    B, Hkv, N = 1, 2 if G < 16 else 1, 99
    q = torch.randn(B, Hkv * G, N, 32, generator=g).to(tdt)
    k, v = torch.randn(B, Hkv, N, 32, generator=g).to(tdt), torch.randn(B, Hkv, N, 16, generator=g).to(tdt)
    indices = rt._top_blocks(torch.rand(B, Hkv, N, 4, generator=g), torch.arange(N))
    indices[:, :, 70] = -1
    want_o, want_lse = _selected_reference(q, k, v, indices, 32, rt.scale)
    runs = {}
    try:
        rt.loop_order = "query"  # the token tiles (the default below G 4 from 16k tokens is key-major)
        for T in (None, 1) if forced is None else (None, forced, 1):
            rt.tokens_per_program = T
            runs[T] = rt.selected_forward(q, k, v, indices, rt.scale)
        rt.loop_order = "key"
        runs["key"] = rt.selected_forward(q, k, v, indices, rt.scale)
        rt.partial_bytes = 1  # the partial rows a selection block of tokens at a time (4 chunks)
        runs["key, chunks"] = rt.selected_forward(q, k, v, indices, rt.scale)
        if dtype == "fp16":  # the partial rows in fp16 (partials_half) or float32 (the default)
            rt.partials_half = True
            runs["key, fp16 partials"] = rt.selected_forward(q, k, v, indices, rt.scale)
    finally:
        rt.tokens_per_program = rt.loop_order = None
        rt.partial_bytes, rt.partials_half = 1 << 30, False
    if dtype == "fp16":  # the half rows round once more: apart by about fp16's rounding, no more
        half, full = runs["key, fp16 partials"][0].float(), runs["key"][0].float()
        assert not torch.equal(half, full) and (half - full).abs().max() <= 2e-3 * half.abs().max()
    assert rt.selected_tokens(G, N) == 64 // max(1, G)  # the automatic choice: 64 rows
    assert rt.selected_order(G, N) == "query"  # few tokens
    assert rt.selected_order(G, N, dq=True) == ("key" if G <= 4 else "query")  # dQ: a small group pads to 16 rows
    assert rt.selected_order(G, 16384) == ("key" if G < 4 else "query")
    assert rt.selected_order(G, 65536) == ("key" if G <= 4 else "query")  # one token a program past 32k
    from attngen.runtime.nsa import loop_order  # past head dim 128 query-major takes one token a program

    assert [loop_order(G, 8192, d) for d in (128, 192)] == ["query", "key" if G <= 4 else "query"]
    tol = 2e-5 if dtype == "fp32" else 2e-3
    for T, (o, lse) in runs.items():
        assert (o.double() - want_o).abs().max() < tol, T
        assert (o[:, :, 70] == 0).all() and (lse[:, :, 70] == float("-inf")).all(), T
        assert torch.allclose(lse.double(), want_lse, atol=tol, rtol=0), T
    o1, lse1 = runs[1]
    for T, (o, lse) in runs.items():
        assert (o.float() - o1.float()).abs().max() <= (1e-6 if dtype == "fp32" else 1e-3), T
        assert torch.allclose(lse, lse1, atol=1e-6, rtol=0), T


@pytest.mark.interp
@pytest.mark.parametrize("G, steps", [(1, 1), (3, 2), (16, None)])
def test_selected_backward_in_segments_matches_reference(tmp_path, G, steps):
    """The selected branch's gradients against float64 autograd, dK and dV from segments of a
    block's tokens (steps per work item: 1 cuts the first block, which every token chose, into many
    items) added in order, dQ query-major and key-major (a row per choice, added); N = 99 ragged,
    one token choosing nothing."""
    spec, module = _module(tmp_path)
    rt = module.RUNTIME
    g = torch.Generator().manual_seed(10 + G)
    B, Hkv, N = 1, 2 if G < 16 else 1, 99
    q = torch.randn(B, Hkv * G, N, 32, generator=g)
    k, v = torch.randn(B, Hkv, N, 32, generator=g), torch.randn(B, Hkv, N, 16, generator=g)
    indices = rt._top_blocks(torch.rand(B, Hkv, N, 4, generator=g), torch.arange(N))
    indices[:, :, 70] = -1
    do = torch.randn(B, Hkv * G, N, 16, generator=g)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    want_o, _ = _selected_reference(qd, kd, vd, indices, 32, rt.scale)
    want = torch.autograd.grad(want_o, (qd, kd, vd), do.double())
    o, lse = rt.selected_forward(q, k, v, indices, rt.scale)
    runs = {}
    try:
        # key-major is for small groups: at 16 the query-major schedules alone (suite time)
        for order, chunk_bytes in (("query", 1 << 30), ("key", 1 << 30), ("key, chunks", 1))[:3 if G < 16 else 1]:
            rt.loop_order, rt.partial_bytes = order.split(",")[0], chunk_bytes  # 1: 32 tokens a chunk
            for s in (steps, 10_000) if chunk_bytes > 1 else (steps,):
                rt.backward_steps = s
                runs[order, s] = rt.selected_backward(q, k, v, indices, o, lse, do, rt.scale)
    finally:
        rt.backward_steps = rt.loop_order = None
        rt.partial_bytes = 1 << 30
    for run in runs.values():
        for name, got, ref in zip("qkv", run, want):
            assert (got.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item()), name
    if G < 16:
        assert torch.equal(runs["key, chunks", steps][0], runs["key", steps][0])  # a token's dQ rows: in one chunk
    for order in ("query", "key")[:2 if G < 16 else 1]:
        assert torch.equal(runs[order, steps][0], runs[order, 10_000][0])  # dQ: one sum per row either way
        if steps is not None:  # other segments, other sums: fp32 rounding only
            for a, b in zip(runs[order, steps][1:], runs[order, 10_000][1:]):
                assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())
    for order in ("key", "key, chunks")[:2 if G < 16 else 0]:  # the same sums, in other orders (other warps on a GPU)
        for a, b in zip(runs["query", steps][1:], runs[order, steps][1:]):
            assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.compiler
def test_work_items_cut_each_block_into_segments_in_order():
    from attngen.runtime.nsa import entry_lists, work_items

    g = torch.Generator().manual_seed(3)
    B, Hkv, N, n, n_blocks, segment = 2, 2, 50, 3, 6, 4
    idx = torch.stack([torch.randperm(n_blocks, generator=g)[:n] for _ in range(B * Hkv * N)]).view(B, Hkv, N, n)
    idx = torch.where(torch.rand(idx.shape, generator=g) < 0.2, -1, idx)
    idx[0, 1] = torch.stack([torch.randperm(n_blocks - 1, generator=g)[:n] + 1 for _ in range(N)])
    idx[0, 1, :, 0] = 0  # a block every token chose
    idx = torch.sort(idx, -1).values.to(torch.int32)
    tokens, _, starts = entry_lists(idx, n_blocks)  # entries t * n + slot: the order is the tokens'
    tokens = tokens.flatten()
    items, spans = work_items(starts, segment, N * n)
    for r in range(B * Hkv):
        live = items[r][items[r, :, 2] > 0]
        assert (items[r, len(live):, 2] == 0).all()  # the live items first, then the grid's slack
        for b in range(n_blocks):
            first, count = spans[r, b].tolist()
            lo, hi = starts[r, b].item(), starts[r, b + 1].item()
            assert count == -(-(hi - lo) // segment)
            got = [t for blk, f, c in items[r, first:first + count].tolist()
                   for t in tokens[f:f + c].tolist() if blk == b]
            assert got == tokens[lo:hi].tolist() and all(c <= segment for c in items[r, first:first + count, 2])
    assert spans[1, 0, 1] == -(-N // segment)


@pytest.mark.compiler
def test_union_lists_hold_each_tiles_blocks_once(tmp_path):
    from attngen.runtime.nsa import union_lists

    g = torch.Generator().manual_seed(0)
    B, Hkv, N, n, n_blocks = 2, 3, 37, 4, 9
    raw = torch.randint(-1, n_blocks, (B, Hkv, N, n), generator=g).to(torch.int32)
    for block_t in (2, 8, 64):
        union, count = union_lists(raw, block_t, n_blocks)
        tiles = -(-N // block_t)
        assert union.shape == (B, Hkv, tiles, min(block_t * n, n_blocks)) and count.shape == (B, Hkv, tiles)
        for b in range(B):
            for h in range(Hkv):
                for i in range(tiles):
                    want = sorted(set(raw[b, h, i * block_t:(i + 1) * block_t].flatten().tolist()) - {-1})
                    assert count[b, h, i] == len(want)
                    assert union[b, h, i].tolist() == want + [-1] * (union.shape[-1] - len(want))
    _, module = _module(tmp_path)
    rt = module.RUNTIME
    assert [rt.selected_tokens(G, 4096) for G in (1, 3, 16, 64, 128)] == [64, 16, 4, 1, 1]
    assert rt.selected_tokens(16, 1) == 1 and rt.selected_tokens(2, 3) == 4  # decoding one token; three
    assert rt.selected_tokens(16, 4096, tensor_cores=False) == 1  # fp32 on the GPU
    assert rt.selected_tokens(16, 32768) == 4 and rt.selected_tokens(16, 65536) == 1  # one token past 32k
    rt.tokens_per_program = 3  # (the module is cached per spec: later tests load this one again)
    try:
        with pytest.raises(ValueError, match="tokens_per_program must be None or a power of two"):
            rt.selected_tokens(16, 4096)
    finally:
        rt.tokens_per_program = None


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["nsa", "nsa_linear"])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_selected_forward_over_token_tiles_on_gpu(name, G):
    """The shipped specs' selected forward in bf16 (d128; d192 padded to 256 over 8 warps): query-major
    with the automatic tokens per program and with one token per program, and key-major (the
    default below G 4 from 16k tokens or past head dim 128), each against the float64 reference."""
    from attngen.resources import resolve_spec

    rt = attngen.load(resolve_spec(name)).RUNTIME
    g = torch.Generator(device="cuda").manual_seed(G)
    B, Hkv, N = 1, 2, 1500
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    q, k, v = mk(B, Hkv * G, N, rt.head_dim), mk(B, Hkv, N, rt.head_dim), mk(B, Hkv, N, rt.head_dim_v)
    n_blocks = -(-N // rt.l_sel)
    scores = torch.rand(B, Hkv, N, n_blocks, generator=g, device="cuda")
    indices = rt._top_blocks(scores, torch.arange(N, device="cuda"))
    try:
        rt.loop_order = "query"
        o, lse = rt.selected_forward(q, k, v, indices, rt.scale)
        rt.tokens_per_program = 1
        o1, lse1 = rt.selected_forward(q, k, v, indices, rt.scale)
        rt.loop_order, rt.tokens_per_program = "key", None
        ok, lsek = rt.selected_forward(q, k, v, indices, rt.scale)
    finally:
        rt.tokens_per_program = rt.loop_order = None
    want_o, want_lse = _selected_reference(q, k, v, indices, rt.l_sel, rt.scale)
    for got_o, got_lse in ((o, lse), (o1, lse1), (ok, lsek)):
        assert (got_o.double() - want_o).abs().max() < 2e-2 and (got_lse.double() - want_lse).abs().max() < 1e-2


@pytest.mark.interp
@pytest.mark.parametrize("kind, N", [("mean", 100), ("linear", 70), ("mean", 20)])
def test_nsa_under_fullgraph_compile_matches_eager(tmp_path, kind, N):
    """torch.compile(fullgraph=True) over an NSA module (aot_eager on the CPU): the selection and the
    selected branch are custom ops, the branches their fa2 modules' ops, the gates' mix torch ops;
    the output and every gradient (q, k, v, the gates, the compression weights) equal eager's bit for
    bit with the mix in torch ops (fused_mix off), and eager's with the mix kernels to float32
    rounding. N = 20 is shorter than one compression window."""
    _, module = _module(tmp_path, kind=kind, stride=32 if kind == "linear" else 16)
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(1, 4, N, 32, generator=g), torch.randn(1, 2, N, 32, generator=g),
              torch.randn(1, 2, N, 16, generator=g), torch.rand(1, 4, N, 3, generator=g)]
    if kind == "linear":
        leaves += [torch.randn(2, 32 * 32, 32, generator=g) * 0.03, torch.randn(2, 32 * 16, 16, generator=g) * 0.03]
    leaves = [t.requires_grad_() for t in leaves]

    def step(q, k, v, gates, *weights):
        return (module.attention(q, k, v, gates=gates, compress_weights=tuple(weights) or None) ** 2).sum()

    def run(f):
        for t in leaves:
            t.grad = None
        out = f(*leaves)
        out.backward()
        return out.detach(), [t.grad.clone() for t in leaves]

    torch._dynamo.reset()
    out_c, grads_c = run(torch.compile(step, fullgraph=True, backend="aot_eager"))  # a graph break raises
    rt = module.RUNTIME
    saved, rt.fused_mix = rt.fused_mix, False
    try:
        out_e, grads_e = run(step)
    finally:
        rt.fused_mix = saved
    assert torch.equal(out_c, out_e)
    assert all(torch.equal(a, b) for a, b in zip(grads_c, grads_e))
    out_k, grads_k = run(step)
    assert all((a - b).abs().max() <= 1e-6 * b.abs().max() for a, b in zip((out_k, *grads_k), (out_e, *grads_e)))


@pytest.mark.interp
@pytest.mark.parametrize("paged, fused", [(False, False), (True, False), (False, True)])
def test_nsa_decoding_under_fullgraph_compile_matches_eager(tmp_path, paged, fused):
    """A decode step (appending three tokens, updating the compressed cache in place, attending)
    under torch.compile(fullgraph=True) with aot_eager: the output, both caches and the compressed
    cache equal eager's bit for bit (the selected branch is an op; the rest is torch and the window
    branch's decode op; eager's gates' mix in torch ops too, fused_mix off); also with paged caches
    (pages of 16, shuffled) and their block table, and with fused_decode (the compressed branch and
    the selection one op)."""
    from attngen.verify import paged as as_pages

    _, module = _module(tmp_path)
    rt = module.RUNTIME
    saved, rt.fused_decode, rt.fused_mix = (rt.fused_decode, rt.fused_mix), fused, False
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, S, Nq, D, Dv = 3, 2, 2, 160, 3, 32, 16
    k_cache, v_cache = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, Dv, generator=g)
    table = None
    if paged:
        table = torch.randperm(B * S // 16, generator=g).reshape(B, S // 16).to(torch.int32)
        k_cache, v_cache = as_pages(k_cache, 16, table), as_pages(v_cache, 16, table)
    before = torch.tensor([30, 63, 140], dtype=torch.int32)
    q, gates = torch.randn(B, Hkv * G, Nq, D, generator=g), torch.rand(B, Hkv * G, Nq, 3, generator=g)
    k_new, v_new = torch.randn(B, Hkv, Nq, D, generator=g), torch.randn(B, Hkv, Nq, Dv, generator=g)

    def step(q, k_cache, v_cache, lengths, gates, k_cmp, v_cmp, k, v):
        return module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, gates=gates,
                                             cmp_cache=(k_cmp, v_cmp), k=k, v=v, block_table=table)

    runs = []
    try:
        for f in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):  # a graph break raises
            torch._dynamo.reset()
            caches = [k_cache.clone(), v_cache.clone()]
            caches += rt.compressed_cache(*caches, before, block_table=table)
            runs.append((f(q, caches[0], caches[1], before, gates, caches[2], caches[3], k_new, v_new), *caches))
    finally:
        rt.fused_decode, rt.fused_mix = saved
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.gpu
def test_nsa_decode_step_captured_in_a_cuda_graph_replays_with_new_lengths(capture):
    """No host read on NSA's decoding path: capture one step (append, compressed-cache update,
    attention), change the lengths, the new tokens and the cache, replay: the eager call's output."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from attngen.resources import resolve_spec

    module = attngen.load(resolve_spec("nsa"))
    rt = module.RUNTIME
    g = torch.Generator(device="cuda").manual_seed(5)
    B, Hkv, G, S, D = 3, 2, 16, 4096, rt.head_dim
    mk = lambda *shape: torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    k_cache, v_cache = mk(B, Hkv, S, D), mk(B, Hkv, S, rt.head_dim_v)
    lengths = torch.tensor([0, 700, 4000], dtype=torch.int32, device="cuda")
    cmp_cache = rt.compressed_cache(k_cache, v_cache, lengths)
    q, k_new, v_new = mk(B, Hkv * G, 1, D), mk(B, Hkv, 1, D), mk(B, Hkv, 1, rt.head_dim_v)
    gates = torch.rand(B, Hkv * G, 1, 3, generator=g, device="cuda", dtype=torch.bfloat16)
    step = lambda: module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, gates=gates,  # noqa: E731
                                                 cmp_cache=cmp_cache, k=k_new, v=v_new)
    with torch.no_grad():
        graph, out = capture(step)
        for new_lengths in ((5, 3000, 4094), (4095, 1, 17)):
            lengths.copy_(torch.tensor(new_lengths, dtype=torch.int32))
            for t in (q, k_new, v_new, k_cache):
                t.normal_()
            graph.replay()
            got = out.clone()
            want = step()  # eager: the same append and compressed-cache update (idempotent), and attention
            assert torch.equal(got, want), new_lengths
