"""attention_with_kvcache: decoding against contiguous and paged KV caches, against the float64
reference of decoding (reference.decode: the spec's mask at absolute positions, per sequence);
split and unsplit runs, paged and contiguous runs, appending to the cache, the split rule, and the
checks on bad input."""

from __future__ import annotations

import pytest
import torch

import attngen
from attngen import reference, runtime
from attngen.resources import resolve_spec
from attngen.runtime import decode, decode_gate
from attngen.spec import load_spec
from attngen.verify import paged as as_pages


def _case(name, B=3, Hkv=2, G=2, Nq=1, S=160, lengths=(0, 1, 150), dtype=torch.float32, seed=0):
    path = resolve_spec(name)
    spec, module = load_spec(path), attngen.load(path)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, Nq, spec.head_dim, generator=g).to(dtype)
    k_cache = torch.randn(B, Hkv, S, spec.head_dim, generator=g).to(dtype)
    v_cache = torch.randn(B, Hkv, S, spec.head_dim_v, generator=g).to(dtype)
    return spec, module, q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32), g


def _shuffle(B: int, S: int, page_size: int, g):
    per_seq = -(-S // page_size)
    return torch.randperm(B * per_seq, generator=g).reshape(B, per_seq).to(torch.int32)


def _close(spec, o, lse, q, k_cache, v_cache, lengths, tol, **kw):
    want_o, want_lse = reference.decode(spec, q, k_cache, v_cache, lengths, **kw)
    assert (o.double() - want_o).abs().max() < tol
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))  # empty rows: -inf exactly
    finite = torch.isfinite(want_lse)
    assert (lse.double()[finite] - want_lse[finite]).abs().max() < tol if finite.any() else True
    assert torch.equal(o[torch.isinf(lse)], torch.zeros_like(o[torch.isinf(lse)]))


@pytest.mark.interp
@pytest.mark.parametrize("name, Nq", [("causal", 1), ("causal", 3), ("sliding_window", 2), ("alibi", 1),
                                      ("softcap", 1), ("dilated", 2), ("temperature", 1), ("prefix_lm", 4)])
def test_decode_matches_reference_split_and_not(name, Nq):
    spec, module, q, k_cache, v_cache, lengths, g = _case(name, Nq=Nq)
    kw = {"temperature": torch.rand(q.shape[1], generator=g) + 0.5} if spec.score.temperature else {}
    with torch.no_grad():
        for splits in (1, 3, None):
            o, lse = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True,
                                                   num_splits=splits, **kw)
            _close(spec, o, lse, q, k_cache, v_cache, lengths, 2e-5, **kw)


def _split_runs(monkeypatch, spec, module, q, k_cache, v_cache, lengths, counts, ref=None, **kw) -> dict:
    """Decodes with each count of splits, checks each run against the reference (`ref`: its extra
    arguments) and returns, per count, the split merge's partial LSEs [B, Hq, Nq, splits] (None
    when one split ran no merge)."""
    parts, combine = [], decode._combine_splits

    class Merge:
        def __getitem__(self, grid):
            def launch(o_part, lse_part, *args, **kw):
                parts.append(lse_part.clone())
                return combine[grid](o_part, lse_part, *args, **kw)
            return launch

    monkeypatch.setattr(decode, "_combine_splits", Merge())
    runs = {}
    with torch.no_grad():
        for splits in counts:
            parts.clear()
            o, lse = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True,
                                                   num_splits=splits, **kw)
            _close(spec, o, lse, q, k_cache, v_cache, lengths, 2e-5, **(ref or {}))
            runs[splits] = parts[0] if parts else None
    return runs


@pytest.mark.interp
def test_splits_share_a_window_shorter_than_the_context(monkeypatch):
    """The splits cut each sequence's visible keys (here the window's 257 of up to 650), not the cache:
    any count of them, a split with one tile or none, agrees with the reference; mixed lengths. With 5
    splits, every split of the 650-token sequence sees keys (its window spans 5 tiles of 64), where
    slices of the capacity gave all of the window to the last one or two."""
    spec, module, q, k_cache, v_cache, lengths, g = _case("sliding_window", B=4, Hkv=1, G=2, Nq=2, S=700,
                                                          lengths=(0, 1, 650, 300))
    runs = _split_runs(monkeypatch, spec, module, q, k_cache, v_cache, lengths, (1, 2, 5, 9, None))
    assert runs[5].shape[-1] == 5 and torch.isfinite(runs[5][2]).all()  # [B, Hq, Nq, splits]


@pytest.mark.interp
@pytest.mark.parametrize("page_size", [16, 48, 64])
def test_paged_cache_gives_the_contiguous_bits(page_size):
    spec, module, q, k_cache, v_cache, lengths, g = _case("causal", Nq=2, lengths=(150, 7, 33))
    table = _shuffle(3, k_cache.shape[2], page_size, g)
    k_pages, v_pages = as_pages(k_cache, page_size, table), as_pages(v_cache, page_size, table)
    with torch.no_grad():
        for splits in (1, 2):
            want = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, num_splits=splits)
            got = module.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, block_table=table,
                                                num_splits=splits)
            assert torch.equal(got, want), (page_size, splits)


@pytest.mark.interp
@pytest.mark.parametrize("paged", [False, True])
def test_appending_writes_the_cache_then_attends(paged):
    spec, module, q, k_cache, v_cache, lengths, g = _case("gqa", B=2, Hkv=2, G=4, Nq=3, S=96, lengths=(0, 60))
    k_new = torch.randn(2, 2, 3, spec.head_dim, generator=g)
    v_new = torch.randn(2, 2, 3, spec.head_dim_v, generator=g)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(lengths.tolist()):
        want_k[b, :, n:n + 3], want_v[b, :, n:n + 3] = k_new[b], v_new[b]
    kc, vc, table = k_cache.clone(), v_cache.clone(), None
    if paged:
        table = _shuffle(2, 96, 32, g)
        kc, vc = as_pages(k_cache, 32, table), as_pages(v_cache, 32, table)
    with torch.no_grad():
        o, lse = module.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, block_table=table, k=k_new, v=v_new,
                                               return_lse=True)
    if paged:
        assert torch.equal(kc, as_pages(want_k, 32, table)) and torch.equal(vc, as_pages(want_v, 32, table))
    else:
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    _close(spec, o, lse, q, want_k, want_v, lengths + 3, 2e-5)


@pytest.mark.interp
def test_fp16_decode_with_many_packed_rows():
    """G x Nq = 96 rows: two row blocks per KV head."""
    spec, module, q, k_cache, v_cache, lengths, _ = _case("causal", B=2, Hkv=1, G=12, Nq=8, S=130, lengths=(130, 9),
                                                          dtype=torch.float16)
    with torch.no_grad():
        o, lse = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True)
    _close(spec, o, lse, q, k_cache, v_cache, lengths, 2e-3)


@pytest.mark.interp
@pytest.mark.parametrize("name", ["causal", "sliding_window"])
def test_chunked_prefill_runs_128_row_tiles(name):
    """G x Nq = 2 x 70 = 140 rows: the plan's 128-row tiles on 8 warps, a chunk wrapping into the
    next query head, sequences shorter than the chunk (rows before their start see nothing)."""
    spec, module, q, k_cache, v_cache, lengths, _ = _case(name, B=3, Hkv=1, G=2, Nq=70, S=200,
                                                          lengths=(200, 75, 40))
    assert decode.decode_plan(3, 1, 140, 200, spec.head_dim, 132).block_m == 128
    with torch.no_grad():
        for splits in (1, None):
            o, lse = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True,
                                                   num_splits=splits)
            _close(spec, o, lse, q, k_cache, v_cache, lengths, 2e-5)


@pytest.mark.compiler
@pytest.mark.parametrize("tiles, key_blocks, want", [(132, 512, 1), (106, 512, 1), (8, 512, 15), (1, 512, 109),
                                                     (8, 4, 4), (64, 512, 2)])
def test_split_rule_is_flashattention3s(tiles, key_blocks, want):
    assert decode.num_splits(tiles, key_blocks, 132) == want


@pytest.mark.compiler
def test_decode_plan_splits_cover_the_cache_once():
    for capacity in (1, 64, 1000, 32768):
        plan = decode.decode_plan(1, 8, 4, capacity, 128, 132)
        assert plan.split_len % plan.block_n == 0
        assert 1 <= plan.splits <= max(1, -(-capacity // plan.block_n)) <= plan.splits * plan.split_len // plan.block_n
    # a count asked for is the count launched (at most one tile each)
    assert [decode.decode_plan(1, 1, 4, 700, 128, 132, s).splits for s in (1, 5, 9, 11, 12, 40)] == [1, 5, 9, 11, 11, 11]


def _errors():
    spec, module, q, k_cache, v_cache, lengths, g = _case("causal", B=2, lengths=(5, 7))
    table = _shuffle(2, k_cache.shape[2], 16, g)
    pages = as_pages(k_cache, 16, table)
    return [
        (dict(cache_seqlens=torch.tensor([5, 161], dtype=torch.int32)), "must lie in [0, 160]"),
        (dict(cache_seqlens=lengths.long()), "cache_seqlens must be int32"),
        (dict(cache_seqlens=lengths, k_cache=k_cache.half()), "must share one dtype"),
        (dict(cache_seqlens=lengths, k_cache=pages, v_cache=pages, block_table=table + 100), "block_table entries"),
        (dict(cache_seqlens=lengths, k_cache=pages[:, :12], v_cache=pages[:, :12], block_table=table),
         "multiple of 16"),
        (dict(cache_seqlens=lengths, k_cache=pages, v_cache=pages, block_table=table.long()), "block_table must be int32"),
        (dict(cache_seqlens=lengths, k=torch.zeros(2, 2, 1, spec.head_dim)), "give both k and v"),
        (dict(cache_seqlens=lengths, k_cache=k_cache[:, :, :, :64]), "k_cache must be"),
    ], module, q, k_cache, v_cache


@pytest.mark.compiler
def test_bad_input_is_refused_with_the_argument_named():
    cases, module, q, k_cache, v_cache = _errors()
    for kwargs, fragment in cases:
        args = {"k_cache": k_cache, "v_cache": v_cache, **kwargs}
        kc, vc = args.pop("k_cache"), args.pop("v_cache")
        before = kc.clone()
        with pytest.raises((ValueError, TypeError), match=fragment.replace("[", r"\[").replace("]", r"\]")):
            module.attention_with_kvcache(q, kc, vc, **args)
        assert torch.equal(kc, before)  # nothing written
    with pytest.raises(ValueError, match="no backward"):
        module.attention_with_kvcache(q.clone().requires_grad_(), k_cache, v_cache,
                                      cache_seqlens=torch.tensor([5, 7], dtype=torch.int32))
    lengths = torch.tensor([5, 7], dtype=torch.int32)
    with pytest.raises(TypeError, match="no document mask: documents="):
        module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, documents=torch.zeros(2, 80).int())
    with pytest.raises(TypeError, match="no sparsity section: layout="):
        module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, layout=torch.ones(2, 4, 1, 1).bool())
    document = attngen.load(resolve_spec("document"))
    with pytest.raises(ValueError, match="pass documents="):
        document.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    with pytest.raises(TypeError, match="documents kv_ids must be an integer tensor"):
        document.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, documents=torch.zeros(2, 80))
    with pytest.raises(ValueError, match=r"documents q_ids must be \[batch=2, Nq=1\]"):
        document.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                        documents=(torch.zeros(2, 3).int(), torch.zeros(2, 160).int()))
    with pytest.raises(ValueError, match=r"documents kv_ids must be \[batch=2, at least the cache's 160 positions\]"):
        document.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, documents=torch.zeros(2, 80).int())
    blocks = attngen.load(resolve_spec("block_sparse"))
    with pytest.raises(ValueError, match=r"pass layout= \(bool \[B or 1, Hq or 1, 2, 2\]: query and key blocks "
                                         r"of 128 and 128 over the cache's 160 positions"):
        blocks.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    with pytest.raises(ValueError, match=r"the layout must be \[2 or 1, 4 or 1, 2, 2\]"):
        blocks.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, layout=torch.ones(1, 1, 1, 2).bool())


# The five specs decoding gates by document ids or a block layout: a runtime one (block_sparse),
# static ones (longformer, strided), one with random blocks drawn per length (bigbird).
GATED = ["document", "block_sparse", "longformer", "strided", "bigbird"]


def _gate_args(spec, B, Hq, Nq, S, lengths, g):
    """The call's documents / layout, and the reference's (q_ids, kv_ids) / layout."""
    kw, ref = {}, {}
    if spec.mask.document:  # documents of about 70 positions, shifted per sequence
        ids = (torch.arange(S)[None] + torch.randint(0, 50, (B, 1), generator=g)) // 70
        pos = (lengths.long()[:, None] - Nq + torch.arange(Nq)).clamp(0, S - 1)
        kw["documents"], ref["documents"] = ids, (ids.gather(1, pos), ids)
    if spec.sparsity is not None and spec.sparsity.runtime:
        bq, bk = spec.sparsity.block
        kw["layout"] = ref["layout"] = torch.rand(B, Hq, -(-S // bq), -(-S // bk), generator=g) < 0.5
    return kw, ref


@pytest.mark.interp
@pytest.mark.parametrize("name", GATED)
def test_gated_decoding_matches_reference_split_paged_and_not(name):
    """Several layout blocks and documents per sequence (the caches hold 320 positions); lengths 0
    and 2 (fewer keys than the 3 queries), 130 (queries in two layout rows); split and unsplit; paged
    runs give the contiguous bits."""
    spec, module, q, k_cache, v_cache, lengths, g = _case(name, B=4, Nq=3, S=320, lengths=(0, 2, 130, 320))
    kw, ref = _gate_args(spec, 4, q.shape[1], 3, 320, lengths, g)
    table = _shuffle(4, 320, 16, g)
    with torch.no_grad():
        for splits in (1, 4):
            o, lse = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True,
                                                   num_splits=splits, **kw)
            _close(spec, o, lse, q, k_cache, v_cache, lengths, 2e-5, **ref)
            paged_o = module.attention_with_kvcache(q, as_pages(k_cache, 16, table), as_pages(v_cache, 16, table),
                                                    cache_seqlens=lengths, block_table=table, num_splits=splits, **kw)
            assert torch.equal(paged_o, o)


@pytest.mark.interp
def test_document_decoding_takes_query_ids_and_skips_other_documents():
    """q_ids given apart from the cache's ids; a query whose document has no key in the cache gets
    zeros and LSE -inf."""
    spec, module, q, k_cache, v_cache, lengths, g = _case("document", B=2, Nq=2, S=96, lengths=(40, 96))
    kv_ids = torch.arange(96).repeat(2, 1) // 30
    q_ids = torch.tensor([[1, 7], [3, 3]])  # document 7 has no key
    with torch.no_grad():
        o, lse = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True,
                                               documents=(q_ids, kv_ids))
    _close(spec, o, lse, q, k_cache, v_cache, lengths, 2e-5, documents=(q_ids, kv_ids))
    assert torch.isinf(lse[0, :, 1]).all() and torch.isfinite(lse[0, :, 0]).all()


@pytest.mark.interp
def test_splits_share_the_queries_document(monkeypatch):
    """Document ids bound the keys a decode walks (decode_gate.document_span): with 5 splits, each
    of them sees keys of the 270 positions (5 tiles) of the 600-token sequence's last document, where
    splits of the whole sequence gave them all to the last three; a query whose document also has keys
    early in the cache (sequence 1, ids not sorted) and an empty sequence agree with the reference."""
    spec, module, q, k_cache, v_cache, lengths, g = _case("document", B=3, Hkv=1, G=2, Nq=2, S=640,
                                                          lengths=(600, 200, 0))
    ids = (torch.arange(640) >= 330).long().repeat(3, 1)  # two documents: [0, 330) and [330, ...)
    ids[1, :30] = 1  # sequence 1: its queries' document also holds positions 0 .. 29
    ids[1, 30:] = 0
    ids[1, 180:] = 1
    pos = (lengths.long()[:, None] - 2 + torch.arange(2)).clamp(0, 639)
    span = decode_gate.document_span(ids.gather(1, pos), ids, lengths)
    assert span[:2].tolist() == [[330, 600], [0, 200]] and span[2, 0] > span[2, 1]
    runs = _split_runs(monkeypatch, spec, module, q, k_cache, v_cache, lengths, (1, 5),
                       {"documents": (ids.gather(1, pos), ids)}, documents=ids)
    assert runs[5].shape[-1] == 5 and torch.isfinite(runs[5][0]).all()


@pytest.mark.interp
@pytest.mark.parametrize("per_head", [True, False])
def test_visible_blocks_lists_what_some_packed_row_sees(per_head):
    """decode_gate.visible_blocks against a loop over the packed rows: per (sequence, KV head), the
    layout's key blocks that one of the group's heads sees at one of the last Nq positions,
    ascending, then padding; a layout per head or one for all, rows from row 0 or from each
    sequence's row0 (the random term's rows near the queries); lengths 0, 2 < Nq, and one whose
    queries straddle two rows (639 .. 641). (The kernel cuts the list by its keys' bounds.)"""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Nq, bq, bk, S = 3, 4, 2, 3, 64, 128, 700
    lengths = torch.tensor([0, 2, 642], dtype=torch.int32)
    n_kb = -(-S // bk)
    if per_head:
        layout, row0 = torch.rand(B, Hq, -(-S // bq), n_kb, generator=g) < 0.3, None
    else:
        layout, row0 = torch.rand(1, 1, 2, n_kb, generator=g) < 0.5, torch.tensor([0, 0, 639 // bq], dtype=torch.int32)
    got = decode_gate.visible_blocks(layout.view(torch.uint8), row0, (bq, bk), lengths, Hkv, Nq)
    assert got.shape == (B * Hkv, 2 + n_kb) and got.dtype == torch.int32
    for b, L in enumerate(lengths.tolist()):
        for hk in range(Hkv):
            heads, rows = range(hk * Hq // Hkv, (hk + 1) * Hq // Hkv), range(max(0, L - Nq), max(L, 1))
            want = sorted({kb for h in heads for t in rows for kb in range(n_kb)
                           if layout[min(b, layout.shape[0] - 1), min(h, layout.shape[1] - 1),
                                     t // bq - (0 if row0 is None else int(row0[b])), kb]})
            row = got[b * Hkv + hk].tolist()
            assert row[0] == len(want) and row[1:1 + len(want)] == want and set(row[1 + len(want):]) == {n_kb}


@pytest.mark.interp
@pytest.mark.parametrize("Nq, dtype", [(1, torch.int32), (3, torch.int64), (20, torch.int32), (150, torch.int64)])
def test_document_span_against_a_loop(Nq, dtype):
    """decode_gate.document_span (one kernel) against a loop over the positions: ids unsorted and
    repeated, a query id absent from the cache, lengths 0, 1, one inside a chunk of the kernel and
    the capacity, Nq 1 to 150 (query ids compared 64 at a time: 3 chunks)."""
    g = torch.Generator().manual_seed(Nq)
    B, S = 5, 5000
    kv_ids = torch.randint(0, 6, (B, S + 7), generator=g).to(dtype)  # wider than the capacity
    q_ids = torch.randint(0, 7, (B, Nq), generator=g).to(dtype)  # 6: in no position
    q_ids[3] = 6
    q_ids[3, -1] = 2  # sequence 3's one present id in the last chunk
    q_ids[4] = 6
    lengths = torch.tensor([0, 1, 1234, S, S], dtype=torch.int32)
    got = decode_gate.document_span(q_ids, kv_ids[:, :S], lengths)
    for b, L in enumerate(lengths.tolist()):
        hits = [p for p in range(L) if int(kv_ids[b, p]) in set(q_ids[b].tolist())]
        assert got[b].tolist() == ([hits[0], hits[-1] + 1] if hits else [S, 0]), b


@pytest.mark.interp
@pytest.mark.parametrize("chunk, grid1, Nq", [(64, 65535, 3), (48, 65535, 70), (64, 3, 1)])
def test_document_span_over_chunks(monkeypatch, chunk, grid1, Nq):
    """document_span with each sequence spread over many programs of `chunk` positions, against a
    loop: lengths 0 and past the capacity (clamped), ids only in the last chunk, in none, in several
    chunks (first and last positions too), a length inside a chunk; a chunk not a power of two (its
    block wider than it), and a grid of 3 programs per sequence, each taking several chunks."""
    monkeypatch.setattr(decode_gate, "_GRID1", grid1)
    g = torch.Generator().manual_seed(chunk + grid1 + Nq)
    B, S = 7, 10 * chunk + 17
    kv_ids = torch.randint(0, 50, (B, S + 5), generator=g)  # wider than the capacity
    q_ids = torch.randint(0, 50, (B, Nq), generator=g)
    q_ids[:, 0] = 99  # in no position: every row has one absent id
    lengths = torch.tensor([0, S + 100, S, S, S - 1, 7 * chunk + 5, S], dtype=torch.int32)
    kv_ids[1, [0, S - 1, S + 2]] = 99  # past the capacity: not seen
    kv_ids[2] = 50  # ids only in the last (partial) chunk
    kv_ids[2, S - 3] = q_ids[2, -1]
    kv_ids[3] = 50  # none found
    kv_ids[4, 3 * chunk - 1] = kv_ids[4, S - 2] = 99  # several chunks, the last position L - 1
    kv_ids[5, 5 * chunk:] = 99  # a length inside a chunk: hits past it unseen
    kv_ids[6, 0] = 99
    got = decode_gate.document_span(q_ids, kv_ids[:, :S], lengths, chunk=chunk)
    assert got.shape == (B, 2) and got.dtype == torch.int32
    for b, L in enumerate(lengths.tolist()):
        want = set(q_ids[b].tolist())
        hits = [p for p in range(min(L, S)) if int(kv_ids[b, p]) in want]
        assert got[b].tolist() == ([hits[0], hits[-1] + 1] if hits else [S, 0]), b
    assert got[2].tolist() == [S - 3, S - 2] and got[3].tolist() == [S, 0] and got[6, 0] == 0


@pytest.mark.interp
def test_the_mask_bounds_cut_the_visible_blocks(monkeypatch, tmp_path):
    """A window under a runtime layout (every block visible): the kernel walks only the listed
    blocks that meet the window, so with 3 splits each sees keys of the last 300 positions of 1250
    (blocks 14 .. 19 of 64 keys), where the whole list gave them all to the last split; a document
    span cuts it further (sequence 1 of 600: its queries' document [450, 600) is blocks 7 .. 9 of
    the window's 4 .. 9); mixed lengths with 0."""
    path = tmp_path / "window_layout.yaml"
    path.write_text("name: window_layout\nhead_dim: 32\nmask:\n  window: {left: 299, right: 0, align: bottom_right}\n"
                    "  document: true\nsparsity:\n  block: [64, 64]\n  layout: runtime\n")
    spec, module = load_spec(path), attngen.load(path)
    g = torch.Generator().manual_seed(5)
    B, Hkv, G, S = 3, 1, 2, 1280
    q = torch.randn(B, Hkv * G, 1, 32, generator=g)
    k_cache, v_cache = torch.randn(B, Hkv, S, 32, generator=g), torch.randn(B, Hkv, S, 32, generator=g)
    lengths = torch.tensor([1250, 600, 0], dtype=torch.int32)
    layout = torch.ones(1, 1, S // 64, S // 64, dtype=torch.bool)
    ids = torch.zeros(B, S, dtype=torch.long)
    ids[1, 450:600] = 1
    runs = _split_runs(monkeypatch, spec, module, q, k_cache, v_cache, lengths, (1, 3),
                       {"layout": layout, "documents": (ids.gather(1, (lengths.long()[:, None] - 1).clamp(0)), ids)},
                       layout=layout, documents=ids)
    assert runs[3].shape[-1] == 3 and torch.isfinite(runs[3][:2]).all()


@pytest.mark.interp
def test_splits_share_the_visible_blocks(monkeypatch):
    """A block layout's decode walks only its visible key blocks (blocks 0, 1 and 9 of 10), which the
    splits share: with 3, each sees keys, where slices of the sequence gave the middle one nothing."""
    spec, module, q, k_cache, v_cache, lengths, g = _case("block_sparse", B=1, Hkv=1, G=2, S=1280, lengths=(1250,))
    layout = torch.zeros(1, 2, 10, 10, dtype=torch.bool)
    layout[:, :, 9, [0, 1, 9]] = True  # row 9: position 1249's
    runs = _split_runs(monkeypatch, spec, module, q, k_cache, v_cache, lengths, (1, 3), {"layout": layout},
                       layout=layout)
    assert runs[3].shape[-1] == 3 and torch.isfinite(runs[3]).all()


@pytest.mark.compiler
def test_a_gated_kernel_refuses_to_run_without_its_gate():
    """The runtime's decode (what the op and bench-decode call) of a spec with a layout or document
    ids needs them (its kernel would read a placeholder as its block list); a key tile larger than
    the layout's key block is refused."""
    spec, module, q, k_cache, v_cache, lengths, g = _case("bigbird", lengths=(5, 90, 0))
    rt = runtime.of(module)
    hp = rt.head_param_rows(q, {})
    for name in ("bigbird", "document"):
        with pytest.raises(ValueError, match="decodes with its document ids / block layout"):
            runtime.of(attngen.load(resolve_spec(name))).decode(q, k_cache, v_cache, lengths, None, hp, rt.scale)
    plan = decode.decode_plan(3, 2, 2, 160, spec.head_dim, 132, block_n=128)
    gate = decode_gate.Gate(layout=torch.ones(1, 1, 3, 3, dtype=torch.uint8), block=(64, 64))
    with pytest.raises(ValueError, match=r"key block \(64\) must hold whole key tiles; got block_n 128"):
        decode.run(rt.decode_kernel, q, k_cache, v_cache, hp, lengths, None, rt.scale, plan, 2, spec.head_dim_v,
                   rt.native, gate)


@pytest.mark.compiler
def test_random_blocks_refuse_capture(monkeypatch):
    """bigbird's random blocks are drawn per sequence length on the host: not under torch.compile
    or CUDA graph capture, with the reason given."""
    spec, module, q, k_cache, v_cache, lengths, g = _case("bigbird", B=2, lengths=(5, 90))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="random sparsity blocks depend on each sequence's length"):
        module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)


@pytest.mark.interp
def test_verify_decode_passes():
    from attngen.verify import verify_spec

    for name in ("alibi", "document", "block_sparse"):
        results = verify_spec(resolve_spec(name), dtypes=["fp32"], decode=True)
        assert len(results) == 2 and all(r.ok for r in results), [r.why for r in results]


@pytest.mark.interp
@pytest.mark.parametrize("name", ["alibi", "document", "longformer", "block_sparse"])
def test_fullgraph_compile_of_a_decode_step_matches_eager(name):
    """Appending and attending under torch.compile(fullgraph=True): the append is torch indexing, the
    attention one custom op (documents and layouts made into its tensors before it); the same
    output and the same cache as eager."""
    spec, module, q, k_cache, v_cache, lengths, g = _case(name, B=2, Nq=1, S=288, lengths=(3, 270))
    k_new, v_new = (torch.randn(2, 2, 1, spec.head_dim, generator=g) for _ in range(2))
    table = _shuffle(2, 288, 16, g)
    kw, _ = _gate_args(spec, 2, q.shape[1], 1, 288, lengths + 1, g)

    def step(q, kc, vc, lengths, table, k, v):
        return module.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, block_table=table, k=k, v=v,
                                             num_splits=2, **kw)
    caches = [(as_pages(k_cache, 16, table), as_pages(v_cache, 16, table)) for _ in range(2)]
    with torch.no_grad():
        want = step(q, *caches[0], lengths, table, k_new, v_new)
        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, *caches[1], lengths, table, k_new, v_new)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(caches[0], caches[1]))


@pytest.mark.interp
def test_opcheck_decode():
    spec, module, q, k_cache, v_cache, lengths, g = _case("temperature", B=2, Nq=2, S=40, lengths=(0, 33))
    rt = runtime.of(module)
    hp = rt.head_param_rows(q, {})
    torch.library.opcheck(rt.ops.decode, (q, k_cache, v_cache, lengths, None, hp, None, None, None, None, 0.1, 2))
    spec, module, q, k_cache, v_cache, lengths, g = _case("document", B=2, Nq=2, S=40, lengths=(0, 33))
    kv_ids = torch.arange(40).repeat(2, 1) // 9
    q_ids = kv_ids[:, 31:33].contiguous()
    rt = runtime.of(module)
    torch.library.opcheck(rt.ops.decode, (q, k_cache, v_cache, lengths, None, rt.head_param_rows(q, {}), q_ids,
                                          kv_ids, None, None, 0.1, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sliding_window", "document", "block_sparse", "longformer"])
def test_a_decode_step_captured_in_a_cuda_graph_replays_with_new_lengths_and_cache(name, capture):
    """No host read on the way: capture one step (appending and attending), then change
    cache_seqlens, the new token and the cache in place and replay: the eager call's output."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    spec, module, q, k_cache, v_cache, lengths, g = _case(name, B=4, Hkv=8, G=4, Nq=1, S=4096,
                                                          lengths=(0, 1, 700, 4000), dtype=torch.bfloat16)
    kw, _ = _gate_args(spec, 4, 32, 1, 4096, lengths + 1, g)
    q, k_cache, v_cache, lengths = (t.cuda() for t in (q, k_cache, v_cache, lengths))
    kw = {key: value.cuda() for key, value in kw.items()}
    k_new, v_new = (torch.randn(4, 8, 1, spec.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    step = lambda: module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k=k_new,  # noqa: E731
                                                 v=v_new, **kw)
    with torch.no_grad():
        graph, out = capture(step)
        for new_lengths in ((5, 2, 3000, 4094), (4095, 0, 1, 17)):
            lengths.copy_(torch.tensor(new_lengths, dtype=torch.int32))
            for t in (q, k_new, v_new, k_cache):
                t.normal_()
            graph.replay()
            got = out.clone()
            want = step()  # eager: the same append (idempotent at these lengths) and attention
            assert torch.equal(got, want), new_lengths


@pytest.mark.interp
def test_strided_lengths_and_block_table_give_the_contiguous_bits():
    """cache_seqlens and block_table are read with their strides honoured (a view of a wider tensor)."""
    spec, module, q, k_cache, v_cache, lengths, g = _case("causal", B=2, Nq=1, S=96, lengths=(5, 90))
    table = _shuffle(2, 96, 16, g)
    k_pages, v_pages = as_pages(k_cache, 16, table), as_pages(v_cache, 16, table)
    wide_lengths = torch.stack([lengths, torch.zeros_like(lengths)], 1)[:, 0]  # stride 2
    wide_table = torch.stack([table, torch.full_like(table, 10**6)], 2).reshape(2, -1)[:, ::2]  # strides (2n, 2)
    assert not wide_lengths.is_contiguous() and not wide_table.is_contiguous()
    with torch.no_grad():
        want = module.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, block_table=table)
        got = module.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=wide_lengths, block_table=wide_table)
    assert torch.equal(got, want)


@pytest.mark.interp
@pytest.mark.parametrize("name", ["causal", "sliding_window", "document", "block_sparse"])
@pytest.mark.parametrize("page_size", [16, 48, 64])
def test_page_numbers_loaded_a_step_ahead_give_the_same_bits(name, page_size):
    """plan.pages_ahead (the default, measured faster): page numbers (one per key for pages smaller
    than a key tile, one per step for larger ones) loaded one step before the K/V loads they
    address, carried across the masked, full and masked loops (one loop for a gated spec); the same
    bits as loading them in the step, with splits whose bounds fall inside a tile and sequences of
    0, 1 and a window's length; a layout's list of blocks with a gap (the next tile is not the
    adjacent one)."""
    sparse = name == "block_sparse"
    spec, module, q, k_cache, v_cache, lengths, g = _case(name, B=4, Nq=2, S=400 if sparse else 160,
                                                          lengths=(330, 1, 0, 270) if sparse else (150, 1, 0, 97))
    rt = runtime.of(module)
    hp = rt.head_param_rows(q, {})
    table = _shuffle(4, k_cache.shape[2], page_size, g)
    k_pages, v_pages = as_pages(k_cache, page_size, table), as_pages(v_cache, page_size, table)
    gate = decode_gate.NO_GATE
    if spec.mask.document:  # documents of 40 positions: a gated spec's one loop
        ids = (torch.arange(k_cache.shape[2]) // 40).to(torch.int32).expand(4, -1).contiguous()
        gate = decode_gate.Gate(*decode_gate.documents(ids, 4, 2, k_cache.shape[2], lengths, spec.name), None, None,
                                (16, 16))
    if sparse:  # blocks 0 and 2 of 4 (of 128 keys: tiles 0, 1, 4, 5 of 64)
        layout = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
        layout[..., [0, 2]] = 1
        gate = decode_gate.Gate(layout=layout, block=(128, 128))
    for splits in (1, 3):
        outs = []
        for ahead in (False, True):
            plan = decode.decode_plan(4, 2, 4, k_cache.shape[2], spec.head_dim, decode.sms(q.device), splits=splits,
                                      pages_ahead=ahead, key_block=128 if sparse else None)
            outs.append(decode.run(rt.decode_kernel, q, k_pages, v_pages, hp, lengths, table, rt.scale, plan, 2,
                                   spec.head_dim_v, rt.native, gate))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), (splits, page_size)


@pytest.mark.interp
def test_split_merge_fused_into_the_last_split_matches_the_merge_kernel():
    """plan.fused (off by default: measured slower, docs/decisions/decode-plan.md): the last split of
    each tile merges them; the same rows as the second kernel's merge, and the counters reset."""
    spec, module, q, k_cache, v_cache, lengths, g = _case("causal", Nq=2, lengths=(0, 1, 150))
    rt = runtime.of(module)
    hp = rt.head_param_rows(q, {})
    outs = []
    for fused in (False, True, True):  # twice fused: the counters were left at zero
        plan = decode.decode_plan(3, 2, 4, 160, spec.head_dim, decode.sms(q.device), splits=3, fused=fused)
        outs.append(decode.run(rt.decode_kernel, q, k_cache, v_cache, hp, lengths, None, rt.scale, plan, 2,
                               spec.head_dim_v, rt.native))
    for o, lse in outs[1:]:
        assert (o - outs[0][0]).abs().max() < 1e-6
        assert torch.equal(torch.isinf(lse), torch.isinf(outs[0][1]))
        assert (lse - outs[0][1]).nan_to_num(0.0, 0.0, 0.0).abs().max() < 1e-6


@pytest.mark.interp
def test_a_window_bounds_the_split_count(monkeypatch):
    """A window's keys (sliding_window's 256 + Nq) bound the splits: at B1 with Hkv 8 on 132 SMs, 15
    splits of a 32k cache where 257 keys meet at most 5 tiles of 64 (6 of a layout's 128-key blocks
    of 2 tiles; 64 keys meet 2 tiles); the module carries the width, and its decode calls plan with
    it (5 splits launched by attention_with_kvcache at 132 SMs)."""
    rt = runtime.of(attngen.load(resolve_spec("sliding_window")))
    assert rt.decode_width == (256, 1) and runtime.of(attngen.load(resolve_spec("causal"))).decode_width is None
    span = decode.decode_span(rt.decode_width, 1)
    assert decode.decode_plan(1, 8, 4, 32768, 128, 132).splits == 15
    assert decode.decode_plan(1, 8, 4, 32768, 128, 132, span=span).splits == 5
    assert decode.decode_plan(1, 8, 4, 32768, 128, 132, span=span, key_block=128).splits == 6
    assert decode.decode_plan(1, 8, 4, 32768, 128, 132, span=64).splits == 2
    assert decode.decode_plan(1, 8, 4, 200, 128, 132, span=span).splits == 4  # the capacity bounds it first
    plans, run = [], decode.run
    monkeypatch.setattr(decode, "sms", lambda device: 132)
    monkeypatch.setattr(decode, "run", lambda *a, **kw: plans.append(a[8]) or run(*a, **kw))
    spec, module, q, k_cache, v_cache, lengths, g = _case("sliding_window", B=1, Hkv=8, G=1, S=32768, lengths=(300,))
    with torch.no_grad():
        o, lse = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True)
    assert [p.splits for p in plans] == [5]
    _close(spec, o, lse, q, k_cache, v_cache, lengths, 2e-5)


@pytest.mark.interp
def test_a_chunk_bounds_the_split_count(monkeypatch):
    """A chunk of 256 keys (chunked's, Llama 4's) bounds the splits as a window does: its rows see at
    most 255 + Nq keys (the floors of the chunk's bounds bounded by their arguments), 5 tiles of 64,
    so 5 splits of a 4096-key cache at B2 with Hkv 8 on 132 SMs where the capacity gives 8; the
    outputs match the reference at a length in a chunk's middle and one at its first key."""
    rt = runtime.of(attngen.load(resolve_spec("chunked")))
    assert rt.decode_width == (255, 1)
    plans, run = [], decode.run
    monkeypatch.setattr(decode, "sms", lambda device: 132)
    monkeypatch.setattr(decode, "run", lambda *a, **kw: plans.append(a[8]) or run(*a, **kw))
    spec, module, q, k_cache, v_cache, lengths, g = _case("chunked", B=2, Hkv=8, G=1, S=4096, lengths=(1000, 769))
    assert decode.decode_plan(2, 8, 1, 4096, 128, 132).splits == 8
    with torch.no_grad():
        o, lse = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True)
    assert [p.splits for p in plans] == [5]
    _close(spec, o, lse, q, k_cache, v_cache, lengths, 2e-5)


GAPPED = {  # a window (and documents) over a runtime layout with gaps: the cut searches a sparse list
    "window_layout_128": "mask:\n  window: {left: 150, right: 0, align: bottom_right}\n"
                         "sparsity:\n  block: [128, 128]\n",
    "window_documents_64": "mask:\n  window: {left: 70, right: 0, align: bottom_right}\n  document: true\n"
                           "sparsity:\n  block: [64, 64]\n",
}


@pytest.mark.interp
@pytest.mark.parametrize("name", list(GAPPED))
@pytest.mark.parametrize("Nq", [1, 3])
def test_the_mask_bounds_cut_a_gapped_block_list(tmp_path, name, Nq):
    """The kernel's binary searches over a list with gaps (a random layout at 0.4): each sequence's
    listed blocks that meet its window (and documents) against the float64 reference, lengths 0 to
    the capacity (block edges, rows before the start), 1, 3 and the default splits, and paged
    caches giving the contiguous bits. (Indexing the list by block number passes the all-ones
    layout's test but fails this one.)"""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nhead_dim: 32\n{GAPPED[name]}  layout: runtime\n")
    spec, module = load_spec(path), attngen.load(path)
    g = torch.Generator().manual_seed(1)
    S, Hkv, G = 640, 1, 2
    lengths = torch.tensor([0, 1, 2, 64, 128, 129, 255, 257, 500, 639, 640], dtype=torch.int32)
    B = len(lengths)
    q = torch.randn(B, Hkv * G, Nq, 32, generator=g)
    k_cache, v_cache = torch.randn(B, Hkv, S, 32, generator=g), torch.randn(B, Hkv, S, 32, generator=g)
    bq, bk = spec.sparsity.block
    kw = {"layout": torch.rand(B, Hkv * G, -(-S // bq), -(-S // bk), generator=g) < 0.4}
    ref = dict(kw)
    if spec.mask.document:
        ids = (torch.arange(S)[None] + torch.randint(0, 50, (B, 1), generator=g)) // 90
        pos = (lengths.long()[:, None] - Nq + torch.arange(Nq)).clamp(0, S - 1)
        kw["documents"], ref["documents"] = ids, (ids.gather(1, pos), ids)
    table = _shuffle(B, S, 16, g)
    with torch.no_grad():
        for splits in (1, 3, None):
            o, lse = module.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, return_lse=True,
                                                   num_splits=splits, **kw)
            _close(spec, o, lse, q, k_cache, v_cache, lengths, 2e-5, **ref)
            paged = module.attention_with_kvcache(q, as_pages(k_cache, 16, table), as_pages(v_cache, 16, table),
                                                  cache_seqlens=lengths, block_table=table, num_splits=splits, **kw)
            assert torch.equal(paged, o)
