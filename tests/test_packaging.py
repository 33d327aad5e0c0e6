"""Packaging: attngen.resources finds the templates, the shipped specs and the cost constants (in a
checkout and the editable install: the repository's folders), from any working directory.
.ci/wheel_smoke.sh checks the same in a wheel install."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from attngen import resources
from attngen.errors import AttngenError

pytestmark = pytest.mark.compiler

ROOT = Path(__file__).resolve().parent.parent


def test_resources_are_the_repository_folders():
    assert resources.templates_dir() == ROOT / "templates"
    assert resources.specs_dir() == ROOT / "specs"
    assert resources.cost_constants_path() == ROOT / "data" / "cost_constants.json"
    assert resources.cost_constants_path().is_file()
    assert any(resources.templates_dir().rglob("*.jinja"))


def test_shipped_specs_are_the_repository_specs():
    shipped = resources.shipped_specs()
    assert shipped and shipped == sorted(shipped)
    assert shipped == sorted((ROOT / "specs").glob("*.yaml"))


def test_a_shipped_spec_is_named_bare_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resources.resolve_spec("causal") == ROOT / "specs" / "causal.yaml"
    assert resources.resolve_spec("causal.yaml") == ROOT / "specs" / "causal.yaml"
    (tmp_path / "causal.yaml").write_text("name: mine\nhead_dim: 64\n")  # a file in the cwd wins
    assert resources.resolve_spec("causal.yaml") == Path("causal.yaml")
    assert resources.resolve_spec("nonesuch") == Path("nonesuch")  # left for load_spec to report
    assert resources.resolve_spec("sub/causal") == Path("sub/causal")  # paths are never looked up


def test_cli_lists_and_shows_shipped_specs_from_any_directory(tmp_path, monkeypatch):
    from cli.main import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.output.splitlines()] == [p.stem for p in resources.shipped_specs()]
    shown = runner.invoke(app, ["show", "prefix_lm", "--emit", "spec"])
    assert shown.exit_code == 0, shown.output
    assert "prefix: 128" in shown.output
    missing = runner.invoke(app, ["show", "nonesuch", "--emit", "spec"])
    assert missing.exit_code == 2 and "nonesuch: cannot read the file" in missing.output


def test_missing_cost_constants_are_an_error(tmp_path, monkeypatch):
    from attngen import cost_model

    missing = tmp_path / "cost_constants.json"
    monkeypatch.setattr(resources, "cost_constants_path", lambda: missing)
    with pytest.raises(AttngenError, match="cost_constants.json: the cost model's fitted constants are missing"):
        cost_model.load_fitted()
    missing.write_text('{"scale": 2.0}')
    assert cost_model.load_fitted() == cost_model.Constants(scale=2.0)
