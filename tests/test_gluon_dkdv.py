"""The Gluon dK/dV kernel (attngen/runtime/gluon_dkdv.py): which calls it takes, and what it compiles
to for sm90 without a GPU (its numbers are checked on a GPU: tests/test_gpu.py and `attngen verify`;
Triton's interpreter does not run Gluon)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attngen.resources import resolve_spec
from attngen.spec import load_spec
from attngen.runtime import gluon_dkdv

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.compiler
def test_only_plain_specs_take_the_gluon_kernel():
    plain = {"head_dim_256", "head_dim_192", "dense", "causal", "causal_bottom_right", "gqa"}
    for name in ("head_dim_256", "head_dim_192", "dense", "causal", "causal_bottom_right", "gqa", "softcap", "alibi",
                 "temperature", "causal_dropout", "document", "sliding_window", "prefix_lm", "dilated", "block_sparse",
                 "chunked", "nsa"):
        spec = load_spec(resolve_spec(name)).to_dict()
        assert gluon_dkdv.spec_eligible(spec) == (name in plain), name


@pytest.mark.compiler
def test_the_option_turns_it_on_in_the_module():
    """Off by default until its runtime path has run on a GPU; PassOptions.gluon_dkdv (verify and
    inspect --option gluon_dkdv, bench --ab gluon_dkdv) compiles a module that takes it."""
    import attngen
    from attngen import runtime

    path = resolve_spec("head_dim_256")
    assert not runtime.of(attngen.load(path)).gluon_dkdv
    on = attngen.load(path, gluon_dkdv=True)
    assert on.GLUON_DKDV is True and runtime.of(on).gluon_dkdv


@pytest.mark.compiler
def test_a_call_takes_it_only_on_sm90_at_head_dims_padded_to_256(monkeypatch):
    spec = load_spec(resolve_spec("head_dim_256")).to_dict()
    q, k, v, do = (torch.randn(1, 2, 64, 256, dtype=torch.bfloat16) for _ in range(4))
    assert not gluon_dkdv.eligible(spec, q, k, v, do, 256, 256)  # CPU tensors: not sm90
    monkeypatch.setattr(gluon_dkdv, "on_sm90", lambda t: True)  # as if on an H100
    assert gluon_dkdv.available() == gluon_dkdv.eligible(spec, q, k, v, do, 256, 256)
    assert not gluon_dkdv.eligible(spec, q, k, v, do, 128, 128)  # Triton's kernel does not duplicate there
    assert not gluon_dkdv.eligible(spec, *(t.float() for t in (q, k, v, do)), 256, 256)  # fp32
    assert not gluon_dkdv.eligible(spec, q, k, v, do[:, :, :1].expand(1, 2, 64, 256), 256, 256)  # stride 0
    assert not gluon_dkdv.eligible(load_spec(resolve_spec("softcap")).to_dict(), q, k, v, do, 256, 256)


@pytest.mark.interp
@pytest.mark.parametrize("name", ["causal", "document"])
def test_the_runtime_gates_it_and_falls_back_when_it_fails(name, monkeypatch):
    """With the kernel taken as eligible and made to fail: a plain call warns, turns it off for the
    module and still gets the right gradients from the Triton kernel; a call with documents never
    tries it (the runtime's own gates: documents, dropout, windows, packed sequences)."""
    import math
    import warnings

    import attngen
    from attngen import runtime
    from attngen.verify import random_documents, Shape

    mod = attngen.load(resolve_spec(name), gluon_dkdv=True)
    rt = runtime.of(mod)
    tried = []

    def fails(*args, **kwargs):
        tried.append(args)
        raise RuntimeError("a Gluon this Triton cannot compile")

    monkeypatch.setattr(gluon_dkdv, "eligible", lambda *args: True)
    monkeypatch.setattr(gluon_dkdv, "dkdv", fails)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 96, 128, generator=g) for _ in range(4))
    extra = {}
    if name == "document":
        extra["documents"] = random_documents(Shape(1, 2, 2, 96, 96), "cpu", g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod.attention(*leaves, **extra).backward(do)
    if name == "document":
        assert not tried and rt.gluon_dkdv
        return
    assert len(tried) == 1 and not rt.gluon_dkdv and rt.last_backward == "two kernels"
    assert any("the Gluon dK/dV kernel failed" in str(w.message) for w in caught)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    s = ref[0] @ ref[1].transpose(-1, -2) / math.sqrt(128)
    s = s.masked_fill(torch.ones(96, 96, dtype=torch.bool).triu(1), float("-inf"))
    (torch.softmax(s, -1) @ ref[2]).backward(do.double())
    for got, want in zip(leaves, ref):
        assert torch.allclose(got.grad.double(), want.grad, atol=2e-3, rtol=2e-3)


@pytest.mark.compiler
def test_tma_reads_unit_stride_rows_of_16_bytes_only():
    x = torch.randn(2, 64, 4, 256, dtype=torch.bfloat16)
    assert gluon_dkdv.tma_legal(x.transpose(1, 2))  # [B, N, H, D] memory read as [B, H, N, D]
    assert not gluon_dkdv.tma_legal(torch.randn(1, 1, 1, 256, dtype=torch.bfloat16).expand(2, 4, 64, 256))
    assert not gluon_dkdv.tma_legal(torch.randn(2, 4, 64, 255, dtype=torch.bfloat16))  # 510-byte rows
    assert not gluon_dkdv.tma_legal(x.transpose(2, 3))  # D not the unit stride


@pytest.mark.compiler
@pytest.mark.parametrize("dims,causal", [((256, 256), "bottom_right"), ((256, 128), None)])
def test_it_issues_each_score_product_once_without_spills(dims, causal):
    """Compiled for sm90 offline: per step 32 wgmma of 64 x 32 for QK^T and dO V^T together (the
    two warpgroups split the 64 queries; Triton's kernel issues both products on each warpgroup),
    then dV and dK, asynchronous (no wait after each), and no local-memory traffic."""
    if not gluon_dkdv.available():
        pytest.skip("this Triton has no Gluon Hopper ops")
    code = (f"from attngen.tools.inspect_kernels import gluon_dkdv_sm90, sass, registers; "
            f"k = gluon_dkdv_sm90({dims[0]}, {dims[1]}, {causal!r}); s = sass(k); "
            f"import re; print(len(re.findall(r'HGMMA.64x32x16', s)), len(re.findall(r'HGMMA.64x\\d+x16', s)), "
            f"len(re.findall(r'WARPGROUP.DEPBAR', s)), "
            f"len(re.findall(r'\\b(LDL|STL)\\b', s)), registers(k), k.metadata.shared)")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    from attngen.tools.inspect_kernels import _nvidia_tool

    if _nvidia_tool("ptxas") is None or _nvidia_tool("cuobjdump") is None:
        pytest.skip("no ptxas / cuobjdump for this Triton (bundled with its NVIDIA backend, or on PATH)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    scores, hgmma, waits, spills, regs, shared = (int(x) for x in done.stdout.split()[-6:])
    d, dv = dims
    assert scores == (d + dv) // 16  # one K-step of 16 a wgmma, each product once
    assert hgmma == scores + 2 * (64 // 16)  # plus dV and dK, each over 64 queries in K-steps of 16
    assert spills == 0 and shared <= 232448
    # a few waits a step, not one after every wgmma: ptxas serializes them all where an instruction
    # other than a wgmma defines an accumulator inside a pipeline stage (its warning C7515)
    assert waits <= 4, waits
