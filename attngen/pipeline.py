"""The compiler, straight-line: spec -> IR -> passes -> Triton, stoppable after any stage.

    compile_spec("specs/causal.yaml", stop="ir")      # the IR after each pass, as text
    emit("specs/causal.yaml", "triton")               # the generated module's source
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .codegen import generate
from .cost_model import Ranking, format_ranking
from .ir import Kernel, print_ir
from .lower import lower
from .passes import PASSES, PassOptions, rankings, run_passes
from .spec import Spec, load_spec

STAGES = ("spec", "ir", "tiling", "triton")


@dataclass(frozen=True)
class Compiled:
    spec: Spec
    stages: tuple[tuple[str, Kernel], ...] = ()  # the IR after lowering and after each pass
    rankings: dict[str, Ranking] = field(default_factory=dict)
    source: str | None = None

    @property
    def kernel(self) -> Kernel:
        return self.stages[-1][1]


def compile_spec(spec: Spec | str | Path, *, options: PassOptions = PassOptions(), stop: str = "triton") -> Compiled:
    if stop not in STAGES:
        raise ValueError(f"unknown stage {stop!r}; stages: {', '.join(STAGES)}")
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    if stop == "spec":
        return Compiled(spec)
    kernel = lower(spec)
    stages = [("lower", kernel)]
    for name in PASSES:
        kernel = run_passes(kernel, options, (name,))
        stages.append((name, kernel))
    ranks = rankings(stages[-2][1], options) if stop in ("tiling", "triton") else {}
    source = generate(spec, kernel) if stop == "triton" else None
    return Compiled(spec, tuple(stages), ranks, source)


def emit(spec: Spec | str | Path, stage: str, options: PassOptions = PassOptions()) -> str:
    """The printed form of one stage, as `attngen show --emit STAGE` prints it."""
    c = compile_spec(spec, options=options, stop=stage)
    if stage == "spec":
        return c.spec.to_yaml()
    if stage == "ir":
        return "\n".join(f"// after {name}\n{print_ir(k)}" for name, k in c.stages)
    if stage == "tiling":
        return "\n".join(f"// {dtype}\n{format_ranking(r)}" for dtype, r in c.rankings.items())
    return c.source
