"""generated/ holds the kernels of the shipped specs, and they are fresh; a generated module imports
only torch, triton, math and attngen's runtime, and a standalone one (the runtime inlined) no
attngen module at all."""

import ast
import importlib.util
import re
import sys
import uuid
from pathlib import Path

import pytest
import torch

from attngen.pipeline import compile_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def _imports(source: str) -> set[str]:
    """The dotted names of the modules a source imports, anywhere in it (relative imports as '.')."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.compiler
@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_generated_is_fresh(spec):
    c = compile_spec(spec)
    path = ROOT / "generated" / f"{c.spec.name}.py"
    assert path.exists(), f"{path} is missing: run `attngen generate specs/*.yaml`"
    assert path.read_text() == c.source, f"{path} is stale: run `attngen generate specs/*.yaml`"


@pytest.mark.compiler
def test_no_stray_generated_files():
    names = {compile_spec(s, stop="spec").spec.name for s in SPECS}
    stray = [p.name for p in (ROOT / "generated").glob("*.py") if p.stem not in names]
    assert not stray, f"generated/ has kernels of no shipped spec: {stray}"


@pytest.mark.compiler
def test_generated_imports_only_torch_triton_math_and_the_runtime():
    paths = sorted((ROOT / "generated").glob("*.py"))
    assert paths
    for path in paths:
        imports = _imports(path.read_text())
        allowed = {name for name in imports if name.split(".")[0] in ("torch", "triton", "math")
                   or name == "attngen.runtime" or name.startswith("attngen.runtime.")}
        assert imports == allowed, (path.name, sorted(imports - allowed))
        assert any(name.startswith("attngen.runtime") for name in imports), path.name


@pytest.mark.interp
def test_standalone_module_imports_no_attngen_and_computes_causal_attention(tmp_path, monkeypatch, device):
    """`attngen generate --standalone`: the runtime inlined into one file that needs only torch
    and triton; loaded from that file, it computes causal attention as torch's SDPA does, and
    decodes (the runtime's modules imported as modules are namespaces there)."""
    spec = tmp_path / "tiny_causal.yaml"
    spec.write_text("name: tiny_causal\nhead_dim: 32\ndtypes: [fp32]\nmask: {causal: {align: top_left}}\n")
    source = compile_spec(spec, standalone=True).source
    imports = _imports(source)
    assert not [name for name in imports if name.startswith(".") or name.split(".")[0] == "attngen"], imports
    assert {"torch", "triton"} <= {name.split(".")[0] for name in imports}
    path = tmp_path / "tiny_causal_standalone.py"
    path.write_text(source)
    name = f"attngen_standalone_test_{uuid.uuid4().hex}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    monkeypatch.setitem(sys.modules, name, module)
    module_spec.loader.exec_module(module)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 32, generator=g).to(device) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (module.attention(q, k, v) - expected).abs().max() < 1e-5
    with torch.no_grad():  # the last 3 queries against a cache of the 37 keys (bottom-right: top-left's last rows)
        o = module.attention_with_kvcache(q[:, :, -3:], k, v, cache_seqlens=torch.tensor([37], dtype=torch.int32,
                                                                                      device=device))
    assert (o - expected[:, :, -3:]).abs().max() < 1e-5
    out = torch.empty_like(q).transpose(1, 2).contiguous().transpose(1, 2)  # out= (checked, then written in place)
    assert module.attention(q, k, v, out=out) is out and (out - expected).abs().max() < 1e-5
    k_cache, v_cache = (torch.zeros(1, 2, 40, 32, device=device) for _ in range(2))
    with torch.no_grad():  # an append (its checks), then attending
        o = module.attention_with_kvcache(q[:, :, -1:], k_cache, v_cache, cache_seqlens=torch.tensor(
            [36], dtype=torch.int32, device=device), k=k[:, :, 36:], v=v[:, :, 36:])
    assert torch.equal(k_cache[:, :, 36], k[:, :, 36]) and torch.isfinite(o).all()


@pytest.mark.compiler
def test_standalone_inlines_every_runtime_module_the_runtime_imports():
    from attngen.standalone import RUNTIME, RUNTIME_MODULES

    # the fa2 runtime's closure (the nsa family's host modules have no standalone form: pipeline.py)
    files = [RUNTIME / f"{m}.py" for m in RUNTIME_MODULES]
    imported = {part.strip().partition(" as ")[0] for f in files
                for line in re.findall(r"^from \. import (.+)$", f.read_text(), re.M) for part in line.split(",")}
    imported |= {m for f in files for m in re.findall(r"^from \.(\w+) import", f.read_text(), re.M)}
    assert imported <= set(RUNTIME_MODULES), imported - set(RUNTIME_MODULES)
    assert {"decode", "library", "tiles"} <= imported  # the scan sees the runtime's imports
