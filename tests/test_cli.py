"""The command line: list, show, generate, verify (exit codes included)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.mark.compiler
def test_list_names_every_shipped_spec():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for path in (ROOT / "specs").glob("*.yaml"):
        assert path.stem in result.output


@pytest.mark.compiler
def test_show_every_stage():
    spec = str(ROOT / "specs" / "prefix_lm.yaml")
    outputs = {stage: runner.invoke(app, ["show", spec, "--emit", stage]) for stage in ("spec", "ir", "tiling", "triton")}
    assert all(r.exit_code == 0 for r in outputs.values())
    assert "prefix: 128" in outputs["spec"].output
    assert "kv_loop {" in outputs["ir"].output and "q_loop {" in outputs["ir"].output
    assert "// bwd_dkdv, bf16" in outputs["tiling"].output and "pred ms" in outputs["tiling"].output
    assert "def _attn_fwd(" in outputs["triton"].output and "RUNTIME = KernelModule(globals())" in outputs["triton"].output
    bad = runner.invoke(app, ["show", spec, "--emit", "asm"])
    assert bad.exit_code == 2 and "expected one of spec, ir, tiling, triton" in bad.output


@pytest.mark.compiler
def test_show_tiling_of_an_nsa_spec_names_its_selected_loop_orders():
    small = runner.invoke(app, ["show", "nsa", "--emit", "tiling", "--decode", "1x16/8x1x65536"])
    large = runner.invoke(app, ["show", "nsa", "--emit", "tiling", "--decode", "1x64/4x1x32768"])
    longer = runner.invoke(app, ["show", "nsa", "--emit", "tiling", "--decode", "1x64/4x1x65536"])
    assert small.exit_code == 0 and large.exit_code == 0 and longer.exit_code == 0
    assert "// nsa selected branch, Hq=16 Hkv=8 N=65536" in small.output
    assert "forward key-major" in small.output and "loop_order='query' or 'key'" in small.output
    assert "dQ key-major from the work items" in small.output  # a group of 2 pads query-major's 16 rows
    assert "forward query-major, 4 tokens x 16 heads" in large.output and "dQ query-major" in large.output
    assert "forward query-major, 1 token x 16 heads" in longer.output  # past 32k tokens, one token a program


@pytest.mark.compiler
def test_show_tiling_says_what_a_gated_decode_walks_and_refuses_a_bad_shape():
    layout = runner.invoke(app, ["show", "block_sparse", "--emit", "tiling", "--decode", "1x32/8x1x131072"])
    documents = runner.invoke(app, ["show", "document", "--emit", "tiling", "--decode", "1x32/8x1x131072"])
    assert layout.exit_code == 0 and "of the tiles of the layout's visible key blocks" in layout.output
    assert documents.exit_code == 0 and "within the span of the queries' documents" in documents.output
    for bad in ("1x131072", "1x32/5x1x100", "1x32/8x0x100", "ax32/8x1x100"):
        result = runner.invoke(app, ["show", "causal", "--emit", "tiling", "--decode", bad])
        assert result.exit_code == 2 and "expected BxHQ/HKVxNQxCONTEXT" in result.output, bad


@pytest.mark.compiler
def test_generate_writes_once(tmp_path):
    spec = str(ROOT / "specs" / "causal.yaml")
    first = runner.invoke(app, ["generate", spec, "-o", str(tmp_path)])
    assert first.exit_code == 0 and "written" in first.output and "BLOCK_M=" in first.output
    assert (tmp_path / "causal.py").read_text() == (ROOT / "generated" / "causal.py").read_text()
    assert "unchanged" in runner.invoke(app, ["generate", spec, "-o", str(tmp_path)]).output


@pytest.mark.compiler
def test_bad_spec_exits_2_with_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nhead_dim: 64\nmask: {window: {left: -3}}\n")
    result = runner.invoke(app, ["generate", str(bad), "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{bad}: mask.window.left: expected a non-negative integer, got -3" in result.output
    assert not (tmp_path / "bad.py").exists()


@pytest.mark.interp
def test_verify_passes_and_fails_by_exit_code(monkeypatch):
    spec = str(ROOT / "specs" / "causal_bottom_right.yaml")
    ok = runner.invoke(app, ["verify", spec, "--dtype", "fp32"])
    assert ok.exit_code == 0, ok.output
    assert "5 passed, 0 failed" in ok.output

    import attngen.verify as verify

    real = verify.check

    def broken(*args, **kwargs):  # any failed check must fail the command
        r = real(*args, **kwargs)
        return verify.Result(r.spec, r.dtype, r.shape, r.errors, False, "forced mismatch")

    monkeypatch.setattr(verify, "check", broken)
    bad = runner.invoke(app, ["verify", spec, "--dtype", "fp32"])
    assert bad.exit_code == 1 and "FAIL: forced mismatch" in bad.output and "0 passed, 5 failed" in bad.output


@pytest.mark.compiler
def test_head_dim_copies_and_script_cases():
    """`bench --head-dim` benches a renamed copy of a shipped spec; the GPU scripts' cases
    ('name:head_dim[:BxHxN]') resolve to the same copies."""
    from attngen.bench import BenchShape, parse_case, with_head_dim
    from attngen.spec import load_spec

    causal = ROOT / "specs" / "causal.yaml"
    copy = with_head_dim(causal, 64)
    spec = load_spec(copy)
    assert (spec.name, spec.head_dim, spec.head_dim_v) == ("causal_d64", 64, 64)
    assert spec.mask == load_spec(causal).mask
    assert with_head_dim(causal, 128) == causal  # already that head dim: the spec itself
    assert parse_case("causal:64:4x16x4096") == (copy, BenchShape(4, 16, 4096))
    assert parse_case("causal:128") == (causal.resolve(), None)
    assert parse_case("specs/dense.yaml") == (Path("specs/dense.yaml"), None)


@pytest.mark.compiler
def test_verify_and_bench_name_the_allowed_options():
    """verify --option compiles with a lowering option on, or off with NAME=false; an unknown one, or
    a value not true / false, exits 2 naming what is allowed, before anything runs; bench --warm
    needs --exhaustive."""
    bad = runner.invoke(app, ["verify", "causal", "--option", "nonsense"])
    assert bad.exit_code == 2 and "chunked_head_dims" in bad.output and "nonsense" in bad.output
    value = runner.invoke(app, ["verify", "causal", "--option", "chunked_head_dims=maybe"])
    assert value.exit_code == 2 and "chunked_head_dims=true|false" in value.output
    warm = runner.invoke(app, ["bench", "causal", "--warm", "2"])
    assert warm.exit_code == 2 and "--exhaustive" in warm.output
