"""Golden text tests: the printed IR and the tiling table of a few specs (the generated source is
in generated/, whose freshness tests/test_generated.py checks).

Run `pytest tests/test_golden.py --update-golden` to rewrite them after an intended change, then
read the diff."""

from pathlib import Path

import pytest

from attngen.pipeline import emit

pytestmark = pytest.mark.compiler

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = [(spec, stage) for spec in ("causal", "softcap", "dilated", "head_dim_96", "document")
         for stage in ("ir", "tiling")]


@pytest.mark.parametrize("spec,stage", CASES, ids=[f"{s}-{t}" for s, t in CASES])
def test_golden(spec, stage, update_golden):
    text = emit(ROOT / "specs" / f"{spec}.yaml", stage)
    path = GOLDEN / f"{spec}.{stage}.txt"
    if update_golden:
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run pytest --update-golden"
    assert text == path.read_text(), f"{path} differs from the current output: rerun with --update-golden if intended"

