"""Loading a spec's kernel module: compile, write the source to a file (Triton's JIT reads
kernels' source from their file), import it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

CACHE = Path(os.environ.get("ATTNGEN_CACHE", Path.home() / ".cache" / "attngen"))


def write_if_different(path: Path, text: str) -> bool:
    """Writes only when the content changes (keeps mtimes and caches stable); True if written."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_LOADED: dict[tuple, ModuleType] = {}


def load(spec_path: str | Path, *, autotune: bool = False, **options) -> ModuleType:
    """Compiles the spec and returns its kernel module (exposing `attention`). The same spec text
    and options give the same module object within a process, without compiling again.
    With autotune=True on a GPU, tilings measured by `attngen autotune` for this GPU are used in
    their shape buckets (see attngen/autotune.py)."""
    from .passes import PassOptions
    from .pipeline import compile_spec

    spec_path = Path(spec_path)
    key = (str(spec_path.resolve()), spec_path.read_text() if spec_path.is_file() else None,
           tuple(sorted(options.items())))
    if key not in _LOADED:
        source = compile_spec(spec_path, options=PassOptions(**options)).source
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        name = f"attngen_kernel_{spec_path.stem}_{digest}"
        if name not in sys.modules:
            path = CACHE / f"{name}.py"
            write_if_different(path, source)
            import_file(path, name).__attngen_digest__ = digest
        _LOADED[key] = sys.modules[name]
    module = _LOADED[key]
    if autotune:
        import torch

        from .autotune import apply

        if torch.cuda.is_available():
            apply(module, torch.cuda.get_device_name())
    return module
