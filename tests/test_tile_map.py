"""`attngen show SPEC --emit tiles`: the forward kernel's tiles as its loops treat them, which must
be sound against the mask evaluated densely (a skipped tile has no visible pair, an unmasked one
no hidden in-bounds pair)."""

import pytest
import torch
from typer.testing import CliRunner

from attngen.mask_analysis import dense_tile_classes, forward_tiles
from attngen.passes import PassOptions
from attngen.pipeline import compile_spec
from attngen.resources import specs_dir
from attngen.tools import tile_map


@pytest.mark.compiler
@pytest.mark.parametrize("name", ["causal", "causal_bottom_right", "sliding_window", "prefix_lm", "chunked", "dilated",
                                  "dense", "softcap"])
@pytest.mark.parametrize("Nq, Nk, bm, bn", [(1024, 1024, 128, 64), (300, 1000, 64, 64), (1000, 257, 32, 128)])
def test_the_picture_is_sound_against_the_dense_mask(name, Nq, Nk, bm, bn):
    fwd = compile_spec(specs_dir() / f"{name}.yaml", options=PassOptions(), stop="tiling").kernel("fwd")
    plan = fwd.attr("mask_plan")
    tiles = forward_tiles(plan, Nq, Nk, bm, bn)
    truth = dense_tile_classes(plan.cond, Nq, Nk, bm, bn)  # 0 empty, 1 partial, 2 full
    assert tiles.shape == truth.shape
    assert not ((tiles == tile_map.SKIPPED) & (truth > 0)).any(), "a skipped tile has visible pairs"
    assert not ((tiles == tile_map.UNMASKED) & (truth < 2)).any(), "an unmasked tile hides pairs"
    if Nk % bn:
        assert not (tiles[:, -1] == tile_map.UNMASKED).any()  # the ragged key tile checks bounds


@pytest.mark.compiler
def test_show_tiles_prints_one_character_per_tile():
    from cli.main import app

    result = CliRunner().invoke(app, ["show", "causal", "--emit", "tiles", "--shape", "512,256", "--block", "64x32"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines()[1:] if line and set(line) <= set(".+#")]
    assert len(rows) == 8 and all(len(r) == 8 for r in rows)
    assert rows[:4] == ["++......", "##++....", "####++..", "######++"] and rows[4:] == ["########"] * 4
    assert "64 tiles: 44 unmasked ('#'), 8 masked ('+'), 12 skipped ('.')" in result.output


@pytest.mark.compiler
def test_wide_pictures_merge_tiles():
    tiles = torch.tensor([[2] * 300, [0] * 150 + [2] * 150], dtype=torch.int8)
    text = tile_map.as_text(tiles, width=100).splitlines()
    assert text == ["+" * 50 + "#" * 50]  # 3 x 3 cells; the rows differ in the first half only


@pytest.mark.compiler
def test_bad_shape_and_block_are_refused():
    from cli.main import app

    for args, what in ((["--shape", "12"], "--shape"), (["--block", "64"], "--block")):
        result = CliRunner().invoke(app, ["show", "causal", "--emit", "tiles", *args])
        assert result.exit_code == 2 and what in result.output
