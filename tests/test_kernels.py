"""Every shipped spec's kernel against the float64 reference, on the device at hand
(Triton's interpreter on CPU tensors when there is no GPU; bf16 only on the GPU)."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attngen
from attngen import reference, runtime
from attngen.runtime import launch, module as runtime_module
from attngen.spec import load_spec
from attngen.verify import CPU_SHAPES, GPU_SHAPES, Shape, check, format_table

ROOT = Path(__file__).resolve().parent.parent
# fa2 specs (NSA specs: tests/test_nsa.py)
SPECS = sorted(p for p in (ROOT / "specs").glob("*.yaml") if load_spec(p).nsa is None)


def _dtypes(device, spec):
    """The spec's dtypes that this device tests (bf16 only on a GPU: the interpreter's bf16 dot is wrong)."""
    return tuple(d for d in (("fp32", "fp16", "bf16") if device == "cuda" else ("fp32", "fp16")) if d in spec.dtypes)


@pytest.mark.interp
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_spec_matches_reference(path, device):
    spec = load_spec(path)
    module = attngen.load(path)
    shapes = CPU_SHAPES if device == "cpu" else GPU_SHAPES[:3]
    results = [check(spec, module, s, d, device, seed=i) for d in _dtypes(device, spec) for i, s in enumerate(shapes)]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])


@pytest.mark.interp
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_spec_gradients_match_reference(path, device):
    spec = load_spec(path)
    module = attngen.load(path)
    shapes = (CPU_SHAPES[0], CPU_SHAPES[1], CPU_SHAPES[4]) if device == "cpu" else GPU_SHAPES[4:6]
    results = [check(spec, module, s, d, device, seed=i, backward=True)
               for d in _dtypes(device, spec) for i, s in enumerate(shapes)]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])


RANDOM_SPECS = ["causal_bottom_right", "sliding_window", "prefix_lm", "chunked", "dilated", "alibi", "softcap"]


@pytest.mark.interp
@settings(max_examples=12, deadline=None, derandomize=True)
@given(spec=st.sampled_from(RANDOM_SPECS), nq=st.integers(1, 200), nk=st.integers(1, 200),
       group=st.sampled_from([1, 2, 3]), dtype=st.sampled_from(["fp32", "fp16"]), seed=st.integers(0, 2**16))
def test_random_shapes(spec, nq, nk, group, dtype, seed, device):
    path = ROOT / "specs" / f"{spec}.yaml"
    r = check(load_spec(path), attngen.load(path), Shape(1, 2 * group, 2, nq, nk), dtype, device, seed=seed,
              backward=seed % 2 == 0)
    assert r.ok, format_table([r])


def _inputs(spec, B, Hq, Hkv, Nq, Nk, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    mk = lambda h, n, d: torch.randn(B, h, n, d, generator=g).to(device, dtype)  # noqa: E731
    return mk(Hq, Nq, spec.head_dim), mk(Hkv, Nk, spec.head_dim), mk(Hkv, Nk, spec.head_dim_v)


@pytest.mark.interp
def test_fully_masked_rows_are_zero_with_lse_minus_inf(device):
    path = ROOT / "specs" / "causal_bottom_right.yaml"
    spec, mod = load_spec(path), attngen.load(path)
    q, k, v = _inputs(spec, 1, 2, 2, 50, 20, device=device)  # bottom-right, Nq > Nk: rows 0..29 see nothing
    o, lse = mod.attention(q, k, v, return_lse=True)
    assert torch.isneginf(lse[:, :, :30]).all() and (o[:, :, :30] == 0).all()
    assert torch.isfinite(lse[:, :, 30:]).all() and not o.isnan().any()


@pytest.mark.compiler
def test_empty_inputs(device):
    path = ROOT / "specs" / "dense.yaml"
    spec, mod = load_spec(path), attngen.load(path)
    q, k, v = _inputs(spec, 1, 2, 2, 5, 0, device=device)
    o, lse = mod.attention(q, k, v, return_lse=True)
    assert (o == 0).all() and torch.isneginf(lse).all() and o.shape == (1, 2, 5, 128)
    q, k, v = _inputs(spec, 1, 2, 2, 0, 7, device=device)
    assert mod.attention(q, k, v).shape == (1, 2, 0, 128)


@pytest.mark.interp
@pytest.mark.parametrize("name", ["causal_bottom_right", "gqa", "sliding_window"])
def test_every_output_element_is_written(name, device, monkeypatch):
    """Outputs and gradients are allocated without a fill: with every new buffer poisoned (NaN),
    the results must still match the reference: rows that see no key included (bottom-right with
    Nq > Nk, a window whose first keys no query sees), ragged tiles, GQA."""
    real = torch.empty_like, torch.empty

    def poisoned(make):
        def f(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return f
    monkeypatch.setattr(torch, "empty_like", poisoned(real[0]))
    monkeypatch.setattr(torch, "empty", poisoned(real[1]))
    path = ROOT / "specs" / f"{name}.yaml"
    spec, module = load_spec(path), attngen.load(path)
    shapes = [Shape(1, 4, 2 if name == "gqa" else 4, 70, 33), Shape(2, 2, 2, 45, 130)]
    results = [check(spec, module, s, "fp32", device, seed=i, backward=True) for i, s in enumerate(shapes)]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])


@pytest.mark.compiler
def test_wide_offsets_flag_tensors_whose_rows_reach_int32_limits():
    """Row x stride within one (batch, head) at or past 2^31 elements needs int64 addresses: e.g.
    a [B, N, H, D] view with H = 32, D = 128 past N = 512k. Shapes and strides only (meta tensors)."""
    view = lambda n, strides: torch.empty_strided((1, 32, n, 128), strides, device="meta")  # noqa: E731
    bnhd = lambda n: view(n, (n * 4096, 128, 4096, 1))  # noqa: E731
    assert not launch.wide_offsets(bnhd(2**19 - 1))
    assert launch.wide_offsets(bnhd(2**19 + 1))
    assert not launch.wide_offsets(view(2**23, (32 * 2**30, 2**30, 128, 1)))  # contiguous: 2^30 per head
    assert launch.wide_offsets(view(4096, (1, 1, 1, 2**25)))  # a column stride of 2^25: 127 x 2^25 + 4095
    assert not launch.wide_offsets(view(4096, (1, 1, 1, 2**24)))  # 127 x 2^24 + 4095 < 2^31
    assert not launch.wide_offsets(view(0, (0, 0, 4096, 1)))


@pytest.mark.interp
@pytest.mark.parametrize("name", ["causal_dropout", "gqa", "softcap"])
def test_int64_addressing_matches_reference(name, device, monkeypatch):
    """The kernels' int64 address path (taken only for tensors past 2^31 elements per head, too
    big to test here) on small shapes, forced: same results as the reference."""
    path = ROOT / "specs" / f"{name}.yaml"
    spec, module = load_spec(path), attngen.load(path)
    rt = runtime.of(module)
    launched = []
    real = rt._constexprs

    def spy(role, cfg, tma, wide, q):
        launched.append(wide)
        return real(role, cfg, tma, wide, q)
    monkeypatch.setattr(runtime_module, "wide_offsets", lambda *tensors: True)
    monkeypatch.setattr(rt, "_constexprs", spy)
    monkeypatch.setattr(rt, "plans", {})  # plans made before would not ask again
    shapes = (Shape(1, 4, 2, 45, 70), Shape(2, 2, 2, 70, 30, "bnhd"))
    results = [check(spec, module, s, d, device, seed=i, backward=True)
               for d in ("fp32", "fp16") for i, s in enumerate(shapes)]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])
    assert launched and all(launched)


@pytest.mark.interp
@pytest.mark.parametrize("name,seq", [("causal", 1024), ("alibi", 1024), ("alibi", 16384), ("head_dim_96", 16384),
                                      ("prefix_lm", 16384)])
def test_shape_bucket_tilings_match_reference(name, seq, device, monkeypatch):
    """A module with per-bucket tilings (PassOptions.shape_buckets), every call sent to one
    bucket's tilings (which differ from the nominal ones for these specs), on small shapes."""
    path = ROOT / "specs" / f"{name}.yaml"
    spec, module = load_spec(path), attngen.load(path, shape_buckets=True)
    assert any(key[2] == seq for key in module.BUCKET_TILINGS)
    monkeypatch.setattr(runtime.of(module), "bucket_seqs", (seq,))
    shapes = (CPU_SHAPES[0], CPU_SHAPES[4])
    results = [check(spec, module, s, d, device, seed=i, backward=True)
               for d in _dtypes(device, spec) for i, s in enumerate(shapes)]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])


@pytest.mark.interp
@pytest.mark.parametrize("name", ["dense", "alibi"])
def test_training_after_inference_mode(name, device, monkeypatch):
    """Tensors the module caches (argument placeholders, ALiBi slopes) first made under
    torch.inference_mode must not break a later training call: inference tensors cannot be saved
    for backward."""
    path = ROOT / "specs" / f"{name}.yaml"
    spec, module = load_spec(path), attngen.load(path)
    monkeypatch.setattr(runtime_module, "_PLACEHOLDERS", {})
    monkeypatch.setattr(runtime_module, "_SLOPES", {})
    q, k, v = _inputs(spec, 1, 2, 2, 20, 30, device=device)
    with torch.inference_mode():
        module.attention(q, k, v)
    qg = q.clone().requires_grad_()
    module.attention(qg, k, v).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


@pytest.mark.interp
def test_scale_override_and_default_alibi_slopes(device):
    path = ROOT / "specs" / "alibi.yaml"
    spec, mod = load_spec(path), attngen.load(path)
    q, k, v = _inputs(spec, 1, 3, 1, 40, 40, device=device)  # 3 heads: non-power-of-two slopes
    o = mod.attention(q, k, v, scale=0.3)
    ref, _ = reference.attention(spec, q, k, v, scale=0.3)
    assert (o.double() - ref).abs().max() < 1e-5


@pytest.mark.compiler  # refused before any launch
@pytest.mark.parametrize("slopes, match", [(torch.ones(3, device="meta"), "q's device"),
                                           (torch.ones(3, dtype=torch.int32), "floating-point"),
                                           (torch.ones(4), r"shape \[3\]")])
def test_per_head_parameters_are_checked_not_moved(slopes, match):
    path = ROOT / "specs" / "alibi.yaml"
    spec, mod = load_spec(path), attngen.load(path)
    q, k, v = _inputs(spec, 1, 3, 1, 8, 8, device="cpu")
    with pytest.raises(ValueError, match=match):
        mod.attention(q, k, v, alibi_slopes=slopes)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0], k, v), "4-d"),
    (lambda q, k, v: (q.half(), k, v), "one dtype"),
    (lambda q, k, v: (q[..., :32], k, v), "head_dim"),
    (lambda q, k, v: (q[:, :3], k[:, :2], v[:, :2]), "multiple"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "alike"),
    (lambda q, k, v: (q.expand(16385, 4, 8, 128), k.expand(16385, 2, 8, 128), v.expand(16385, 2, 8, 128)), "65535"),
])
@pytest.mark.compiler  # refused before any launch
def test_bad_inputs_get_clear_errors(bad, match):
    path = ROOT / "specs" / "dense.yaml"
    spec, mod = load_spec(path), attngen.load(path)
    q, k, v = _inputs(spec, 1, 4, 2, 8, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        mod.attention(*bad(q, k, v))


@pytest.mark.interp
def test_generated_module_in_repo_is_importable_and_runs(device):
    """Users import generated/<name>.py directly."""
    from attngen.loader import import_file

    mod = import_file(ROOT / "generated" / "sliding_window.py", "generated_sliding_window")
    spec = load_spec(ROOT / "specs" / "sliding_window.yaml")
    q, k, v = _inputs(spec, 1, 2, 1, 33, 300, device=device)
    ref, _ = reference.attention(spec, q, k, v)
    assert (mod.attention(q, k, v).double() - ref).abs().max() < 1e-5


TMA_SPECS = ["causal_bottom_right", "head_dim_96", "dilated", "softcap", "causal_dropout", "alibi"]


@pytest.mark.interp
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("name", TMA_SPECS)
def test_both_load_paths_match_reference(name, tma, device, monkeypatch):
    """Every kernel with its tiles loaded through TMA descriptors (ragged edges and padded head
    dims rely on the descriptors' zero fill) and through pointers (masked loads), whichever the
    cost model picked for the shipped module."""
    import contextlib
    from dataclasses import replace

    from attngen.exhaustive import tiling_of
    from attngen.pipeline import compile_spec

    path = ROOT / "specs" / f"{name}.yaml"
    spec, module, compiled = load_spec(path), attngen.load(path), compile_spec(path, stop="tiling")
    dtypes = ("fp16", "bf16") if device == "cuda" else ("fp16",)
    shapes = (CPU_SHAPES[0], CPU_SHAPES[1], CPU_SHAPES[4]) if device == "cpu" else GPU_SHAPES[4:6] + GPU_SHAPES[1:2]
    calls = []
    real = runtime_module.descriptors
    monkeypatch.setattr(runtime.of(module), "plans", {})  # plans made before would not ask again

    def spy(*args):
        out = real(*args)
        calls.append(out[1])
        return out
    monkeypatch.setattr(runtime_module, "descriptors", spy)
    with contextlib.ExitStack() as stack:
        for role in ("fwd", "bwd_dkdv", "bwd_dq"):
            for dtype in dtypes:
                cfg = replace(compiled.kernel(role).attr("tiling")[dtype], tma=tma)
                stack.enter_context(tiling_of(module, role, dtype, cfg))
        results = [check(spec, module, s, d, device, seed=i, backward=True)
                   for d in dtypes for i, s in enumerate(shapes)]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])
    assert calls and all(used == tma for used in calls)  # every launch took the path under test


@pytest.mark.interp
def test_tma_falls_back_to_pointers_for_misaligned_views(device):
    """A view whose base is not 16-byte aligned cannot be a TMA descriptor: the host takes the
    pointer path for that launch, and the result is still right."""
    path = ROOT / "specs" / "softcap.yaml"
    spec, module = load_spec(path), attngen.load(path)
    g = torch.Generator().manual_seed(3)
    big = lambda n: torch.randn(1, 2, n, spec.head_dim + 1, generator=g).to(device, torch.float16)  # noqa: E731
    q, k, v = big(40)[..., 1:], big(70)[..., 1:], big(70)[..., 1:]  # base offset by one element
    cfg = dict(runtime.of(module).config("fwd", "fp16", 40, 70), TMA=True)
    d, dv = cfg["HEAD_DIM_PAD"], cfg["HEAD_DIM_V_PAD"]
    blocks = {0: (cfg["BLOCK_M"], d), 1: (cfg["BLOCK_N"], d), 2: (cfg["BLOCK_N"], dv)}  # q, k, v (the forward's boxes)
    assert launch.descriptors(cfg, (q, k, v), blocks)[1] is False
    qa, ka, va = (t.contiguous() for t in (q, k, v))
    assert launch.descriptors(cfg, (qa, ka, va), blocks)[1] is True
    ref, _ = reference.attention(spec, q.double(), k.double(), v.double())
    assert (module.attention(q, k, v).double() - ref).abs().max() < 1e-2


@pytest.mark.interp
@pytest.mark.parametrize("expr", [
    "2 * kv_idx <= q_idx",  # its range bounds use floor(q_idx / 2); the mask itself has no `//`
    "2 * kv_idx < min(40, (q_idx + q_idx))",  # sympy drops a floor: Min(40, 2*q_idx)/2 - 1
    "min(kv_idx, 30) % 7 != 2 and abs(q_idx - kv_idx) < 50",  # a tile table: the host evaluates min, %, abs
])
def test_masks_whose_bounds_or_host_code_need_helpers(tmp_path, expr, device):
    """Masks whose compiled bounds use integer division the mask text does not, or whose tile
    table's host code applies min, max, % or abs to Python ints as well as tensors."""
    path = tmp_path / "helpers.yaml"
    path.write_text(f'name: helpers\nhead_dim: 16\nmask:\n  expr: "{expr}"\n')
    spec, module = load_spec(path), attngen.load(path)
    results = [check(spec, module, s, "fp32", device, seed=i, backward=True)
               for i, s in enumerate([Shape(1, 2, 1, 100, 100), Shape(2, 1, 1, 70, 130)])]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])


SINGLE_PASS_SPECS = ["causal", "document", "causal_dropout", "softcap", "alibi", "dilated", "head_dim_96", "gqa"]


@pytest.mark.interp
@pytest.mark.parametrize("name", SINGLE_PASS_SPECS)
def test_single_pass_backward_matches_reference(name, device):
    """deterministic=False: one dK/dV kernel adding dQ with atomics (and the delta kernel before it),
    against the float64 reference; ragged shapes, GQA, strided inputs, rows with no visible key."""
    path = ROOT / "specs" / f"{name}.yaml"
    spec, module = load_spec(path), attngen.load(path)
    shapes = (CPU_SHAPES[0], CPU_SHAPES[1], CPU_SHAPES[4]) if device == "cpu" else GPU_SHAPES[4:6]
    results = [check(spec, module, s, d, device, seed=i, backward=True, deterministic=False)
               for d in _dtypes(device, spec)[:1] for i, s in enumerate(shapes)]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])
    assert all(r.spec.endswith("(single pass)") for r in results)


@pytest.mark.interp
def test_single_pass_backward_of_packed_sequences(device):
    from attngen.verify import CPU_PACKED, check_varlen

    path = ROOT / "specs" / "document.yaml"
    spec, module = load_spec(path), attngen.load(path)
    results = [check_varlen(spec, module, c, "fp32", device, seed=i, backward=True, deterministic=False)
               for i, c in enumerate(CPU_PACKED[:2])]
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])


@pytest.mark.interp
def test_a_learnable_head_parameter_keeps_the_two_kernel_backward(device):
    """The dQ kernel sums dtemperature: deterministic=False still runs the two kernels."""
    path = ROOT / "specs" / "temperature.yaml"
    spec, module = load_spec(path), attngen.load(path)
    q, k, v = (t.requires_grad_() for t in _inputs(spec, 1, 2, 1, 20, 30, device=device))
    temperature = torch.ones(2, device=device, requires_grad=True)
    module.attention(q, k, v, temperature=temperature, deterministic=False).sum().backward()
    assert runtime.of(module).last_backward == "two kernels" and temperature.grad is not None


@pytest.mark.interp
def test_single_pass_that_does_not_fit_falls_back_to_two_kernels(device, monkeypatch):
    """A tiling whose single-pass variant overflows shared memory (d192 on the H100) runs the two
    kernels instead, and is remembered."""
    from triton.runtime.errors import OutOfResources

    module = attngen.load(ROOT / "specs" / "causal.yaml")
    rt = runtime.of(module)
    launch_ = rt._launch

    def launch(role, tensors, scalars, seed, flags, *args, **kw):
        if role == "bwd_dkdv" and flags[0]:
            raise OutOfResources(263192, 232448, "shared memory")
        return launch_(role, tensors, scalars, seed, flags, *args, **kw)

    monkeypatch.setattr(rt, "_launch", launch)
    monkeypatch.setattr(rt, "_no_single_pass", set())
    spec = load_spec(ROOT / "specs" / "causal.yaml")
    q, k, v = _inputs(spec, 1, 2, 1, 40, 70, device=device)
    grads = []
    for det in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        module.attention(*leaves, deterministic=det).sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and len(rt._no_single_pass) == 1


@pytest.mark.interp
def test_the_backward_form_follows_the_cost_models_choice(device, monkeypatch):
    """With the module's default None, deterministic=None takes the form BACKWARD_FORMS names for the
    ranked length nearest the call's; True and False override it; the module's default (True as
    shipped) applies to deterministic=None."""
    module = attngen.load(ROOT / "specs" / "causal.yaml")
    rt = runtime.of(module)
    assert rt.deterministic is True
    monkeypatch.setattr(rt, "deterministic", None)
    monkeypatch.setattr(rt, "backward_forms", {"fp32": ((64, "single pass"), (1024, "two kernels")),
                                               "fp16": ((64, "single pass"), (1024, "two kernels"))})
    assert rt.single_pass("fp32", 40, 70) and not rt.single_pass("fp32", 700, 900)
    assert not rt.single_pass("fp32", 40, 70, deterministic=True) and rt.single_pass("fp32", 700, 900, False)
    assert not rt.single_pass("bf16", 40, 70)  # no forms for the dtype: the two kernels
    spec = load_spec(ROOT / "specs" / "causal.yaml")
    q, k, v = _inputs(spec, 1, 2, 1, 40, 70, device=device)
    ran = []
    for det_default, det in ((None, None), (None, True), (True, None), (True, False)):
        monkeypatch.setattr(rt, "deterministic", det_default)
        module.attention(*(t.clone().requires_grad_() for t in (q, k, v)), deterministic=det).sum().backward()
        ran.append(rt.last_backward)
    assert ran == ["single pass", "two kernels", "two kernels", "single pass"]


@pytest.mark.compiler
def test_show_tiling_names_the_backward_form():
    from attngen.pipeline import emit

    text = emit(ROOT / "specs" / "causal.yaml", "tiling")
    assert "// bwd_single, bf16" in text
    forms = text.split("// the backward's form (deterministic=None), per dtype at each ranked length\n")[1]
    # as measured on the H100 for bf16 (docs/decisions/single-pass-backward.md); fp32's is predicted
    assert forms.splitlines()[:3] == ["fp16: 4096: two kernels, 1024: two kernels, 16384: two kernels",
                                      "bf16: 4096: two kernels, 1024: two kernels, 16384: two kernels",
                                      "fp32: 4096: single pass, 1024: single pass, 16384: single pass"]
