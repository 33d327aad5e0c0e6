"""The tile IR: the verifier rejects broken kernels naming the offending op; print_ir does not
depend on the spec file's location and shows what the passes decided."""

from __future__ import annotations

import re
import shutil
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import networkx as nx
import pytest

from attngen.errors import IRError
from attngen.ir import REQUIRED, Kernel, Op, OpKind, Region, graph, print_ir, verify
from attngen.lower import lower, lower_backward
from attngen.passes import PassOptions, Tilings, run_passes
from attngen.spec import load_spec
from attngen.tiling import MAX_CHUNKS, TileConfig, chunk_width, chunks

pytestmark = pytest.mark.compiler

# REQUIRED is the forward kernel's required kinds (a dict keyed by kernel role once backward kernels exist)
FWD_REQUIRED = tuple(REQUIRED["fwd"] if isinstance(REQUIRED, dict) else REQUIRED)
LOOP = Region.KV_LOOP.value  # the loop region's name in messages

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"
SHIPPED = sorted(SPECS_DIR.glob("*.yaml"))
# the tiling pass ranks a `tiles` plan slowly (seconds), so pass-level tests use range/dense specs
FAST_PASS_SPECS = ["causal", "causal_bottom_right", "dense", "sliding_window", "softcap", "prefix_lm",
                   "alibi", "head_dim_96", "chunked"]


@pytest.fixture(scope="module")
def causal() -> Kernel:
    return lower(load_spec(SPECS_DIR / "causal.yaml"))


@pytest.fixture(scope="module")
def softcap_passed() -> Kernel:
    return run_passes(lower(load_spec(SPECS_DIR / "softcap.yaml")), PassOptions())


def ops_of(kernel: Kernel) -> dict[str, Op]:
    return {o.name: o for o in kernel.ops}


def with_ops(kernel: Kernel, ops) -> Kernel:
    return replace(kernel, ops=tuple(ops))


def edit_op(kernel: Kernel, name: str, **changes) -> Kernel:
    return with_ops(kernel, (replace(o, **changes) if o.name == name else o for o in kernel.ops))


def ir_error(kernel: Kernel, *fragments: str) -> str:
    with pytest.raises(IRError) as info:
        verify(kernel)
    msg = str(info.value)
    assert msg.startswith(f"{kernel.name}: "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


# ------------------------------------------------------------------ well-formed kernels

@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_lowered_shipped_specs_verify(path: Path):
    spec = load_spec(path)
    kernel = lower(spec)
    assert verify(kernel) is kernel
    assert kernel.name == f"{spec.name}_fwd"
    assert kernel.attr("head_dim") == spec.head_dim and kernel.attr("head_dim_v") == spec.head_dim_v
    kinds = [o.kind for o in kernel.ops]
    assert all(kinds.count(k) == 1 for k in FWD_REQUIRED)
    assert kernel.has(OpKind.MASK) == (not spec.mask.is_dense or spec.sparsity is not None)
    assert kernel.has(OpKind.SOFTCAP) == (spec.score.softcap is not None)
    assert kernel.has(OpKind.ALIBI) == spec.score.alibi
    # regions appear in order prologue, kv_loop, epilogue
    regions = [o.region for o in kernel.ops]
    order = [Region.PROLOGUE, Region.KV_LOOP, Region.EPILOGUE]
    assert regions == sorted(regions, key=order.index)
    g = graph(kernel)
    assert nx.is_directed_acyclic_graph(g) and set(g.nodes) == {o.name for o in kernel.ops}


def test_score_modifiers_chain_in_order():
    kernel = lower(load_spec(SPECS_DIR / "softcap.yaml"))
    chain = [o.kind for o in kernel.ops if o.kind in (OpKind.QK, OpKind.SCALE, OpKind.SOFTCAP, OpKind.MASK,
                                                      OpKind.ONLINE_SOFTMAX)]
    assert chain == [OpKind.QK, OpKind.SCALE, OpKind.SOFTCAP, OpKind.MASK, OpKind.ONLINE_SOFTMAX]
    ops = ops_of(kernel)
    assert ops["s2"].inputs == ("s1",) and ops["s3"].inputs == ("s2",) and ops["p"].inputs == ("s3",)


def test_nodes_are_frozen(causal: Kernel):
    with pytest.raises(FrozenInstanceError):
        causal.ops[0].name = "x"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        causal.name = "x"  # type: ignore[misc]


# ------------------------------------------------------------------ broken kernels

def test_undefined_input(causal: Kernel):
    bad = edit_op(causal, "s", inputs=("q", "nope"))
    ir_error(bad, "%s (qk) uses %nope, which no op defines")


def test_use_before_definition(causal: Kernel):
    ops = list(causal.ops)
    names = [o.name for o in ops]
    i, j = names.index("p"), names.index("acc")
    ops[i], ops[j] = ops[j], ops[i]  # pv now comes before the online_softmax it reads
    ir_error(with_ops(causal, ops), "%acc (pv) uses %p before it is defined")


@pytest.mark.parametrize("victim, clash", [("v", "k"), ("store_lse", "o"), ("s1", "s")])
def test_duplicate_op_name(causal: Kernel, victim: str, clash: str):
    bad = with_ops(causal, (replace(o, name=clash) if o.name == victim else o for o in causal.ops))
    ir_error(bad, f"%{clash} is defined twice")


def test_missing_pv_without_rewiring_names_the_consumer(causal: Kernel):
    bad = with_ops(causal, (o for o in causal.ops if o.kind is not OpKind.PV))
    ir_error(bad, "%o (normalize) uses %acc, which no op defines")


@pytest.mark.parametrize("kind", FWD_REQUIRED, ids=lambda k: k.value)
def test_missing_required_op(causal: Kernel, kind: OpKind):
    """Remove the op and rewire its consumers to its first input, so only the absence is wrong."""
    gone = causal.op(kind)
    stand_in = gone.inputs[:1]
    ops = []
    for o in causal.ops:
        if o is gone:
            continue
        inputs = tuple(x for i in o.inputs for x in (stand_in if i == gone.name else (i,)))
        ops.append(replace(o, inputs=tuple(dict.fromkeys(inputs))))
    ir_error(with_ops(causal, ops), f"expected exactly one {kind.value} op, found 0")


def test_duplicate_required_op(causal: Kernel):
    ops = list(causal.ops)
    i = [o.kind for o in ops].index(OpKind.PV)
    ops.insert(i + 1, replace(ops[i], name="acc2"))
    ir_error(with_ops(causal, ops), "expected exactly one pv op, found 2")


def test_loop_op_used_by_prologue(causal: Kernel):
    ops = ops_of(causal)
    reordered = [ops["k"], replace(ops["q"], inputs=("k",))] + [o for o in causal.ops if o.name not in ("q", "k")]
    ir_error(with_ops(causal, reordered), f"%q in prologue uses %k from the later region {LOOP}")


def test_epilogue_op_used_by_loop(causal: Kernel):
    late = Op("late", OpKind.ALIBI, ("o",))  # an alibi op (a loop op) reading the normalized output
    assert late.region is Region.KV_LOOP
    ir_error(with_ops(causal, [*causal.ops, late]), f"%late in {LOOP} uses %o from the later region epilogue")


def test_cycle(causal: Kernel):
    # qk reads online_softmax, which (through scale and mask) reads qk
    bad = edit_op(causal, "s", inputs=("q", "k", "p"))
    msg = ir_error(bad, "%s ")
    assert "%p" in msg
    assert not nx.is_directed_acyclic_graph(graph(bad))


def test_self_loop(causal: Kernel):
    bad = edit_op(causal, "s1", inputs=("s1",))
    ir_error(bad, "the op graph has a cycle: %s1")
    assert not nx.is_directed_acyclic_graph(graph(bad))


def test_mask_op_without_plan(softcap_passed: Kernel):
    mask = softcap_passed.op(OpKind.MASK)
    assert mask.attr("plan") == "range"
    bad = edit_op(softcap_passed, mask.name, attrs=tuple((k, v) for k, v in mask.attrs if k != "plan"))
    ir_error(bad, f"%{mask.name} has no plan although the kernel has one")


def test_ops_must_be_grouped_by_region(causal: Kernel):
    ops = list(causal.ops)
    ops.insert(2, ops.pop(0))  # k, v, q, s, ...: q (prologue) now sits between loop ops
    assert print_ir(with_ops(causal, ops)).count("kv_loop {") == 2
    ir_error(with_ops(causal, ops), "%q")


# ------------------------------------------------------------------ tiling attrs

def tilings(block_m=64, block_n=64, head_dim_pad=128, head_dim_v_pad=128) -> Tilings:
    good = TileConfig(128, 64, 8, 2, 128, 128)
    bad = TileConfig(block_m, block_n, 4, 2, head_dim_pad, head_dim_v_pad)
    return Tilings("sm90", (("fp16", good), ("bf16", bad)))


def test_valid_tiling_verifies(softcap_passed: Kernel):
    kernel = softcap_passed.with_attrs(tiling=tilings())
    assert verify(kernel) is kernel
    assert "BLOCK_M=64 BLOCK_N=64" in print_ir(kernel)


@pytest.mark.parametrize("dim, value", [("block_m", 96), ("block_m", 48), ("block_m", 3),
                                        ("block_n", 80), ("head_dim_pad", 0), ("head_dim_v_pad", 160),
                                        ("head_dim_v_pad", 192)])
def test_tiling_dims_must_be_powers_of_two(softcap_passed: Kernel, dim: str, value: int):
    kernel = softcap_passed.with_attrs(tiling=tilings(**{dim: value}))
    ir_error(kernel, f"tiling.{dim} = {value} is not a positive power of two")


def test_a_head_dim_may_pad_to_a_few_equal_chunks(softcap_passed: Kernel):
    """The kernels load q and k (and dQ, dK) in power-of-two column chunks (tiling.pad_chunked):
    192 = 3 x 64 is a legal padding for every role; 320 is too many chunks, 208 too narrow ones, 384
    past the head dim's next power of two."""
    padded = lambda pad: Tilings("sm90", (("bf16", TileConfig(64, 64, 4, 2, pad, 128)),))  # noqa: E731
    for kernel in (softcap_passed, *lower_backward(load_spec(SPECS_DIR / "softcap.yaml"))):
        d192 = kernel.with_attrs(head_dim=192, bucket_tilings=None)
        assert verify(d192.with_attrs(tiling=padded(192))) is not None
        for bad in (320, 208, 384):
            ir_error(d192.with_attrs(tiling=padded(bad)), f"tiling.head_dim_pad = {bad} is neither a power of two "
                                                          f"nor at most 4 equal power-of-two chunks")


def test_padded_head_dim_smaller_than_head_dim(softcap_passed: Kernel):
    assert softcap_passed.attr("head_dim") == 128
    ir_error(softcap_passed.with_attrs(tiling=tilings(head_dim_pad=64)), "padded head dims 64/128")


def test_zero_block_m_is_rejected(softcap_passed: Kernel):
    ir_error(softcap_passed.with_attrs(tiling=tilings(block_m=0)), "tiling.block_m = 0")


# ------------------------------------------------------------------ print_ir

def test_print_ir_shape(causal: Kernel):
    text = print_ir(causal)
    lines = text.splitlines()
    assert text.endswith("}\n") and lines[0] == "kernel causal_fwd {" and lines[-1] == "}"
    assert lines.count("  kv_loop {") == 1
    assert "  %q = load_q() {head_dim=128}" in lines
    assert "    %s = qk(%q, %k)" in lines  # loop ops indented inside the loop
    assert "    %s2 = mask(%s1) {cond=kv_idx <= q_idx}" in lines
    assert "  %o = normalize(%acc, %p)" in lines
    assert "  attr spec = causal" in lines
    loop = lines.index("  kv_loop {")
    close = lines.index("  }", loop)
    assert all(line.startswith("    %") for line in lines[loop + 1:close])


@pytest.mark.parametrize("name", FAST_PASS_SPECS)
def test_print_ir_does_not_depend_on_where_the_spec_file_lives(name: str, tmp_path: Path):
    """Two independent compilations, of the spec and of a copy elsewhere, print the same IR
    before and after the passes."""
    original = SPECS_DIR / f"{name}.yaml"
    copy = tmp_path / "elsewhere" / f"{name}.yaml"
    copy.parent.mkdir()
    shutil.copy(original, copy)
    ka, kb = lower(load_spec(original)), lower(load_spec(copy))
    assert print_ir(ka) == print_ir(kb)
    assert "kv_loop {" in print_ir(ka)
    assert print_ir(run_passes(ka, PassOptions())) == print_ir(run_passes(kb, PassOptions()))


@pytest.mark.parametrize("name", FAST_PASS_SPECS)
def test_print_ir_after_passes_shows_plan_and_tiling(name: str):
    kernel = lower(load_spec(SPECS_DIR / f"{name}.yaml"))
    before = print_ir(kernel)
    assert "attr mask_plan" not in before and "attr tiling" not in before
    passed = run_passes(kernel, PassOptions())
    text = print_ir(passed)
    plan = re.search(r"^  attr mask_plan = (\w+): ", text, re.M)
    assert plan, text
    assert plan.group(1) == ("dense" if name == "dense" else "range")
    tiling = re.search(r"^  attr tiling = sm90: (.*)$", text, re.M)
    assert tiling, text
    for dtype in passed.attr("dtypes").split(","):
        assert re.search(rf"{dtype}: BLOCK_M=\d+ BLOCK_N=\d+ num_warps=\d+ num_stages=\d+ "
                         rf"head_dim_pad=\d+ head_dim_v_pad=\d+", tiling.group(1))
    if passed.has(OpKind.MASK):
        assert f"plan={plan.group(1)}" in text
    # attrs print sorted, so the passes' additions slot in deterministically
    keys = re.findall(r"^  attr (\w+) = ", text, re.M)
    assert keys == sorted(keys)
    # the chosen tiles satisfy the verifier's invariants
    for cfg in passed.attr("tiling"):
        for dim in (cfg.block_m, cfg.block_n, cfg.head_dim_v_pad, chunk_width(cfg.head_dim_pad)):
            assert dim > 0 and dim & (dim - 1) == 0
        assert chunks(cfg.head_dim_pad) <= MAX_CHUNKS  # the forward loads D in chunks (tiling.pad_chunked)
        assert cfg.head_dim_pad >= passed.attr("head_dim") and cfg.head_dim_v_pad >= passed.attr("head_dim_v")


def test_passes_do_not_mutate_their_input(causal: Kernel):
    before = print_ir(causal)
    run_passes(causal, PassOptions())
    assert print_ir(causal) == before
