"""Loading a spec's kernel module: compile, write the source to a file (Triton's JIT reads
kernels' source from their file), import it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import uuid
from pathlib import Path
from types import ModuleType

CACHE = Path(os.environ.get("ATTNGEN_CACHE", Path.home() / ".cache" / "attngen"))


def write_if_different(path: Path, text: str) -> bool:
    """Writes only when the content changes (keeps mtimes and caches stable); True if written."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # processes loading at once
    tmp.write_text(text)  # (torchrun's ranks) each write their own and rename it over the file
    tmp.replace(path)
    return True


def import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_LOADED: dict[tuple, ModuleType] = {}
_COMPILER: list[str] = []


def _digest(paths, h=None) -> str:
    h = h or hashlib.sha256()
    for path in paths:
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def compiler_digest() -> str:
    """What a compiled module depends on besides its spec and options: attngen's version, sources
    and cost constants as this process imported them (hashed once), and the templates as Jinja
    reads them now (it reloads edited ones). An edited checkout never reads a stale module."""
    from .resources import cost_constants_path, templates_dir

    if not _COMPILER:
        from . import __version__

        package = Path(__file__).parent
        _COMPILER.append(_digest([*sorted(package.rglob("*.py")), cost_constants_path()],
                                 hashlib.sha256(__version__.encode())))
    return _COMPILER[0] + _digest(sorted(templates_dir().rglob("*.jinja")))


def _cached(index: Path) -> tuple[str, Path] | None:
    """The module an earlier process compiled for this key, if its file is intact."""
    try:
        name = index.read_text().strip()
        path = CACHE / f"{name}.py"
        if hashlib.sha256(path.read_bytes()).hexdigest()[:16] == name.rsplit("_", 1)[1]:
            return name, path
    except (OSError, IndexError, ValueError):  # missing, truncated or not text: compile again
        pass
    return None


def load(spec_path: str | Path, *, autotune: bool = False, cache: bool = True, **options) -> ModuleType:
    """Compiles the spec and returns its kernel module (exposing `attention`). The same spec text
    and options give the same module object within a process, without compiling again, and (with
    `cache`) the module compiled by an earlier process, from $ATTNGEN_CACHE (~/.cache/attngen),
    keyed by the spec's text, the options and compiler_digest().
    With autotune=True on a GPU, tilings measured by `attngen autotune` for this GPU are used in
    their shape buckets (see attngen/autotune.py)."""
    spec_path = Path(spec_path)
    text = spec_path.read_text() if spec_path.is_file() else None
    key = (str(spec_path.resolve()), text, tuple(sorted(options.items())))
    if key not in _LOADED:
        index = None
        if cache and text is not None:
            digest = hashlib.sha256(repr((compiler_digest(), spec_path.stem, text, key[2])).encode()).hexdigest()[:24]
            index = CACHE / "index" / digest
        found = _cached(index) if index is not None else None
        if found is None:
            from .passes import PassOptions
            from .pipeline import compile_spec

            source = compile_spec(spec_path, options=PassOptions(**options)).source
            name = f"attngen_kernel_{spec_path.stem}_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
            path = CACHE / f"{name}.py"
            write_if_different(path, source)
            if index is not None:
                write_if_different(index, name)
        else:
            name, path = found
        if name not in sys.modules:
            import_file(path, name).__attngen_digest__ = name.rsplit("_", 1)[1]
        _LOADED[key] = sys.modules[name]
    module = _LOADED[key]
    if autotune:
        import torch

        from .autotune import apply

        if torch.cuda.is_available():
            apply(module, torch.cuda.get_device_name())
    return module


def load_derived(data: dict, **options) -> ModuleType:
    """The module of a spec given as a dict (a family's derived spec, e.g. an NSA branch): its YAML
    is written once under $ATTNGEN_CACHE/specs/ and loaded (and disk-cached) like a file."""
    import yaml

    text = yaml.safe_dump(data, sort_keys=False)
    path = CACHE / "specs" / f"{data['name']}_{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    write_if_different(path, text)
    return load(path, **options)
