"""The tile-level IR of one attention kernel.

Grammar:

    kernel  := name attrs op*                      attr role: fwd | bwd_dkdv | bwd_dq
    op      := %name = KIND(%input, ...) {attr=value, ...}   in region prologue | loop | epilogue
    KIND    := load_q | load_k | load_v | load_do | qk | scale | temperature | softcap | alibi | mask
             | online_softmax | dropout | pv | normalize | store_o | store_lse         (forward)
             | recompute_p | dv | dp | ds | vjp | dk | dq | store_dk | store_dv | store_dq  (backward)

The backward kernels are derived from the forward (lower.derive_backward): they recompute its
score chain, and each score modifier's `vjp` op (attr `of`: the modifier) carries its derivative
rule (attngen/ops.py). attngen/interp.py evaluates any kernel of this IR on torch tensors.

One program instance of `fwd` or `bwd_dq` owns BLOCK_M query rows of one (batch, head) and its
`loop` walks key tiles; one of `bwd_dkdv` owns BLOCK_N keys of one (batch, KV head) and its loop
walks query tiles (of every query head in the GQA group). `online_softmax` carries the running row
max, row sum and accumulator across iterations; `recompute_p` rebuilds P from the saved LSE.
Kernel attrs hold decisions made by passes (the mask plan, the tiling); op attrs hold per-op facts. Nodes are frozen: passes build
new kernels with `dataclasses.replace`. The DAG view (`graph`) is a networkx DiGraph used by the
verifier and the printer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from .errors import IRError
from .runtime.roles import ROLES
from .tiling import MAX_CHUNKS, chunk_width, chunks, pad_head_dim


class OpKind(enum.Enum):
    LOAD_Q = "load_q"
    LOAD_K = "load_k"
    LOAD_V = "load_v"
    LOAD_DO = "load_do"
    QK = "qk"
    SCALE = "scale"
    TEMPERATURE = "temperature"
    SOFTCAP = "softcap"
    ALIBI = "alibi"
    MASK = "mask"
    ONLINE_SOFTMAX = "online_softmax"
    DROPOUT = "dropout"
    PV = "pv"
    NORMALIZE = "normalize"
    STORE_O = "store_o"
    STORE_LSE = "store_lse"
    RECOMPUTE_P = "recompute_p"
    DV = "dv"
    DP = "dp"
    DS = "ds"
    VJP = "vjp"
    DK = "dk"
    DQ = "dq"
    STORE_DK = "store_dk"
    STORE_DV = "store_dv"
    STORE_DQ = "store_dq"


class Region(enum.Enum):
    PROLOGUE = "prologue"
    KV_LOOP = "loop"
    EPILOGUE = "epilogue"


SCORE_MODIFIERS = (OpKind.SCALE, OpKind.TEMPERATURE, OpKind.SOFTCAP, OpKind.ALIBI, OpKind.MASK)
_COMMON = (OpKind.LOAD_Q, OpKind.LOAD_K, OpKind.LOAD_V, OpKind.QK, OpKind.SCALE)
REQUIRED = {
    "fwd": _COMMON + (OpKind.ONLINE_SOFTMAX, OpKind.PV, OpKind.NORMALIZE, OpKind.STORE_O),
    "bwd_dkdv": _COMMON + (OpKind.LOAD_DO, OpKind.RECOMPUTE_P, OpKind.DV, OpKind.DP, OpKind.DS, OpKind.DK,
                           OpKind.STORE_DK, OpKind.STORE_DV),
    "bwd_dq": _COMMON + (OpKind.LOAD_DO, OpKind.RECOMPUTE_P, OpKind.DP, OpKind.DS, OpKind.DQ, OpKind.STORE_DQ),
}


@dataclass(frozen=True)
class Op:
    name: str
    kind: OpKind
    inputs: tuple[str, ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    region: Region = Region.KV_LOOP

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)


@dataclass(frozen=True)
class Kernel:
    name: str
    ops: tuple[Op, ...]
    attrs: tuple[tuple[str, Any], ...] = field(default=())

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)

    def with_attrs(self, **updates: Any) -> "Kernel":
        merged = dict(self.attrs) | updates
        return replace(self, attrs=tuple(sorted(merged.items())))

    def op(self, kind: OpKind) -> Op | None:
        return next((o for o in self.ops if o.kind is kind), None)

    def has(self, kind: OpKind) -> bool:
        return self.op(kind) is not None

    def replace_op(self, kind: OpKind, **attrs: Any) -> "Kernel":
        """A new kernel whose op of this kind has `attrs` merged in."""
        ops = tuple(replace(o, attrs=tuple(sorted((dict(o.attrs) | attrs).items()))) if o.kind is kind else o
                    for o in self.ops)
        return replace(self, ops=ops)


def graph(kernel: Kernel) -> nx.DiGraph:
    g = nx.DiGraph()
    for op in kernel.ops:
        g.add_node(op.name, op=op)
        for src in op.inputs:
            g.add_edge(src, op.name)
    return g


def verify(kernel: Kernel) -> Kernel:
    """Checks the invariants later stages rely on; raises IRError naming the node."""
    name = kernel.name
    seen: set[str] = set()
    for op in kernel.ops:
        if op.name in seen:
            raise IRError(f"{name}: %{op.name} is defined twice")
        seen.add(op.name)
    by_name = {o.name: o for o in kernel.ops}
    for op in kernel.ops:
        for src in op.inputs:
            if src not in by_name:
                raise IRError(f"{name}: %{op.name} ({op.kind.value}) uses %{src}, which no op defines")
    g = graph(kernel)
    if not nx.is_directed_acyclic_graph(g):
        cycle = " -> ".join(f"%{u}" for u, _ in nx.find_cycle(g))
        raise IRError(f"{name}: the op graph has a cycle: {cycle}")
    index = {o.name: i for i, o in enumerate(kernel.ops)}
    order = {Region.PROLOGUE: 0, Region.KV_LOOP: 1, Region.EPILOGUE: 2}
    for op in kernel.ops:
        for src in op.inputs:
            if index[src] > index[op.name]:
                raise IRError(f"{name}: %{op.name} ({op.kind.value}) uses %{src} before it is defined")
            if order[by_name[src].region] > order[op.region]:
                raise IRError(f"{name}: %{op.name} in {op.region.value} uses %{src} "
                              f"from the later region {by_name[src].region.value}")
    for before, after in zip(kernel.ops, kernel.ops[1:]):
        if order[after.region] < order[before.region]:
            raise IRError(f"{name}: %{after.name} in {after.region.value} is listed after "
                          f"%{before.name} in {before.region.value}; ops must be grouped prologue, loop, epilogue")
    role = kernel.attr("role", "fwd")
    if role not in REQUIRED:
        raise IRError(f"{name}: unknown role {role!r}")
    for kind in REQUIRED[role]:
        found = [f"%{o.name}" for o in kernel.ops if o.kind is kind]
        if len(found) != 1:
            raise IRError(f"{name}: expected exactly one {kind.value} op, found {len(found)}"
                          + (f": {', '.join(found)}" if found else ""))
    for tiling in (*(kernel.attr("tiling") or ()), *(kernel.attr("bucket_tilings") or ()), *(kernel.attr("variants") or ())):
        for dim in ("head_dim_pad", "head_dim_v_pad", "block_m", "block_n"):
            v = getattr(tiling, dim)
            if dim == "head_dim_pad" and ROLES[role].chunked_d and v > 0 and v & (v - 1):
                # loaded in equal power-of-two chunks of at least 32 columns (tiling.pad_chunked)
                if chunks(v) > MAX_CHUNKS or chunk_width(v) < 32 or v > pad_head_dim(kernel.attr("head_dim")):
                    raise IRError(f"{name}: tiling.{dim} = {v} is neither a power of two nor at most "
                                  f"{MAX_CHUNKS} equal power-of-two chunks of at least 32 columns, below the "
                                  f"head dim's next power of two")
                continue
            if v <= 0 or v & (v - 1):
                raise IRError(f"{name}: tiling.{dim} = {v} is not a positive power of two")
        if tiling.head_dim_pad < kernel.attr("head_dim") or tiling.head_dim_v_pad < kernel.attr("head_dim_v"):
            raise IRError(f"{name}: padded head dims {tiling.head_dim_pad}/{tiling.head_dim_v_pad} "
                          f"are smaller than the head dims")
    mask = kernel.op(OpKind.MASK)
    if mask is not None and kernel.attr("mask_plan") is not None and mask.attr("plan") is None:
        raise IRError(f"{name}: %{mask.name} has no plan although the kernel has one")
    return kernel


def _show(value: Any) -> str:
    text = getattr(value, "describe", None)
    return text() if callable(text) else str(value)


def print_ir(kernel: Kernel) -> str:
    """A deterministic text form; golden tests compare it verbatim."""
    lines = [f"kernel {kernel.name} {{"]
    lines += [f"  attr {k} = {_show(v)}" for k, v in kernel.attrs]
    region = None
    for op in kernel.ops:
        if op.region is not region:
            if region is Region.KV_LOOP:
                lines.append("  }")
            region = op.region
            if region is Region.KV_LOOP:
                lines.append(f"  {ROLES[kernel.attr('role', 'fwd')].loop} {{")
        indent = "    " if region is Region.KV_LOOP else "  "
        args = ", ".join(f"%{s}" for s in op.inputs)
        kind = f"vjp.{op.attr('of')}" if op.kind is OpKind.VJP else op.kind.value
        attrs = ", ".join(f"{k}={_show(v)}" for k, v in op.attrs if not (op.kind is OpKind.VJP and k == "of"))
        lines.append(f"{indent}%{op.name} = {kind}({args})" + (f" {{{attrs}}}" if attrs else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"
