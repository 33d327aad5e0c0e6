"""Head dims 16 to 256 (and 192 with head_dim_v 128) have legal tilings on sm80 and sm90 for every
kernel in fp16 and bf16 (issue 16); past 128 the sm90 ranking uses the wgmma register estimate
(docs/decisions/head-dims-256.md), and fp32 gets a clear error rather than a spilling kernel."""

import inspect

import pytest

from attngen.cost_model import TARGETS, Workload, rank
from attngen.errors import TilingError
from attngen.mask_analysis import MaskPlan, PlanKind
from attngen.runtime.roles import ROLES

DIMS = [(d, d) for d in range(16, 257, 8)] + [(192, 128), (256, 128), (72, 72), (80, 80)]


@pytest.mark.compiler
@pytest.mark.parametrize("target", ["sm90", "sm80"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_every_head_dim_to_256_has_a_tiling_for_every_kernel(target, dtype):
    missing = [(d, dv, role) for d, dv in DIMS for role in ("fwd", "bwd_dq", "bwd_dkdv")
               if not rank(d, dv, MaskPlan(PlanKind.DENSE, None, transposed=ROLES[role].transposed),
                           TARGETS[target], Workload(dtype=dtype), role).ranked]
    assert not missing, missing


@pytest.mark.compiler
def test_the_wgmma_estimate_is_a_fallback_it_leaves_head_dim_64_picks_alone():
    """At d64 mma.sync's estimate admits tilings, so the measured picks stay (128x128 dQ on 8 warps,
    which the wgmma estimate would admit, timed slower)."""
    plan = MaskPlan(PlanKind.DENSE, None)
    best = rank(64, 64, plan, TARGETS["sm90"], Workload(dtype="bf16"), "bwd_dq").best
    assert (best.block_m, best.block_n) != (128, 128) or best.num_warps != 8


@pytest.mark.compiler
def test_a_spec_with_no_legal_tiling_names_the_kernel_and_the_fix(tmp_path):
    from attngen.passes import PassOptions
    from attngen.pipeline import compile_spec

    path = tmp_path / "wide.yaml"
    path.write_text("name: wide\nhead_dim: 256\nmask:\n  causal: true\n")
    with pytest.raises(TilingError, match=r"bwd_dq kernel at head_dim 256 in fp32.*dtypes: \[fp16, bf16\]"):
        compile_spec(path, options=PassOptions(target="sm90"), stop="triton")


@pytest.mark.compiler
def test_a_contracting_head_dim_pads_to_a_few_equal_power_of_two_chunks():
    from attngen.tiling import MAX_CHUNKS, chunk_width, chunks, pad_chunked

    assert [pad_chunked(d) for d in (64, 72, 80, 96, 128, 160, 192, 200, 256)] == [64, 96, 96, 96, 128, 192, 192, 256, 256]
    for d in range(16, 257, 8):
        pad = pad_chunked(d)
        assert d <= pad <= max(16, 1 << (d - 1).bit_length())  # never more than the power of two
        assert chunk_width(pad) >= 16 and chunks(pad) <= MAX_CHUNKS and pad % chunk_width(pad) == 0


@pytest.mark.compiler
def test_every_kernel_pads_by_chunks_unless_the_option_is_off():
    from attngen.passes import PassOptions
    from attngen.pipeline import compile_spec
    from attngen.resources import resolve_spec

    off = compile_spec(resolve_spec("head_dim_192"), options=PassOptions(chunked_head_dims=False), stop="tiling")
    on = compile_spec(resolve_spec("head_dim_192"), options=PassOptions(), stop="tiling")
    for role in ("fwd", "bwd_dq", "bwd_dkdv"):
        assert {c.head_dim_pad for c in off.kernel(role).attr("tiling")} == {256}
        assert {c.head_dim_pad for c in on.kernel(role).attr("tiling")} == {192}
        # less work: the model's time drops with a quarter less of each product over D
        assert on.rankings[role]["bf16"].ranked[0].time_s < off.rankings[role]["bf16"].ranked[0].time_s
    assert {v.tiling["bf16"].head_dim_pad for v in on.kernel("bwd_dkdv").attr("variants").items} == {192}


@pytest.mark.interp
@pytest.mark.parametrize("name,chunked", [("head_dim_192", True), ("head_dim_96", True), ("head_dim_96", False)])
def test_the_chunked_forward_matches_the_reference(name, chunked, device):
    """q and k loaded in three column chunks (192 = 3 x 64, 96 = 3 x 32; the default), QK^T summed
    over them, dQ and dK accumulated and stored per chunk: the forward, its LSE and the gradients of
    both backward forms (the single pass adds dQ chunk by chunk) against float64, in every dtype the
    device tests (fp16 through TMA descriptors in chunk-wide boxes), on ragged Nq != Nk shapes with
    fully masked rows (bottom-right causal, more queries than keys); and with the option off, the
    head dim padded to the next power of two."""
    import attngen
    from attngen import runtime
    from attngen.resources import resolve_spec
    from attngen.spec import load_spec
    from attngen.verify import CPU_SHAPES, check, format_table

    path = resolve_spec(name)
    spec, module = load_spec(path), attngen.load(path, **({} if chunked else {"chunked_head_dims": False}))
    assert ("q2 = _tile_at(Q" in inspect.getsource(module)) == chunked  # the chunked code, or the padded one
    dtypes = [d for d in (("fp32", "fp16", "bf16") if device == "cuda" else ("fp32", "fp16")) if d in spec.dtypes]
    results = [check(spec, module, s, d, device, seed=i, backward=True, deterministic=det)
               for det in (True, False) for d in dtypes for i, s in enumerate((CPU_SHAPES[1], CPU_SHAPES[4]))]
    assert runtime.of(module).last_backward == "single pass"  # the last calls' form: it fits, no fallback
    assert all(r.ok for r in results), format_table([r for r in results if not r.ok])
