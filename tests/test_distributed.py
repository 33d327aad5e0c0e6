"""Context parallelism (attngen/distributed.py) on CPU: gloo process groups of 2 and 4 ranks on
Triton's interpreter, forward and gradients against the single-process call on the whole tensors
(fp32), with ragged lengths that the world size does not divide."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attngen import distributed as cp

ROOT = Path(__file__).resolve().parent.parent
SPECS = {
    "causal": "mask:\n  causal: {}\n",
    "window": "mask:\n  window: {left: 40, right: 0}\n",
    "document": "mask:\n  causal: {}\n  document: true\n",
    "expr": "mask:\n  causal: {}\n  expr: \"q_idx // 48 == kv_idx // 48 or (q_idx - kv_idx) % 5 == 0\"\n",
    "dropout": "mask:\n  causal: {}\ndropout: {p: 0.2}\n",
    "temperature": "dtypes: [fp32, fp16]\nmask:\n  causal: {}\nscore:\n  temperature: true\n",
}


def _write_specs(tmp: Path) -> None:
    for name, body in SPECS.items():
        (tmp / f"{name}.yaml").write_text(f"name: cp_{name}\nhead_dim: 32\n{body}")


def _run(tmp: Path, world: int, cases: list[dict]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TRITON_INTERPRET="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE=str(world), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "cp_worker.py"), str(tmp), json.dumps(cases)],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return {r["case"]: r for r in map(json.loads, outs[0][0].splitlines())}


def _case(name, spec, strategy="ring", layout="zigzag", N=203, **kw):
    return dict(name=name, spec=spec, strategy=strategy, layout=layout, B=1, Hq=2, Hkv=1, N=N, D=32,
                documents=spec == "document", **kw)


@pytest.mark.interp
def test_two_ranks_match_one(tmp_path):
    _write_specs(tmp_path)
    cases = [_case("causal ring zigzag", "causal", N=150, twice=True),
             _case("causal allgather contiguous", "causal", "allgather", "contiguous", N=150, twice=True),
             _case("window ring contiguous", "window", layout="contiguous", N=120),
             _case("document ring", "document", N=130),
             _case("dropout ring", "dropout", N=100, dropout_seed=1234),
             _case("temperature ring", "temperature", N=90, temperature=True),
             _case("causal ring, fewer tokens than parts", "causal", N=3),
             # fp16, small scores: the temperature gradient's rounding residue is corrected per whole
             # row across the ring's windows, as one call does (without it: 2.5e-3 off)
             _case("temperature ring fp16", "temperature", N=256, temperature=True, dtype="fp16", q_scale=0.1,
                   tol={"dtemperature": 2e-5, "o": 2e-3, "dq": 2e-3, "dk": 2e-3, "dv": 2e-3})]
    results = _run(tmp_path, 2, cases)
    assert set(results) == {c["name"] for c in cases}
    tols = {c["name"]: c.get("tol", {}) for c in cases}
    for name, r in results.items():
        assert all(e < tols[name].get(q, 2e-5) for q, e in r["errors"].items()), (name, r["errors"])
        assert r.get("deterministic", True), name


@pytest.mark.interp
def test_four_ranks_match_one(tmp_path):
    _write_specs(tmp_path)
    cases = [_case("causal ring zigzag", "causal", N=171, twice=True),
             _case("document allgather zigzag", "document", "allgather", N=150),
             _case("expr ring contiguous", "expr", layout="contiguous", N=133)]
    results = _run(tmp_path, 4, cases)
    assert set(results) == {c["name"] for c in cases}
    for name, r in results.items():
        assert max(r["errors"].values()) < 2e-5, (name, r["errors"])
        assert r.get("deterministic", True), name


@pytest.mark.compiler
def test_layouts_cover_the_sequence_once():
    for N in (1, 7, 203, 256):
        for world in (1, 2, 3, 4, 8):
            for layout in cp.LAYOUTS:
                seen = sorted(p for r in range(world) for s, n in cp.chunks(N, world, r, layout) for p in range(s, s + n))
                assert seen == list(range(N))
                x = torch.arange(N)[None, None, :, None].float()
                parts = [cp.shard(x, world, r, layout) for r in range(world)]
                assert torch.equal(cp.unshard(parts, layout), x)
    assert cp.chunks(16, 2, 0) == ((0, 4), (12, 4)) and cp.chunks(16, 2, 1) == ((4, 4), (8, 4))
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.chunks(16, 2, 0, "striped")


@pytest.mark.compiler
def test_zigzag_balances_causal_work():
    causal = lambda q, kv, Nq, Nk: kv <= q  # noqa: E731
    for world in (2, 4):
        zig, flat = cp.work(causal, 1024, world, "zigzag"), cp.work(causal, 1024, world, "contiguous")
        assert sum(zig) == sum(flat) == 1024 * 1025 // 2
        assert max(zig) / min(zig) < 1.01 < max(flat) / min(flat)


@pytest.mark.compiler
def test_zigzag_is_pytorchs_head_tail_order():
    lb = pytest.importorskip("torch.distributed.tensor.experimental._context_parallel._load_balancer")
    for world in (2, 4):
        order = lb._HeadTailLoadBalancer(64, world, "cpu")._generate_indices().flatten()
        ours = torch.cat([cp.shard(torch.arange(64)[None, None, :, None], world, r)[0, 0, :, 0] for r in range(world)])
        assert torch.equal(order, ours)


_GROUPS: dict = {}


def _world_of_one(device) -> object:
    """A process group of this process alone: gloo for CPU tensors, NCCL for CUDA ones."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if str(device).startswith("cuda") and "nccl" not in _GROUPS:
        _GROUPS["nccl"] = dist.new_group(ranks=[0], backend="nccl")
    return _GROUPS["nccl"] if str(device).startswith("cuda") else dist.group.WORLD


@pytest.mark.interp
@pytest.mark.parametrize("strategy", cp.STRATEGIES)
def test_a_world_of_one_is_the_single_call(strategy, tmp_path, device):
    """One rank, in this process: the zigzag layout still cuts the sequence into two pieces, so the
    ring runs windows and merges them; the result is the plain call's."""
    import attngen

    group = _world_of_one(device)
    _write_specs(tmp_path)
    mod = attngen.load(tmp_path / "window.yaml")
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, h, 77, 32, generator=g).to(device) for h in (2, 1, 1, 2))
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    want = mod.attention(*full)
    want.backward(do)
    local = [x.clone().requires_grad_() for x in (q, k, v)]
    o = cp.context_parallel_attention(mod, *local, strategy=strategy, group=group)
    o.backward(do)
    assert (o - want).abs().max() < 2e-5
    assert all((a.grad - b.grad).abs().max() < 2e-5 for a, b in zip(local, full))


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", cp.STRATEGIES)
def test_a_world_of_one_on_the_gpu_in_bf16(strategy):
    """The windowed kernels (POSITIONS) on the GPU through NCCL with one rank: bf16, causal and
    document, against the plain call."""
    import attngen
    from attngen.resources import resolve_spec

    group = _world_of_one("cuda")
    for name in ("causal", "document"):
        mod = attngen.load(resolve_spec(name))
        g = torch.Generator(device="cuda").manual_seed(4)
        q, k, v, do = (torch.randn(1, h, 3001, 128, generator=g, device="cuda", dtype=torch.bfloat16)
                       for h in (8, 2, 2, 8))
        kw = {"documents": (torch.arange(3001, device="cuda") // 700)[None].to(torch.int32)} if name == "document" else {}
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        want = mod.attention(*full, **kw)
        want.backward(do)
        local = [x.clone().requires_grad_() for x in (q, k, v)]
        o = cp.context_parallel_attention(mod, *local, strategy=strategy, group=group, **kw)
        o.backward(do)
        for a, b in zip((o, *(x.grad for x in local)), (want, *(x.grad for x in full))):
            assert (a.float() - b.float()).abs().max() / b.float().abs().max() < 1e-2, name
