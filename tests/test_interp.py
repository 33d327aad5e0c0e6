"""The IR means what it prints: attngen/interp.py runs each shipped spec's forward and backward
kernels' IR (after the passes: the loops visit only the tiles the mask plan gives, mask code only
on partial ones) on float64 tensors, against the reference built from the spec."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from attngen import interp, reference
from attngen.ir import OpKind
from attngen.ops import SCORE_MODS
from attngen.pipeline import compile_spec
from attngen.spec import load_spec
from attngen.verify import Shape, random_documents

pytestmark = pytest.mark.compiler
ROOT = Path(__file__).resolve().parent.parent
# fa2 specs (an NSA spec's branches are fa2 specs, checked end to end by tests/test_nsa.py)
SPECS = sorted(p for p in (ROOT / "specs").glob("*.yaml") if load_spec(p).nsa is None)
# ragged, Nq != Nk both ways (bottom-right causal with Nq > Nk leaves rows with no visible key), GQA
SHAPES = [Shape(2, 4, 2, 37, 53), Shape(1, 2, 1, 70, 30), Shape(1, 3, 3, 16, 16)]
SPARSE_SHAPES = [Shape(2, 4, 2, 300, 410), Shape(1, 2, 1, 330, 130)]  # several 64 x 64 layout blocks


def _run(path, shape, block=(16, 32), seed=0):
    spec = load_spec(path)
    if spec.sparsity is not None:  # the smallest layout blocks, so that the shapes have several
        spec = replace(spec, sparsity=replace(spec.sparsity, block=(64, 64)))
    c = compile_spec(spec, stop="tiling")
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, n, d: torch.randn(shape.batch, h, n, d, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = mk(shape.heads_q, shape.seq_q, spec.head_dim), mk(shape.heads_kv, shape.seq_k, spec.head_dim), \
        mk(shape.heads_kv, shape.seq_k, spec.head_dim_v)
    params, ref_kw, docs, keep = {}, {}, None, None
    if spec.score.alibi:
        params["alibi"] = ref_kw["alibi_slopes_"] = torch.rand(shape.heads_q, generator=g, dtype=torch.float64)
    if spec.score.temperature:
        ref_kw["temperature"] = (torch.rand(shape.heads_q, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
        params["temperature"] = ref_kw["temperature"].detach()
    if spec.mask.document:
        docs = ref_kw["documents"] = random_documents(shape, "cpu", g)
    if spec.sparsity is not None and spec.sparsity.runtime:  # broadcast over batch or heads by the seed
        n_b, n_h = (shape.batch, 1) if seed % 2 else (1, shape.heads_q)
        ref_kw["layout"] = torch.rand(n_b, n_h, -(-shape.seq_q // 64), -(-shape.seq_k // 64), generator=g) < 0.5
    if spec.dropout:
        keep = ref_kw["keep"] = torch.rand(shape.batch, shape.heads_q, shape.seq_q, shape.seq_k, generator=g) > spec.dropout
    ref_o, ref_lse = reference.attention(spec, q, k, v, **ref_kw)
    do = torch.randn(ref_o.shape, generator=g, dtype=torch.float64)
    ref_o.backward(do)
    kw = dict(block=block, params=params, documents=docs, layout=ref_kw.get("layout"), keep=keep, p_drop=spec.dropout)
    o, lse = interp.forward(c.kernel("fwd"), q.detach(), k.detach(), v.detach(), **kw)
    dq, dk, dv, pgrads = interp.backward(c.kernel("bwd_dkdv"), c.kernel("bwd_dq"), q.detach(), k.detach(), v.detach(),
                                         o, lse, do, **kw)
    got = {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    want = {"o": ref_o, "lse": ref_lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if spec.score.temperature:
        got["dtemperature"], want["dtemperature"] = pgrads["temperature"], ref_kw["temperature"].grad
    return got, want


def _max_errors(got, want):
    out = {}
    for name in got:
        a, b = got[name].detach(), want[name].detach()
        if name == "lse":  # rows with no visible key: both -inf
            assert torch.equal(torch.isneginf(a), torch.isneginf(b))
            a, b = a[torch.isfinite(b)], b[torch.isfinite(b)]
        out[name] = float((a - b).abs().max()) if a.numel() else 0.0
    return out


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_spec_ir_matches_reference(path):
    for i, shape in enumerate(SHAPES + SPARSE_SHAPES * ("sparsity:" in path.read_text())):
        errors = _max_errors(*_run(path, shape, seed=i))
        assert all(e < 1e-10 for e in errors.values()), (shape, errors)


def test_interpreter_catches_a_wrong_derivative(monkeypatch):
    """The test above can fail: softcap's vjp without its (1 - t^2) factor is caught in dQ and dK."""
    mod = SCORE_MODS[OpKind.SOFTCAP]
    monkeypatch.setitem(SCORE_MODS, OpKind.SOFTCAP, replace(mod, vjp_evaluate=lambda op, ds, s_in, env: (ds, {})))
    errors = _max_errors(*_run(ROOT / "specs" / "softcap.yaml", SHAPES[0]))
    assert errors["o"] < 1e-10 and errors["dq"] > 1e-3 and errors["dk"] > 1e-3


def test_interpreter_catches_an_unsound_loop_bound(tmp_path):
    """A mask plan whose closed-form bounds skip visible keys gives a wrong forward."""
    spec = load_spec(ROOT / "specs" / "causal.yaml")
    c = compile_spec(spec, stop="tiling")
    fwd = c.kernel("fwd")
    plan = fwd.attr("mask_plan")
    bad = fwd.with_attrs(mask_plan=replace(plan, kv_hi=plan.kv_hi - 20))  # stop 20 keys short
    q, k, v = (torch.randn(1, 1, 64, spec.head_dim, dtype=torch.float64) for _ in range(3))
    o, _ = interp.forward(fwd, q, k, v)
    o_bad, _ = interp.forward(bad, q, k, v)
    ref, _ = reference.attention(spec, q, k, v)
    assert (o - ref).abs().max() < 1e-12 and (o_bad - ref).abs().max() > 1e-3


def test_backward_ir_is_derived_from_the_forward():
    """Every score modifier of the forward has exactly one vjp op in each backward kernel, last first."""
    c = compile_spec(ROOT / "specs" / "temperature.yaml", stop="ir")
    chain = [o.kind.value for o in c.kernel("fwd").ops if o.kind in SCORE_MODS or o.kind is OpKind.MASK]
    for role in ("bwd_dkdv", "bwd_dq"):
        vjps = [o.attr("of") for o in c.kernel(role).ops if o.kind is OpKind.VJP]
        assert vjps == chain[::-1]
    acc = [o.attr("accumulates") for o in c.kernel("bwd_dq").ops if o.kind is OpKind.VJP and o.attr("accumulates")]
    assert acc == ["dtemperature"]  # only the dQ kernel sums the parameter's gradient


def test_codegen_refuses_an_op_without_a_renderer(monkeypatch):
    """A score modifier with no entry in attngen/ops.py cannot reach the templates unnoticed."""
    from attngen.codegen import FAMILY_KINDS
    from attngen.errors import IRError
    from attngen.ops import check_renderable

    c = compile_spec(ROOT / "specs" / "softcap.yaml", stop="ir")
    check_renderable(c.kernel("bwd_dq"), FAMILY_KINDS)
    monkeypatch.delitem(SCORE_MODS, OpKind.SOFTCAP)
    with pytest.raises(IRError, match="softcap"):
        check_renderable(c.kernel("bwd_dq"), FAMILY_KINDS)
