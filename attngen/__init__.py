"""attngen: a compiler for attention variants.

    import attngen
    mod = attngen.load("specs/causal.yaml")
    o = mod.attention(q, k, v)
"""

__version__ = "0.1.0"

from .loader import load  # noqa: E402

__all__ = ["load", "__version__"]
