"""`attngen bench --plot` / `bench-merge --plot`: the ratios drawn, from benchmark rows."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from attngen.tools.bench_plot import plot, ratios
from cli.main import app

ROWS = [
    {"spec": "causal", "shape": "B4 H16 N4096", "mode": "fwd", "tflops": {}, "notes": {},
     "ms": {"attngen": 2.0, "flex": 3.0, "sdpa_cudnn": 1.5}},
    {"spec": "causal", "shape": "B1 H16 N16384", "mode": "fwd", "tflops": {}, "notes": {"flex": "failed"},
     "ms": {"attngen": 4.0, "sdpa_cudnn": 5.0}},
    {"spec": "softcap", "shape": "B4 H16 N4096", "mode": "fwd+bwd", "tflops": {}, "notes": {}, "ms": {"flex": 1.0}},
]


@pytest.mark.compiler
def test_ratios_are_peer_time_over_ours_and_skip_what_did_not_run():
    assert ratios(ROWS) == {"causal (fwd)": {"B4 H16 N4096": {"flex": 1.5, "sdpa_cudnn": 0.75},
                                             "B1 H16 N16384": {"sdpa_cudnn": 1.25}}}


@pytest.mark.compiler
def test_bench_merge_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "rows.json"
    src.write_text(json.dumps({"environment": {"device": "GPU", "torch": "2", "triton": "3", "cuda": "13"},
                               "rows": ROWS}))
    out = tmp_path / "ratios.png"
    result = CliRunner().invoke(app, ["bench-merge", str(src), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no row has a time for attngen"):
        plot(ROWS[2:], tmp_path / "none.png")
