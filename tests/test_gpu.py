"""The GPU tier (skipped without CUDA): bf16, realistic sizes, determinism at scale.
Run on the device machine: python -m pytest tests/test_gpu.py"""

from pathlib import Path

import pytest
import torch

import attngen
from attngen import runtime
from attngen.spec import load_spec
from attngen.verify import Shape, check, format_table, random_documents

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent


def _inputs(spec, heads_q, heads_kv, nq, nk, seed):
    """bf16 q, k, v (requiring grad) and dO, batch 2, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h, n, d: torch.randn(2, h, n, d, generator=g, device="cuda").bfloat16()  # noqa: E731
    q, k, v = mk(heads_q, nq, spec.head_dim), mk(heads_kv, nk, spec.head_dim), mk(heads_kv, nk, spec.head_dim_v)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mk(heads_q, nq, spec.head_dim_v)


@pytest.mark.parametrize("name", ["gqa", "causal_dropout", "dilated", "softcap"])
def test_backward_bitwise_deterministic(name):
    path = ROOT / "specs" / f"{name}.yaml"
    spec, mod = load_spec(path), attngen.load(path)
    q, k, v, do = _inputs(spec, 16, 4, 2048, 2048, seed=0)
    runs = []
    for _ in range(3):
        q.grad = k.grad = v.grad = None
        mod.attention(q, k, v, dropout_seed=11).backward(do)
        runs.append([t.grad.clone() for t in (q, k, v)])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("name", ["causal", "sliding_window", "prefix_lm", "head_dim_96", "alibi", "document"])
def test_bf16_forward_and_backward(name):
    path = ROOT / "specs" / f"{name}.yaml"
    spec, mod = load_spec(path), attngen.load(path)
    results = [check(spec, mod, s, "bf16", "cuda", seed=i, backward=True)
               for i, s in enumerate([Shape(2, 8, 2, 1500, 2500), Shape(1, 4, 4, 4096, 1000, "bnhd")])]
    assert all(r.ok for r in results), format_table(results)


@pytest.mark.parametrize("name", ["causal", "dilated", "causal_dropout", "alibi", "document"])
def test_direct_launches_match_launches_through_triton_bitwise(name):
    """A signature's first call launches through Triton, later ones call the compiled kernels'
    launchers directly (runtime.launch.Plan.runner): the same outputs and gradients, bit for bit.
    The document spec gets ids as attngen.verify.random_documents draws them, as a pair of
    tensors: each call builds its own Documents, so the direct launches get new table tensors."""
    path = ROOT / "specs" / f"{name}.yaml"
    spec, mod = load_spec(path), attngen.load(path)
    rt = runtime.of(mod)
    assert rt.direct, "this GPU's Triton has no direct launch path"
    rt.plans.clear()
    q, k, v, do = _inputs(spec, 8, 2, 1000, 1500, seed=1)
    extra = {}
    if spec.mask.document:
        g = torch.Generator(device="cuda").manual_seed(2)
        extra["documents"] = random_documents(Shape(2, 8, 2, 1000, 1500), "cuda", g)
    runs = []
    for _ in range(3):
        q.grad = k.grad = v.grad = None
        o = mod.attention(q, k, v, dropout_seed=5, **extra)
        o.backward(do)
        runs.append([o.detach().clone()] + [t.grad.clone() for t in (q, k, v)])
        if not runs[1:]:
            assert all(plan.runner is not None for plan in rt.plans.values())  # the next calls are direct
    assert len(rt.plans) == 3
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


GLUON_MASKS = {"dense": "{}", "top_left": "{causal: {align: top_left}}"}


@pytest.mark.parametrize("name,options", [("head_dim_256", {}), ("head_dim_192", {"chunked_head_dims": False}),
                                          ("dense", {}), ("top_left", {})])
def test_the_gluon_dkdv_kernel_matches_the_reference_and_repeats_bitwise(name, options, tmp_path):
    """A spec compiled with gluon_dkdv takes the Gluon dK/dV kernel (runtime/gluon_dkdv.py) on sm90
    at head dims padded to 256: head_dim_256 and head_dim_192 unchunked (dv 128 below D), both
    causal bottom-right, and d256 with no mask or a top-left causal one: gradients against float64
    on GQA, Nq < Nk, Nq > Nk (rows that see nothing) and strided inputs; the same bits over
    repeated calls; close to the Triton kernel's."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel is for sm90")
    path = ROOT / "specs" / f"{name}.yaml"
    if name in GLUON_MASKS:
        path = tmp_path / f"gluon_{name}.yaml"
        path.write_text(f"name: gluon_{name}\ndescription: d256, {name}\nhead_dim: 256\ndtypes: [fp16, bf16]\n"
                        f"mask: {GLUON_MASKS[name]}\n")
    spec, mod = load_spec(path), attngen.load(path, gluon_dkdv=True, **options)
    rt = runtime.of(mod)
    results = [check(spec, mod, s, dt, "cuda", seed=i, backward=True) for dt in ("bf16", "fp16")
               for i, s in enumerate([Shape(2, 8, 2, 1500, 2500), Shape(1, 4, 4, 4096, 1000, "bnhd")])]
    assert rt.last_backward == "two kernels, dK/dV in Gluon"
    assert all(r.ok for r in results), format_table(results)
    q, k, v, do = _inputs(spec, 16, 4, 2048, 2048, seed=2)
    runs = []
    for gluon in (True, True, False):
        rt.gluon_dkdv = gluon
        q.grad = k.grad = v.grad = None
        mod.attention(q, k, v).backward(do)
        runs.append([t.grad.clone() for t in (q, k, v)])
    rt.gluon_dkdv = True
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    for a, b in zip(runs[0][1:], runs[2][1:]):  # dK, dV: Gluon against Triton, both bf16 roundings of fp32 sums
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()
