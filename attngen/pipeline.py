"""The compiler, straight-line: spec -> IR -> passes -> Triton, stoppable after any stage.

    compile_spec("specs/causal.yaml", stop="ir")      # the IR of each kernel after each pass
    emit("specs/causal.yaml", "triton")               # the generated module's source

A spec lowers to three kernels (forward; backward dK/dV; backward dQ); each runs through the same
passes, and one module holds them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .codegen import generate
from .cost_model import Ranking, format_ranking
from .ir import Kernel, print_ir
from .lower import derive_backward, lower
from .passes import PASSES, PassOptions, backward_forms, rankings, run_passes, variants_of
from .spec import Spec, load_spec

STAGES = ("spec", "ir", "tiling", "triton")


@dataclass(frozen=True)
class Compiled:
    spec: Spec
    stages: dict[str, tuple[tuple[str, Kernel], ...]] = field(default_factory=dict)  # role -> IR after each step
    rankings: dict[str, dict[str, Ranking]] = field(default_factory=dict)  # role -> dtype -> ranking
    source: str | None = None

    def kernel(self, role: str = "fwd") -> Kernel:
        return self.stages[role][-1][1]


def compile_spec(spec: Spec | str | Path, *, options: PassOptions = PassOptions(), stop: str = "triton",
                 standalone: bool = False) -> Compiled:
    if stop not in STAGES:
        raise ValueError(f"unknown stage {stop!r}; stages: {', '.join(STAGES)}")
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    if stop == "spec":
        return Compiled(spec)
    if spec.nsa is not None:
        if standalone:
            raise ValueError(f"{spec.source}: an nsa: spec has no --standalone module yet (its branches compile "
                             f"through attngen)")
        return _compile_nsa(spec, options, stop)
    stages, ranks = {}, {}
    fwd = lower(spec)
    for kernel in (fwd, *derive_backward(fwd)):
        steps = [("lower", kernel)]
        for name in PASSES:
            kernel = run_passes(kernel, options, (name,))
            steps.append((name, kernel))
        role = kernel.attr("role")
        stages[role] = tuple(steps)
        if stop in ("tiling", "triton"):
            before_tiling = dict(steps)["mask_plan"]
            ranks[role] = rankings(before_tiling, options)
            for variant in variants_of(before_tiling):  # ranked as their own role (bwd_single)
                ranks[variant] = rankings(before_tiling, options, variant)
    c = Compiled(spec, stages, ranks)
    if stop == "triton":
        c = Compiled(spec, stages, ranks, generate(spec, {role: c.kernel(role) for role in stages}, standalone))
    return c


def _compile_nsa(spec: Spec, options: PassOptions, stop: str) -> Compiled:
    """An NSA spec: its compressed and window branches are fa2 specs (their stages under roles
    `cmp.fwd`, `swa.bwd_dq`, ...); the module holds the selected branch's kernels besides
    (codegen_nsa.py, docs/decisions/nsa-plan.md)."""
    from . import codegen_nsa
    from .spec import parse_spec

    stages, ranks = {}, {}
    for branch, data in codegen_nsa.branch_specs(spec).items():
        c = compile_spec(parse_spec(data, f"{spec.source} ({branch} branch)"), options=options,
                         stop="tiling" if stop == "triton" else stop)
        stages.update({f"{branch}.{role}": steps for role, steps in c.stages.items()})
        ranks.update({f"{branch}.{role}": r for role, r in c.rankings.items()})
    return Compiled(spec, stages, ranks, codegen_nsa.generate(spec) if stop == "triton" else None)


def emit(spec: Spec | str | Path, stage: str, options: PassOptions = PassOptions()) -> str:
    """The printed form of one stage, as `attngen show --emit STAGE` prints it."""
    c = compile_spec(spec, options=options, stop=stage)
    if stage == "spec":
        return c.spec.to_yaml()
    if stage == "ir":
        return "\n".join(f"// {role}, after {name}\n{print_ir(k)}" for role, steps in c.stages.items()
                         for name, k in steps)
    if stage == "tiling":
        text = "\n".join(f"// {role}, {dtype}\n{format_ranking(r, top=5)}" for role, by_dtype in c.rankings.items()
                         for dtype, r in by_dtype.items())
        if {"bwd_dq", "bwd_dkdv"} <= set(c.stages):
            forms = backward_forms({role: c.kernel(role) for role in c.stages})
            text += "\n// the backward's form (deterministic=None), per dtype at each ranked length\n" + "".join(
                f"{d}: " + ", ".join(f"{seq}: {form}" for seq, form in by_seq) + "\n" for d, by_seq in forms.items())
        return text
    return c.source
