"""The `sparsity:` section: parsed and validated (errors name the field), round-tripped, and the
runtime's block layouts (attngen/runtime/layouts.py) agree with the reference's element mask."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from attngen import reference
from attngen.errors import SpecError
from attngen.runtime.block_mask import BlockMask
from attngen.runtime.layouts import static_layout
from attngen.spec import Sparsity, load_spec, parse_spec

pytestmark = pytest.mark.compiler

BASE = {"name": "t", "head_dim": 64}


def spec_with(sparsity, mask=None):
    data = dict(BASE, sparsity=sparsity)
    if mask is not None:
        data["mask"] = mask
    return parse_spec(data, "s.yaml")


# ------------------------------------------------------------------ parsing

def test_full_section(tmp_path: Path):
    path = tmp_path / "bigbird.yaml"
    path.write_text(textwrap.dedent("""\
        name: bigbird
        head_dim: 64
        sparsity:
          block: [128, 64]
          local: 2
          global: 1
          stride: 8
          random: {blocks: 3, seed: 7}
          layout: runtime
        """))
    sp = load_spec(path).sparsity
    assert sp == Sparsity(block=(128, 64), local_left=2, local_right=2, global_blocks=1, stride=8,
                          random_blocks=3, random_seed=7, runtime=True)
    assert sp.has_local and sp.is_static


@pytest.mark.parametrize("section, expected", [
    ({"block": [64, 64], "local": {"left": 2, "right": 0}}, Sparsity((64, 64), 2, 0)),
    ({"block": [64, 128], "local": {"left": None, "right": 0}}, Sparsity((64, 128), None, 0)),
    ({"block": [64, 64], "local": {"right": 1}}, Sparsity((64, 64), None, 1)),  # a missing side is unbounded
    ({"block": [64, 64], "global": 2}, Sparsity((64, 64), None, None, global_blocks=2)),
    ({"block": [64, 64], "stride": 4}, Sparsity((64, 64), None, None, stride=4)),
    ({"block": [64, 64], "random": {"blocks": 2}}, Sparsity((64, 64), None, None, random_blocks=2)),
    ({"block": [64, 64], "layout": "runtime"}, Sparsity((64, 64), None, None, runtime=True)),
    ({"block": [64, 64], "local": 0, "global": None}, Sparsity((64, 64), 0, 0)),  # null = absent
])
def test_accepted_sections(section, expected):
    sp = spec_with(section).sparsity
    assert sp == expected
    assert sp.is_static == (expected.runtime is False)


def test_no_section_is_none():
    spec = parse_spec(BASE)
    assert spec.sparsity is None
    assert "sparsity" not in spec.to_dict()  # generated modules of older specs are unchanged
    assert parse_spec(dict(BASE, sparsity=None)).sparsity is None


@pytest.mark.parametrize("section, field, fragments", [
    ([1], "sparsity", ["expected a mapping, got [1]"]),
    ({"local": 1}, "sparsity.block", ["required field is missing", "power of two >= 64"]),
    ({"block": 128, "local": 1}, "sparsity.block", ["[query block, key block]", "power of two >= 64", "got 128"]),
    ({"block": [128], "local": 1}, "sparsity.block", ["got [128]"]),
    ({"block": [128, 128, 128], "local": 1}, "sparsity.block", ["got [128, 128, 128]"]),
    ({"block": [32, 128], "local": 1}, "sparsity.block", ["power of two >= 64", "got [32, 128]"]),
    ({"block": [128, 96], "local": 1}, "sparsity.block", ["power of two", "got [128, 96]"]),
    ({"block": [128, True], "local": 1}, "sparsity.block", ["got [128, True]"]),
    ({"block": [128, 64.0], "local": 1}, "sparsity.block", ["got [128, 64.0]"]),
    ({"block": [64, 64]}, "sparsity", ["needs at least one of local, global, stride, random, layout"]),
    ({"block": [64, 64], "dilation": 2}, "sparsity.dilation",
     ["unknown field; allowed here: block, local, global, stride, random, layout"]),
    ({"block": [64, 64], "local": -1}, "sparsity.local", ["a non-negative integer", "{left, right}", "got -1"]),
    ({"block": [64, 64], "local": "2"}, "sparsity.local", ["got '2'"]),
    ({"block": [64, 64], "local": True}, "sparsity.local", ["got True"]),
    ({"block": [64, 64], "local": {}}, "sparsity.local", ["needs `left` or `right`", "leave `local` out"]),
    ({"block": [64, 64], "local": {"left": None, "right": None}}, "sparsity.local", ["needs `left` or `right`"]),
    ({"block": [64, 64], "local": {"left": -2}}, "sparsity.local.left", ["expected a non-negative integer, got -2"]),
    ({"block": [64, 64], "local": {"right": 1.5}}, "sparsity.local.right", ["expected an integer, got 1.5"]),
    ({"block": [64, 64], "local": {"left": 1, "size": 2}}, "sparsity.local.size",
     ["unknown field; allowed here: left, right"]),
    ({"block": [64, 64], "global": 0}, "sparsity.global", ["expected an integer >= 1, got 0"]),
    ({"block": [64, 64], "global": "1"}, "sparsity.global", ["expected an integer, got '1'"]),
    ({"block": [64, 64], "stride": 1}, "sparsity.stride", ["expected an integer >= 2, got 1"]),
    ({"block": [64, 64], "stride": 2.0}, "sparsity.stride", ["expected an integer, got 2.0"]),
    ({"block": [64, 64], "random": 3}, "sparsity.random", ["expected a mapping, got 3"]),
    ({"block": [64, 64], "random": {"seed": 1}}, "sparsity.random.blocks", ["required field is missing"]),
    ({"block": [64, 64], "random": {"blocks": 0}}, "sparsity.random.blocks", ["expected an integer >= 1, got 0"]),
    ({"block": [64, 64], "random": {"blocks": 1, "seed": -1}}, "sparsity.random.seed",
     ["expected an integer from 0 to", "got -1"]),
    ({"block": [64, 64], "random": {"blocks": 1, "sed": 1}}, "sparsity.random.sed",
     ["unknown field; allowed here: blocks, seed"]),
    ({"block": [64, 64], "layout": "static"}, "sparsity.layout", ["expected `runtime`", "got 'static'"]),
    ({"block": [64, 64], "layout": True}, "sparsity.layout", ["expected a string, got True"]),
])
def test_bad_section(tmp_path: Path, section, field: str, fragments: list[str]):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(dict(BASE, sparsity=section)))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    e, msg = info.value, str(info.value)
    assert e.source == str(path) and e.field == field, msg
    assert msg.startswith(f"{path}: {field}: "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize("section", [
    {"block": [128, 128], "local": 2, "global": 1, "stride": 8, "random": {"blocks": 3}, "layout": "runtime"},
    {"block": [64, 256], "local": {"left": None, "right": 0}},
    {"block": [64, 64], "local": {"left": 4}, "random": {"blocks": 1, "seed": 12345}},
    {"block": [64, 64], "layout": "runtime"},
])
def test_round_trip(section):
    spec = spec_with(section, mask={"causal": True})
    text = spec.to_yaml()
    again = parse_spec(yaml.safe_load(text), "again.yaml")
    assert replace(again, source="") == replace(spec, source="")
    assert again.to_yaml() == text


def test_to_dict_form():
    spec = spec_with({"block": [128, 128], "local": 2, "global": 1, "random": {"blocks": 3}})
    assert spec.to_dict()["sparsity"] == {"block": [128, 128], "local": {"left": 2, "right": 2}, "global": 1,
                                          "random": {"blocks": 3, "seed": 0}}
    assert spec_with({"block": [64, 256], "layout": "runtime"}).to_dict()["sparsity"] == {
        "block": [64, 256], "layout": "runtime"}


def test_existing_constructors_still_work():
    from attngen.spec import Spec
    spec = Spec(name="t", description="", head_dim=64, head_dim_v=64, dtypes=("fp16",))
    assert spec.sparsity is None


# ------------------------------------------------------------------ layouts against the reference

def blocks_to_elements(layout: torch.Tensor, bq: int, bk: int, Nq: int, Nk: int) -> torch.Tensor:
    return layout.repeat_interleave(bq, dim=2)[:, :, :Nq].repeat_interleave(bk, dim=3)[..., :Nk]


SECTIONS = [
    {"local": 1},
    {"local": {"left": 2, "right": 0}},
    {"local": {"left": None, "right": 1}},
    {"local": {"left": 0}},
    {"global": 2},
    {"stride": 3},
    {"random": {"blocks": 2, "seed": 5}},
    {"random": {"blocks": 50}},  # more than there are key blocks: all of them
    {"local": 1, "global": 1, "stride": 4, "random": {"blocks": 1, "seed": 3}},
]
SHAPES = [(256, 256), (148, 212), (400, 120), (64, 800), (4, 260), (516, 516)]


@pytest.mark.parametrize("block", [(64, 64), (64, 128), (128, 64)])
@pytest.mark.parametrize("section", SECTIONS, ids=str)
def test_static_layout_matches_reference(section, block):
    spec = spec_with(dict(section, block=list(block)))
    bq, bk = block
    heads = 3
    for Nq, Nk in SHAPES:
        n_qb, n_kb = -(-Nq // bq), -(-Nk // bk)
        layout = static_layout(spec.to_dict()["sparsity"], n_qb, n_kb, heads, "cpu")
        assert layout.dtype == torch.bool
        assert layout.shape == (1, heads if "random" in section else 1, n_qb, n_kb)
        want = reference.sparsity_mask(spec, Nq, Nk, heads)
        got = blocks_to_elements(layout, bq, bk, Nq, Nk)
        assert got.shape == want.shape, (Nq, Nk)
        assert torch.equal(got, want), (Nq, Nk)


def test_static_layout_terms_by_hand():
    def layout(section, n_qb=6, n_kb=6):
        return static_layout(dict(section, block=[16, 16]), n_qb, n_kb, 1, "cpu")[0, 0].int().tolist()
    assert layout({"local": {"left": 1, "right": 0}}, 4, 4) == [
        [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert layout({"global": 1}, 3, 4) == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert layout({"stride": 3}, 2, 7) == [[0, 0, 1, 0, 0, 1, 0]] * 2
    rows = static_layout({"block": [16, 16], "random": {"blocks": 2, "seed": 0}}, 5, 9, 4, "cpu")
    assert (rows.sum(-1) == 2).all()  # exactly r key blocks per (head, query block)


def test_runtime_only_has_no_static_layout():
    spec = spec_with({"block": [64, 64], "layout": "runtime"})
    assert static_layout(spec.to_dict()["sparsity"], 3, 4, 2, "cpu") is None


def test_random_is_reproducible_from_the_seed():
    def random(seed, heads=4):
        return static_layout({"block": [16, 16], "random": {"blocks": 3, "seed": seed}}, 16, 16, heads, "cpu")
    a = random(0)
    assert torch.equal(a, random(0))
    assert not torch.equal(a, random(1))
    assert not all(torch.equal(a[0, 0], a[0, h]) for h in range(1, 4))  # heads differ
    # the documented contract, spelled out
    g = torch.Generator(device="cpu").manual_seed(0)
    picked = torch.rand(4, 16, 16, generator=g).argsort(dim=-1, stable=True)[..., :3]
    want = torch.zeros(4, 16, 16, dtype=torch.bool).scatter_(-1, picked, True)
    assert torch.equal(a[0], want)
    spec = spec_with({"block": [64, 64], "random": {"blocks": 3, "seed": 0}})
    assert torch.equal(reference.sparsity_mask(spec, 1024, 1024, 4), blocks_to_elements(a, 64, 64, 1024, 1024))


def test_reference_runtime_layout():
    spec = spec_with({"block": [64, 128], "local": 0, "layout": "runtime"})
    Nq, Nk = 160, 280  # 3 x 3 blocks, ragged ends
    layout = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    layout[1, 0, 2, 0] = True
    vis = reference.sparsity_mask(spec, Nq, Nk, 1, layout)
    assert vis.shape == (2, 1, Nq, Nk)
    diagonal = blocks_to_elements(torch.eye(3, dtype=torch.bool)[None, None], 64, 128, Nq, Nk)
    assert torch.equal(vis[0:1], diagonal)
    assert vis[1, 0, 128:, :128].all() and not vis[1, 0, :128, :128][~diagonal[0, 0, :128, :128]].any()
    with pytest.raises(ValueError, match="pass layout="):
        reference.sparsity_mask(spec, Nq, Nk, 1)
    with pytest.raises(ValueError, match=r"bool \[B or 1, H or 1, 3, 3\]"):
        reference.sparsity_mask(spec, Nq, Nk, 1, layout[:, :, :2])
    with pytest.raises(ValueError, match="layout= is not taken"):
        reference.sparsity_mask(spec_with({"block": [64, 64], "local": 1}), Nq, Nk, 1, layout)
    assert reference.sparsity_mask(parse_spec(BASE), 5, 7, 2).all()


def _attention_inputs(B, H, Nq, Nk, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (Nq, Nk, Nk)]


def test_reference_attention_intersects_mask_and_sparsity():
    spec = spec_with({"block": [64, 64], "local": {"left": 1, "right": 0}, "random": {"blocks": 1, "seed": 2},
                      "layout": "runtime"}, mask={"causal": {"align": "top_left"}})
    B, H, Nq, Nk = 2, 3, 160, 200
    q, k, v = _attention_inputs(B, H, Nq, Nk)
    layout = torch.rand(B, 1, 3, 4, generator=torch.Generator().manual_seed(1)) < 0.3
    o, lse = reference.attention(spec, q, k, v, layout=layout)
    vis = reference.dense_mask(spec, Nq, Nk) & reference.sparsity_mask(spec, Nq, Nk, H, layout)
    s = (q @ k.transpose(-1, -2)) * spec.scale
    s = s.masked_fill(~vis, float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(s, -1))
    assert torch.allclose(o, torch.softmax(s, -1).nan_to_num(0.0) @ v)
    # heads in chunks (as verify runs them) see the random term of the whole call
    o1, lse1 = reference.attention(spec, q[:, 1:], k[:, 1:], v[:, 1:], layout=layout, heads=H, head_offset=1)
    assert torch.equal(o1, o[:, 1:]) and torch.equal(lse1, lse[:, 1:])
    with pytest.raises(ValueError, match="pass layout="):
        reference.attention(spec, q, k, v)


def test_reference_attention_unchanged_without_sparsity():
    spec = parse_spec(dict(BASE, mask={"causal": True}))
    q, k, v = _attention_inputs(1, 2, 33, 47)
    o, lse = reference.attention(spec, q, k, v)
    s = ((q @ k.transpose(-1, -2)) * spec.scale).masked_fill(~reference.dense_mask(spec, 33, 47), float("-inf"))
    assert torch.equal(lse, torch.logsumexp(s, -1))
    assert torch.equal(o, torch.softmax(s, -1).nan_to_num(0.0) @ v)
    with pytest.raises(ValueError, match="layout= is not taken"):
        reference.attention(spec, q, k, v, layout=torch.ones(1, 1, 1, 1, dtype=torch.bool))


# ------------------------------------------------------------------ call-time layouts

def _check(layout):
    """A layout as attention(layout=) checks it: 2 batches, 4 heads, 3 x 5 blocks of 64."""
    BlockMask(layout).check(2, 4, 3 * 64 - 5, 5 * 64, (64, 64), "bigbird")


def test_layout_shapes_accepted():
    for shape in [(2, 4, 3, 5), (1, 4, 3, 5), (2, 1, 3, 5), (1, 1, 3, 5)]:
        _check(torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("layout, error, fragments", [
    (torch.ones(2, 4, 3, 5), TypeError, ["torch.bool", "torch.float32"]),
    (torch.ones(2, 4, 3, 5, dtype=torch.int8), TypeError, ["torch.bool", "torch.int8"]),
    ([[True]], TypeError, ["torch.bool", "list"]),
    (torch.ones(4, 3, 5, dtype=torch.bool), TypeError, ["[B or 1, H or 1, query blocks, key blocks]", "[4, 3, 5]"]),
    (torch.ones(3, 4, 3, 5, dtype=torch.bool), ValueError, ["[2 or 1, 4 or 1, 3, 5]", "got [3, 4, 3, 5]", "'bigbird'"]),
    (torch.ones(2, 2, 3, 5, dtype=torch.bool), ValueError, ["got [2, 2, 3, 5]"]),
    (torch.ones(2, 4, 3, 6, dtype=torch.bool), ValueError, ["got [2, 4, 3, 6]"]),
    (torch.ones(2, 4, 5, 3, dtype=torch.bool), ValueError, ["got [2, 4, 5, 3]"]),
])
def test_layout_errors(layout, error, fragments):
    with pytest.raises(error) as info:
        _check(layout)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_layouts_import_nothing_outside_the_runtime():
    text = (Path(__file__).resolve().parent.parent / "attngen" / "runtime" / "layouts.py").read_text()
    imports = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["from __future__ import annotations", "import torch"]
