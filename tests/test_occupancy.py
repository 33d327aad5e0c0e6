"""The cost model's programs per SM against the kernels compiled for sm90 offline (no GPU; the
installed Triton and its bundled ptxas): no kernel may get fewer co-resident programs than its
tiling was ranked with. Offline compilation needs Triton JIT functions, so it runs in a process
without TRITON_INTERPRET."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.compiler
ROOT = Path(__file__).resolve().parent.parent


def _audit(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "attngen.tools.occupancy", *args, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_compiled_kernels_get_the_programs_per_sm_the_cost_model_counted():
    rows = _audit("document:128", "causal:128", "--seq", "1024")
    assert len(rows) == 6
    fewer = [r for r in rows if r["real"] < r["model"]]
    assert not fewer, fewer


def test_the_audit_catches_a_tiling_that_loses_its_second_program():
    """Without shallow_partial the document forward's ids buffers take 24 bytes past two programs."""
    (row,) = _audit("document:128", "--role", "fwd", "--seq", "1024", "--no-shallow-partial")
    assert row["model"] == 2 and row["real"] == 1, row
