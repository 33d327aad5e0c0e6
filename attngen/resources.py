"""Where the templates, the shipped specs and the cost constants live: one place for all of them.

A wheel (`pip install .`) holds the repository's folders inside the package, as pyproject.toml maps
them: attngen/templates/, attngen/specs/, attngen/data/cost_constants.json. A source checkout, and
the editable install (`pip install -e .`), reads them where they are in the repository: templates/,
specs/, data/. (setuptools' editable install cannot import a mapped folder that has no __init__.py,
so these are looked up beside the package rather than imported as attngen.templates and so on.)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

_PACKAGE = Path(str(files("attngen")))
_INSTALLED = (_PACKAGE / "templates").is_dir()  # a wheel install: the folders lie inside the package
_ROOT = _PACKAGE if _INSTALLED else _PACKAGE.parent  # else the repository's root


def templates_dir() -> Path:
    """The Jinja templates the code generator renders."""
    return _ROOT / "templates"


def specs_dir() -> Path:
    """The shipped specs (`attngen list`)."""
    return _ROOT / "specs"


def shipped_specs() -> list[Path]:
    """The shipped spec files, sorted."""
    return sorted(specs_dir().glob("*.yaml"))


def cost_constants_path() -> Path:
    """The cost model's fitted constants (written by `attngen calibrate --write`)."""
    return _ROOT / "data" / "cost_constants.json"


def generated_dir() -> Path:
    """Where `attngen generate` writes by default: the repository's generated/ in a checkout,
    ./generated (from the working directory) in a wheel install."""
    return Path("generated") if _INSTALLED else _ROOT / "generated"


def resolve_spec(arg: str | Path) -> Path:
    """A spec argument of the command line: the file if there is one, else a shipped spec named bare
    ('causal' or 'causal.yaml'), else the argument as it is (loading it then says what is wrong)."""
    path = Path(arg)
    if path.is_file() or len(path.parts) != 1:
        return path
    shipped = specs_dir() / f"{path.name.removesuffix('.yaml')}.yaml"
    return shipped if shipped.is_file() else path
