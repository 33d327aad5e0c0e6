"""Lowering: a validated Spec becomes the forward kernel's tile IR.

    spec sliding_window (softcap 30, window 256)   ->   %q = load_q()
                                                        kv_loop {
                                                          %k = load_k()  %v = load_v()
                                                          %s = qk(%q, %k)
                                                          %s1 = scale(%s) {scale=0.0883...}
                                                          %s2 = softcap(%s1) {softcap=30.0}
                                                          %s3 = mask(%s2) {cond=...}
                                                          %p = online_softmax(%s3)
                                                          %acc = pv(%p, %v)
                                                        }
                                                        %o = normalize(%acc, %p)
                                                        %st = store_o(%o)  %stl = store_lse(%p)
Only the modifiers the spec asks for become ops; decisions (loop plan, tiling) are left to passes.
"""

from __future__ import annotations

from .ir import Kernel, Op, OpKind, verify
from .mask import mask_condition
from .spec import Spec


def lower(spec: Spec) -> Kernel:
    ops = [
        Op("q", OpKind.LOAD_Q, attrs=(("head_dim", spec.head_dim),)),
        Op("k", OpKind.LOAD_K, attrs=(("head_dim", spec.head_dim),)),
        Op("v", OpKind.LOAD_V, attrs=(("head_dim_v", spec.head_dim_v),)),
        Op("s", OpKind.QK, ("q", "k")),
        Op("s1", OpKind.SCALE, ("s",), (("scale", spec.scale),)),
    ]
    last = "s1"

    def add(kind: OpKind, attrs: tuple = ()) -> None:
        nonlocal last
        name = f"s{len(ops) - 3}"
        ops.append(Op(name, kind, (last,), attrs))
        last = name

    if spec.score.softcap is not None:
        add(OpKind.SOFTCAP, (("softcap", spec.score.softcap),))
    if spec.score.alibi:
        add(OpKind.ALIBI, (("slopes", "per query head, at call time"),))
    cond = mask_condition(spec.mask, spec.source)
    if cond is not None:
        add(OpKind.MASK, (("cond", cond),))
    ops += [
        Op("p", OpKind.ONLINE_SOFTMAX, (last,)),
        Op("acc", OpKind.PV, ("p", "v")),
        Op("o", OpKind.NORMALIZE, ("acc", "p")),
        Op("store_o", OpKind.STORE_O, ("o",)),
        Op("store_lse", OpKind.STORE_LSE, ("p",), (("when", "return_lse=True"),)),
    ]
    attrs = {"spec": spec.name, "head_dim": spec.head_dim, "head_dim_v": spec.head_dim_v,
             "dtypes": ",".join(spec.dtypes)}
    return verify(Kernel(f"{spec.name}_fwd", tuple(ops), tuple(sorted(attrs.items()))))
