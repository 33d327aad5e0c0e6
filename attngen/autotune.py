"""Autotuning: measure the cost model's top candidates on the GPU and cache the winner per
(spec, shape bucket, GPU name) on disk; loading a spec with autotune=True applies the cached
winners, which the generated module then uses for calls in those shape buckets.

    attngen autotune specs/causal.yaml --shapes 4x16x4096 --top 8     # on the GPU: measure, cache
    mod = attngen.load("specs/causal.yaml", autotune=True)           # uses the cache for this GPU

The single pass's tilings (bwd_single) are tuned too, and the faster backward form per bucket is
kept (it decides deterministic=None where the module's default is None, before the cost model).

Buckets are the next powers of two of Nq and Nk (runtime.KernelModule.config). An entry is
keyed by the generated source's digest too, so a compiler change that alters the kernels makes old
entries unused instead of wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from . import runtime
from .bench import BenchShape
from .exhaustive import as_launch, search
from .loader import CACHE, load
from .runtime.module import TUNED_FORM as FORM  # an entry's role: the backward's form measured faster
from .runtime.roles import VARIANTS

CACHE_FILE = CACHE / "autotune.json"


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _key(digest: str, gpu: str, role: str, dtype: str, nq: int, nk: int) -> str:
    return f"{digest}|{gpu}|{role}|{dtype}|{_bucket(nq)}|{_bucket(nk)}"


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def tune(spec_path: str | Path, shapes: list[BenchShape], timer: Callable[[Callable], float], gpu: str,
         top: int = 8, dtype: str = "bf16", device: str = "cuda", path: Path | None = None) -> dict[str, dict]:
    """Measures the `top` ranked tilings of each kernel at each shape; caches and returns the winners."""
    path = path or CACHE_FILE
    module = load(spec_path)
    winners = {}
    for shape in shapes:
        best_ms = {}  # role -> its best candidate's time (each times a whole backward for the backward roles)
        for role in (*runtime.ROLES, *VARIANTS):
            timed = [t for t in search(spec_path, shape, role, timer, dtype, device, top) if t.measured_ms is not None]
            if timed:
                best = min(timed, key=lambda t: t.measured_ms)
                key = _key(module.__attngen_digest__, gpu, role, dtype, shape.seq, shape.seq)
                winners[key] = {**as_launch(best.config), "measured_ms": best.measured_ms, "rank": best.rank}
                best_ms[role] = best.measured_ms
        if {"bwd_dq", "bwd_dkdv", "bwd_single"} <= set(best_ms):  # the backward's form, as measured
            two = min(best_ms["bwd_dq"], best_ms["bwd_dkdv"])
            key = _key(module.__attngen_digest__, gpu, FORM, dtype, shape.seq, shape.seq)
            winners[key] = {"form": "single pass" if best_ms["bwd_single"] < two else "two kernels",
                            "measured_ms": min(two, best_ms["bwd_single"])}
    cache = _read(path)
    cache.update(winners)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache, indent=1, sort_keys=True))
    return winners


def apply(module, gpu: str, path: Path | None = None) -> int:
    """Fills the module's tuned tilings (runtime.of(module).tuned) from the cache entries for its
    source and this GPU; returns how many."""
    tuned, applied = runtime.of(module).tuned, 0
    for key, entry in _read(path or CACHE_FILE).items():
        digest, key_gpu, role, dtype, nq, nk = key.split("|")
        if digest == module.__attngen_digest__ and key_gpu == gpu:
            tuned[(role, dtype, int(nq), int(nk))] = entry["form"] if role == FORM else \
                {k: v for k, v in entry.items() if k not in ("measured_ms", "rank")}
            applied += 1
    return applied
