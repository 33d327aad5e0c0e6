"""The NSA float64 reference (attngen/reference_nsa.py) against brute-force per-query loops written
here from the method's math: compression (mean, linear and its flatten order), the selection scores
per (query, block), the top-n selection's rules (forced blocks, causality, counts, ties to the lower
index), each branch as a per-query softmax over the keys it sees, the gates' gradient, gradcheck
under linear compression, and rows that see no compressed token. No kernel runs."""

from __future__ import annotations

import math

import pytest
import torch

from attngen.reference_nsa import compress, nsa_attention, select_blocks, selection_scores

pytestmark = pytest.mark.compiler

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The brute-force loops run thousands of tiny ops, which intra-op threads only slow down
    (badly so on a loaded machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ brute force, from the math

def overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    """|[a0, a1) intersect [b0, b1)| by counting."""
    return len(set(range(a0, a1)) & set(range(b0, b1)))


def brute_compress(x, block, stride, kind, weight=None):
    B, H, N, E = x.shape
    n_cmp = (N - block) // stride + 1 if N >= block else 0
    out_dim = E if kind == "mean" else weight.shape[-1]
    out = torch.zeros(B, H, n_cmp, out_dim, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            for j in range(n_cmp):
                acc = torch.zeros(out_dim, dtype=x.dtype)
                for i in range(block):  # token i of the window
                    row = x[b, h, j * stride + i]
                    if kind == "mean":
                        acc = acc + row / block
                    else:  # flatten row-major (token, feature): token i is rows i*E .. i*E+E-1
                        acc = acc + row @ weight[h, i * E:(i + 1) * E]
                out[b, h, j] = acc
    return out


def softmax_row(qt, keys, vals, scale):
    """(output, probabilities) of one query over a list of keys; zeros over an empty list."""
    if keys.shape[0] == 0:
        return torch.zeros(vals.shape[-1], dtype=qt.dtype), torch.zeros(0, dtype=qt.dtype)
    p = torch.softmax((keys @ qt) * scale, dim=0)
    return p @ vals, p


def brute_select_row(s, t, select_block, count, init_blocks, local_blocks, width):
    qb = t // select_block
    forced = set(range(min(init_blocks, qb + 1))) | set(range(max(0, qb - local_blocks + 1), qb + 1))
    rest = sorted((beta for beta in range(qb + 1) if beta not in forced), key=lambda beta: (-s[beta], beta))
    chosen = sorted(forced | set(rest[:max(0, count - len(forced))]))
    return chosen + [-1] * (width - len(chosen))


def brute_nsa(q, k, v, gates, *, l, d, kind, w_k, w_v, lsel, count, init_blocks, local_blocks, window, scale=None):
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    kc, vc = brute_compress(k, l, d, kind, w_k), brute_compress(v, l, d, kind, w_v)
    n_cmp, n_blocks = kc.shape[2], math.ceil(N / lsel)
    width = min(count, n_blocks)
    o_cmp, o_slc, o_swa = (torch.zeros(B, Hq, N, Dv, dtype=F64) for _ in range(3))
    P = torch.zeros(B, Hkv, N, n_cmp, dtype=F64)
    for b in range(B):
        for h in range(Hq):
            hk = h // G
            for t in range(N):
                vis = torch.tensor([j for j in range(n_cmp) if j * d + l - 1 <= t], dtype=torch.long)
                o_cmp[b, h, t], p = softmax_row(q[b, h, t], kc[b, hk, vis], vc[b, hk, vis], scale)
                P[b, hk, t, vis] += p
    scores = torch.zeros(B, Hkv, N, n_blocks, dtype=F64)
    indices = torch.zeros(B, Hkv, N, width, dtype=torch.int32)
    cover = [[overlap(j * d, j * d + l, beta * lsel, (beta + 1) * lsel) for beta in range(n_blocks)]
             for j in range(n_cmp)]
    for b in range(B):
        for hk in range(Hkv):
            for t in range(N):
                Pt = P[b, hk, t].tolist()
                for beta in range(n_blocks):
                    scores[b, hk, t, beta] = sum(Pt[j] * cover[j][beta] / d for j in range(n_cmp))
                row = brute_select_row(scores[b, hk, t].tolist(), t, lsel, count, init_blocks, local_blocks, width)
                indices[b, hk, t] = torch.tensor(row, dtype=torch.int32)
    for b in range(B):
        for h in range(Hq):
            hk = h // G
            for t in range(N):
                sel = set(indices[b, hk, t].tolist()) - {-1}
                keys = torch.tensor([j for j in range(t + 1) if j // lsel in sel], dtype=torch.long)
                o_slc[b, h, t] = softmax_row(q[b, h, t], k[b, hk, keys], v[b, hk, keys], scale)[0]
                keys = torch.tensor([j for j in range(N) if t - window < j <= t], dtype=torch.long)
                o_swa[b, h, t] = softmax_row(q[b, h, t], k[b, hk, keys], v[b, hk, keys], scale)[0]
    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_swa
    return {"o": o, "o_cmp": o_cmp, "o_slc": o_slc, "o_swa": o_swa, "indices": indices, "scores": scores}


def inputs(B, Hq, Hkv, N, D, Dv, seed=0, kind="mean", l=32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g, dtype=F64)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=F64)
    v = torch.randn(B, Hkv, N, Dv, generator=g, dtype=F64)
    gates = torch.rand(B, Hq, N, 3, generator=g, dtype=F64)
    w_k = w_v = None
    if kind == "linear":
        w_k = torch.randn(Hkv, l * D, D, generator=g, dtype=F64) / math.sqrt(l * D)
        w_v = torch.randn(Hkv, l * Dv, Dv, generator=g, dtype=F64) / math.sqrt(l * Dv)
    return q, k, v, gates, w_k, w_v


# ------------------------------------------------------------------ compression

def test_compress_mean_equals_hand_loop():
    x = torch.randn(2, 3, 75, 5, dtype=F64)
    got = compress(x, 32, 16, "mean")
    assert got.shape == (2, 3, 3, 5)  # j = 0 .. floor((75 - 32) / 16) = 2
    for b in range(2):
        for h in range(3):
            for j in range(3):
                for e in range(5):
                    want = sum(x[b, h, j * 16 + i, e].item() for i in range(32)) / 32
                    assert abs(got[b, h, j, e].item() - want) < 1e-12


@pytest.mark.parametrize("n,block,stride,count", [(31, 32, 16, 0), (32, 32, 16, 1), (47, 32, 16, 1),
                                                  (48, 32, 16, 2), (200, 32, 16, 11), (127, 64, 64, 1),
                                                  (128, 64, 64, 2), (63, 64, 64, 0)])
def test_compress_counts(n, block, stride, count):
    x = torch.randn(1, 2, n, 4, dtype=F64)
    assert compress(x, block, stride, "mean").shape == (1, 2, count, 4)
    w = torch.randn(2, block * 4, 4, dtype=F64)
    assert compress(x, block, stride, "linear", w).shape == (1, 2, count, 4)


def test_linear_with_mean_like_weight_equals_mean():
    l, D = 32, 6
    x = torch.randn(2, 2, 90, D, dtype=F64)
    w = (torch.eye(D, dtype=F64).repeat(l, 1) / l)[None].repeat(2, 1, 1)  # [2, l*D, D]
    torch.testing.assert_close(compress(x, l, 16, "linear", w), compress(x, l, 16, "mean"), rtol=0, atol=1e-13)
    torch.testing.assert_close(compress(x, l, 16, "linear", w), brute_compress(x, l, 16, "mean"), rtol=0, atol=1e-13)


def test_linear_flatten_is_row_major_over_token_then_feature():
    l, d, D, E = 8, 4, 3, 5
    x = torch.randn(1, 2, 20, D, dtype=F64)
    for i, f, e in [(0, 0, 0), (5, 2, 4), (7, 1, 3)]:
        w = torch.zeros(2, l * D, E, dtype=F64)
        w[1, i * D + f, e] = 1.0  # head 1 only: head 0 must stay zero
        got = compress(x, l, d, "linear", w)
        want = torch.zeros(1, 2, 4, E, dtype=F64)
        for j in range(4):
            want[0, 1, j, e] = x[0, 1, j * d + i, f]
        assert torch.equal(got, want)
    w = torch.randn(2, l * D, E, dtype=F64)
    torch.testing.assert_close(compress(x, l, d, "linear", w), brute_compress(x, l, d, "linear", w))


# ------------------------------------------------------------------ selection scores and selection

@pytest.mark.parametrize("l,d,lsel,Hq,Hkv", [(32, 16, 64, 4, 2), (32, 16, 24, 3, 1), (64, 64, 64, 2, 2),
                                            (32, 16, 16, 4, 1)])
def test_scores_equal_brute_force(l, d, lsel, Hq, Hkv):
    N, D = 150, 8
    q, k, *_ = inputs(1, Hq, Hkv, N, D, 4, seed=1)
    kc = compress(k, l, d, "mean")
    got = selection_scores(q, kc, block=l, stride=d, select_block=lsel)
    assert got.dtype == F64 and got.shape == (1, Hkv, N, math.ceil(N / lsel))
    n_cmp, G = kc.shape[2], Hq // Hkv
    for hk in range(Hkv):
        for t in range(0, N, 7):
            P = [0.0] * n_cmp
            vis = [j for j in range(n_cmp) if j * d + l - 1 <= t]
            for h in range(hk * G, hk * G + G):
                if vis:
                    p = torch.softmax(kc[0, hk, vis] @ q[0, h, t] / math.sqrt(D), 0)
                    for j, pj in zip(vis, p.tolist()):
                        P[j] += pj
            for beta in range(got.shape[-1]):
                want = sum(P[j] * overlap(j * d, j * d + l, beta * lsel, (beta + 1) * lsel) / d for j in range(n_cmp))
                assert abs(got[0, hk, t, beta].item() - want) < 1e-12
            # every compressed token's weight l/d is spread over the blocks: sum = G * l / d if any visible
            assert abs(got[0, hk, t].sum().item() - (G * l / d if vis else 0.0)) < 1e-12


@pytest.mark.parametrize("lsel,count,init_blocks,local_blocks", [(16, 5, 1, 2), (16, 3, 0, 1), (8, 6, 2, 2),
                                                                 (16, 4, 0, 0), (32, 16, 1, 2), (16, 3, 3, 0)])
@pytest.mark.parametrize("tied", [False, True])
def test_select_blocks_rules(lsel, count, init_blocks, local_blocks, tied):
    B, Hkv, N = 2, 2, 100
    g = torch.Generator().manual_seed(lsel * 100 + count + 7 * tied)
    n_blocks = math.ceil(N / lsel)
    scores = (torch.randint(0, 3, (B, Hkv, N, n_blocks), generator=g).to(F64) if tied  # many ties
              else torch.rand(B, Hkv, N, n_blocks, generator=g, dtype=F64))
    got = select_blocks(scores, select_block=lsel, count=count, init_blocks=init_blocks, local_blocks=local_blocks)
    width = min(count, n_blocks)
    assert got.dtype == torch.int32 and got.shape == (B, Hkv, N, width)
    for b in range(B):
        for hk in range(Hkv):
            for t in range(N):
                row = got[b, hk, t].tolist()
                qb = t // lsel
                sel = [x for x in row if x >= 0]
                assert row == sel + [-1] * (width - len(sel))  # -1 only as trailing padding
                assert sel == sorted(set(sel))  # ascending, distinct
                assert len(sel) == min(count, qb + 1)
                assert all(x <= qb for x in sel)  # never a block after the query's own
                for forced in list(range(init_blocks)) + list(range(qb - local_blocks + 1, qb + 1)):
                    if 0 <= forced <= qb:
                        assert forced in sel
                assert row == brute_select_row(scores[b, hk, t].tolist(), t, lsel, count, init_blocks,
                                               local_blocks, width)


def test_select_ties_go_to_lower_index():
    N, lsel = 160, 16  # 10 blocks
    scores = torch.ones(1, 1, N, 10, dtype=F64)
    got = select_blocks(scores, select_block=lsel, count=4, init_blocks=1, local_blocks=1)
    assert got[0, 0, 159].tolist() == [0, 1, 2, 9]  # forced 0 and 9, then the lowest of the tied 1 .. 8
    assert got[0, 0, 100].tolist() == [0, 1, 2, 6]
    assert got[0, 0, 20].tolist() == [0, 1, -1, -1]
    scores[..., 5] = 2.0
    scores[..., 7] = 2.0
    scores[..., 3] = 2.0  # three tied at the top, two places: 3 and 5
    assert select_blocks(scores, select_block=lsel, count=4, init_blocks=1, local_blocks=1)[0, 0, 159].tolist() \
        == [0, 3, 5, 9]
    # a forced block's score does not matter, nor does a later block's
    scores = torch.zeros(1, 1, N, 10, dtype=F64)
    scores[..., 9] = 10.0
    scores[..., 4] = 1.0
    assert select_blocks(scores, select_block=lsel, count=3, init_blocks=1, local_blocks=1)[0, 0, 100].tolist() \
        == [0, 4, 6]


def test_select_rejects_forced_beyond_count():
    with pytest.raises(ValueError):
        select_blocks(torch.zeros(1, 1, 64, 4, dtype=F64), select_block=16, count=2, init_blocks=1, local_blocks=2)


# ------------------------------------------------------------------ the whole reference against brute force

CASES = {
    # B, Hq, Hkv, N, D, Dv, l, d, l', count, init, local, window, kind
    "g1_mean": (1, 2, 2, 200, 16, 8, 32, 16, 64, 3, 1, 1, 40, "mean"),
    "g3_l64_linear": (1, 6, 2, 200, 8, 12, 64, 64, 64, 2, 0, 1, 40, "linear"),
    "g4_mean_small_blocks": (2, 4, 1, 130, 8, 4, 32, 16, 16, 4, 1, 2, 40, "mean"),
    "g2_linear_ragged_blocks": (1, 4, 2, 120, 8, 6, 32, 16, 24, 3, 1, 1, 33, "linear"),
    "g3_l64_mean_l32": (1, 3, 1, 150, 8, 4, 64, 64, 32, 3, 1, 1, 40, "mean"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_nsa_equals_brute_force(name):
    B, Hq, Hkv, N, D, Dv, l, d, lsel, count, init_blocks, local_blocks, window, kind = CASES[name]
    q, k, v, gates, w_k, w_v = inputs(B, Hq, Hkv, N, D, Dv, seed=len(name), kind=kind, l=l)
    kw = dict(select_block=lsel, select_count=count, init_blocks=init_blocks, local_blocks=local_blocks,
              window=window)
    got = nsa_attention(q, k, v, gates, compress_block=l, compress_stride=d, compress_kind=kind, w_k=w_k, w_v=w_v,
                        return_parts=True, **kw)
    want = brute_nsa(q, k, v, gates, l=l, d=d, kind=kind, w_k=w_k, w_v=w_v, lsel=lsel, count=count,
                     init_blocks=init_blocks, local_blocks=local_blocks, window=window)
    torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-12)
    assert got["indices"].dtype == torch.int32
    assert torch.equal(got["indices"], want["indices"])
    for part in ("o_cmp", "o_slc", "o_swa", "o"):
        assert got[part].dtype == F64 and got[part].shape == (B, Hq, N, Dv)
        torch.testing.assert_close(got[part], want[part], rtol=0, atol=1e-12, msg=part)
    assert torch.equal(nsa_attention(q, k, v, gates, compress_block=l, compress_stride=d, compress_kind=kind,
                                     w_k=w_k, w_v=w_v, **kw), got["o"])


def test_defaults_equal_brute_force():
    """l = 32, d = 16, l' = 64, n = 16, 1 + 2 forced blocks, w = 512 (all blocks fit n, the window N)."""
    q, k, v, gates, *_ = inputs(1, 2, 1, 256, 16, 24, seed=5)
    got = nsa_attention(q, k, v, gates, return_parts=True)
    want = brute_nsa(q, k, v, gates, l=32, d=16, kind="mean", w_k=None, w_v=None, lsel=64, count=16,
                     init_blocks=1, local_blocks=2, window=512)
    assert got["indices"].shape == (1, 1, 256, 4)
    assert torch.equal(got["indices"], want["indices"])
    for part in ("scores", "o_cmp", "o_slc", "o_swa", "o"):
        torch.testing.assert_close(got[part], want[part], rtol=0, atol=1e-12, msg=part)
    # every eligible block selected, and the window covers everything: both are causal attention
    torch.testing.assert_close(got["o_slc"], got["o_swa"], rtol=0, atol=1e-13)


def test_window_of_one_is_the_own_value():
    q, k, v, gates, *_ = inputs(1, 4, 2, 70, 8, 5, seed=3)
    o_swa = nsa_attention(q, k, v, gates, window=1, return_parts=True)["o_swa"]
    torch.testing.assert_close(o_swa, v.repeat_interleave(2, dim=1), rtol=0, atol=1e-14)


# ------------------------------------------------------------------ empty rows

def test_rows_without_compressed_tokens_are_zero():
    l = 32
    q, k, v, gates, w_k, w_v = inputs(1, 4, 2, 100, 8, 6, seed=4, kind="linear", l=l)
    q.requires_grad_(True)
    k.requires_grad_(True)
    parts = nsa_attention(q, k, v, gates, compress_kind="linear", w_k=w_k, w_v=w_v, return_parts=True)
    assert torch.equal(parts["o_cmp"][:, :, :l - 1], torch.zeros_like(parts["o_cmp"][:, :, :l - 1]))
    assert (parts["o_cmp"][:, :, l - 1:].abs().sum(-1) > 0).all()  # from t = l - 1 on, one or more tokens
    assert torch.equal(parts["scores"][:, :, :l - 1], torch.zeros_like(parts["scores"][:, :, :l - 1]))
    parts["o_cmp"].sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert torch.equal(q.grad[:, :, :l - 1], torch.zeros_like(q.grad[:, :, :l - 1]))


def test_sequence_shorter_than_a_compression_block():
    q, k, v, gates, w_k, w_v = inputs(1, 2, 1, 20, 4, 3, seed=6, kind="linear", l=32)
    for p in (q, k, v, gates, w_k, w_v):
        p.requires_grad_(True)
    parts = nsa_attention(q, k, v, gates, compress_kind="linear", w_k=w_k, w_v=w_v, return_parts=True)
    assert torch.equal(parts["o_cmp"], torch.zeros_like(parts["o_cmp"]))
    assert parts["scores"].shape == (1, 1, 20, 1) and torch.equal(parts["indices"], torch.zeros(1, 1, 20, 1).int())
    parts["o"].sum().backward()
    for p in (q, k, v, gates):
        assert torch.isfinite(p.grad).all()
    assert torch.equal(w_k.grad, torch.zeros_like(w_k)) and torch.equal(w_v.grad, torch.zeros_like(w_v))


# ------------------------------------------------------------------ gradients

def test_gate_gradient_is_branch_dot_output_gradient():
    q, k, v, gates, *_ = inputs(2, 4, 2, 96, 8, 6, seed=8)
    gates.requires_grad_(True)
    parts = nsa_attention(q, k, v, gates, select_count=3, local_blocks=1, window=40, select_block=32,
                          return_parts=True)
    do = torch.randn_like(parts["o"])
    parts["o"].backward(do)
    want = torch.stack([(parts[p].detach() * do).sum(-1) for p in ("o_cmp", "o_slc", "o_swa")], dim=-1)
    torch.testing.assert_close(gates.grad, want, rtol=0, atol=1e-13)


def test_gradients_reach_every_input_under_linear():
    q, k, v, gates, w_k, w_v = inputs(1, 6, 2, 140, 8, 4, seed=9, kind="linear", l=32)
    leaves = (q, k, v, gates, w_k, w_v)
    for p in leaves:
        p.requires_grad_(True)
    parts = nsa_attention(q, k, v, gates, compress_kind="linear", w_k=w_k, w_v=w_v, select_block=32,
                          select_count=3, local_blocks=1, window=40, return_parts=True)
    assert not parts["scores"].requires_grad and not parts["indices"].requires_grad
    parts["o"].square().sum().backward()
    for p in leaves:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_gradcheck_tiny_linear():
    """Selection is piecewise constant, so finite differences see the same blocks (no near-ties here)."""
    q, k, v, gates, w_k, w_v = inputs(1, 2, 1, 20, 3, 2, seed=10, kind="linear", l=4)
    leaves = tuple(p.requires_grad_(True) for p in (q, k, v, gates, w_k, w_v))
    kw = dict(compress_block=4, compress_stride=2, compress_kind="linear", select_block=4, select_count=3,
              init_blocks=1, local_blocks=1, window=5)
    idx = nsa_attention(*leaves[:4], w_k=w_k, w_v=w_v, return_parts=True, **kw)["indices"]
    assert (idx[0, 0, 12:, 1] > 0).all() and len(set(idx[0, 0, 12:, 1].tolist())) > 1  # a real choice is made

    def f(q, k, v, gates, w_k, w_v):
        return nsa_attention(q, k, v, gates, w_k=w_k, w_v=w_v, **kw)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8)


def test_float32_follows_float64():
    q, k, v, gates, *_ = inputs(1, 2, 1, 128, 16, 8, seed=11)
    kw = dict(select_block=32, select_count=3, local_blocks=1, window=40)
    o32 = nsa_attention(q.float(), k.float(), v.float(), gates.float(), dtype=torch.float32, **kw)
    o64 = nsa_attention(q, k, v, gates, **kw)
    assert o32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, rtol=1e-4, atol=1e-5)
