"""generated/ holds the kernels of the shipped specs, and they are fresh."""

from pathlib import Path

import pytest

from attngen.pipeline import compile_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_generated_is_fresh(spec):
    c = compile_spec(spec)
    path = ROOT / "generated" / f"{c.spec.name}.py"
    assert path.exists(), f"{path} is missing: run `attngen generate specs/*.yaml`"
    assert path.read_text() == c.source, f"{path} is stale: run `attngen generate specs/*.yaml`"


def test_no_stray_generated_files():
    names = {compile_spec(s, stop="spec").spec.name for s in SPECS}
    stray = [p.name for p in (ROOT / "generated").glob("*.py") if p.stem not in names]
    assert not stray, f"generated/ has kernels of no shipped spec: {stray}"


def test_generated_imports_only_torch_triton_math():
    for path in (ROOT / "generated").glob("*.py"):
        imports = {line.split()[1].split(".")[0] for line in path.read_text().splitlines()
                   if line.startswith(("import ", "from "))}
        assert imports <= {"torch", "triton", "math"}, (path.name, imports)
