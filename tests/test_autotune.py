"""Autotuning: winners measured per (spec source, GPU, kernel, dtype, shape bucket) are cached on
disk, applied on load, and used by the generated module for calls in that bucket only."""

from pathlib import Path

import pytest
import torch

import attngen
from attngen import reference, runtime
from attngen.autotune import apply, tune
from attngen.bench import BenchShape
from attngen.spec import load_spec

pytestmark = pytest.mark.interp

ROOT = Path(__file__).resolve().parent.parent


def test_tune_caches_winners_and_load_applies_them(tmp_path, device):
    path = ROOT / "specs" / "sliding_window.yaml"
    module = attngen.load(path)
    calls = []

    def timer(run):  # a fake clock that prefers each kernel's second-ranked tiling
        run()
        calls.append(1)
        return 0.5 if len(calls) % 2 == 0 else 1.0

    cache = tmp_path / "autotune.json"
    winners = tune(path, [BenchShape(1, 2, 100)], timer, gpu="TestGPU", top=2, dtype="fp32", device=device, path=cache)
    tilings = {k: w for k, w in winners.items() if "|backward_form|" not in k}
    assert len(tilings) == 4 and all(w["rank"] == 2 for w in tilings.values())  # fwd, bwd_dkdv, bwd_dq, bwd_single
    assert [w["form"] for k, w in winners.items() if "|backward_form|" in k] == ["two kernels"]  # a tie: two kernels
    assert all("|TestGPU|" in k and k.endswith("|fp32|128|128") for k in winners)

    module.TUNED.clear()
    assert apply(module, "OtherGPU", cache) == 0 and not module.TUNED
    assert apply(module, "TestGPU", cache) == 5
    rt = runtime.of(module)
    assert module.TUNED[("backward_form", "fp32", 128, 128)] == "two kernels"
    rt.deterministic = None  # the measured form decides in its bucket, before BACKWARD_FORMS
    try:
        module.TUNED[("backward_form", "fp32", 128, 128)] = "single pass"
        assert rt.single_pass("fp32", 100, 77) and rt.single_pass("fp32", 100, 77, deterministic=True) is False
    finally:
        rt.deterministic = True
    assert rt.tuned is module.TUNED
    tuned = module.TUNED[("fwd", "fp32", 128, 128)]
    assert rt.config("fwd", "fp32", 100, 77) == tuned  # Nq, Nk in the (128, 128) bucket
    assert rt.config("fwd", "fp32", 300, 77) == rt.tilings["fwd"]["fp32"]  # another bucket

    spec = load_spec(path)  # and the tuned tiling computes the same function
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 128, generator=g).to(device) for _ in range(3))
    ref, _ = reference.attention(spec, q, k, v)
    assert (module.attention(q, k, v).double() - ref).abs().max() < 1e-5
    module.TUNED.clear()
