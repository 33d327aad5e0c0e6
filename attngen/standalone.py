"""`attngen generate --standalone`: a generated module with the runtime inlined verbatim, for
someone who vendors a single file (it then imports only torch and triton)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

RUNTIME = Path(__file__).resolve().parent / "runtime"

# The runtime's modules in dependency order (attngen/runtime/__init__.py only re-exports them).
RUNTIME_MODULES = ("roles", "host_math", "tl_lib", "table_kernel", "tiles", "layouts", "block_mask", "varlen", "window", "sparse", "launch", "decode_gate", "library", "memory", "decode", "gluon_dkdv", "module")


def _as_modules(texts: dict[str, str]) -> dict[str, set[str]]:
    """module -> the names it is bound to by `from . import module [as name]` anywhere in the runtime."""
    names: dict[str, set[str]] = {}
    for text in texts.values():
        for line in re.findall(r"^from \. import (.+)$", text, re.M):
            for part in line.split(","):
                module, _, alias = part.strip().partition(" as ")
                names.setdefault(module, set()).add(alias or module)
    return names


def _namespace(name: str, alias: str, text: str) -> str:
    """`alias = types.SimpleNamespace(...)` of the module's top-level names: `decode.run` then works
    where the module was imported as a module."""
    top = []
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.append(node.name)
        elif isinstance(node, ast.Assign):
            top += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return f"{alias} = types.SimpleNamespace(**{{n: globals()[n] for n in {tuple(top)!r}}})  # runtime/{name}.py"


def runtime_source() -> str:
    """The runtime's modules, concatenated, without their imports of each other (a module imported
    as a module becomes a namespace of its names)."""
    imports, bodies = ["import types"], []
    texts = {name: (RUNTIME / f"{name}.py").read_text() for name in RUNTIME_MODULES}
    as_modules = _as_modules(texts)
    for name in RUNTIME_MODULES:
        text = texts[name]
        body = []
        for line in text.splitlines():
            if line.startswith(("from __future__", "from .")):
                continue
            if line.startswith(("import ", "from ")) and not line.startswith("from . "):
                if line not in imports:
                    imports.append(line)
                continue
            body.append(line)
        body += [_namespace(name, alias, text) for alias in sorted(as_modules.get(name, ()))]
        bodies.append(f"# ---- attngen/runtime/{name}.py\n" + "\n".join(body).strip("\n"))
    return "\n".join(imports) + "\n\n\n" + "\n\n\n".join(bodies)


def inline_runtime(imports: list[str], binding: str) -> tuple[list[str], str]:
    """The module's imports and binding with the runtime inlined instead of imported."""
    kept = [line for line in imports if not line.startswith("from attngen")]
    binding = "\n".join(line for line in binding.splitlines() if not line.startswith("from attngen"))
    return kept + ["", "", runtime_source()], binding.lstrip("\n")
