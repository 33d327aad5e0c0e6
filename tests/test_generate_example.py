"""examples/generate.py: a Llama-shaped model generates the same greedy tokens with attngen's
prefill and decode (attention_with_kvcache) as with torch SDPA, in fp32 on the interpreter."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.interp
def test_generate_example_matches_sdpa_greedy_tokens():
    spec = importlib.util.spec_from_file_location("generate_example", ROOT / "examples" / "generate.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(mod)
    results = mod.main(["--device", "cpu", "--batch", "2", "--prompt", "9", "--new", "5", "--check"])
    assert results["attngen"]["tokens"] == results["sdpa"]["tokens"]
    assert len(results["attngen"]["tokens"][0]) == 5
