"""Score modifiers as data: for each IR op kind that transforms the score tile, how it renders into
Triton, how the interpreter evaluates it, and its derivative rule.

A modifier maps the score `s` (kernel units: log2, s = log2(e) * S) to a new `s`; it may read a
per-head parameter given at call time (`HeadParam`) and save values for its derivative. Its vjp
maps the gradient with respect to its output (`ds`, natural units: the softmax backward's dS) to
the gradient with respect to its input, and, for a learnable parameter, gives the elementwise
contribution `g` to that parameter's gradient. Adding a modifier is one entry here, one line in
lower.py, and one field in spec.py; the templates do not change.

    kind         forward (kernel units)                       vjp
    scale        s = qk * scale * log2(e)                     ds * scale (applied once to dQ, dK)
    temperature  s = s * tau_h                                g = ds * S_in; ds = ds * tau_h
    softcap      t = tanh(s / c'); s = c' * t  (c' = c log2 e) ds = ds * (1 - t^2)
    alibi        s = s - slope_h * log2(e) * |i + Nk - Nq - j|  ds
    mask         s = -inf where not visible (family code)     ds (masked entries have P = 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import IRError
from .ir import Op, OpKind

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclass(frozen=True)
class HeadParam:
    """A per-head value passed at call time, one row of the kernels' HP tensor."""

    name: str  # the kernel variable is hp_<name>
    arg: str  # attention()'s keyword
    default: str  # runtime default: "alibi" (geometric slopes) or "ones"
    grad: bool  # differentiable: the dQ kernel sums its gradient
    load: str = ""  # applied when loaded (units)

    def as_data(self) -> dict:
        return {"arg": self.arg, "default": self.default, "grad": self.grad}


@dataclass(frozen=True)
class Env:
    """What an evaluator sees of a tile, natural units: positions broadcastable to the score tile,
    sizes, and per-head parameters shaped to broadcast over [B, H, rows, cols]."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    Nq: int
    Nk: int
    params: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ScoreMod:
    kind: OpKind
    triton: Callable[[Op], tuple[list[str], tuple[str, ...]]]  # -> (lines over s, names saved for the vjp)
    vjp_triton: Callable[[Op, str], tuple[list[str], dict[str, str]]]  # (op, ds var) -> (lines, {param: g expr})
    evaluate: Callable[[Op, torch.Tensor, Env], torch.Tensor]  # natural units
    vjp_evaluate: Callable[[Op, torch.Tensor, torch.Tensor, Env], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    param: HeadParam | None = None  # (ds, s_in) -> (ds_in, {param: elementwise g})


def _saved(op: Op, what: str) -> str:
    return f"{what}_{op.name}"


def _scale() -> ScoreMod:
    return ScoreMod(
        OpKind.SCALE,
        triton=lambda op: (["s = qk * qk_scale"], ()),
        # linear in a call-time scalar: the family multiplies dQ and dK by sm_scale once, after the loop
        vjp_triton=lambda op, ds: ([], {}),
        evaluate=lambda op, s, env: s * env.params["scale"],
        vjp_evaluate=lambda op, ds, s_in, env: (ds * env.params["scale"], {}),
    )


def _temperature() -> ScoreMod:
    param = HeadParam("temperature", "temperature", "ones", grad=True)

    def vjp(op, ds):
        s_in = _saved(op, "s_in")
        return [f"{ds} = {ds} * hp_temperature"], {"temperature": f"{ds} * {s_in} * {LN2!r}"}

    return ScoreMod(
        OpKind.TEMPERATURE,
        triton=lambda op: ([f"{_saved(op, 's_in')} = s", "s = s * hp_temperature"], (_saved(op, "s_in"),)),
        vjp_triton=vjp,
        evaluate=lambda op, s, env: s * env.params["temperature"],
        vjp_evaluate=lambda op, ds, s_in, env: (ds * env.params["temperature"], {"temperature": ds * s_in}),
        param=param,
    )


def _softcap() -> ScoreMod:
    def fwd(op):
        c, t = op.attr("softcap") * LOG2E, _saved(op, "t")
        return [f"{t} = _tanh(s * {1 / c!r}, FAST_TANH)  # softcap: c * tanh(s / c)", f"s = {c!r} * {t}"], (t,)

    def vjp(op, ds):
        t = _saved(op, "t")
        return [f"{ds} = {ds} * (1.0 - {t} * {t})  # softcap's derivative"], {}

    def vjp_eval(op, ds, s_in, env):
        t = torch.tanh(s_in / op.attr("softcap"))
        return ds * (1 - t * t), {}

    return ScoreMod(OpKind.SOFTCAP, fwd, vjp,
                    evaluate=lambda op, s, env: op.attr("softcap") * torch.tanh(s / op.attr("softcap")),
                    vjp_evaluate=vjp_eval)


def _distance(env: Env) -> torch.Tensor:
    return (env.q_idx + env.Nk - env.Nq - env.kv_idx).abs().to(torch.float64)


def _alibi() -> ScoreMod:
    return ScoreMod(
        OpKind.ALIBI,
        triton=lambda op: (["s = s - hp_alibi * tl.abs(q_idx + Nk - Nq - kv_idx).to(tl.float32)  # ALiBi"], ()),
        vjp_triton=lambda op, ds: ([], {}),
        evaluate=lambda op, s, env: s - env.params["alibi"] * _distance(env),
        vjp_evaluate=lambda op, ds, s_in, env: (ds, {}),
        param=HeadParam("alibi", "alibi_slopes", "alibi", grad=False, load=f" * {LOG2E!r}"),
    )


SCORE_MODS: dict[OpKind, ScoreMod] = {m.kind: m for m in (_scale(), _temperature(), _softcap(), _alibi())}


def head_params(ops) -> tuple[HeadParam, ...]:
    """The per-head parameters a kernel's score chain reads, in chain order."""
    return tuple(SCORE_MODS[o.kind].param for o in ops if o.kind in SCORE_MODS and SCORE_MODS[o.kind].param)


def check_renderable(kernel, family_kinds: frozenset) -> None:
    """Every op of `kernel` has a renderer: a score modifier here, or the family's template; a vjp
    op, through the modifier it differentiates (the family's mask passes ds through)."""
    for op in kernel.ops:
        kind = OpKind(op.attr("of")) if op.kind is OpKind.VJP else op.kind
        if kind not in SCORE_MODS and kind not in family_kinds:
            raise IRError(f"{kernel.name}: %{op.name} ({op.kind.value} of {kind.value}) has no renderer in "
                          f"attngen/ops.py nor in the kernel family's template")
