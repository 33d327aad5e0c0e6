"""Passes over the kernel IR: pure functions Kernel -> Kernel, registered by name.

* `mask_plan`: runs the mask analysis and records its plan on the kernel and on the mask op:

      %s3 = mask(%s2) {cond=kv_idx <= Nk - Nq + q_idx}
   -> %s3 = mask(%s2) {cond=..., plan=range}
      attr mask_plan = range: query q_idx sees keys [-oo, Nk - Nq + q_idx]
   (the loop splits into masked / full / masked segments; the backward's dK/dV kernel gets the
   transposed plan: the queries that see each key)

* `tiling`: ranks tile configurations with the cost model, per dtype, and records the winners:

      attr tiling = {bf16: BLOCK_M=128 BLOCK_N=64 ...}

  With `shape_buckets`, it also ranks at one shape per sequence-length bucket (1k, 16k; as many
  tokens as the nominal shape, batch at least 1) and records the winners; the module takes the
  nearest bucket's tiling per call. On by default: the nominal shape's pick misses at 1k tokens
  (docs/decisions/shape-buckets.md):

      attr bucket_tilings = {1024: bf16: BLOCK_M=64 ...; 16384: ...}

  A kernel whose role has variants (bwd_dkdv: the single-pass backward, bwd_single) also gets
  each variant's winners, ranked as that role, and the predicted time of every winner, from which
  `backward_forms` chooses the backward's form per dtype and bucket:

      attr variants = {bwd_single: bf16: BLOCK_M=64 ...; buckets {...}}

* `schedule`: the order programs start in, and the shape of their loops. Where later blocks have
  more work than earlier ones (causal: the last query block sees every key), the longest programs
  go first, so the last wave is made of short ones (free; no measurable effect at 4k tokens:
  docs/decisions/longest-first.md). A range plan's tiles run as masked / unmasked / masked loops
  in the forward (no mask code on full tiles) and as one masked loop in the backward kernels, whose
  four matrix products hide the mask (docs/decisions/split-loops.md):

      attr loop = longest first; range loops: masked | full | masked     (fwd)
      attr loop = longest first; range loops: masked                     (bwd_dkdv, bwd_dq)

  A tile-table plan's full tiles are stored as runs of consecutive blocks. The forward loops
  over the runs with each run's tiles in an inner loop; the backward kernels' tables hold the
  first run, looped over flat, and then the other full tiles one index each: each role's faster
  encoding (docs/decisions/nested-runs.md):

      attr loop = block order; table loops: full tiles (nested runs) | partial tiles   (fwd)

  A document kernel's partial-tile loop pipelines one stage fewer than the tiling's num_stages (at
  least two): the ids' buffer per stage would otherwise cost the tiling its programs per SM
  (docs/decisions/shallow-partial.md):

      ... | partial tiles (num_stages - 1)   (document plans)

The verifier runs after every pass.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable

from .cost_model import TARGETS, Ranking, Workload, rank
from .errors import AttngenError, TilingError
from .ir import Kernel, OpKind, verify
from .ops import head_params
from .mask_analysis import MaskPlan, PlanKind, analyze, longest_first
from .runtime.roles import ROLES, VARIANTS
from .tiling import TileConfig


@dataclass(frozen=True)
class PassOptions:
    target: str = "sm90"
    workload: Workload = Workload()
    longest_first: bool = True  # False: programs start in block order whatever the work profile
    split_loops: bool | None = None  # None: the schedule pass decides; True / False: force it (for A/B)
    shape_buckets: bool = True  # also pick tilings per sequence-length bucket (BUCKETS); False: one tiling
    nested_runs: bool | None = None  # tile tables: None: the schedule pass decides; True: runs in nested loops; False: first run flat
    shallow_partial: bool | None = None  # document plans: None: the schedule pass decides; True / False: force it (for A/B)
    # the kernels load q and k (and keep dQ, dK) in power-of-two column chunks where the head dim pads to a
    # few of them (192 = 3 x 64) rather than to the next power of two (tiling.pad_chunked); False: the
    # next power of two (docs/decisions/head-dim-chunks.md: the default since it was timed)
    chunked_head_dims: bool = True
    # the dK/dV kernel in Gluon where it applies (runtime/gluon_dkdv.py: plain masks at head dims padded to
    # 256, sm90); off until its runtime path has run on a GPU (docs/decisions/gluon-dkdv.md)
    gluon_dkdv: bool = False

    def __post_init__(self):
        if self.target not in TARGETS:
            raise AttngenError(f"unknown target {self.target!r}; targets: {', '.join(TARGETS)}")


def mask_plan(kernel: Kernel, options: PassOptions) -> Kernel:
    mask = kernel.op(OpKind.MASK)
    plan = analyze(mask.attr("cond") if mask else None, transposed=ROLES[kernel.attr("role")].transposed,
                   document=mask is not None and mask.attr("document") is not None,
                   sparsity=mask.attr("layout") if mask else None)
    if mask is not None:
        kernel = kernel.replace_op(OpKind.MASK, plan=plan.kind.value)
    return kernel.with_attrs(mask_plan=plan)


@dataclass(frozen=True)
class Tilings:
    """The chosen configuration per dtype (a kernel attr)."""

    target: str
    by_dtype: tuple[tuple[str, TileConfig], ...]
    ms: tuple[tuple[str, float], ...] = ()  # the cost model's predicted time per dtype, at the ranked shape
    seq: int = 0  # the ranked shape's sequence length

    def __getitem__(self, dtype: str) -> TileConfig:
        return dict(self.by_dtype)[dtype]

    def describe(self) -> str:
        return f"{self.target}: " + "; ".join(f"{d}: {c.describe()}" for d, c in self.by_dtype)

    # the verifier checks the padded dims and block sizes of every choice
    def __iter__(self):
        return iter(c for _, c in self.by_dtype)


BUCKETS = (1024, 16384)  # sequence lengths ranked besides the nominal one (shape_buckets)


@dataclass(frozen=True)
class BucketTilings:
    """Per sequence-length bucket, the chosen configuration per dtype (a kernel attr)."""

    nominal: int  # the sequence length the kernel's own `tiling` was ranked at
    by_seq: tuple[tuple[int, Tilings], ...]

    def describe(self) -> str:
        return f"{{nominal {self.nominal}; " + "; ".join(f"{seq}: {t.describe()}" for seq, t in self.by_seq) + "}"

    def __iter__(self):  # every configuration, for the verifier
        return iter(c for _, t in self.by_seq for c in t)


def bucket_workload(work: Workload, seq: int) -> Workload:
    """The nominal workload moved to sequence length `seq`, same number of tokens (batch >= 1)."""
    return replace(work, batch=max(1, work.batch * work.seq_q // seq), seq_q=seq, seq_k=seq)


def bucket_for(work: Workload, seq: int) -> Workload:
    """The workload a module ranks tilings at for calls of `seq` tokens: the nominal one or the
    nearest of BUCKETS on a log scale (as runtime/module.py config() picks among BUCKET_SEQS)."""
    nearest = min((work.seq_q, *BUCKETS), key=lambda b: abs(math.log2(max(seq, 1) / b)))
    return work if nearest == work.seq_q else bucket_workload(work, nearest)


def sfu_per_score(kernel: Kernel) -> int:
    """Special-function ops per score element: exp2, and tanh with softcap."""
    return 1 + kernel.has(OpKind.SOFTCAP)


def rankings(kernel: Kernel, options: PassOptions, role: str | None = None) -> dict[str, Ranking]:
    """The cost model's ranking per dtype (an analysis; `tiling` keeps the winners), of the kernel's
    role or of one of its variants."""
    plan: MaskPlan = kernel.attr("mask_plan")
    target = TARGETS[options.target]
    sfu = sfu_per_score(kernel)
    return {d: rank(kernel.attr("head_dim"), kernel.attr("head_dim_v"), plan, target,
                    replace(options.workload, dtype=d, score_sfu=sfu), role or kernel.attr("role"),
                    chunked=options.chunked_head_dims)
            for d in kernel.attr("dtypes").split(",")}


def variants_of(kernel: Kernel) -> list[str]:
    """The variant roles launched through this kernel (runtime/roles.py VARIANTS). None where a
    per-head parameter is learnable: its gradient is summed by the dQ kernel, so such a spec's
    backward is always the two kernels."""
    if any(p.grad for p in head_params(kernel.ops)):
        return []
    return [v for v, (_, base) in VARIANTS.items() if base == kernel.attr("role")]


def _best(kernel: Kernel, dtype: str, r: Ranking) -> TileConfig:
    if not r.ranked:
        d, dv = kernel.attr("head_dim"), kernel.attr("head_dim_v")
        raise TilingError(f"no legal tiling on {r.target.name} for the {kernel.attr('role')} kernel at head_dim {d}"
                          f"{f', head_dim_v {dv}' if dv != d else ''} in {dtype} ({r.work.describe()}); "
                          + ("fp32 (no 16-bit MMAs) has no spill-free tiling at this head dim: list `dtypes: [fp16, bf16]`"
                             if dtype == "fp32" else f"e.g. {r.rejected[0].rejected}" if r.rejected else ""))
    return r.best


def _winners(kernel: Kernel, options: PassOptions, role: str | None = None) -> Tilings:
    """The best tiling per dtype and its predicted time. A variant (role given) may have no legal
    tiling for a dtype: it is then left out (the runtime runs the kernel's own role instead)."""
    ranks = rankings(kernel, options, role)
    if role is not None:
        ranks = {d: r for d, r in ranks.items() if r.ranked}
    return Tilings(options.target, tuple((d, _best(kernel, d, r)) for d, r in ranks.items()),
                   tuple((d, r.ranked[0].time_s * 1e3) for d, r in ranks.items()), options.workload.seq_q)


def _buckets(kernel: Kernel, options: PassOptions, role: str | None = None) -> BucketTilings:
    return BucketTilings(options.workload.seq_q, tuple(
        (seq, _winners(kernel, replace(options, workload=bucket_workload(options.workload, seq)), role))
        for seq in BUCKETS))


@dataclass(frozen=True)
class Variant:
    """A variant role's winners on a kernel (runtime/roles.py VARIANTS)."""

    role: str
    tiling: Tilings
    bucket_tilings: BucketTilings | None

    def describe(self) -> str:
        buckets = f"; buckets {self.bucket_tilings.describe()}" if self.bucket_tilings else ""
        return f"{self.role}: {self.tiling.describe()}{buckets}"


@dataclass(frozen=True)
class Variants:
    """Every variant's winners (a kernel attr)."""

    items: tuple[Variant, ...]

    def describe(self) -> str:
        return "{" + "; ".join(v.describe() for v in self.items) + "}"

    def __iter__(self):  # every configuration, for the verifier
        return iter(c for v in self.items for c in (*v.tiling, *(v.bucket_tilings or ())))


def tiling(kernel: Kernel, options: PassOptions) -> Kernel:
    kernel = kernel.with_attrs(tiling=_winners(kernel, options))
    if options.gluon_dkdv and kernel.attr("role") == "bwd_dkdv":  # the runtime decides per call where it applies
        kernel = kernel.with_attrs(gluon=True)
    if options.shape_buckets:
        kernel = kernel.with_attrs(bucket_tilings=_buckets(kernel, options))
    variants = tuple(Variant(v, _winners(kernel, options, v), _buckets(kernel, options, v) if options.shape_buckets
                             else None) for v in variants_of(kernel))
    return kernel.with_attrs(variants=Variants(variants)) if variants else kernel


TWO_KERNELS, SINGLE_PASS = "two kernels", "single pass"


def backward_forms(kernels: dict[str, Kernel]) -> dict[str, tuple[tuple[int, str], ...]]:
    """Per dtype, per ranked sequence length (the nominal one, then the buckets), the backward form
    the cost model predicts faster: the two kernels (bwd_dq + bwd_dkdv) or the single pass
    (bwd_single), each at its own winning tiling. A dtype the single pass has no tiling for keeps
    the two kernels."""
    dq, dkdv = kernels["bwd_dq"], kernels["bwd_dkdv"]
    single = next((v for v in (dkdv.attr("variants") or Variants(())).items if v.role == "bwd_single"), None)

    def ranked(tiling: Tilings, buckets: BucketTilings | None) -> list[Tilings]:  # nominal, then buckets
        return [tiling, *(t for _, t in buckets.by_seq)] if buckets else [tiling]

    twos = zip(ranked(dq.attr("tiling"), dq.attr("bucket_tilings")),
               ranked(dkdv.attr("tiling"), dkdv.attr("bucket_tilings")))
    ones = ranked(single.tiling, single.bucket_tilings) if single else itertools.repeat(None)
    forms: dict[str, list] = {}
    for (a, b), c in zip(twos, ones):
        for d in dict(a.ms):
            two = dict(a.ms)[d] + dict(b.ms)[d]
            one = dict(c.ms).get(d) if c else None
            forms.setdefault(d, []).append((a.seq, SINGLE_PASS if one is not None and one < two else TWO_KERNELS))
    return {d: tuple(f) for d, f in forms.items()}


@dataclass(frozen=True)
class Loop:
    """The loop over a program's inner tiles, as the schedule pass shapes it (a kernel attr; codegen
    renders it, attngen/interp.py walks it)."""

    longest_first: bool  # programs start last block first
    walk: str  # "range": closed-form bounds; "table": a tile table
    segments: tuple[str, ...] = ()  # range: ("masked", "full", "masked") split, or ("masked",)
    encoding: str | None = None  # table: full tiles as "nested" runs, or the "first" run then indices
    shallow_partial: bool = False  # table: the partial-tile loop pipelines one stage less

    def describe(self) -> str:
        order = "longest first" if self.longest_first else "block order"
        if self.walk == "range":
            return f"{order}; range loops: {' | '.join(self.segments)}"
        partial = "partial tiles (num_stages - 1)" if self.shallow_partial else "partial tiles"
        return f"{order}; table loops: full tiles ({self.encoding} run{'s' if self.encoding == 'nested' else ''}) | {partial}"


def schedule(kernel: Kernel, options: PassOptions) -> Kernel:
    w, cfg = options.workload, next(iter(kernel.attr("tiling")))
    plan = kernel.attr("mask_plan")
    reverse = options.longest_first and longest_first(plan, w.seq_q, w.seq_k, cfg.block_m, cfg.block_n)
    forward = not ROLES[kernel.attr("role")].backward
    if plan.kind is not PlanKind.TILES:
        split = forward if options.split_loops is None else options.split_loops
        return kernel.with_attrs(loop=Loop(reverse, "range", ("masked", "full", "masked") if split else ("masked",)))
    nested = forward if options.nested_runs is None else options.nested_runs
    shallow = plan.document if options.shallow_partial is None else options.shallow_partial and plan.document
    return kernel.with_attrs(loop=Loop(reverse, "table", encoding="nested" if nested else "first", shallow_partial=shallow))


PASSES: dict[str, Callable[[Kernel, PassOptions], Kernel]] = {
    "mask_plan": mask_plan,
    "tiling": tiling,
    "schedule": schedule,
}


def run_passes(kernel: Kernel, options: PassOptions, names=tuple(PASSES)) -> Kernel:
    for name in names:
        kernel = verify(PASSES[name](kernel, options))
    return kernel
