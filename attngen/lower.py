"""Lowering: a validated Spec becomes the forward kernel's tile IR; the backward kernels' IR is
derived from it (`derive_backward`), one kernel per launch.

    spec softcap (window 512, softcap 50)        forward                 backward dQ (derived)
                                                 %q = load_q()           %q = load_q()  %do = load_do()
                                                 kv_loop {               kv_loop {
                                                   %k = load_k()           %k = load_k()  %v = load_v()
                                                   %v = load_v()           %s = qk(%q, %k)
                                                   %s = qk(%q, %k)         ... the forward's score chain ...
                                                   %s1 = scale(%s)         %p = recompute_p(%s3)
                                                   %s2 = softcap(%s1)      %dp = dp(%do, %v)
                                                   %s3 = mask(%s2)         %ds3 = ds(%p, %dp)
                                                   %p = online_softmax(%s3)  %ds2 = vjp.mask(%ds3, %s2)
                                                   %acc = pv(%p, %v)       %ds1 = vjp.softcap(%ds2, %s1)
                                                 }                         %ds = vjp.scale(%ds1, %s)
                                                 %o = normalize(...)       %dq = dq(%ds, %k)
                                                                         }
Only the modifiers the spec asks for become ops; each has its renderer and derivative rule in
attngen/ops.py. Decisions (loop plan, tiling, schedule) are left to passes.
"""

from __future__ import annotations

from dataclasses import replace

from .ir import SCORE_MODIFIERS, Kernel, Op, OpKind, Region, verify
from .mask import mask_condition
from .ops import SCORE_MODS
from .runtime.roles import BWD_DKDV, BWD_DQ, KernelRole
from .spec import Spec

PRO, LOOP, EPI = Region.PROLOGUE, Region.KV_LOOP, Region.EPILOGUE
LOADS = {"q": OpKind.LOAD_Q, "k": OpKind.LOAD_K, "v": OpKind.LOAD_V, "do": OpKind.LOAD_DO}


def _score_chain(spec: Spec) -> list[Op]:
    """qk and the score modifiers, in the order they apply."""
    ops = [Op("s", OpKind.QK, ("q", "k")), Op("s1", OpKind.SCALE, ("s",), (("scale", spec.scale),))]
    mods = []
    if spec.score.temperature:
        mods.append((OpKind.TEMPERATURE, (("per_head", "temperature, at call time"),)))
    if spec.score.softcap is not None:
        mods.append((OpKind.SOFTCAP, (("softcap", spec.score.softcap),)))
    if spec.score.alibi:
        mods.append((OpKind.ALIBI, (("slopes", "per query head, at call time"),)))
    cond = mask_condition(spec.mask, spec.source)
    mask = [("cond", cond)] if cond is not None else []
    if spec.mask.document:  # the ids come with each call: the op compares them besides `cond`
        mask.append(("document", "q_doc == kv_doc, ids per call"))
    if spec.sparsity is not None:  # and the block layout: its terms, and a layout per call
        mask.append(("layout", spec.sparsity))
    if mask:
        mods.append((OpKind.MASK, tuple(mask)))
    last = "s1"
    for i, (kind, attrs) in enumerate(mods, start=2):
        ops.append(Op(f"s{i}", kind, (last,), attrs))
        last = f"s{i}"
    return ops


def _kernel(spec_attrs: dict, role: str, ops: list[Op]) -> Kernel:
    attrs = spec_attrs | {"role": role}
    return verify(Kernel(f"{attrs['spec']}_{role}", tuple(ops), tuple(sorted(attrs.items()))))


def lower(spec: Spec) -> Kernel:
    """The forward kernel."""
    ops = [Op("q", OpKind.LOAD_Q, attrs=(("head_dim", spec.head_dim),), region=PRO),
           Op("k", OpKind.LOAD_K, attrs=(("head_dim", spec.head_dim),)),
           Op("v", OpKind.LOAD_V, attrs=(("head_dim_v", spec.head_dim_v),))]
    ops += _score_chain(spec)
    ops.append(Op("p", OpKind.ONLINE_SOFTMAX, (ops[-1].name,)))
    pd = "p"
    if spec.dropout:
        ops.append(Op("pd", OpKind.DROPOUT, ("p",), (("p", spec.dropout), ("rng", "philox(seed; k, q, b*Hq+h)"),
                                                      ("when", "training"))))
        pd = "pd"
    ops += [
        Op("acc", OpKind.PV, (pd, "v")),
        Op("o", OpKind.NORMALIZE, ("acc", "p"), region=EPI),
        Op("store_o", OpKind.STORE_O, ("o",), region=EPI),
        Op("store_lse", OpKind.STORE_LSE, ("p",), (("when", "return_lse or training"),), region=EPI),
    ]
    attrs = {"spec": spec.name, "head_dim": spec.head_dim, "head_dim_v": spec.head_dim_v, "dtypes": ",".join(spec.dtypes)}
    return _kernel(attrs, "fwd", ops)


def score_chain(kernel: Kernel) -> list[Op]:
    """The kernel's qk op and the score modifiers after it, in order."""
    return [o for o in kernel.ops if o.kind is OpKind.QK or o.kind in SCORE_MODIFIERS]


def _derive(fwd: Kernel, role: KernelRole) -> Kernel:
    """One backward kernel from the forward: its loads (resident ones in the prologue), the
    forward's score chain recomputed, P from the saved LSE, the products of this role, and the
    chain rule back through every score modifier as vjp ops (ops.SCORE_MODS holds each rule)."""
    loads = [Op(name, LOADS[name], region=PRO if name in role.resident else LOOP)
             for name in ("q", "do", "k", "v")]
    ops = sorted(loads, key=lambda o: o.region is LOOP)  # prologue loads first
    chain = score_chain(fwd)
    ops += [replace(o, region=LOOP) for o in chain]
    ops.append(Op("p", OpKind.RECOMPUTE_P, (chain[-1].name,), (("from", "saved lse"),)))
    pd, dropout = "p", fwd.op(OpKind.DROPOUT)
    if dropout is not None:
        ops.append(replace(dropout, inputs=("p",)))
        pd = dropout.name
    if role is BWD_DKDV:
        ops.append(Op("dv", OpKind.DV, (pd, "do")))
    ops += [Op("dp", OpKind.DP, ("do", "v"), (("dropout", "scaled by keep mask"),) if dropout else ()),
            Op(f"d{chain[-1].name}", OpKind.DS, ("p", "dp"), (("D", "rowsum(dO * O)"),))]
    grad = f"d{chain[-1].name}"
    for op in reversed(chain[1:]):  # d(score)/d(input) of each modifier, last first
        param = SCORE_MODS[op.kind].param if op.kind in SCORE_MODS else None
        accumulates = (("accumulates", f"d{param.name}"),) if param and param.grad and role is BWD_DQ else ()
        ops.append(Op(f"d{op.inputs[0]}", OpKind.VJP, (grad, op.inputs[0]), (("of", op.kind.value),) + accumulates))
        grad = f"d{op.inputs[0]}"
    if role is BWD_DKDV:
        ops += [Op("dk", OpKind.DK, (grad, "q")),
                Op("store_dk", OpKind.STORE_DK, ("dk",), region=EPI),
                Op("store_dv", OpKind.STORE_DV, ("dv",), region=EPI)]
    else:
        ops += [Op("dq", OpKind.DQ, (grad, "k")), Op("store_dq", OpKind.STORE_DQ, ("dq",), region=EPI)]
    attrs = {k: v for k, v in fwd.attrs if k in ("spec", "head_dim", "head_dim_v", "dtypes")}
    return _kernel(attrs, role.name, ops)


def derive_backward(fwd: Kernel) -> tuple[Kernel, Kernel]:
    """The two backward kernels: dK/dV (one program per key block) and dQ (one per query block)."""
    return _derive(fwd, BWD_DKDV), _derive(fwd, BWD_DQ)


def lower_backward(spec: Spec) -> tuple[Kernel, Kernel]:
    return derive_backward(lower(spec))
