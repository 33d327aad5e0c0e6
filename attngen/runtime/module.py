"""The host side of a generated kernel module: checks, tiling choice, tile tables, launch plans,
autograd, and the torch.library ops that torch.compile sees. A generated module holds only its
kernels and a data section, and binds them with `KernelModule(globals())`.

    plan: per call signature (dtypes, shapes, strides, alignment, flags), once (launch.Plan)
    run:  re-base the TMA descriptors, launch; the hot path
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources

from . import decode, decode_gate, gluon_dkdv, memory
from .block_mask import BlockMask
from .launch import Plan, descriptors, direct_launch, native_nvidia, signature, wide_offsets
from .layouts import static_layout
from .library import register_ops
from .roles import ROLES, chunk_width
from .sparse import NO_SPARSE, Sparse, kept_seqlens, made_for
from .tiles import Documents, as_documents, kept, layout_tiles, oriented_lists, tile_classes
from .tl_lib import _bwd_delta, _keep_mask_kernel
from .varlen import Seqlens
from .window import Window

LOG2E = 1.4426950408889634
TUNED_FORM = "backward_form"  # tuned entries (TUNED_FORM, dtype, Nq, Nk): the backward's form measured faster
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_PLACEHOLDERS: dict = {}
_SLOPES: dict = {}


def check_qkv(name: str, dtypes: tuple[str, ...], head_dim: int, head_dim_v: int, q, k, v) -> tuple[int, ...]:
    """(B, Hq, Hkv, Nk) of q [B, Hq, Nq, head_dim], k [B, Hkv, Nk, head_dim], v [B, Hkv, Nk,
    head_dim_v], one dtype of spec `name`'s `dtypes` on one device, Hq a multiple of Hkv; else an
    error naming the argument and what is allowed (every family's entry points)."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"q, k, v must be 4-d [batch, heads, seq, head_dim]; got {q.dim()}-d, {k.dim()}-d, {v.dim()}-d")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype of {', '.join(DTYPES.values())}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if DTYPES[q.dtype] not in dtypes:
        raise TypeError(f"spec {name!r} is built for {', '.join(dtypes)}, not {DTYPES[q.dtype]}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    B, Hq = q.shape[:2]
    Bk, Hkv, Nk = k.shape[:3]
    if q.shape[-1] != head_dim or k.shape[-1] != head_dim or v.shape[-1] != head_dim_v:
        raise ValueError(f"spec {name!r} has head_dim {head_dim} and head_dim_v {head_dim_v}; "
                         f"got q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}")
    if Bk != B or v.shape[0] != B or v.shape[1] != Hkv or v.shape[2] != Nk:
        raise ValueError(f"k and v must be [{B}, Hkv, Nk, *] alike; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    return B, Hq, Hkv, Nk


def tma_reductions(device) -> bool:
    """Whether the single pass adds dQ by TMA reductions here: on a GPU (Triton's interpreter has no
    descriptor reduction; offline inspection patches this to compile them)."""
    return device.type == "cuda"


def placeholder(device, dtype=torch.int32) -> torch.Tensor:
    """An empty tensor for an argument a kernel does not read (made once per device and dtype)."""
    return kept(_PLACEHOLDERS, (device, dtype), lambda: torch.empty(0, dtype=dtype, device=device))


def default_alibi_slopes(heads: int, device=None) -> torch.Tensor:
    """The ALiBi paper's geometric slopes for `heads` heads."""
    def make():
        def powers(n):
            start = 2.0 ** (-8.0 / n)
            return [start ** (i + 1) for i in range(n)]
        p = 1 << (heads.bit_length() - 1)
        slopes = powers(p) if p == heads else powers(p) + powers(2 * p)[0::2][: heads - p]
        return torch.tensor(slopes, dtype=torch.float32, device=device)
    return kept(_SLOPES, (heads, str(device)), make)


_DEFAULTS = {"alibi": default_alibi_slopes,
             "ones": lambda heads, device: kept(_SLOPES, ("ones", heads, str(device)),
                                                lambda: torch.ones(heads, dtype=torch.float32, device=device))}


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rt, q, k, v, hp, scale, seed, p_drop, sparse, deterministic):
        o, lse = rt.forward(q, k, v, hp, scale, seed, p_drop, None, True, sparse)
        ctx.save_for_backward(q, k, v, o, lse, hp)
        ctx.rt, ctx.scale, ctx.seed, ctx.p_drop, ctx.sparse = rt, scale, seed, p_drop, sparse
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, hp = ctx.saved_tensors
        dq, dk, dv, dhp = ctx.rt.backward(do, q, k, v, o, lse, hp, ctx.scale, ctx.seed, ctx.p_drop, ctx.sparse,
                                          deterministic=ctx.deterministic)
        return None, dq, dk, dv, dhp if ctx.needs_input_grad[4] else None, None, None, None, None, None


class KernelModule:
    """One generated module's kernels and data, with its host code. `attention` is the entry point."""

    def __init__(self, ns: dict):
        self.spec = ns["SPEC"]
        self.name = self.spec["name"]
        self.tilings, self.tuned = ns["TILINGS"], {}
        self.bucket_seqs, self.bucket_tilings = ns.get("BUCKET_SEQS"), ns.get("BUCKET_TILINGS", {})
        self.head_dim, self.head_dim_v = ns["HEAD_DIM"], ns["HEAD_DIM_V"]
        self.scale, self.dropout_p = ns["SCALE"], ns["DROPOUT_P"]
        self.head_params = ns["HEAD_PARAMS"]  # ({"arg", "default", "grad"}, ...): rows of the kernels' HP
        self.n_grads = sum(p["grad"] for p in self.head_params)
        self.param_args = frozenset(p["arg"] for p in self.head_params)
        self.tables = ns["TILE_TABLES"]  # role -> "nested" | "first" for kernels that walk a tile table
        self.shallow = ns["SHALLOW_PARTIAL"]  # roles whose partial-tile loop pipelines one stage less
        self.document = ns["DOCUMENT"]
        self.decode_width = ns.get("DECODE_WIDTH")  # (a, b): n decoding rows see at most a + b n keys
        self.sparsity = self.spec.get("sparsity")  # the spec's block layout terms, or None
        self.layout_block = tuple(self.sparsity["block"]) if self.sparsity else None
        self.runtime_layout = bool(self.sparsity) and self.sparsity.get("layout") == "runtime"
        self.per_call = self.document or self.runtime_layout  # tile tables made from each call's data
        self.visible = ns.get("_visible_host")
        self.kernels = {role: ns[r.kernel] for role, r in ROLES.items()}
        self.decode_kernel = ns.get("_attn_decode")
        self.native = native_nvidia(self.kernels["fwd"])
        self.direct = direct_launch(self.kernels["fwd"])
        self.plans: dict = {}  # call signature -> Plan; cleared when it reaches 1024
        self._static: dict = {}
        self._decode_layouts: dict = {}  # capacity -> static layout terms for decoding (never evicted)
        # the backward's default form: True, the two kernels (timed faster than the single pass as
        # far as it was timed: docs/decisions/single-pass-backward.md); None, the cost model's choice
        # per dtype and length (BACKWARD_FORMS); False, the single pass. Per call: deterministic=
        self.deterministic: bool | None = True
        self.backward_forms = ns.get("BACKWARD_FORMS", {})  # dtype -> ((ranked length, form), ...)
        self._no_single_pass: set = set()  # bwd_single tilings that did not fit (OutOfResources)
        self.last_backward = None  # the form the latest backward ran: "two kernels" | "single pass" | ...
        # dK/dV by the Gluon kernel where it applies (plain masks at head dims padded to 256 on sm90;
        # runtime/gluon_dkdv.py, docs/decisions/gluon-dkdv.md): the module's GLUON_DKDV, settable
        self.gluon_dkdv = bool(ns.get("GLUON_DKDV", False))
        source = Path(ns["__file__"]).read_bytes() if ns.get("__file__") else repr(self.spec).encode()
        self.key = f"{self.name}_{hashlib.sha256(source).hexdigest()[:12]}"
        self.ops = register_ops(self)

    # ------------------------------------------------------------------ choices per call

    def config(self, role: str, dtype: str, Nq: int, Nk: int) -> dict:
        """The tiling for this call: an autotuned one for its shape bucket if any, else the cost
        model's (the nearest sequence-length bucket's, when the module has buckets)."""
        if self.tuned:
            key = (role, dtype, triton.next_power_of_2(Nq), triton.next_power_of_2(Nk))
            if key in self.tuned:
                return self.tuned[key]
        if self.bucket_seqs:
            seq = min(self.bucket_seqs, key=lambda b: abs(math.log2(max(Nq, Nk, 1) / b)))
            return self.bucket_tilings.get((role, dtype, seq), self.tilings[role][dtype])
        return self.tilings[role][dtype]

    def single_pass(self, dtype: str, Nq: int, Nk: int, deterministic: bool | None = None,
                    packed: bool = False) -> bool:
        """Whether a backward runs the single pass: deterministic=True never, False where it can,
        None (and the module's default None) where autotuning measured it faster in the call's shape
        bucket, else where the cost model chose it for the ranked length nearest max(Nq, Nk), not
        for packed sequences (pointer loads: its TMA tilings would spill).
        It cannot with a learnable head parameter (the dQ kernel sums its gradient) or where the
        single pass has no tiling for the dtype."""
        det = self.deterministic if deterministic is None else deterministic
        if self.n_grads or dtype not in self.tilings.get("bwd_single", {}):
            return False
        if det is not None:
            return not det
        if packed:
            return False
        measured = self.tuned.get((TUNED_FORM, dtype, triton.next_power_of_2(Nq), triton.next_power_of_2(Nk)))
        if measured is not None:  # autotuned: the form measured faster in this shape bucket
            return measured == "single pass"
        forms = self.backward_forms.get(dtype)
        if not forms:
            return False
        return min(forms, key=lambda f: abs(math.log2(max(Nq, Nk, 1) / f[0])))[1] == "single pass"

    def static_classes(self, Nq: int, Nk: int, block_m: int, block_n: int, device, heads: int = 1,
                       with_layout: bool = True, window: Window | None = None):
        """The tile classes of the spec's static mask and (with_layout) static layout terms at this
        shape (or window of a larger problem), by keys and by rows (tiles.tile_classes): int8
        [1, H', n_m, n_n] twice, H' = heads with a random layout term, else 1 (cached)."""
        random = with_layout and bool(self.sparsity and self.sparsity.get("random"))
        key = ("classes", Nq, Nk, block_m, block_n, str(device), heads if random else 1, with_layout, window)
        visible = self.visible if window is None else window.host_mask(self.visible)

        def make():
            by_keys, by_rows = (c[None, None] for c in tile_classes(visible, Nq, Nk, block_m, block_n, device))
            layout = self.static_layout(Nq, Nk, heads, device) if with_layout else None
            if layout is None:
                return by_keys, by_rows
            tiles = layout_tiles(layout, by_keys.shape[-2], by_keys.shape[-1], block_m, block_n, *self.layout_block)
            return torch.where(tiles, by_keys, 0).to(torch.int8), torch.where(tiles, by_rows, 0).to(torch.int8)
        if len(self._static) >= 4096:  # one entry per shape (and per sequence shape with varlen): bounded
            self._static.clear()
        return kept(self._static, key, make)

    def static_layout(self, Nq: int, Nk: int, heads: int, device):
        """The spec's static layout terms at this shape, bool [1, H', n_qb, n_kb], or None."""
        if not self.sparsity:
            return None
        bq, bk = self.layout_block
        return static_layout(self.sparsity, -(-Nq // bq), -(-Nk // bk), heads, device)

    def _tables(self, role: str, cfg: dict, q, k, sparse: Sparse, window: Window | None = None):
        """COUNT, INDEX, DOC_Q, DOC_KV for role's kernel: per call from its documents or block
        mask, per shape (and window) for a static tile table, placeholders for closed-form loops."""
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        encoding = self.tables.get(role)
        empty = placeholder(q.device)
        if encoding is None:
            return empty, empty, empty, empty
        Nq, Nk, transposed, nested = q.shape[2], k.shape[2], ROLES[role].transposed, encoding == "nested"
        static = lambda: self.static_classes(Nq, Nk, bm, bn, q.device, q.shape[1], window=window)  # noqa: E731
        if sparse.seqlens is not None:  # per sequence, at its own Nq and Nk
            docs, blocks, heads = sparse.documents, sparse.block_mask, q.shape[1]

            def layout(i: int, n_q: int, n_k: int):  # sequence i's rows of the call's layout, and the static terms
                own = blocks.layout[i:i + 1] if blocks.layout.shape[0] > 1 else blocks.layout
                own = own[..., :-(-n_q // self.layout_block[0]), :-(-n_k // self.layout_block[1])]
                static_terms = self.static_layout(n_q, n_k, heads, q.device)
                return own if static_terms is None else own | static_terms
            count, index = sparse.seqlens.tables(
                (self.key, heads, bm, bn, transposed, nested, id(docs), id(blocks)),
                lambda n_q, n_k: self.static_classes(n_q, n_k, bm, bn, q.device, heads, with_layout=blocks is None),
                bm, bn, transposed, nested, docs, layout if blocks is not None else None, self.layout_block, keep=blocks)
            return (count, index, *((docs.q_ids, docs.kv_ids) if self.document else (empty, empty)))
        if self.runtime_layout and sparse.block_mask is None:
            raise ValueError(f"spec {self.name!r} has a runtime block layout: its kernels need a BlockMask")
        docs, ids = sparse.documents, (empty, empty)
        if self.document:
            ids = docs.q_ids, docs.kv_ids
        if sparse.block_mask is not None:  # the mask's classes in the union of the static and the call's layout
            element = lambda: self.static_classes(Nq, Nk, bm, bn, q.device, with_layout=False)  # noqa: E731
            base = (lambda: docs.classes(self.key, element, bm, bn, transposed, q.shape[1])) if docs else \
                (lambda: element()[1 if transposed else 0])
            key = (self.key, Nq, Nk, q.shape[1], bm, bn, transposed, nested, id(docs))
            count, index = sparse.block_mask.tables(
                key, base, -(-Nq // bm), -(-Nk // bn), bm, bn, self.layout_block, transposed, nested, keep=docs,
                static=lambda: self.static_layout(Nq, Nk, q.shape[1], q.device))
        elif docs is not None:
            owner = self.key if window is None else (self.key, window)
            count, index = docs.tables(owner, static, bm, bn, transposed, nested, q.shape[1])
        else:
            key = ("lists", Nq, Nk, bm, bn, str(q.device), q.shape[1], transposed, encoding, window)
            count, index = kept(self._static, key,
                                lambda: oriented_lists(static()[1 if transposed else 0], transposed, nested))
        return count, index, *ids

    def _constexprs(self, role: str, cfg: dict, tma: bool, wide: bool, q) -> dict:
        return dict(HEAD_DIM=self.head_dim, HEAD_DIM_V=self.head_dim_v, HEAD_DIM_PAD=cfg["HEAD_DIM_PAD"],
                    HEAD_DIM_V_PAD=cfg["HEAD_DIM_V_PAD"], HEAD_DIM_CHUNK=chunk_width(cfg["HEAD_DIM_PAD"]),
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                    TMA=tma, WIDE=wide, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                    # the tanh instruction on NVIDIA GPUs for 16-bit inputs; exact tanh for fp32, the interpreter, ROCm
                    FAST_TANH=self.native and q.is_cuda and q.dtype != torch.float32,
                    DOCUMENT=self.document,
                    PARTIAL_STAGES=max(2, cfg["num_stages"] - 1) if role in self.shallow else cfg["num_stages"],
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    # ------------------------------------------------------------------ plan and run

    def _plan(self, role: str, cfg: dict, tensors, flags, seqlens: Seqlens | None, positions: bool = False) -> Plan:
        q, k, v = tensors[:3]
        B, Hq, Nq, _ = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        total_q, per_call = Nq, self.per_call or seqlens is not None
        if seqlens is not None:  # a program per block of the longest sequence, per (sequence, head)
            B, Nq, Nk = seqlens.batch, seqlens.max_q, seqlens.max_k
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        n = {"fwd": 6, "bwd_dq": 10, "bwd_dkdv": 10}[role]  # the tensors before the tables
        # static tables are the same tensors for every call of this signature: plan constants
        tables = () if per_call else tensors[n:]
        count = tensors[n]  # [B', H', n_outer, 2]: its rows per batch and per head (0 where shared)
        rows = (0, 0) if count.dim() != 4 else (count.shape[1] * count.shape[2] * (count.shape[0] > 1),
                                                 count.shape[2] * (count.shape[1] > 1))
        # q, k, v and the [B, H, N, D] outputs / dO (and the dK/dV kernel's fp32 dQ buffer)
        strided = {"fwd": tensors[:4], "bwd_dq": tensors[:6], "bwd_dkdv": tensors[:7]}[role]
        # TMA boxes (rows, columns): q, k (and dO) are read a column chunk at a time (the whole padded
        # dim unless the role loads D in chunks: tiling.chunk_width), v (and o) whole
        d, dv = chunk_width(cfg["HEAD_DIM_PAD"]), cfg["HEAD_DIM_V_PAD"]
        blocks = {0: (bm, d), 1: (bn, d), 2: (bn, dv)} if role == "fwd" else \
            {0: (bm, d), 3: (bm, dv), 1: (bn, d), 2: (bn, dv)}
        # the single pass adds dQ tiles into its fp32 buffer by TMA reductions on a GPU (the interpreter has none)
        reduce_tma = role == "bwd_dkdv" and flags[0] and tma_reductions(q.device)
        if reduce_tma:
            blocks[6] = (bm, d)
        # packed sequences start at any row: no TMA (its boxes would cross into the next sequence)
        descs, tma = descriptors({**cfg, "TMA": cfg["TMA"] and seqlens is None}, tensors[:n], blocks)
        if per_call:
            descs += [None] * (len(tensors) - n)
        # LSE and delta rows [B, H, Nq] (packed: [H, total_q]); document ids [B, N] (packed: [1, total])
        rows += (0, total_q) if seqlens is not None else (Hq * Nq, Nq)
        rows += (0, 0) if seqlens is not None else (Nq, Nk)
        sizes = {"fwd": (Hq, Hq // Hkv, Nq, Nk, triton.cdiv(Nk, bn), *rows),
                 "bwd_dq": (Hq, Hq // Hkv, Nq, Nk, triton.cdiv(Nk, bn), *rows),
                 "bwd_dkdv": (Hq, Hkv, Hq // Hkv, Nq, Nk, triton.cdiv(Nq, bm), *rows)}[role]
        grid = (triton.cdiv(Nk, bn), B * Hkv, 1) if ROLES[role].transposed else (triton.cdiv(Nq, bm), B * Hq, 1)
        # packed sequences: the batch entry is a sequence, found through CU_Q and CU_K, not a stride
        middle = (*tables, *(s for t in strided for s in (0 if seqlens else t.stride(0), *t.stride()[1:])), *sizes)
        consts = dict(DROPOUT=flags[-1], VARLEN=seqlens is not None, POSITIONS=positions,
                      **self._constexprs(role, cfg, tma, wide_offsets(*strided), q))
        if role == "fwd":
            consts["STORE_LSE"] = flags[0]
        if role == "bwd_dkdv":  # 0: no dQ; 1: per-element atomics; 2: TMA reductions
            consts["ATOMIC_DQ"] = 2 if reduce_tma and tma else int(flags[0])
        return Plan(self.kernels[role], grid, descs, middle, consts, self.direct)

    def _launch(self, role: str, tensors, scalars, seed: int, flags, sparse: Sparse, cfg=None,
                window: Window | None = None):
        q, k = tensors[0], tensors[1]
        if window is not None and window == Window.whole(q.shape[2], k.shape[2]):
            window = None
        scalars = (*scalars, *((0, 0, q.shape[2], k.shape[2]) if window is None else window))
        cfg = cfg or self.config(role, DTYPES[q.dtype], *self._lengths(q, k, sparse))
        seqlens = sparse.seqlens
        per_call = self.per_call or seqlens is not None
        empty = placeholder(q.device)
        starts = (seqlens.cu_q, seqlens.cu_k) if seqlens is not None else (empty, empty)
        if per_call:  # the call's tables, ids and sequence starts are kernel arguments like the tensors
            tensors = (*tensors, *self._tables(role, cfg, q, k, sparse, window), *starts)
        key = signature(role, cfg, tensors, seed, flags) + ((seqlens.max_q, seqlens.max_k) if seqlens else ())
        if window is not None:  # compiled with POSITIONS (a whole-problem call compiles without: no cost)
            key += (True, *window) if role in self.tables and not per_call else (True,)  # a static table is the window's
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= 1024:
                self.plans.clear()
            # a static table depends only on what the signature holds: a plan constant
            full = tensors if per_call else (*tensors, *self._tables(role, cfg, q, k, NO_SPARSE, window), *starts)
            plan = self.plans[key] = self._plan(role, cfg, full, flags, seqlens, window is not None)
        plan(tensors, scalars)

    @staticmethod
    def _lengths(q, k, sparse: Sparse) -> tuple[int, int]:
        """The (Nq, Nk) a call's tiling is chosen for: the longest sequence's when packed."""
        s = sparse.seqlens
        return (q.shape[2], k.shape[2]) if s is None else (s.max_q, s.max_k)

    def forward(self, q, k, v, hp, scale: float, seed: int, p_drop: float, out=None, store_lse: bool = True,
                sparse: Sparse = NO_SPARSE, window: Window | None = None):
        """o [B, Hq, Nq, Dv] and lse [B, Hq, Nq] (float32, natural log): no autograd, no checks but
        the window's (the call's part of a larger problem, or None: the whole)."""
        if window is not None:
            self._check_window(q, k, sparse, window)
        B, Hq, Nq, _ = q.shape
        Nk = k.shape[2]
        if out is None and sparse.seqlens is not None:  # packed: o [total_q, Hq, Dv] in memory
            out = torch.empty((Nq, Hq, self.head_dim_v), dtype=q.dtype, device=q.device).transpose(0, 1)[None]
        o = torch.empty((B, Hq, Nq, self.head_dim_v), dtype=q.dtype, device=q.device) if out is None else out
        lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
        if o.numel() == 0 or Nk == 0:
            return o.zero_(), lse.fill_(float("-inf"))
        flags = (store_lse, p_drop > 0)
        self._launch("fwd", (q, k, v, o, lse, hp), (scale * LOG2E, seed, p_drop), seed, flags, sparse, window=window)
        return o, lse

    def backward(self, do, q, k, v, o, lse, hp, scale: float, seed: int, p_drop: float, sparse: Sparse = NO_SPARSE,
                 window: Window | None = None, deterministic: bool | None = None):
        """dq, dk, dv and dhp: the head parameters' gradients [P, Hq] (zero rows for those without
        one), or None when no parameter has one. With a window, o and lse are the whole problem's
        rows (their softmax runs over every key, not only this call's), and dhp is per row
        [P, 3, B, Hq, Nq] (see _dhp_store; finish_head_param_grads). deterministic: True, the
        two-kernel backward; False, the single pass adding dQ with atomics; None, the module's
        default (see single_pass)."""
        if window is not None:
            self._check_window(q, k, sparse, window)
        B, Hq, Nq, _ = q.shape
        Nk = k.shape[2]
        if q.numel() == 0 or Nk == 0:
            dhp = None if not self.n_grads else torch.zeros_like(hp) if window is None else \
                hp.new_zeros(hp.shape[0], 3, B, Hq, Nq)
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dhp
        # No zero fill: the kernels store every row of dQ, dK and dV (blocks that see nothing store zeros).
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
        scalars = (scale * LOG2E, scale, seed, p_drop)
        lengths = self._lengths(q, k, sparse)
        if self.single_pass(DTYPES[q.dtype], *lengths, deterministic, packed=sparse.seqlens is not None):
            one_cfg = self.config("bwd_single", DTYPES[q.dtype], *lengths)
            if tuple(one_cfg.items()) not in self._no_single_pass:
                # one kernel: dK, dV per key block, dQ added into fp32 rows (TMA reductions, or atomics)
                self._delta(o, do, delta)
                dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
                try:
                    self._launch("bwd_dkdv", (q, k, v, do, dk, dv, dq_acc, lse, delta, hp), scalars, seed,
                                 (True, p_drop > 0), sparse, one_cfg, window)
                    self.last_backward = "single pass"
                    return dq.copy_(dq_acc), dk, dv, None
                except OutOfResources:  # more than the model's estimate (docs/decisions/single-pass-backward.md)
                    self._no_single_pass.add(tuple(one_cfg.items()))  # so: the two kernels, for this tiling
        flags = (p_drop > 0,)
        cfg = self.config("bwd_dq", DTYPES[q.dtype], *lengths)
        kv_cfg = self.config("bwd_dkdv", DTYPES[q.dtype], *lengths)
        # per dQ program, its rows' share of each learnable head parameter's gradient; summed below
        # (packed: zeros, for the programs past their sequence's end return before writing theirs)
        programs = (B if sparse.seqlens is None else sparse.seqlens.batch) * Hq
        blocks = triton.cdiv(lengths[0], cfg["BLOCK_M"])
        # (a window: per row the three sums the caller completes over the windows, _dhp_store)
        shape = (self.n_grads, programs, blocks) if window is None else (self.n_grads, 3, programs, blocks * cfg["BLOCK_M"])
        part = ((torch.empty if sparse.seqlens is None else torch.zeros)(shape, dtype=torch.float32, device=q.device)
                if self.n_grads else placeholder(q.device, torch.float32))
        # dQ first: its programs also write delta = rowsum(dO * O), which the dK/dV kernel reads.
        self._launch("bwd_dq", (q, k, v, do, o, dq, lse, delta, hp, part), scalars, seed, flags, sparse, cfg, window)
        self.last_backward = "two kernels"
        if self._gluon_dkdv(q, k, v, do, lse, delta, dk, dv, scale, p_drop, sparse, window, kv_cfg):
            self.last_backward = "two kernels, dK/dV in Gluon"
        else:  # q stands in for the fp32 dQ buffer the kernel does not touch without ATOMIC_DQ
            self._launch("bwd_dkdv", (q, k, v, do, dk, dv, q, lse, delta, hp), scalars, seed, (False, *flags), sparse,
                         kv_cfg, window)
        dhp = None
        if self.n_grads and window is not None:  # [P, 3, B, Hq, Nq]: g(ds), ds and g(p) per row, unfinished
            rows = iter(part.view(self.n_grads, 3, B, Hq, -1)[..., :Nq])
            dhp = torch.stack([next(rows) if p["grad"] else hp.new_zeros(3, B, Hq, Nq) for p in self.head_params])
        elif self.n_grads:  # no indexing with a list here: its index tensor's copy to the GPU would block the host
            sums = iter(part.view(self.n_grads, -1, Hq, part.shape[-1]).sum(dim=(1, 3)))
            dhp = torch.stack([next(sums) if p["grad"] else hp.new_zeros(Hq) for p in self.head_params])
        return dq, dk, dv, dhp

    def _gluon_dkdv(self, q, k, v, do, lse, delta, dk, dv, scale, p_drop, sparse, window, kv_cfg) -> bool:
        """dK and dV by the Gluon kernel where it applies (runtime/gluon_dkdv.py; `gluon_dkdv`: off
        with False); True when it ran. A compile failure (another Triton's Gluon) turns it off."""
        if not (self.gluon_dkdv and p_drop == 0 and window is None and sparse.seqlens is None
                and sparse.block_mask is None and sparse.documents is None and not self.document
                and lse.stride() == delta.stride()
                and gluon_dkdv.eligible(self.spec, q, k, v, do, kv_cfg["HEAD_DIM_PAD"], kv_cfg["HEAD_DIM_V_PAD"])):
            return False
        causal = self.spec.get("mask", {}).get("causal")
        try:
            gluon_dkdv.dkdv(q, k, v, do, lse, delta, dk, dv, scale, causal["align"] if causal else None)
        except Exception as e:  # another Triton's Gluon (names, signatures): the Triton kernel from now on
            self.gluon_dkdv = False
            warnings.warn(f"spec {self.name!r}: the Gluon dK/dV kernel failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); the Triton kernel runs instead")
            return False
        return True

    @staticmethod
    def _delta(o, do, delta) -> None:
        """delta [B, H, N] = rowsum(dO * O) in fp32 (packed sequences: B = 1, N = the total)."""
        B, H, N, Dv = o.shape
        pad = max(16, triton.next_power_of_2(Dv))
        block = max(16, 8192 // pad)
        _bwd_delta[(triton.cdiv(N, block), B * H)](o, do, delta, H, N, *o.stride(), *do.stride(), HEAD_DIM_V=Dv,
                                                   HEAD_DIM_V_PAD=pad, BLOCK=block)

    @staticmethod
    def finish_head_param_grads(rows: torch.Tensor) -> torch.Tensor:
        """[P, Hq] from windowed backwards' per-row sums [P, 3, B, Hq, N], added over the windows of
        whole rows: sum(g(ds)) - sum(ds) x sum(g(p)), the residue's correction of _vjp_lines."""
        a, ds, gp = rows.unbind(1)
        return (a - ds * gp).sum(dim=(1, 3))

    def _check_window(self, q, k, sparse: Sparse, window: Window) -> None:
        window.check(q.shape[2], k.shape[2])
        if sparse.seqlens is not None or sparse.block_mask is not None or self.sparsity:
            raise ValueError(f"spec {self.name!r}: a window of a larger problem (context parallelism) is not "
                             f"supported with packed sequences or block-sparse layouts")

    # ------------------------------------------------------------------ the entry point

    def check(self, q, k, v, out=None):
        B, Hq, _, _ = check_qkv(self.name, tuple(self.tilings["fwd"]), self.head_dim, self.head_dim_v, q, k, v)
        if B * Hq > 65535:
            raise ValueError(f"batch x query heads = {B * Hq} is over 65535, the launch grid's limit on axis 1")
        if out is not None:  # written by the kernel in place: never through a copy, so never cast or moved
            want = (B, Hq, q.shape[2], self.head_dim_v)
            if not isinstance(out, torch.Tensor) or out.dtype != q.dtype:
                got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
                raise TypeError(f"out must be a tensor of q's dtype ({q.dtype}); got {got}")
            if tuple(out.shape) != want or out.device != q.device:
                raise ValueError(f"out must be {list(want)} (batch, query heads, Nq, head_dim_v) on q's device "
                                 f"({q.device}); got {list(out.shape)} on {out.device}")
            if memory.internal_overlap(out):
                raise ValueError(f"out is not supported because it has overlapping elements (strides "
                                 f"{list(out.stride())}: a stride 0, e.g. an expanded dim): the kernel writes each "
                                 f"element once, in place; any other strides are taken")
            if not torch.compiler.is_compiling():  # (traced tensors have no addresses)
                for arg, t in (("q", q), ("k", k), ("v", v)):
                    if memory.shares_memory(out, t):
                        raise ValueError(f"out is not supported because it shares memory with {arg}: the kernel "
                                         f"reads q, k, v while it writes out; pass a separate tensor")

    def head_param_rows(self, q, given: dict) -> torch.Tensor:
        """HP [P, Hq] float32: the spec's per-head parameters, given or default, in declared order."""
        Hq = q.shape[1]
        for name, value in given.items():
            if value is not None and name not in self.param_args:
                raise TypeError(f"spec {self.name!r} takes no {name}= (it has no such score modifier)")
        if not self.head_params:
            return placeholder(q.device, torch.float32)
        rows = []
        for p in self.head_params:
            value = given.get(p["arg"])
            if value is None:
                value = _DEFAULTS[p["default"]](Hq, q.device)
            elif tuple(value.shape) != (Hq,):
                raise ValueError(f"{p['arg']} must have shape [{Hq}]; got {tuple(value.shape)}")
            elif value.device != q.device or not value.is_floating_point():
                raise ValueError(f"{p['arg']} must be a floating-point tensor on q's device ({q.device}); got "
                                 f"{value.dtype} on {value.device} (nothing is copied between devices)")
            value = value.to(torch.float32)  # the kernels read fp32 rows (a no-op for fp32 input)
            rows.append(value if p["grad"] else value.detach())
        return rows[0].reshape(1, Hq).contiguous() if len(rows) == 1 else torch.stack(rows)

    def block_mask(self, layout, batch: int, heads: int, Nq: int, Nk: int, device) -> BlockMask | None:
        """The call's BlockMask (made from a bool layout if need be), checked against the call."""
        if not self.runtime_layout:
            if layout is not None:
                raise TypeError(f"spec {self.name!r} has no runtime layout (sparsity: {{layout: runtime}}): "
                                f"layout= is not taken")
            return None
        bq, bk = self.layout_block
        if layout is None:
            raise ValueError(f"spec {self.name!r} has a runtime block layout: pass layout= (a bool tensor [B or 1, "
                             f"H or 1, ceil(Nq / {bq}), ceil(Nk / {bk})], or a BlockMask)")
        block_mask = layout if isinstance(layout, BlockMask) else BlockMask(layout)
        block_mask.check(batch, heads, Nq, Nk, self.layout_block, self.name)
        if block_mask.layout.device != device:
            raise ValueError(f"layout: the block mask is on {block_mask.layout.device}, q on {device}")
        return block_mask

    def attention(self, q, k, v, *, documents=None, layout=None, return_lse=False, alibi_slopes=None,
                  temperature=None, scale=None, out=None, training=True, dropout_seed=None, deterministic=None):
        """o [B, Hq, Nq, Dv] from q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (and lse
        [B, Hq, Nq], float32, natural log, with return_lse). The module's docstring has the spec.
        deterministic: the backward's form: True, two kernels, bitwise-repeatable gradients; False,
        one kernel adding dQ with atomics; None, the module's `deterministic` default (True; set it
        to None for the form the cost model predicts faster per dtype and length, BACKWARD_FORMS)."""
        self.check(q, k, v, out)
        if self.document:
            documents = as_documents(documents, q.shape[0], q.shape[2], k.shape[2], q.device, self.name)
        elif documents is not None:
            raise TypeError(f"spec {self.name!r} has no document mask: documents= is not taken")
        sparse = Sparse(documents, self.block_mask(layout, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device))
        hp = self.head_param_rows(q, {"alibi_slopes": alibi_slopes, "temperature": temperature})
        scale = self.scale if scale is None else float(scale)
        p_drop = self.dropout_p if training else 0.0
        if torch.compiler.is_compiling():  # one opaque op per direction: no graph break
            o, lse = self._compiled(q, k, v, hp, documents, sparse.block_mask, scale, p_drop, dropout_seed,
                                    deterministic=deterministic)
            if out is not None:
                out.copy_(o)
                o = out
            return (o, lse) if return_lse else o
        o, lse = self._eager(q, k, v, hp, scale, p_drop, dropout_seed, sparse, out, return_lse, deterministic)
        return (o, lse) if return_lse else o

    def _eager(self, q, k, v, hp, scale: float, p_drop: float, dropout_seed, sparse: Sparse, out, store_lse: bool,
               deterministic=None):
        """o, lse of an eager call: through autograd when a gradient is needed, else the forward alone."""
        seed = 0
        if p_drop > 0:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_seed is None else int(dropout_seed)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or hp.requires_grad):
            if out is not None:
                raise ValueError("out= cannot be used when gradients are required")
            return _Attention.apply(self, q, k, v, hp, scale, seed, p_drop, sparse, deterministic)
        return self.forward(q, k, v, hp, scale, seed, p_drop, out, store_lse, sparse)

    def attention_varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                         return_lse=False, documents=None, layout=None, alibi_slopes=None, temperature=None,
                         scale=None, training=True, dropout_seed=None, deterministic=None):
        """Packed sequences without padding, FlashAttention's varlen layout: o [total_q, Hq, Dv] from
        q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv], where sequence i is rows
        cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q and cu_seqlens_k[i]:cu_seqlens_k[i + 1] of k and v
        (int32 [B + 1]); and lse [Hq, total_q] with return_lse. Sequence i's queries see only its
        keys, under the spec's mask at its own lengths (bottom-right causal aligns each pair of
        sequence ends). Lengths 0 and Nq_i != Nk_i are legal. documents= takes ids of the packed
        tokens ([total_q] and [total_k], or one tensor when they are the same); layout= (specs with a
        runtime layout) a block layout per sequence, [B or 1, H or 1, ceil(max_seqlen_q / bq),
        ceil(max_seqlen_k / bk)], in each sequence's own block coordinates. The lengths are
        read on the host once per pair of tensors (checked, and for tile-table specs made into
        per-sequence tables), then kept while the tensors are unchanged; under torch.compile, inside
        the op at run time."""
        if not (q.dim() == k.dim() == v.dim() == 3):
            raise ValueError(f"attention_varlen: q, k, v must be 3-d [total, heads, head_dim]; got {q.dim()}-d, "
                             f"{k.dim()}-d, {v.dim()}-d")
        q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # [1, H, total, D] views
        self.check(q4, k4, v4)
        compiling = torch.compiler.is_compiling()  # the lengths are read in the op, at run time
        seqlens = None if compiling else kept_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                   q.shape[0], k.shape[0])
        if cu_seqlens_q.device != q.device:
            raise ValueError(f"cu_seqlens are on {cu_seqlens_q.device}, q on {q.device}")
        if seqlens is not None and seqlens.batch * q.shape[1] > 65535:
            raise ValueError(f"sequences x query heads = {seqlens.batch * q.shape[1]} is over 65535, the launch "
                             f"grid's limit on axis 1")
        if self.document:
            ids = documents if isinstance(documents, (Documents, tuple, list)) or documents is None else (documents,)
            if isinstance(ids, (tuple, list)) and len(ids) in (1, 2) and all(isinstance(t, torch.Tensor) for t in ids):
                q_ids, kv_ids = (t.reshape(1, -1) for t in (ids[0], ids[-1]))
                ids = made_for("documents", ids[0], ids[-1],  # raw ids: one Documents per tensor pair
                               lambda: as_documents((q_ids, kv_ids), 1, q.shape[0], k.shape[0], q.device, self.name))
            documents = as_documents(ids, 1, q.shape[0], k.shape[0], q.device, self.name)
        elif documents is not None:
            raise TypeError(f"spec {self.name!r} has no document mask: documents= is not taken")
        hp = self.head_param_rows(q4, {"alibi_slopes": alibi_slopes, "temperature": temperature})
        scale = self.scale if scale is None else float(scale)
        p_drop = self.dropout_p if training else 0.0
        if isinstance(layout, torch.Tensor) and layout.dtype == torch.bool:  # raw: one BlockMask per tensor
            layout = made_for("layout", layout, layout, lambda: BlockMask(layout))
        blocks = self.block_mask(layout, cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k, q.device)
        if compiling:
            o, lse = self._compiled(q4, k4, v4, hp, documents, blocks, scale, p_drop, dropout_seed,
                                    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), deterministic)
            return (o[0].transpose(0, 1), lse[0]) if return_lse else o[0].transpose(0, 1)
        o, lse = self._eager(q4, k4, v4, hp, scale, p_drop, dropout_seed, Sparse(documents, blocks, seqlens), None,
                             return_lse, deterministic)
        o = o[0].transpose(0, 1)  # [total_q, Hq, Dv], contiguous
        return (o, lse[0]) if return_lse else o

    def attention_with_kvcache(self, q, k_cache, v_cache, *, cache_seqlens, block_table=None, k=None, v=None,
                               return_lse=False, num_splits=None, documents=None, layout=None, alibi_slopes=None,
                               temperature=None, scale=None):
        """Decoding against a KV cache, FlashAttention's flash_attn_with_kvcache semantics: o [B, Hq,
        Nq, Dv] (and lse [B, Hq, Nq] with return_lse) for q [B, Hq, Nq, D], the queries at each
        sequence's last Nq positions. The cache is [B, Hkv, S, D] (v: Dv), or paged [pages,
        page_size, Hkv, D] with block_table int32 [B, pages per sequence] (page_size a multiple of
        16). cache_seqlens int32 [B] counts the tokens already cached; k, v [B, Hkv, Nq, *], when
        given, are first written into the cache there, in place. The spec's mask and score apply
        at absolute positions with Nk = the sequence's length (its bottom-right rows); a sequence
        with no key gives zeros and LSE -inf. num_splits (default: FlashAttention-3's rule, from the
        shapes alone) splits each sequence's keys over programs. No backward and no dropout
        (inference). Inputs are checked with one host read of the lengths, skipped while a CUDA
        graph is captured or torch.compile traces (one custom op then; runtime/decode.py).

        Specs with a document mask take documents= ids per cache position [B, S'] (the queries take
        their positions' ids) or a (q_ids [B, Nq], kv_ids [B, S']) pair; specs with a runtime layout
        take layout= over the cache's positions, bool [B or 1, Hq or 1, ceil(S / bq), ceil(S / bk)]
        with S the capacity (runtime/decode_gate.py)."""
        if torch.is_grad_enabled() and q.requires_grad:
            raise ValueError("attention_with_kvcache has no backward (inference): call it under torch.no_grad(), "
                             "or on tensors that do not require grad")
        if documents is not None and not self.document:
            raise TypeError(f"spec {self.name!r} has no document mask: documents= is not taken")
        dtypes = [t for t, name in DTYPES.items() if name in self.tilings["fwd"]]
        decode.check(self.name, dtypes, (self.head_dim, self.head_dim_v), q, k_cache, v_cache, cache_seqlens,
                     block_table, k, v)
        if k is not None:
            decode.append(k_cache, v_cache, block_table, cache_seqlens, k, v)
        seqlens = cache_seqlens + q.shape[2] if k is not None else cache_seqlens
        hp = self.head_param_rows(q, {"alibi_slopes": alibi_slopes, "temperature": temperature}).detach()
        scale = self.scale if scale is None else float(scale)
        splits = 0 if num_splits is None else max(1, int(num_splits))  # 0: the rule's choice
        B, Hq, Nq = q.shape[:3]
        q_ids = kv_ids = lay = row0 = None
        capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[2]
        if self.document:
            q_ids, kv_ids = decode_gate.documents(documents, B, Nq, capacity, seqlens, self.name)
        if self.sparsity:
            lay, row0 = decode_gate.layout(self, layout, B, Hq, Nq, capacity, seqlens)
        elif layout is not None:
            raise TypeError(f"spec {self.name!r} has no sparsity section: layout= is not taken")
        if torch.compiler.is_compiling():  # one opaque op: no graph break
            o, lse = self.ops.decode(q, k_cache, v_cache, seqlens, block_table, hp, q_ids, kv_ids, lay, row0, scale,
                                     splits)
        else:
            o, lse = self.decode(q, k_cache, v_cache, seqlens, block_table, hp, scale, splits,
                                 decode_gate.Gate(q_ids, kv_ids, lay, row0, self.layout_block or (16, 16)))
        return (o, lse) if return_lse else o

    def decode(self, q, k_cache, v_cache, seqlens, block_table, hp, scale: float, splits: int = 0,
               gate: decode_gate.Gate = decode_gate.NO_GATE):
        """o, lse of decoding (no checks but the gate's; seqlens counts each sequence's keys, the
        appended ones included)."""
        if (self.document and gate.kv_ids is None) or (self.sparsity and gate.layout is None):
            raise ValueError(f"spec {self.name!r} decodes with its document ids / block layout: pass a "
                             f"decode_gate.Gate holding them (attention_with_kvcache makes it)")
        paged = block_table is not None
        Hkv = k_cache.shape[2] if paged else k_cache.shape[1]
        capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[2]
        plan = self.decode_plan(q.shape[0], q.shape[1], Hkv, q.shape[2], capacity, decode.sms(q.device),
                                splits=splits or None)
        return decode.run(self.decode_kernel, q, k_cache, v_cache, hp, seqlens, block_table, scale, plan, Hkv,
                          self.head_dim_v, self.native, gate)

    def decode_plan(self, batch: int, heads_q: int, heads_kv: int, n_q: int, capacity: int, sms: int,
                    **fields):
        """The plan of a decode call against caches of `capacity` positions on `sms` SMs: the layout's
        key block holds whole tiles, and a mask's span (a window) bounds the splits; `fields`
        override decode_plan's choices (splits, block_n, stages: bench variants)."""
        return decode.decode_plan(batch, heads_kv, heads_q // heads_kv * n_q, capacity, self.head_dim, sms,
                                  key_block=self.layout_block and self.layout_block[1],
                                  span=decode.decode_span(self.decode_width, n_q), **fields)

    def _compiled(self, q, k, v, hp, documents, block_mask, scale, p_drop, dropout_seed, packed=(None, None, 0, 0),
                  deterministic=None):
        """o, lse through the torch.library ops (what torch.compile traces instead of the host code)."""
        if p_drop > 0 and dropout_seed is None:
            raise ValueError(f"spec {self.name!r} has dropout: under torch.compile pass dropout_seed= (an int per "
                             f"step, drawn outside the compiled function), or training=False")
        ids = (documents.q_ids, documents.kv_ids) if self.document else (None, None)
        blocks = None if block_mask is None else block_mask.layout
        det = self.deterministic if deterministic is None else bool(deterministic)  # traced: a constant (or None)
        return self.ops.forward(q, k, v, hp, *ids, blocks, *packed, scale, dropout_seed if p_drop > 0 else 0, p_drop,
                                det)

    def dropout_keep_mask(self, batch, heads, seq_q, seq_k, dropout_seed, device=None):
        """For tests: the bool keep-mask [B, Hq, Nq, Nk] the kernels use for this seed (all True when
        the spec has no dropout)."""
        keep = torch.ones((batch, heads, seq_q, seq_k), dtype=torch.int8, device=device)
        if self.dropout_p > 0 and keep.numel():
            _keep_mask_kernel[(triton.cdiv(seq_q, 64), triton.cdiv(seq_k, 64), batch * heads)](
                keep, heads, seq_q, seq_k, int(dropout_seed), self.dropout_p, BLOCK_M=64, BLOCK_N=64)
        return keep.bool()
