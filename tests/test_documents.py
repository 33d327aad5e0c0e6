"""Document masks (runtime sparsity): the spec field, the reference, the per-batch tile tables
and the kernels against the float64 reference, with sorted and unordered ids, ragged shapes,
Nq != Nk, GQA, queries whose document has no key, and the Documents handle."""

from pathlib import Path

import pytest
import torch

import attngen
from attngen import reference, runtime
from attngen.errors import SpecError
from attngen.passes import PassOptions
from attngen.pipeline import compile_spec
from attngen.runtime import tiles
from attngen.spec import load_spec, parse_spec
from attngen.verify import Shape, check, format_table, random_documents

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "specs" / "document.yaml"


def _spec_file(tmp_path, name, mask, **extra):
    text = f"name: {name}\ndescription: test\nhead_dim: {extra.pop('head_dim', 32)}\ndtypes: [fp32, fp16]\nmask: {mask}\n"
    text += "".join(f"{k}: {v}\n" for k, v in extra.items())
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.compiler
def test_spec_field_parses_round_trips_and_rejects_non_booleans():
    spec = load_spec(SHIPPED)
    assert spec.mask.document and spec.mask.causal is not None and not spec.mask.is_dense
    assert parse_spec(spec.to_dict()).mask == spec.mask
    with pytest.raises(SpecError, match=r"mask\.document.*true or false"):
        parse_spec({"name": "x", "head_dim": 64, "mask": {"document": "yes"}}, "x.yaml")


@pytest.mark.compiler
def test_reference_document_mask_is_same_id_pairs():
    q_ids = torch.tensor([[0, 0, 1, 2], [5, 5, 5, 5]])
    kv_ids = torch.tensor([[0, 1, 1], [5, 4, 5]])
    m = reference.document_mask(q_ids, kv_ids)
    expected = torch.tensor([[[q == k for k in kr] for q in qr] for qr, kr in zip(q_ids.tolist(), kv_ids.tolist())])
    assert torch.equal(m, expected)
    spec = load_spec(SHIPPED)
    q = torch.randn(2, 1, 4, 128, dtype=torch.float64)
    k = torch.randn(2, 1, 3, 128, dtype=torch.float64)
    with pytest.raises(ValueError, match="documents"):
        reference.attention(spec, q, k, k)
    o, lse = reference.attention(spec, q, k, k, documents=(q_ids, kv_ids))
    # batch 0, query 3 (document 2) has no key of its document: zeros and -inf
    assert torch.isneginf(lse[0, 0, 3]) and (o[0, 0, 3] == 0).all()


def _doc_lists(module, q_ids, kv_ids, BM, BN, transposed, nested):
    """A module's tile lists (COUNT, INDEX) for these documents at one tiling and encoding."""
    static = runtime.of(module).static_classes(q_ids.shape[1], kv_ids.shape[1], BM, BN, q_ids.device)
    classes = tiles.document_classes(static[1 if transposed else 0], q_ids, kv_ids, BM, BN)
    count, index = tiles.tile_lists(classes.transpose(-1, -2) if transposed else classes, nested)
    return count[:, 0], index[:, 0]  # [B, H' = 1, ...]: one head's


class _Builds:
    """Counts the tile classes and tile lists that Documents build (spies on attngen.runtime.tiles)."""

    def __init__(self, monkeypatch):
        self.classes, self.lists = [], []
        real_classes, real_lists = tiles.document_classes, tiles.tile_lists

        def classes(*args):
            self.classes.append(args[3:])  # block_m, block_n, transposed
            return real_classes(*args)

        def lists(classes, nested):
            self.lists.append(nested)
            return real_lists(classes, nested)
        monkeypatch.setattr(tiles, "document_classes", classes)
        monkeypatch.setattr(tiles, "tile_lists", lists)


def _full_tiles(nested, count, index):
    """One outer block's full tiles from its COUNT [2] and INDEX [2, n + 1] rows, in either encoding."""
    if nested:  # runs as [first, end) pairs
        runs = index[1, :2 * count[1]].reshape(-1, 2).tolist()
        assert all(f < e for f, e in runs) and all(e < f for (_, e), (f, _) in zip(runs, runs[1:]))  # maximal runs
        return [j for f, e in runs for j in range(f, e)]
    first, end = index[1, :2].tolist()  # the first run, then the others one by one
    rest = index[1, 2:2 + count[1]].tolist()
    assert first <= end and all(j > end for j in rest) and rest == sorted(rest)
    return list(range(first, end)) + rest


@pytest.mark.compiler
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("sorted_", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_tile_tables_are_sound(sorted_, transposed, nested):
    """Every visible pair lies in a listed tile; every FULL tile (in runs of consecutive ones) is
    visible throughout and not ragged along the walked dimension; every tile is listed at most once."""
    module = attngen.load(SHIPPED, nested_runs=nested)
    g = torch.Generator().manual_seed(3)
    shape = Shape(3, 1, 1, 150, 190)
    q_ids, kv_ids = random_documents(shape, "cpu", g, sorted_=sorted_)
    q_ids[2] = 7  # one batch row that is a single document for queries and keys alike
    kv_ids[2] = 7
    BM, BN = 32, 16
    count, index = _doc_lists(module, q_ids, kv_ids, BM, BN, transposed, nested)
    vis = reference.dense_mask(load_spec(SHIPPED), 150, 190)[None] & reference.document_mask(q_ids, kv_ids)
    if transposed:
        vis, BM, BN, Nq, Nk = vis.transpose(1, 2), BN, BM, 190, 150
    else:
        Nq, Nk = 150, 190
    n_m, n_n = -(-Nq // BM), -(-Nk // BN)
    padded = torch.zeros(3, n_m * BM, n_n * BN, dtype=torch.bool)
    padded[:, :Nq, :Nk] = vis
    inb = torch.zeros_like(padded)
    inb[:, :Nq, :Nk] = True
    tiles, inb = padded.reshape(3, n_m, BM, n_n, BN), inb.reshape(3, n_m, BM, n_n, BN)
    any_vis = tiles.any(dim=4).any(dim=2)
    all_vis = (tiles == inb).all(dim=4).all(dim=2)  # every in-bounds pair visible (rows past the end are not stored)
    assert count.shape == (3, n_m, 2) and index.shape == (3, n_m, 2, n_n + 1)
    full_seen = 0
    for b in range(3):
        for i in range(n_m):
            partial = index[b, i, 0, :count[b, i, 0]].tolist()
            full = _full_tiles(nested, count[b, i], index[b, i])
            assert len(set(partial + full)) == len(partial) + len(full)
            assert set(torch.nonzero(any_vis[b, i]).flatten().tolist()) <= set(partial + full)
            for j in full:
                assert all_vis[b, i, j] and (j + 1) * BN <= Nk
            full_seen += len(full)
    assert full_seen > 0  # the single-document row has full tiles below the diagonal
    assert bool((count[2].sum(-1) > 0).all())


@pytest.mark.interp
@pytest.mark.parametrize("name,mask,extra", [
    ("doc_only", "{document: true}", {}),
    ("doc_window_softcap", "{document: true, window: {left: 40, right: 8}}", {"score": "{softcap: 20.0}"}),
    ("doc_dropout_gqa", "{document: true, causal: {align: top_left}}", {"dropout": "{p: 0.2}", "head_dim": 16}),
])
def test_document_variants_match_reference(tmp_path, name, mask, extra, device):
    path = _spec_file(tmp_path, name, mask, **extra)
    nested = {"doc_only": True, "doc_window_softcap": False}.get(name)  # None: the default, per role
    spec, module = load_spec(path), attngen.load(path, nested_runs=nested)
    shapes = [Shape(2, 2, 1, 61, 61), Shape(1, 2, 2, 40, 90), Shape(2, 3, 1, 77, 33, "bnhd")]
    results = [check(spec, module, s, "fp32", device, seed=i, backward=True) for i, s in enumerate(shapes)]
    results += [check(spec, module, shapes[0], "fp16", device, seed=5)]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])


@pytest.mark.interp
@pytest.mark.parametrize("shallow", [True, False])
def test_shallow_partial_renders_its_loop_and_both_match_reference(tmp_path, shallow, device):
    """The schedule pass makes document kernels' partial-tile loop one pipeline stage shallower
    (PARTIAL_STAGES, a constexpr the host sets); forced off, it is a plain loop. Both compute the mask."""
    path = _spec_file(tmp_path, "doc_shallow", "{document: true, causal: {align: top_left}}")
    source = compile_spec(path, options=PassOptions(shallow_partial=shallow)).source
    assert source.count("tl.range(0, n_partial, num_stages=PARTIAL_STAGES)") == (3 if shallow else 0)
    assert compile_spec(path).source == compile_spec(path, options=PassOptions(shallow_partial=True)).source
    spec, module = load_spec(path), attngen.load(path, shallow_partial=shallow)
    results = [check(spec, module, s, "fp32", device, seed=i, backward=True)
               for i, s in enumerate([Shape(2, 2, 1, 61, 61), Shape(1, 2, 2, 40, 90)])]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])


def _qkv(B, Hq, Hkv, Nq, Nk, D=128, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, h, n, D, generator=g).to(device) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk))]


@pytest.mark.interp
def test_documents_forms_agree_and_tables_are_kept(device, monkeypatch):
    module = attngen.load(SHIPPED)
    q, k, v = _qkv(2, 2, 1, 70, 70, device=device)
    ids = torch.tensor([0] * 20 + [1] * 30 + [2] * 20).repeat(2, 1).to(device)
    ids[1, 5:] += 1
    docs = module.Documents(ids)
    assert module.Documents is runtime.Documents
    builds = _Builds(monkeypatch)
    by_handle = module.attention(q, k, v, documents=docs)
    assert len(builds.classes) == 1 and len(builds.lists) == 1  # the forward kernel's table
    module.attention(q, k, v, documents=docs)
    assert len(builds.classes) == 1 and len(builds.lists) == 1  # kept: a second call builds nothing
    assert torch.equal(by_handle, module.attention(q, k, v, documents=ids))
    assert torch.equal(by_handle, module.attention(q, k, v, documents=(ids, ids.to(torch.int16))))
    ref, _ = reference.attention(load_spec(SHIPPED), q.double(), k.double(), v.double(), documents=(ids, ids))
    assert (by_handle.double() - ref).abs().max() < 1e-4


@pytest.mark.interp
def test_a_call_with_other_documents_of_the_same_shape_uses_their_tables(device):
    """The launch plan is per signature; the tables and ids are per call (a plan that kept the
    first call's would give the first call's result)."""
    module = attngen.load(SHIPPED)
    spec = load_spec(SHIPPED)
    q, k, v = _qkv(1, 2, 2, 64, 64, device=device)
    rt = runtime.of(module)
    rt.plans.clear()
    for ids in (torch.zeros(1, 64, dtype=torch.long), torch.arange(64).reshape(1, 64) // 16):
        ids = ids.to(device)
        o = module.attention(q, k, v, documents=ids)
        ref, _ = reference.attention(spec, q.double(), k.double(), v.double(), documents=(ids, ids))
        assert (o.double() - ref).abs().max() < 1e-4
    assert len(rt.plans) == 1


@pytest.mark.compiler
@pytest.mark.parametrize("documents,error,match", [
    (None, ValueError, "has a document mask: pass documents="),
    (torch.zeros(2, 70), TypeError, "integer tensor"),
    (torch.zeros(2, 71, dtype=torch.long), ValueError, r"\[batch, Nq\] = \[2, 70\]"),
    (torch.zeros(70, dtype=torch.long), TypeError, "integer tensor"),
    ((torch.zeros(2, 70, dtype=torch.long), torch.zeros(3, 70, dtype=torch.long)), ValueError, "one batch size"),
])
def test_bad_documents_get_clear_errors(documents, error, match):
    module = attngen.load(SHIPPED)
    q, k, v = _qkv(2, 2, 1, 70, 70)
    with pytest.raises(error, match=match):
        module.attention(q, k, v, documents=documents)


@pytest.mark.compiler
def test_single_ids_tensor_needs_equal_lengths():
    module = attngen.load(SHIPPED)
    q, k, v = _qkv(1, 1, 1, 20, 30)
    with pytest.raises(ValueError, match=r"\[batch, Nk\] = \[1, 30\]"):
        module.attention(q, k, v, documents=torch.zeros(1, 20, dtype=torch.long))


@pytest.mark.compiler
def test_tile_lists_encode_partial_tiles_and_runs_of_full_ones():
    module = attngen.load(SHIPPED)
    assert module.TILE_TABLES == {"fwd": "nested", "bwd_dkdv": "first", "bwd_dq": "first"}  # the schedule pass's default
    assert runtime.of(module).tables is module.TILE_TABLES
    classes = torch.tensor([[2, 0, 2, 0, 2], [2, 2, 1, 2, 2], [0, 1, 1, 0, 0], [2, 2, 2, 2, 2]], dtype=torch.int8)
    count, index = tiles.tile_lists(classes, True)
    assert count.tolist() == [[0, 3], [1, 2], [2, 0], [0, 1]]
    assert index[0, 1].tolist() == [0, 1, 2, 3, 4, 5]  # (n + 1) // 2 runs fill all n + 1 slots
    assert index[1, 0, :1].tolist() == [2] and index[1, 1, :4].tolist() == [0, 2, 3, 5]
    assert index[2, 0, :2].tolist() == [1, 2]
    assert index[3, 1, :2].tolist() == [0, 5]


@pytest.mark.compiler
def test_tile_lists_without_nested_runs_put_the_first_run_then_the_other_full_tiles():
    module = attngen.load(SHIPPED, nested_runs=False)
    assert module.TILE_TABLES == {"fwd": "first", "bwd_dkdv": "first", "bwd_dq": "first"}
    classes = torch.tensor([[2, 0, 2, 0, 2], [2, 2, 1, 2, 2], [0, 1, 1, 0, 0], [0, 2, 2, 2, 2]], dtype=torch.int8)
    count, index = tiles.tile_lists(classes, False)
    assert count.tolist() == [[0, 2], [1, 2], [2, 0], [0, 0]]
    assert index[0, 1, :4].tolist() == [0, 1, 2, 4]  # the run [0, 1), then tiles 2 and 4
    assert index[1, 1, :4].tolist() == [0, 2, 3, 4]
    assert index[2, 1, :2].tolist() == [0, 0]  # no full tile: an empty first run
    assert index[3, 1, :2].tolist() == [1, 5]


@pytest.mark.interp
@pytest.mark.parametrize("nested", [True, False])
def test_one_document_is_the_causal_spec(device, nested):
    """With one document per row the document spec's kernels (tables with runs of full tiles)
    must give what the causal spec's (closed-form bounds) give, forward and gradients."""
    module, causal = attngen.load(SHIPPED, nested_runs=nested), attngen.load(ROOT / "specs" / "causal.yaml")
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 1, 230, 230, device=device))
    do = torch.randn(2, 2, 230, 128, generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for fn in (lambda: module.attention(q, k, v, documents=torch.zeros(2, 230, dtype=torch.long, device=device)),
               lambda: causal.attention(q, k, v)):
        o = fn()
        results.append([o.detach(), *torch.autograd.grad(o, (q, k, v), do)])
    count, index = _doc_lists(module, torch.zeros(2, 230, dtype=torch.long, device=device),
                              torch.zeros(2, 230, dtype=torch.long, device=device),
                              *(runtime.of(module).config("fwd", "fp32", 230, 230)[b] for b in ("BLOCK_M", "BLOCK_N")),
                              False, nested)
    assert any(_full_tiles(nested, c, i) for c, i in zip(count[0], index[0]))  # full tiles: the runs are walked
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.compiler
def test_roles_with_one_tiling_share_classes_but_get_their_own_encoding(monkeypatch):
    """fwd and bwd_dq walk the same orientation: at equal blocks they share the tile classes, yet
    each kernel must get its table in its own encoding (TILE_TABLES), listing the same full tiles."""
    module = attngen.load(SHIPPED)
    rt = runtime.of(module)
    assert rt.tables["fwd"] == "nested" and rt.tables["bwd_dq"] == "first"
    ids = (torch.arange(256) // 16 % 2)[None]  # blocks of 16 alternate between two documents
    docs = module.Documents(ids)
    static = lambda: rt.static_classes(256, 256, 16, 16, ids.device)  # noqa: E731
    builds = _Builds(monkeypatch)
    # each role's table as the runtime asks for it: its orientation, its encoding
    (fc, fi), (qc, qi) = (docs.tables(rt.key, static, 16, 16, runtime.ROLES[role].transposed,
                                      rt.tables[role] == "nested") for role in ("fwd", "bwd_dq"))
    assert len(builds.classes) == 1 and builds.lists == [True, False]
    assert docs.tables(rt.key, static, 16, 16, False, True)[1] is fi  # kept
    (fc, fi), (qc, qi) = (fc[:, 0], fi[:, 0]), (qc[:, 0], qi[:, 0])  # [B, H' = 1, ...]: one head's
    assert torch.equal(fi, _doc_lists(module, docs.q_ids, docs.kv_ids, 16, 16, False, True)[1])
    assert torch.equal(qi, _doc_lists(module, docs.q_ids, docs.kv_ids, 16, 16, False, False)[1])
    last = fi.shape[1] - 1  # the last query block sees every other key block: runs of one tile each
    assert fc[0, last, 1] > 1 and _full_tiles(True, fc[0, last], fi[0, last]) == _full_tiles(False, qc[0, last], qi[0, last])


@pytest.mark.interp
def test_documents_copy_their_ids_and_keep_wide_unsigned_ids_apart(device):
    module, spec = attngen.load(SHIPPED), load_spec(SHIPPED)
    q, k, v = _qkv(1, 1, 1, 200, 200, device=device)
    ids = torch.zeros(1, 200, dtype=torch.long, device=device)
    docs = module.Documents(ids)
    first = module.attention(q, k, v, documents=docs)
    ids[0, 100:] = 1  # the caller's tensor changes; the Documents (and its tables) must not
    assert torch.equal(first, module.attention(q, k, v, documents=docs))
    wide = torch.tensor([[0] * 100 + [2**33] * 100], dtype=torch.uint64).to(device)
    o = module.attention(q, k, v, documents=wide)
    ref, _ = reference.attention(spec, q.double(), k.double(), v.double(), documents=(ids, ids))
    assert (o.double() - ref).abs().max() < 1e-4  # 2^33 is not narrowed into document 0


@pytest.mark.interp
def test_one_documents_serves_two_document_modules(tmp_path, device, monkeypatch):
    """One Documents passed to two document-mask modules with the same tiling but other static
    masks (the shipped spec: causal within documents; a spec with documents only): the tables are
    kept per module, so each module's results match its own reference, in either order, forward
    and gradients (a table built for one module's mask would drop or skip-mask tiles of the other's)."""
    causal_docs, spec_a = attngen.load(SHIPPED), load_spec(SHIPPED)
    path = _spec_file(tmp_path, "doc_plain", "{document: true}", head_dim=128)
    plain_docs, spec_b = attngen.load(path), load_spec(path)
    a, b = runtime.of(causal_docs), runtime.of(plain_docs)
    assert a.key != b.key
    B, H, N = 2, 1, 150
    monkeypatch.setattr(b, "bucket_seqs", ())  # b takes a's tilings at this shape: the same blocks
    for role in runtime.ROLES:
        monkeypatch.setitem(b.tilings[role], "fp32", a.config(role, "fp32", N, N))
        assert a.config(role, "fp32", N, N) == b.config(role, "fp32", N, N)
    g = torch.Generator().manual_seed(4)
    q_ids, kv_ids = random_documents(Shape(B, H, H, N, N), "cpu", g)
    docs = runtime.Documents(q_ids.to(device), kv_ids.to(device))
    q, k, v, do = (torch.randn(B, H, N, 128, generator=g).to(device) for _ in range(4))
    for module, spec in ((causal_docs, spec_a), (plain_docs, spec_b), (causal_docs, spec_a)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = module.attention(*leaves, documents=docs)
        o.backward(do)
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        ref_o, _ = reference.attention(spec, *ref, documents=(q_ids, kv_ids))
        ref_o.backward(do.double())
        for name, got, want in zip("o dq dk dv".split(), [o, *(t.grad for t in leaves)], [ref_o, *(t.grad for t in ref)]):
            err = float((got.detach().double() - want.detach()).abs().max())
            assert err < 1e-4, (spec.name, name, err)


@pytest.mark.interp
@pytest.mark.parametrize("name", ["prefix_lm", "dilated"])
def test_static_tile_tables_without_nested_runs_match_reference(name, device):
    """The `nested_runs=False` encoding on the shipped tile-table plans (prefix-LM's dK/dV kernel,
    every dilated kernel)."""
    path = ROOT / "specs" / f"{name}.yaml"
    spec, module = load_spec(path), attngen.load(path, nested_runs=False)
    assert module.TILE_TABLES and set(module.TILE_TABLES.values()) == {"first"}
    results = [check(spec, module, s, "fp32", device, seed=i, backward=True)
               for i, s in enumerate([Shape(1, 2, 1, 200, 200), Shape(2, 2, 2, 70, 150)])]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])
