"""`attngen generate --standalone`: a generated module with the runtime inlined verbatim, for
someone who vendors a single file (it then imports only torch and triton)."""

from __future__ import annotations

from pathlib import Path

RUNTIME = Path(__file__).resolve().parent / "runtime"

# The runtime's modules in dependency order (attngen/runtime/__init__.py only re-exports them).
RUNTIME_MODULES = ("roles", "host_math", "tl_lib", "table_kernel", "tiles", "layouts", "block_mask", "varlen", "sparse", "launch", "library", "decode", "module")


def runtime_source() -> str:
    """The runtime's modules, concatenated, without their imports of each other."""
    imports, bodies = [], []
    for name in RUNTIME_MODULES:
        text = (RUNTIME / f"{name}.py").read_text()
        body = []
        for line in text.splitlines():
            if line.startswith(("from __future__", "from .")):
                continue
            if line.startswith(("import ", "from ")) and not line.startswith("from . "):
                if line not in imports:
                    imports.append(line)
                continue
            body.append(line)
        bodies.append(f"# ---- attngen/runtime/{name}.py\n" + "\n".join(body).strip("\n"))
    return "\n".join(imports) + "\n\n\n" + "\n\n\n".join(bodies)


def inline_runtime(imports: list[str], binding: str) -> tuple[list[str], str]:
    """The module's imports and binding with the runtime inlined instead of imported."""
    kept = [line for line in imports if not line.startswith("from attngen")]
    binding = "\n".join(line for line in binding.splitlines() if not line.startswith("from attngen"))
    return kept + ["", "", runtime_source()], binding.lstrip("\n")
