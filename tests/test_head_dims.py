"""Head dims 16 to 256 (and 192 with head_dim_v 128) have legal tilings on sm80 and sm90 for every
kernel in fp16 and bf16 (issue 16); past 128 the sm90 ranking uses the wgmma register estimate
(docs/decisions/head-dims-256.md), and fp32 gets a clear error rather than a spilling kernel."""

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
