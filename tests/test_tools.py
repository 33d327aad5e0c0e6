"""The GPU-session tools as subcommands (attngen/tools/): each exists and explains itself, the
offline SASS inspection works on this machine or says why not, bench-merge merges, and
`verify --jobs N` reports what a single process does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

try:
    import torch

    HAS_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_GPU = False

TINY = """name: {name}
description: a small causal spec for the tools' tests
head_dim: 32
dtypes: [{dtypes}]
mask:
  causal: true
"""


def tiny_spec(tmp_path: Path, name: str = "tiny", dtypes: str = "fp32") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(name=name, dtypes=dtypes))
    return path


@pytest.mark.compiler
@pytest.mark.parametrize("command, expected", [
    (["inspect"], ["--offline", "--role", "--shape", "SASS"]),
    (["profile"], ["--fwd", "spec:head_dim:BxHxN"]),
    (["bench"], ["--ab", "OPTION", "--exhaustive"]),
    (["bench-merge"], ["--json", "--markdown", "Merges"]),
    (["verify"], ["--jobs", "--backward"]),
])
def test_subcommand_help(command, expected):
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output, (text, result.output)


@pytest.mark.compiler
def test_the_tools_are_subcommands_not_scripts():
    listed = runner.invoke(app, ["--help"], terminal_width=200).output
    for name in ("inspect", "profile", "bench-merge"):
        assert name in listed
    assert sorted(p.name for p in (ROOT / "scripts").iterdir() if p.name != "__pycache__") == ["gpu_final.sh"]
    assert "bench-merge" in (ROOT / "scripts" / "gpu_final.sh").read_text()


@pytest.mark.compiler
def test_experiments_compile_and_say_where_they_ran():
    import ast
    import py_compile

    files = sorted((ROOT / "experiments").glob("*.py"))
    assert files
    for path in files:
        py_compile.compile(str(path), doraise=True)
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.startswith("Ran on: Triton "), path.name


@pytest.mark.compiler
def test_bench_ab_checks_its_option_first():
    bad = runner.invoke(app, ["bench", "causal.yaml", "--ab", "nonesuch"])
    assert bad.exit_code == 2
    assert "--ab: expected one of longest_first, split_loops" in bad.output and "nonesuch" in bad.output
    both = runner.invoke(app, ["bench", "causal.yaml", "--ab", "longest_first", "--exhaustive", "4"])
    assert both.exit_code == 2 and "--ab cannot go with --exhaustive" in both.output


@pytest.mark.compiler
@pytest.mark.skipif(HAS_GPU, reason="checks the message on a machine without a GPU")
def test_gpu_tools_say_they_need_a_gpu():
    for args, name in ((["bench", "causal.yaml", "--ab", "longest_first"], "bench"),
                       (["profile", "causal:128:1x2x128"], "profile"),
                       (["inspect", "causal"], "inspect")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert f"attngen {name} needs a CUDA GPU" in result.output
    assert "--offline compiles for sm90 without one" in runner.invoke(app, ["inspect", "causal"]).output


@pytest.mark.compiler
def test_inspect_offline_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = runner.invoke(app, ["inspect", "causal", "--offline"])
    assert result.exit_code == 2
    assert "--offline compiles the kernels for sm90, which Triton's interpreter cannot: unset TRITON_INTERPRET" \
        in result.output


@pytest.mark.compiler
def test_inspect_offline_compiles_for_sm90_or_says_why_not(tmp_path):
    """Compiles one small kernel for sm90 through the installed Triton's binder (in a process of
    its own: the test session runs Triton's interpreter), or fails with a message that says what
    is missing."""
    spec = tiny_spec(tmp_path, "tiny_inspect", "bf16")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "cli.main", "inspect", str(spec), "--offline", "--role", "fwd",
                           "--role", "bwd_single", "--shape", "1x2x128", "--out", str(tmp_path / "sass")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if done.returncode != 0:  # no NVIDIA toolchain for this Triton: the message says so
        assert done.returncode == 2, done.stdout + done.stderr
        assert "--offline needs" in done.stderr, done.stderr
        return
    lines = [line for line in done.stdout.splitlines() if line.startswith("tiny_inspect fwd ")]
    assert len(lines) == 2, done.stdout + done.stderr  # pointer loads, then TMA loads
    assert "tma" not in lines[0].split(":")[0] and lines[1].split(":")[0].endswith(" tma")
    for line in lines:
        assert "failed" not in line, line
        assert " regs " in line and " smem " in line and " HGMMA " in line
    assert int(lines[1].split("UTMALDG ")[1].split()[0]) > 0  # the TMA variant loads through TMA
    assert len(list((tmp_path / "sass").glob("tiny_inspect_fwd_*.sass"))) == 2
    single = [line for line in done.stdout.splitlines() if line.startswith("tiny_inspect bwd_single ")]
    assert len(single) == 2 and not any("failed" in line for line in single), done.stdout + done.stderr
    count = lambda line, op: int(line.split(f" {op} ")[1].split()[0])  # noqa: E731
    # dQ added per element (pointer tiles), by one TMA bulk reduction per tile (TMA tiles)
    assert count(single[0], "REDG") > 0 and count(single[0], "UTMAREDG") == 0, single[0]
    assert count(single[1], "UTMAREDG") > 0 and count(single[1], "REDG") == 0, single[1]


def _bench_file(path: Path, device: str, rows: list[dict]) -> Path:
    env = {"device": device, "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0"}
    path.write_text(json.dumps({"environment": env, "rows": rows}))
    return path


@pytest.mark.compiler
def test_bench_merge_merges_two_files(tmp_path):
    a = _bench_file(tmp_path / "fwd_a.json", "NVIDIA H200", [
        {"spec": "causal", "shape": "B4 H16 N4096", "mode": "fwd", "tflops": {"attngen": 500.0, "flex": 400.0},
         "ms": {"attngen": 1.0, "flex": 1.25}, "notes": {}}])
    b = _bench_file(tmp_path / "fwd_b.json", "NVIDIA H100", [
        {"spec": "dense", "shape": "B1 H16 N16384", "mode": "fwd", "tflops": {"attngen": 600.0, "sdpa_cudnn": 620.0},
         "ms": {"attngen": 2.0, "sdpa_cudnn": 1.9}, "notes": {"flex": "disagreed"}}])
    out_json, out_md = tmp_path / "merged.json", tmp_path / "merged.md"
    result = runner.invoke(app, ["bench-merge", str(b), str(a), "--json", str(out_json), "--markdown", str(out_md)])
    assert result.exit_code == 0, result.output
    merged = json.loads(out_json.read_text())
    assert merged["environment"]["device"] == "NVIDIA H200"  # the first file's, in sorted order
    assert [r["spec"] for r in merged["rows"]] == ["causal", "dense"]
    assert merged["rows"][1]["notes"] == {"flex": "disagreed"}
    table = out_md.read_text()
    assert result.output == table
    assert "Device: NVIDIA H200" in table
    assert "| causal | B4 H16 N4096 | fwd |" in table and "| dense | B1 H16 N16384 | fwd |" in table
    assert "| 1.25 |" in table  # causal: ours / flex = 500 / 400
    assert "dense B1 H16 N16384 fwd, flex: disagreed" in table

    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    result = runner.invoke(app, ["bench-merge", str(bad)])
    assert result.exit_code == 2 and f"{bad}: not an `attngen bench --json` file" in result.output


@pytest.mark.interp
def test_verify_jobs_prints_what_one_process_does(tmp_path):
    """--jobs 2 runs the spec in a spawned worker (the interpreter's TRITON_INTERPRET inherited)
    and prints the same table and verdict as --jobs 1."""
    spec = str(tiny_spec(tmp_path, "tiny_jobs", "fp32"))
    one = runner.invoke(app, ["verify", spec, "--jobs", "1"])
    two = runner.invoke(app, ["verify", spec, "--jobs", "2"])
    assert one.exit_code == 0, one.output
    assert two.exit_code == 0, two.output
    assert "| tiny_jobs | fp32 |" in one.output and "passed, 0 failed" in one.output
    assert two.output.splitlines() == one.output.splitlines()


@pytest.mark.compiler
def test_verify_jobs_reports_a_bad_spec_as_one_process_does(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nhead_dim: 64\nmask: {window: {left: -3}}\n")
    for jobs in ("1", "2"):
        result = runner.invoke(app, ["verify", str(bad), "--jobs", jobs])
        assert result.exit_code == 2, result.output
        assert f"{bad}: mask.window.left: expected a non-negative integer, got -3" in result.output


@pytest.mark.compiler
def test_option_flags_turn_on_or_off():
    """--option NAME turns a PassOptions flag on, NAME=false off (chunked_head_dims is on by default)."""
    from attngen.tools.ab import flag_values

    assert flag_values(["split_loops", "chunked_head_dims=false", "longest_first=On"]) == {
        "split_loops": True, "chunked_head_dims": False, "longest_first": True}
    with pytest.raises(ValueError, match="expected one of"):
        flag_values(["nonsense=false"])
    with pytest.raises(ValueError, match=r"chunked_head_dims=true\|false"):
        flag_values(["chunked_head_dims=2"])
