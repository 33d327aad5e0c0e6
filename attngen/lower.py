"""Lowering: a validated Spec becomes tile IR, one kernel per launch.

    spec softcap (window 512, softcap 50)        forward                 backward dK/dV
                                                 %q = load_q()           %k = load_k()  %v = load_v()
                                                 kv_loop {               q_loop {
                                                   %k = load_k()           %q = load_q()  %do = load_do()
                                                   %v = load_v()           %s = qk(%q, %k)
                                                   %s = qk(%q, %k)         ... the same score chain ...
                                                   %s1 = scale(%s)         %p = recompute_p(%s3)
                                                   %s2 = softcap(%s1)      %dv = dv(%p, %do)
                                                   %s3 = mask(%s2)         %dp = dp(%do, %v)
                                                   %p = online_softmax(%s3)  %ds = ds(%p, %dp)
                                                   %acc = pv(%p, %v)       %dk = dk(%ds, %q)
                                                 }                       }
                                                 %o = normalize(...)     %store_dk, %store_dv
Only the modifiers the spec asks for become ops (the backward's `ds` carries the chain rule of
each); decisions (loop plan, tiling) are left to passes.
"""

from __future__ import annotations

from .ir import Kernel, Op, OpKind, Region, verify
from .mask import mask_condition
from .spec import Spec

PRO, LOOP, EPI = Region.PROLOGUE, Region.KV_LOOP, Region.EPILOGUE


def _score_chain(spec: Spec, ops: list[Op]) -> str:
    """Appends qk and the score modifiers; returns the name of the last score value."""
    ops += [Op("s", OpKind.QK, ("q", "k")), Op("s1", OpKind.SCALE, ("s",), (("scale", spec.scale),))]
    mods = []
    if spec.score.softcap is not None:
        mods.append((OpKind.SOFTCAP, (("softcap", spec.score.softcap),)))
    if spec.score.alibi:
        mods.append((OpKind.ALIBI, (("slopes", "per query head, at call time"),)))
    cond = mask_condition(spec.mask, spec.source)
    if spec.mask.document:  # the ids come with each call: the op compares them besides `cond`
        mods.append((OpKind.MASK, (("cond", cond), ("document", "q_doc == kv_doc, ids per call"))))
    elif cond is not None:
        mods.append((OpKind.MASK, (("cond", cond),)))
    last = "s1"
    for i, (kind, attrs) in enumerate(mods, start=2):
        ops.append(Op(f"s{i}", kind, (last,), attrs))
        last = f"s{i}"
    return last


def _dropout(spec: Spec, ops: list[Op], p: str) -> str:
    if not spec.dropout:
        return p
    ops.append(Op("pd", OpKind.DROPOUT, (p,), (("p", spec.dropout), ("rng", "philox(seed; k, q, b*Hq+h)"),
                                                ("when", "training"))))
    return "pd"


def _kernel(spec: Spec, role: str, ops: list[Op]) -> Kernel:
    attrs = {"spec": spec.name, "role": role, "head_dim": spec.head_dim, "head_dim_v": spec.head_dim_v,
             "dtypes": ",".join(spec.dtypes)}
    return verify(Kernel(f"{spec.name}_{role}", tuple(ops), tuple(sorted(attrs.items()))))


def lower(spec: Spec) -> Kernel:
    """The forward kernel."""
    ops = [Op("q", OpKind.LOAD_Q, attrs=(("head_dim", spec.head_dim),), region=PRO),
           Op("k", OpKind.LOAD_K, attrs=(("head_dim", spec.head_dim),)),
           Op("v", OpKind.LOAD_V, attrs=(("head_dim_v", spec.head_dim_v),))]
    last = _score_chain(spec, ops)
    ops.append(Op("p", OpKind.ONLINE_SOFTMAX, (last,)))
    pd = _dropout(spec, ops, "p")
    ops += [
        Op("acc", OpKind.PV, (pd, "v")),
        Op("o", OpKind.NORMALIZE, ("acc", "p"), region=EPI),
        Op("store_o", OpKind.STORE_O, ("o",), region=EPI),
        Op("store_lse", OpKind.STORE_LSE, ("p",), (("when", "return_lse or training"),), region=EPI),
    ]
    return _kernel(spec, "fwd", ops)


def lower_backward(spec: Spec) -> tuple[Kernel, Kernel]:
    """The two backward kernels: dK/dV (one program per key block) and dQ (one per query block)."""
    softcap = (("softcap_grad", "1 - tanh^2"),) if spec.score.softcap is not None else ()

    def body(role: str) -> list[Op]:
        outer = PRO
        ops = [Op("q", OpKind.LOAD_Q, region=outer if role == "bwd_dq" else LOOP),
               Op("do", OpKind.LOAD_DO, region=outer if role == "bwd_dq" else LOOP),
               Op("k", OpKind.LOAD_K, region=outer if role == "bwd_dkdv" else LOOP),
               Op("v", OpKind.LOAD_V, region=outer if role == "bwd_dkdv" else LOOP)]
        ops.sort(key=lambda o: o.region is LOOP)  # prologue loads first
        last = _score_chain(spec, ops)
        ops.append(Op("p", OpKind.RECOMPUTE_P, (last,), (("from", "saved lse"),)))
        pd = _dropout(spec, ops, "p")
        if role == "bwd_dkdv":
            ops.append(Op("dv", OpKind.DV, (pd, "do")))
        ops += [Op("dp", OpKind.DP, ("do", "v"), (("dropout", "scaled by keep mask"),) if spec.dropout else ()),
                Op("ds", OpKind.DS, ("p", "dp"), (("D", "rowsum(dO * O)"),) + softcap)]
        if role == "bwd_dkdv":
            ops += [Op("dk", OpKind.DK, ("ds", "q")),
                    Op("store_dk", OpKind.STORE_DK, ("dk",), region=EPI),
                    Op("store_dv", OpKind.STORE_DV, ("dv",), region=EPI)]
        else:
            ops += [Op("dq", OpKind.DQ, ("ds", "k")), Op("store_dq", OpKind.STORE_DQ, ("dq",), region=EPI)]
        return ops

    return _kernel(spec, "bwd_dkdv", body("bwd_dkdv")), _kernel(spec, "bwd_dq", body("bwd_dq"))
