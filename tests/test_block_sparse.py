"""Block-sparse layouts (`sparsity:`) end to end: the per-(batch, head) tile tables against the
dense block layout and element mask (hypothesis), the kernels against the float64 reference for a
call-time layout (broadcast over batch or heads, GQA, Nq != Nk, ragged, rows that see nothing) and
for the static terms (longformer, bigbird, strided), bigbird's seed, BlockMask reuse and copying,
BlockMask.from_flex, the errors, and torch.compile. Spec copies use 64 x 64 layout blocks and small
head dims, so that several blocks fit small shapes on Triton's interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.nn.attention import flex_attention as flex

import attngen
from attngen import reference, runtime
from attngen.runtime import block_mask as block_mask_module
from attngen.runtime import tiles as tiles_module
from attngen.runtime.sparse import Sparse
from attngen.runtime.tiles import EMPTY, FULL, PARTIAL
from attngen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


# ------------------------------------------------------------------ spec copies and inputs

@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    """copy(base, name, block=(64, 64), mask=..., **sparsity) -> (spec, module): a shipped
    spec with a smaller head dim and layout block (and other sparsity terms), compiled once per module."""
    folder = tmp_path_factory.mktemp("block_sparse_specs")
    made = {}

    def make(base, name, block=(64, 64), mask=None, nested_runs=None, head_dim=32, **sparsity):
        key = (name, nested_runs)
        if key not in made:
            data = load_spec(SPECS / f"{base}.yaml").to_dict()
            data.update(name=name, head_dim=head_dim, head_dim_v=head_dim)
            data["sparsity"] = dict(data["sparsity"], block=list(block), **sparsity)
            if mask is not None:
                data["mask"] = mask
            path = folder / f"{name}.yaml"
            if not path.exists():
                path.write_text(yaml.safe_dump(data, sort_keys=False))
            # one tiling per dtype (no shape buckets): the compile skips the cost model's long-sequence counts
            made[key] = load_spec(path), attngen.load(path, nested_runs=nested_runs, shape_buckets=False)
        return made[key]
    return make


def _qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g).to(device=device, dtype=dtype)
            for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk))]


def _random_layout(shape, seed, p=0.5):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


def _no_kernel(monkeypatch, module):
    """Makes any launch of module's kernels fail the test (for checks that must run nothing)."""
    def launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(runtime.of(module), "_launch", launch)


# ------------------------------------------------------------------ 1. tile tables against the dense layout and mask

def _decode(count, index, nested: bool, n_inner: int) -> torch.Tensor:
    """int8 classes [..., n_outer, n_inner] from COUNT [..., n_outer, 2] and INDEX [..., n_outer, 2,
    n_inner + 1], checking the encoding on the way: sorted partial tiles, maximal runs of full ones
    (nested) or the first run then the other full tiles (first), no tile listed twice."""
    assert count.dtype == index.dtype == torch.int32
    assert index.shape == count.shape[:-1] + (2, n_inner + 1)
    classes = torch.full(count.shape[:-1] + (n_inner,), EMPTY, dtype=torch.int8)
    rows = torch.cartesian_prod(*(torch.arange(s) for s in count.shape[:-1])).reshape(-1, count.dim() - 1)
    for at in rows.tolist():
        c, i = count[tuple(at)].tolist(), index[tuple(at)]
        partial = i[0, :c[0]].tolist()
        assert partial == sorted(set(partial)) and all(0 <= j < n_inner for j in partial), (at, partial)
        if nested:  # c[1] runs as [first, end) pairs
            runs = i[1, :2 * c[1]].reshape(-1, 2).tolist()
            assert all(f < e for f, e in runs) and all(e < f for (_, e), (f, _) in zip(runs, runs[1:])), (at, runs)
            full = [j for f, e in runs for j in range(f, e)]
        else:  # the first run [first, end), then c[1] more full tiles one by one
            first, end = i[1, :2].tolist()
            rest = i[1, 2:2 + c[1]].tolist()
            assert first <= end and all(j > end for j in rest) and rest == sorted(set(rest)), (at, first, end, rest)
            assert first < end or not rest, (at, "full tiles after an empty first run")
            full = list(range(first, end)) + rest
        assert all(0 <= j < n_inner for j in full) and not set(full) & set(partial), (at, partial, full)
        classes[tuple(at)][partial] = PARTIAL
        classes[tuple(at)][full] = FULL
    return classes


def _dense_classes(vis: torch.Tensor, bm: int, bn: int, walk_keys: bool) -> torch.Tensor:
    """int8 [.., n_m, n_n] tile classes from a dense bool mask [.., Nq, Nk]: EMPTY where no pair is
    visible, FULL where every in-bounds pair is and the tile is not ragged along the walked dimension
    (keys for fwd and bwd_dq, queries for bwd_dkdv), else PARTIAL."""
    *lead, Nq, Nk = vis.shape
    n_m, n_n = -(-Nq // bm), -(-Nk // bn)
    padded = torch.zeros(*lead, n_m * bm, n_n * bn, dtype=torch.bool)
    padded[..., :Nq, :Nk] = vis
    inb = torch.zeros_like(padded)
    inb[..., :Nq, :Nk] = True
    shape = (*lead, n_m, bm, n_n, bn)
    any_vis = padded.reshape(shape).any(-1).any(-2)
    all_vis = (padded == inb).reshape(shape).all(-1).all(-2)
    ragged = torch.zeros(n_m, n_n, dtype=torch.bool)
    if walk_keys:
        ragged[:, -1] = Nk % bn != 0
    else:
        ragged[-1, :] = Nq % bm != 0
    full = any_vis & all_vis & ~ragged
    return any_vis.to(torch.int8) + full.to(torch.int8)


WINDOW = {"left": 90, "right": 20, "align": "top_left"}
TABLE_SPECS = {  # a spec copy's name: (base, its changes), each with 64-row layout blocks
    "bs_causal": ("block_sparse", {}),
    # a window mask instead of causal; 128-key blocks (two or four kernel tiles across a block)
    "bs_window": ("block_sparse", dict(block=(64, 128), mask={"window": WINDOW})),
    # and static terms besides the call's layout: a local band, a random block per row (H' = heads)
    "bs_mixed": ("block_sparse", dict(block=(64, 128), mask={"window": WINDOW}, local={"left": 1, "right": 0},
                                      random={"blocks": 1, "seed": 3})),
}


@pytest.mark.compiler
@pytest.mark.parametrize("name", ["bs_causal", "bs_window", "bs_mixed"])
# no shrinking: a failure reports its first example at once
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(nested=st.booleans(), B=st.integers(1, 2), H=st.integers(1, 3),
       batch_wide=st.booleans(), head_wide=st.booleans(), Nq=st.integers(1, 330), Nk=st.integers(1, 330),
       bm=st.sampled_from([32, 64]), bn=st.sampled_from([32, 64]), p=st.sampled_from([0.2, 0.6, 1.0]),
       seed=st.integers(0, 2**16))
def test_tables_agree_with_dense_layout_and_mask(copy, name, nested, B, H, batch_wide, head_wide, Nq, Nk, bm, bn, p,
                                                 seed):
    """The lists KernelModule._tables builds from a BlockMask, for each kernel role in both
    encodings, decode to exactly the tile classes of the dense reference mask (the element mask and
    the block sparsity, static terms and the call's layout): every visible pair in a listed tile,
    no EMPTY tile listed, FULL only where every in-bounds pair is visible and the tile is not
    ragged along the walked dimension, PARTIAL otherwise."""
    base, changes = TABLE_SPECS[name]
    spec, module = copy(base, name, nested_runs=nested, **changes)
    rt = runtime.of(module)
    assert set(rt.tables.values()) == {"nested" if nested else "first"}
    bq, bk = spec.sparsity.block
    layout = _random_layout((B if batch_wide else 1, H if head_wide else 1, -(-Nq // bq), -(-Nk // bk)), seed, p)
    vis = reference.dense_mask(spec, Nq, Nk) & reference.sparsity_mask(spec, Nq, Nk, H, layout)  # [B', H', Nq, Nk]
    q, k = torch.empty(B, H, Nq, 1), torch.empty(B, 1, Nk, 1)  # _tables reads their shapes only
    bmask = runtime.BlockMask(layout)
    for role, r in runtime.ROLES.items():
        count, index, _, _ = rt._tables(role, {"BLOCK_M": bm, "BLOCK_N": bn}, q, k, Sparse(None, bmask))
        want = _dense_classes(vis, bm, bn, walk_keys=not r.transposed)
        if r.transposed:
            want = want.transpose(-1, -2)
        assert count.shape[:2] == vis.shape[:2], (role, count.shape, vis.shape)
        got = _decode(count, index, nested, want.shape[-1])
        assert torch.equal(got, want), (role, (got != want).nonzero()[:5].tolist())


@pytest.mark.interp
@settings(max_examples=12, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(B=st.integers(1, 2), H=st.integers(1, 2), class_wide=st.booleans(), layout_wide=st.booleans(),
       n_qb=st.integers(1, 5), n_kb=st.integers(1, 12), per_block=st.sampled_from([(1, 1), (2, 1), (1, 4), (4, 2)]),
       ragged=st.booleans(), chunk=st.sampled_from([16, 1024]), seed=st.integers(0, 2**16))
def test_the_table_kernel_lists_the_classes_inside_the_layout(B, H, class_wide, layout_wide, n_qb, n_kb, per_block,
                                                              ragged, chunk, seed):
    """The Triton table builder (CUDA's; here on the interpreter) encodes exactly the tile classes
    inside the block layout, in both orientations and encodings, across chunk boundaries, with
    classes and layout each broadcast over batch and heads or not."""
    from attngen.runtime.table_kernel import build_lists
    g = torch.Generator().manual_seed(seed)
    tile = (32, 16)
    block = (tile[0] * per_block[0], tile[1] * per_block[1])
    n_m, n_n = n_qb * per_block[0] - (ragged and per_block[0] > 1), n_kb * per_block[1] - (ragged and per_block[1] > 1)
    # long runs of FULL tiles and scattered PARTIAL ones
    classes = torch.multinomial(torch.tensor([0.3, 0.2, 0.5]), (B if class_wide else 1) * n_m * n_n, replacement=True,
                                generator=g).reshape(B if class_wide else 1, 1, n_m, n_n).to(torch.int8)
    layout = torch.rand(B if layout_wide else 1, H, n_qb, n_kb, generator=g) < 0.7
    inside = tiles_module.layout_tiles(layout, n_m, n_n, *tile, *block)
    want = torch.where(inside, classes, EMPTY).to(torch.int8)
    for transposed in (False, True):
        for nested in (False, True):
            count, index = build_lists(classes, transposed, nested, layout, tile, block, chunk=chunk)
            expect = want.transpose(-1, -2) if transposed else want
            got = _decode(count, index, nested, expect.shape[-1])
            assert torch.equal(got, expect.expand_as(got)), (transposed, nested)


def _static_and_runtime(copy):
    """A runtime layout besides static terms (local 0, a random block per row: H' = heads); no element mask."""
    return copy("block_sparse", "bs_static_runtime", mask={}, local=0, random={"blocks": 1, "seed": 0})


@pytest.mark.compiler
@pytest.mark.parametrize("change", ["seq", "heads"])
def test_a_blockmask_reused_at_another_shape_gets_that_shapes_tables(copy, monkeypatch, change):
    """A BlockMask passes check() for every Nq in ((n_qb - 1) * bq, n_qb * bq] (and, broadcast over
    heads, for any head count): a call at a second such shape must walk that shape's tiles, or be
    refused (it is not). The tables handed to the kernel are captured instead of launching it. (Per head: a
    random term makes the static layout [1, H, ..].)"""
    spec, module = _static_and_runtime(copy) if change == "heads" else copy("block_sparse", "bs_causal")
    rt = runtime.of(module)
    launched = []

    def plan(role, *args):
        assert role == "fwd"
        return lambda tensors, scalars: launched.append(tensors[6:8])  # COUNT, INDEX after q, k, v, o, lse, hp
    monkeypatch.setattr(rt, "_plan", plan)
    monkeypatch.setattr(rt, "plans", {})
    layout = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    shapes = [(2, 150), (3, 150)] if change == "heads" else [(2, 150), (2, 190)]
    shared = runtime.BlockMask(layout)
    for H, N in shapes:
        q, k, v = _qkv(1, H, 1, N, N, 32)
        module.attention(q, k, v, layout=shared)
        module.attention(q, k, v, layout=runtime.BlockMask(layout))  # a fresh BlockMask: the right tables
        (count, index), (want_count, want_index) = launched[-2:]
        assert count.shape == want_count.shape and torch.equal(count, want_count) and torch.equal(index, want_index)


@pytest.mark.interp
def test_static_terms_and_a_runtime_layout_are_united(copy):
    """spec.py: the sparsity terms present are combined with `or`; the reference (sparsity_mask)
    unites them. With `local: 0` and a layout holding only block (0, 1), queries 64..127 see their
    diagonal block through the local term (and one random block)."""
    spec, module = _static_and_runtime(copy)
    q, k, v = _qkv(1, 1, 1, 128, 128, 32, seed=9)
    layout = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    layout[0, 0, 0, 1] = True
    assert reference.sparsity_mask(spec, 128, 128, 1, layout)[0, 0, 64:, 64:].all()
    _check_against_reference(spec, module, q, k, v, layout, backward=False)


# ------------------------------------------------------------------ 2. kernels against the reference

def _check_against_reference(spec, module, q, k, v, layout, backward=True, fp32_tol=1e-4, factor=5.0, seed=1):
    """Runs the module (forward with a NaN-poisoned out=, or forward and backward) and compares o,
    lse and the gradients with the float64 reference: within fp32_tol in fp32; in 16-bit within
    factor x the error of the same reference computed in that dtype, plus a small floor."""
    kw = {} if layout is None else {"layout": layout}
    dense_layout = layout.layout if isinstance(layout, runtime.BlockMask) else layout
    do = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(seed)).to(q.dtype)
    if backward:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o, lse = module.attention(*leaves, return_lse=True, **kw)
        o.backward(do)
        got = [o.detach(), lse, *(t.grad for t in leaves)]
    else:
        out = torch.full(q.shape[:3] + (v.shape[-1],), float("nan"), dtype=q.dtype)
        o, lse = module.attention(q, k, v, return_lse=True, out=out, **kw)
        assert o is out
        got = [o, lse]

    def ref(dtype):
        leaves = [t.detach().to(dtype).requires_grad_(backward) for t in (q, k, v)]
        o, lse = reference.attention(spec, *leaves, layout=dense_layout, dtype=dtype)
        if backward:
            o.backward(do.to(dtype))
        return [o.detach(), lse.detach(), *((t.grad for t in leaves) if backward else ())]
    want = ref(torch.float64)
    eager = ref(q.dtype) if q.dtype != torch.float32 else None
    dead = torch.isneginf(want[1])
    assert not any(t.isnan().any() for t in got), "NaN in an output (unwritten or invalid)"
    assert torch.isneginf(got[1][dead]).all() and (got[0][dead] == 0).all(), "rows that see nothing: zeros, lse -inf"
    errors = {}
    for name, a, w, e in zip(["o", "lse", "dq", "dk", "dv"], got, want, eager or [None] * 5):
        if name == "lse":
            a, w, e = a[~dead], w[~dead], None if e is None else e[~dead]
        err = float((a.double() - w).abs().max()) if a.numel() else 0.0
        bound = fp32_tol if e is None or name == "lse" else factor * float((e.double() - w).abs().max()) + 2e-3
        errors[name] = err
        assert err <= bound, (name, err, bound, errors)
    return errors


BROADCASTS = [  # (B, Hq, Hkv, Nq, Nk, layout's batch and head sizes, dtype)
    (2, 2, 1, 150, 190, "1,H", torch.float32),  # over batch; GQA; Nq != Nk, both ragged
    (2, 4, 2, 150, 100, "B,1", torch.float32),  # over heads; GQA; Nq > Nk (rows before the causal diagonal see nothing)
    (2, 2, 1, 150, 150, "B,H", torch.float16),
    (1, 2, 2, 128, 192, "1,1", torch.float16),  # whole blocks
]


@pytest.mark.interp
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,sizes,dtype", BROADCASTS)
def test_runtime_layout_matches_reference(copy, B, Hq, Hkv, Nq, Nk, sizes, dtype):
    spec, module = copy("block_sparse", "bs_causal")
    lb, lh = (B if sizes[0] == "B" else 1), (Hq if sizes[2] == "H" else 1)
    layout = _random_layout((lb, lh, -(-Nq // 64), -(-Nk // 64)), seed=Nq + Nk, p=0.6)
    q, k, v = _qkv(B, Hq, Hkv, Nq, Nk, 32, dtype, seed=Nq)
    _check_against_reference(spec, module, q, k, v, layout)


@pytest.mark.interp
def test_layout_rows_and_columns_with_no_block(copy):
    """A query block with no visible key block gives zeros and lse = -inf (into a poisoned out=);
    a key block no query sees gets zero dK and dV; and a layout with no block at all."""
    spec, module = copy("block_sparse", "bs_causal")
    q, k, v = _qkv(2, 2, 1, 150, 190, 32, seed=3)
    layout = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    layout[0, 0, 1] = False  # batch 0: queries 64..127 see nothing
    layout[1, 0, :, 2] = False  # batch 1: keys 128..189 are seen by no query
    _check_against_reference(spec, module, q, k, v, layout, backward=False)
    _check_against_reference(spec, module, q, k, v, layout)
    dead = torch.isneginf(reference.attention(spec, q.double(), k.double(), v.double(), layout=layout)[1])
    assert dead[0, :, 64:128].all() and not dead[0, :, :64].any() and not dead[1].any()
    nothing = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    errors = _check_against_reference(spec, module, q, k, v, nothing)
    assert errors == dict.fromkeys(["o", "lse", "dq", "dk", "dv"], 0.0)


STATIC = [  # (base spec, B, Hq, Hkv, Nq, Nk)
    ("longformer", 1, 2, 1, 260, 260),
    ("bigbird", 1, 2, 2, 300, 260),
    ("strided", 1, 2, 1, 150, 300),
]


@pytest.mark.interp
@pytest.mark.parametrize("base,B,Hq,Hkv,Nq,Nk", STATIC)
def test_static_terms_match_reference(copy, base, B, Hq, Hkv, Nq, Nk):
    spec, module = copy(base, f"{base}_64")
    assert spec.sparsity.block == (64, 64) and not spec.sparsity.runtime
    vis = reference.dense_mask(spec, Nq, Nk) & reference.sparsity_mask(spec, Nq, Nk, Hq)
    assert vis.any() and not vis.all()  # sparse at this shape
    q, k, v = _qkv(B, Hq, Hkv, Nq, Nk, 32, seed=Nk)
    _check_against_reference(spec, module, q, k, v, None)


# ------------------------------------------------------------------ 3. bigbird's random term

@pytest.mark.interp
def test_bigbird_random_term_is_reproducible_from_its_seed(copy):
    (spec0, seed0), (spec1, seed1) = copy("bigbird", "bigbird_64"), copy("bigbird", "bigbird_seed1",
                                                                          random={"blocks": 2, "seed": 1})
    N, H = 384, 2
    rt0, rt1 = runtime.of(seed0), runtime.of(seed1)
    classes0, classes1 = (rt.static_classes(N, N, 64, 64, "cpu", H)[0] for rt in (rt0, rt1))
    assert classes0.shape == (1, H, 6, 6) and not torch.equal(classes0, classes1)  # other blocks visible
    assert spec0.sparsity.random_seed == 0 and spec1.sparsity.random_seed == 1
    q, k, v = _qkv(1, H, H, N, N, 32, seed=7)
    first = seed0.attention(q, k, v)
    rt0._static.clear()  # the random blocks drawn again from the seed, not read from the cache
    rt0.plans.clear()
    assert torch.equal(first, seed0.attention(q, k, v))
    other = seed1.attention(q, k, v)
    assert (first - other).abs().max() > 1e-2
    for spec, o in ((spec0, first), (spec1, other)):
        want, _ = reference.attention(spec, q.double(), k.double(), v.double())
        assert (o.double() - want).abs().max() < 1e-4, spec.name


# ------------------------------------------------------------------ 4. BlockMask reuse

class _Builds:
    """Counts the tile tables BlockMasks build (spies on attngen.runtime.block_mask)."""

    def __init__(self, monkeypatch):
        self.lists = []
        real_lists = block_mask_module.oriented_lists

        def lists(classes, transposed, nested, *layout):
            self.lists.append(nested)
            return real_lists(classes, transposed, nested, *layout)
        monkeypatch.setattr(block_mask_module, "oriented_lists", lists)


@pytest.mark.interp
def test_blockmask_tables_are_built_once_and_the_layout_is_copied(copy, monkeypatch):
    spec, module = copy("block_sparse", "bs_causal")
    q, k, v = _qkv(1, 2, 1, 150, 150, 32, seed=4)
    layout = _random_layout((1, 2, 3, 3), seed=2, p=0.7)
    given_layout = layout.clone()
    bmask = runtime.BlockMask(layout)
    builds = _Builds(monkeypatch)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = module.attention(*leaves, layout=bmask)
    o.backward(torch.ones_like(o))
    assert len(builds.lists) == 3  # one table per kernel: fwd, bwd_dq, bwd_dkdv
    first = [o.detach(), *(t.grad for t in leaves)]
    for t in leaves:
        t.grad = None
    o = module.attention(*leaves, layout=bmask)
    o.backward(torch.ones_like(o))
    assert len(builds.lists) == 3  # kept: the second call builds nothing
    assert all(torch.equal(a, b) for a, b in zip(first, [o.detach(), *(t.grad for t in leaves)]))
    layout[0, :, 2] = False  # the caller's tensor changes; the BlockMask (and its tables) must not
    assert torch.equal(bmask.layout, given_layout)
    assert torch.equal(module.attention(q, k, v, layout=bmask), first[0])
    changed = module.attention(q, k, v, layout=layout)  # a tensor: its own BlockMask, built for this call
    assert not torch.equal(changed, first[0])
    assert torch.equal(module.attention(q, k, v, layout=given_layout), first[0])


# ------------------------------------------------------------------ 5. BlockMask.from_flex

def _band(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx < 100)


def _documents(b, h, q_idx, kv_idx):  # documents of 70 positions, shifted per batch entry
    return (q_idx + 30 * b) // 70 == (kv_idx + 30 * b) // 70


def _block_causal(b, h, q_idx, kv_idx):  # whole blocks: flex lists full blocks
    return kv_idx // 64 <= q_idx // 64


def _head_stride(b, h, q_idx, kv_idx):  # per head
    return (kv_idx % (h + 2) == 0) & (kv_idx < 64 * (h + 1))


def _flex_blocks(mask_mod, B, H, Nq, Nk, bq, bk):
    """bool [B, H, n_qb, n_kb]: the blocks where mask_mod holds for some in-bounds pair."""
    b, h = torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None]
    q_idx, kv_idx = torch.arange(Nq)[None, None, :, None], torch.arange(Nk)[None, None, None, :]
    dense = mask_mod(b, h, q_idx, kv_idx).expand(B, H, Nq, Nk)
    n_qb, n_kb = -(-Nq // bq), -(-Nk // bk)
    padded = torch.zeros(B, H, n_qb * bq, n_kb * bk, dtype=torch.bool)
    padded[..., :Nq, :Nk] = dense
    return padded.reshape(B, H, n_qb, bq, n_kb, bk).any(-1).any(-2)


@pytest.mark.compiler
@pytest.mark.parametrize("mask_mod", [_band, _documents, _block_causal, _head_stride])
@pytest.mark.parametrize("B,H,Nq,Nk,block", [(None, None, 150, 190, 64), (2, 3, 300, 200, 64),
                                             (2, 2, 260, 390, 128), (1, 2, 130, 330, (64, 128))])
def test_from_flex_layout_is_the_blocks_flex_marks(mask_mod, B, H, Nq, Nk, block):
    flex_mask = flex.create_block_mask(mask_mod, B, H, Nq, Nk, device="cpu", BLOCK_SIZE=block)
    bmask = runtime.BlockMask.from_flex(flex_mask)
    bq, bk = (block, block) if isinstance(block, int) else block
    assert bmask.block == (bq, bk)
    want = _flex_blocks(mask_mod, B or 1, H or 1, Nq, Nk, bq, bk)
    assert bmask.layout.dtype == torch.bool and bmask.layout.shape == want.shape
    assert torch.equal(bmask.layout, want)
    # flex's own view, partial and full blocks together, agrees
    assert torch.equal(bmask.layout, flex_mask.to_dense()[:, :, :want.shape[2], :want.shape[3]].bool())


@pytest.mark.interp
@pytest.mark.parametrize("mask_mod,B,H", [(_documents, 2, 1), (_block_causal, None, None), (_head_stride, 1, 2)])
def test_attention_with_a_flex_block_mask_matches_reference(copy, mask_mod, B, H):
    spec, module = copy("block_sparse", "bs_causal")
    Nq, Nk = 150, 190
    flex_mask = flex.create_block_mask(mask_mod, B, H, Nq, Nk, device="cpu", BLOCK_SIZE=64)
    bmask = runtime.BlockMask.from_flex(flex_mask)
    q, k, v = _qkv(2, 2, 1, Nq, Nk, 32, seed=5)
    layout = _flex_blocks(mask_mod, B or 1, H or 1, Nq, Nk, 64, 64)
    _check_against_reference(spec, module, q, k, v, bmask, backward=B is None)
    assert torch.equal(module.attention(q, k, v, layout=bmask), module.attention(q, k, v, layout=layout))


@pytest.mark.compiler
def test_from_flex_with_other_blocks_is_refused(copy, monkeypatch):
    spec, module = copy("block_sparse", "bs_causal")
    _no_kernel(monkeypatch, module)
    q, k, v = _qkv(1, 2, 1, 256, 256, 32)
    for block in (128, (64, 128)):
        flex_mask = flex.create_block_mask(_band, None, None, 256, 256, device="cpu", BLOCK_SIZE=block)
        bq, bk = (block, block) if isinstance(block, int) else block
        message = rf"'bs_causal' has layout blocks of 64 x 64; this BlockMask's are {bq} x {bk}"
        with pytest.raises(ValueError, match=message):
            module.attention(q, k, v, layout=runtime.BlockMask.from_flex(flex_mask))


# ------------------------------------------------------------------ 6. errors

@pytest.mark.compiler
@pytest.mark.parametrize("layout,error,fragments", [
    (None, ValueError, ["'bs_causal' has a runtime block layout: pass layout=", "ceil(Nq / 64)", "BlockMask"]),
    (torch.ones(2, 2, 3, 3), TypeError, ["torch.bool", "torch.float32"]),
    (torch.ones(2, 2, 3, 3, dtype=torch.int8), TypeError, ["torch.bool", "torch.int8"]),
    (torch.ones(2, 3, 3, dtype=torch.bool), TypeError, ["[B or 1, H or 1, query blocks, key blocks]", "[2, 3, 3]"]),
    (torch.ones(2, 2, 3, 4, dtype=torch.bool), ValueError,
     ["'bs_causal'", "[2 or 1, 2 or 1, 3, 3]", "got [2, 2, 3, 4]"]),
    (torch.ones(2, 2, 2, 3, dtype=torch.bool), ValueError, ["query blocks of 64", "got [2, 2, 2, 3]"]),
    (torch.ones(3, 1, 3, 3, dtype=torch.bool), ValueError, ["[2 or 1, 2 or 1, 3, 3]", "got [3, 1, 3, 3]"]),
    (torch.ones(1, 4, 3, 3, dtype=torch.bool), ValueError, ["got [1, 4, 3, 3]"]),  # the layout's heads are Hq's
    ([[True]], TypeError, ["torch.bool", "list"]),
])
def test_bad_layouts_get_clear_errors_and_run_nothing(copy, monkeypatch, layout, error, fragments):
    spec, module = copy("block_sparse", "bs_causal")
    _no_kernel(monkeypatch, module)
    q, k, v = _qkv(2, 2, 1, 150, 190, 32)
    with pytest.raises(error) as info:
        module.attention(q, k, v, layout=layout)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.compiler
@pytest.mark.parametrize("base", ["longformer", "causal"])
def test_layout_is_refused_by_specs_without_a_runtime_layout(copy, monkeypatch, base):
    module = copy("longformer", "longformer_64")[1] if base == "longformer" else attngen.load(SPECS / "causal.yaml")
    name = runtime.of(module).name
    _no_kernel(monkeypatch, module)
    q, k, v = _qkv(1, 1, 1, 100, 100, runtime.of(module).head_dim)
    ones = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    for layout in (ones, runtime.BlockMask(ones)):
        with pytest.raises(TypeError, match=rf"spec '{name}' has no runtime layout .*layout= is not taken"):
            module.attention(q, k, v, layout=layout)


@pytest.mark.gpu
def test_a_layout_on_another_device_is_refused(copy, monkeypatch):
    spec, module = copy("block_sparse", "bs_causal")
    _no_kernel(monkeypatch, module)
    q, k, v = _qkv(1, 2, 1, 150, 150, 32, device="cuda")
    with pytest.raises(ValueError, match="layout: the block mask is on cpu, q on cuda"):
        module.attention(q, k, v, layout=torch.ones(1, 1, 3, 3, dtype=torch.bool))


# ------------------------------------------------------------------ 7. torch.compile

def _grads(f, leaves, *args):
    for t in leaves:
        t.grad = None
    out = f(*leaves, *args)
    out.backward()
    return [out.detach(), *(t.grad.clone() for t in leaves)]


@pytest.mark.interp
def test_fullgraph_compile_with_a_layout_matches_eager(copy, device):
    if device == "cuda":
        pytest.skip("the CPU tier: aot_eager through the interpreter")
    spec, module = copy("block_sparse", "bs_causal")
    leaves = [t.requires_grad_() for t in _qkv(2, 2, 1, 100, 130, 32, seed=6)]
    layout = _random_layout((2, 1, 2, 3), seed=6, p=0.6)
    bmask = runtime.BlockMask(layout)  # made outside the compiled function, as a model passes it to layers

    def by_tensor(q, k, v, layout):
        return (module.attention(q, k, v, layout=layout) ** 2).sum()

    def by_handle(q, k, v):
        return (module.attention(q, k, v, layout=bmask) ** 2).sum()
    eager = _grads(by_tensor, leaves, layout)
    for f, args in ((by_tensor, (layout,)), (by_handle, ())):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # a graph break raises
        got = _grads(compiled, leaves, *args)
        assert all(torch.equal(a, b) for a, b in zip(got, eager)), f.__name__
    ref, _ = reference.attention(spec, *(t.detach().double() for t in leaves), layout=layout)
    assert abs(float((ref ** 2).sum()) - float(eager[0])) < 1e-3


@pytest.mark.interp
def test_opcheck_with_a_layout(copy):
    """torch.library.opcheck of block_sparse's ops with a layout: schema, fake tensors, autograd
    registration and dispatch."""
    spec, module = copy("block_sparse", "bs_causal")
    rt = runtime.of(module)
    q, k, v = _qkv(1, 2, 1, 70, 100, 32, seed=8)
    hp = rt.head_param_rows(q, {})
    layout = _random_layout((1, 2, 2, 2), seed=8, p=0.7)
    args = (q, k, v, hp, None, None, layout, None, None, 0, 0, rt.scale, 0, 0.0, True)
    torch.library.opcheck(rt.ops.forward, args)
    o, lse = rt.ops.forward(*args)
    want, _ = reference.attention(spec, q.double(), k.double(), v.double(), layout=layout)
    assert (o.double() - want).abs().max() < 1e-4
    do = torch.randn_like(o)
    torch.library.opcheck(rt.ops.backward, (do, q, k, v, o, lse, hp, None, None, layout, None, None, 0, 0, rt.scale, 0, 0.0,
                                            False))


@pytest.mark.interp
def test_the_table_kernel_with_no_inner_tiles_lists_nothing():
    from attngen.runtime.table_kernel import build_lists
    for nested in (False, True):
        count, index = build_lists(torch.zeros(1, 1, 3, 0, dtype=torch.int8), False, nested)
        assert count.shape == (1, 1, 3, 2) and not count.any() and index.shape[-1] == 1
    with pytest.raises(ValueError, match="does not lie inside one"):
        build_lists(torch.zeros(1, 1, 2, 2, dtype=torch.int8), False, False, torch.ones(1, 1, 1, 1, dtype=torch.bool),
                    (48, 64), (128, 128))
