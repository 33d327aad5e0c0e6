"""Progress bars: drawn with an ETA on a terminal, absent otherwise (pipes, logs, CI)."""

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from attngen.tools.progress import progress


@pytest.mark.compiler
def test_a_terminal_gets_a_bar_with_an_eta():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with progress(3, "verify", console=console) as advance:
        for name in ("a", "b", "c"):
            advance(label=name)
    assert "eta" in out.getvalue() and "3/3" in out.getvalue()


@pytest.mark.compiler
def test_no_terminal_no_bar():
    out = io.StringIO()
    with progress(3, "verify", console=Console(file=out)) as advance:
        advance()
    assert out.getvalue() == ""


@pytest.mark.interp
def test_verify_piped_prints_no_progress():
    from cli.main import app

    result = CliRunner().invoke(app, ["verify", "causal", "dense", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert "eta" not in result.output and "passed, 0 failed" in result.output
