"""The host code of Native Sparse Attention modules (the nsa family; docs/decisions/nsa-plan.md).
A spec's `nsa:` section becomes this pipeline, differentiable end to end except for the selection:

1. compression of each KV head's keys and values (mean, or linear with weights given per call);
2. the compressed branch: the derived fa2 module `BRANCHES["cmp"]`, with its LSE;
3. the selection: block scores from the compressed branch's probabilities summed over the G query
   heads of a KV head (the `_nsa_scores` kernel, or chunked torch), then the top-n blocks with the
   forced ones (torch; no gradient);
4. the selected branch: the module's `_nsa_select_fwd` kernel (BLOCK_T tokens per program over
   the union of their blocks), or for small groups `_nsa_select_fwd_keys` (key-major, each choice
   a partial row merged by LSE); for the backward `_nsa_select_bwd_dq` (query-major) and
   `_nsa_select_bwd_dkdv` (key-major, over each key block's choices cut into segments) with its sum;
5. the window branch: the derived fa2 module `BRANCHES["swa"]`;
6. o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa: the module's `_nsa_mix` kernel, one pass over the
   rows (the backward `_nsa_mix_bwd`), or torch ops (`_mix_torch`) under torch.compile or with
   fused_mix off.

Decoding (attention_with_kvcache) is runtime/nsa_decode.py's, the gates' mix runtime/nsa_mix.py's; both are
mixins of NSAModule. The math is attngen/reference_nsa.py's, which the kernels are verified against.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import triton

from .decode import _combine_splits, cache_strides
from .library import register_nsa_ops
from .module import check_qkv
from .nsa_decode import NSADecoding, top_blocks_launch
from .nsa_mix import NSAMixing, _mix

_CHUNK_ELEMENTS = 1 << 26  # the selection's score chunk: 256 MB of float32 at most


class _Selected(torch.autograd.Function):
    """The selected branch: o [B, Hq, N, Dv] of q over each token's selected blocks (indices)."""

    @staticmethod
    def forward(ctx, rt, q, k, v, indices, scale):
        o, lse = rt.selected_forward(q, k, v, indices, scale)
        ctx.save_for_backward(q, k, v, indices, o, lse)
        ctx.rt, ctx.scale = rt, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, indices, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.rt.selected_backward(q, k, v, indices, o, lse, do, ctx.scale)
        return None, dq, dk, dv, None, None


class NSAModule(NSADecoding, NSAMixing):
    """attention(q, k, v, *, gates, compress_weights=None, return_indices=False, scale=None):
    q [B, Hq, N, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv] (self-attention: queries and keys share
    positions 0 .. N - 1), gates [B, Hq, N, 3] (cmp, slc, swa; e.g. sigmoid outputs). Linear
    compression takes compress_weights=(w_k [Hkv, l * D, D], w_v [Hkv, l * Dv, Dv]). Returns o
    [B, Hq, N, Dv], and with return_indices the selected blocks int32 [B, Hkv, N, n] (ascending, -1
    padded). Gradients reach q, k, v, the gates and the compression weights; none flows through the
    selection."""

    top_blocks_max = 16384  # the widest row of scores the top-blocks kernels hold (1M tokens at blocks of 64)

    def __init__(self, ns: dict):
        self.spec = ns["SPEC"]
        self.name = self.spec["name"]
        self.branch_specs = ns["BRANCHES"]
        n = self.spec["nsa"]
        self.l, self.d, self.kind = n["compress"]["block"], n["compress"]["stride"], n["compress"]["kind"]
        sel = n["select"]
        self.l_sel, self.count, self.init, self.local = sel["block"], sel["count"], sel["init_blocks"], sel["local_blocks"]
        self.window = n["window"]
        self.head_dim, self.head_dim_v = self.spec["head_dim"], self.spec.get("head_dim_v", self.spec["head_dim"])
        self.scale = self.head_dim ** -0.5
        self.fwd_kernel, self.scores_kernel = ns["_nsa_select_fwd"], ns["_nsa_scores"]
        self.bwd_dq_kernel, self.bwd_dkdv_kernel = ns["_nsa_select_bwd_dq"], ns["_nsa_select_bwd_dkdv"]
        self.bwd_dkdv_sum_kernel, self.bwd_dq_sum_kernel = ns["_nsa_select_bwd_dkdv_sum"], ns["_nsa_select_bwd_dq_sum"]
        self.fwd_keys_kernel, self.top_kernel = ns["_nsa_select_fwd_keys"], ns["_nsa_top_blocks"]
        self.decode_cmp_kernel, self.decode_select_kernel = ns["_nsa_decode_cmp"], ns["_nsa_decode_select"]
        self.compress_update_kernel = ns["_nsa_compress_update"]
        self.decode_attend_kernel, self.decode_merge_kernel = ns["_nsa_decode_attend"], ns["_nsa_decode_merge"]
        self.decode_union_kernel = ns["_nsa_decode_union"]
        self.mix_kernel, self.mix_bwd_kernel = ns["_nsa_mix"], ns["_nsa_mix_bwd"]
        self._overlaps: dict = {}
        self.fused_selection = True  # scores from the _nsa_scores kernel, measured faster (docs/decisions/nsa-plan.md)
        # the top blocks by the _nsa_top_blocks kernel (rounds of a max per row) instead of torch's
        # sort of every score: measured faster (docs/decisions/nsa-plan.md); False: the sort
        self.top_blocks_kernel = True
        # decoding in kernels: the compressed cache's update, the compressed branch and the selection,
        # the selected and window branches with the gates' mix (_update_compressed_kernel,
        # _decode_compressed_fused, _decode_attend_fused) instead of about 90 torch ops and 4
        # kernels: measured faster (docs/decisions/nsa-plan.md); False: the torch path
        self.fused_decode = True
        # fused_decode's top blocks by the _nsa_top_blocks kernel, a row to a warp, after the row is
        # gathered by several programs, instead of in the selection kernel's one program per row on
        # 8-16 warps: True or False forces it; None (the default) takes it while the rows (B Hkv Nq)
        # fill at most half the SMs (measured faster at 4 and 32 rows, even at 128: top_apart();
        # docs/decisions/nsa-plan.md, "The decode step's top blocks apart")
        self.decode_top_kernel = None
        # the gates' mix by the _nsa_mix and _nsa_mix_bwd kernels (one pass over the rows each, the
        # inputs read in place) instead of torch ops (_mix_torch: float32 temporaries; experiments/
        # nsa_mix.py times both); False: the torch ops, which torch.compile traces either way
        self.fused_mix = True
        # the selection scores' loop carries the blocks a step shares with the next in registers, so
        # that it only stores and its loads pipeline, instead of adding to them in memory after a
        # barrier: True or False forces it; None (the default) carries past head dim 128 only, where
        # it was measured faster (docs/decisions/nsa-plan.md, "The scores' loop only stores")
        self.scores_carry = None
        # the scores' block sums by windows' pieces (scores_pieces(): no fold product, where the spec's
        # strides allow) instead of the fold product with the overlaps: None takes them where allowed,
        # False the product
        self.scores_fold = None
        # tokens per program of the selected branch's forward: None picks them (selected_tokens());
        # a power of two forces it (1: one token per program, the G query heads alone as rows)
        self.tokens_per_program = None
        # the selected branch's loop order: None picks it (loop_order(), the forward's and dQ's), "query" or "key";
        # key-major's partial rows take up to partial_bytes (1 GiB) a chunk of tokens
        self.loop_order = None
        # key-major's partial rows (B Hq tokens n width) are made at most this many bytes at a time,
        # the tokens in chunks
        self.partial_bytes = 1 << 30
        # the key-major forward's partial rows (normalized, each over one block) in the inputs' dtype
        # where it is bf16 or fp16 (half the bytes written and merged) instead of float32: off by
        # default, its gain measured small against its added rounding (docs/decisions/nsa-plan.md,
        # "Half partial rows")
        self.partials_half = False
        # the backward's dK/dV work item: at most this many steps of a block's tokens (None: 64; an int >= 1)
        self.backward_steps = None
        source = Path(ns["__file__"]).read_bytes() if ns.get("__file__") else repr(self.spec).encode()
        self.key = f"{self.name}_{hashlib.sha256(source).hexdigest()[:12]}"
        self.ops = register_nsa_ops(self)  # what torch.compile traces instead of the selection and the selected branch
        # the branches' modules (disk-cached): loaded here, so that a compiled call never traces the loader
        self._branches = self._load_branches()

    def _load_branches(self) -> dict:
        from attngen.loader import load_derived

        return {role: load_derived(spec) for role, spec in self.branch_specs.items()}

    def branches(self) -> dict:
        """The compressed and window branches' fa2 modules ("cmp", "swa")."""
        return self._branches

    # ------------------------------------------------------------------ the call

    def check(self, q, k, v, gates, compress_weights) -> None:
        B, Hq, Hkv, Nk = check_qkv(self.name, tuple(self.spec["dtypes"]), self.head_dim, self.head_dim_v, q, k, v)
        N = q.shape[2]
        if Nk != N:
            raise ValueError(f"k and v must be [{B}, Hkv, {N}, *] (NSA is self-attention: as many keys as queries); "
                             f"got k {list(k.shape)}, v {list(v.shape)}")
        if B * Hkv > 65535:
            raise ValueError(f"batch x KV heads = {B * Hkv} is over 65535, the launch grid's limit on axis 1")
        if not isinstance(gates, torch.Tensor) or tuple(gates.shape) != (B, Hq, N, 3) \
                or not gates.dtype.is_floating_point or gates.device != q.device:
            got = f"{gates.dtype} {list(gates.shape)} on {gates.device}" if isinstance(gates, torch.Tensor) else \
                type(gates).__name__
            raise ValueError(f"gates must be a floating tensor [{B}, {Hq}, {N}, 3] (cmp, slc, swa) on {q.device}; "
                             f"got {got}")
        self._check_weights(k, compress_weights)

    def _check_weights(self, k, compress_weights) -> None:
        """compress_weights = (w_k [Hkv, l * D, D], w_v [Hkv, l * Dv, Dv]) in k's dtype and device, for
        linear compression only."""
        Hkv, D = k.shape[1], self.head_dim
        if self.kind == "linear":
            if compress_weights is None or len(compress_weights) != 2:
                raise ValueError(f"spec {self.name!r} compresses linearly: pass compress_weights=(w_k [{Hkv}, "
                                 f"{self.l * D}, {D}], w_v [{Hkv}, {self.l * self.head_dim_v}, {self.head_dim_v}])")
            for arg, w, e in (("w_k", compress_weights[0], D), ("w_v", compress_weights[1], self.head_dim_v)):
                if not isinstance(w, torch.Tensor) or tuple(w.shape) != (Hkv, self.l * e, e) or w.dtype != k.dtype \
                        or w.device != k.device:
                    got = f"{w.dtype} {list(w.shape)} on {w.device}" if isinstance(w, torch.Tensor) else type(w).__name__
                    raise ValueError(f"compress_weights: {arg} must be {k.dtype} [{Hkv}, {self.l * e}, {e}] on "
                                     f"{k.device}; got {got}")
        elif compress_weights is not None:
            raise TypeError(f"spec {self.name!r} compresses by the mean: compress_weights= is not taken")

    def attention(self, q, k, v, *, gates, compress_weights=None, return_indices=False, scale=None):
        self.check(q, k, v, gates, compress_weights)
        scale = self.scale if scale is None else float(scale)
        branches = self.branches()
        w_k, w_v = compress_weights if compress_weights is not None else (None, None)
        k_cmp, v_cmp = self.compress(k, w_k), self.compress(v, w_v)
        if k_cmp.shape[2]:
            o_cmp, lse_cmp = branches["cmp"].attention(q, k_cmp, v_cmp, return_lse=True, scale=scale)
        else:  # shorter than one window: no compressed token, o_cmp = 0
            o_cmp = q.new_zeros(*q.shape[:3], self.head_dim_v)
            lse_cmp = None
        if torch.compiler.is_compiling():  # the ops: opaque to the tracer (their host code reads shapes, launches)
            indices = self.ops.select(q, k_cmp, lse_cmp if lse_cmp is not None else q.new_empty(0, dtype=torch.float32),
                                      scale)
            o_slc = self.ops.selected(q, k, v, indices, scale)[0]
        else:
            if self.fused_selection and lse_cmp is not None:
                indices = self.select_fused(q, k_cmp, lse_cmp, scale)[0]
            else:
                indices = self.select(q, k_cmp, lse_cmp, scale)
            o_slc = _Selected.apply(self, q, k, v, indices, scale)
        o_swa = branches["swa"].attention(q, k, v, scale=scale)
        o = _mix(gates, o_cmp, o_slc, o_swa, q.dtype, self)
        return (o, indices) if return_indices else o

    # ------------------------------------------------------------------ the stages

    def compress(self, x, weight=None):
        """[B, H, n_cmp, E]: windows of l rows every d, averaged or mapped by weight [H, l * E, E']."""
        B, H, N, E = x.shape
        if N < self.l:  # no whole window
            return x.new_zeros(B, H, 0, E if weight is None else weight.shape[-1])
        windows = x.unfold(2, self.l, self.d)  # [B, H, (N - l) // d + 1, E, l]
        n = windows.shape[2]
        if weight is None:
            return windows.mean(-1)
        flat = windows.transpose(-1, -2).reshape(B, H, n, self.l * E)  # row-major over (token, feature)
        return torch.einsum("bhnf,hfe->bhne", flat, weight)

    def _overlap(self, n_cmp: int, n_blocks: int, device) -> torch.Tensor:
        """float32 [n_cmp, n_blocks]: |[j d, j d + l) n [b l', (b + 1) l')| / d."""
        key = (n_cmp, n_blocks, str(device))
        if key not in self._overlaps:
            if len(self._overlaps) >= 64:  # one per sequence length: bounded under varying lengths
                self._overlaps.clear()
            j = torch.arange(n_cmp, device=device)[:, None]
            b = torch.arange(n_blocks, device=device)[None, :]
            lo = torch.maximum(j * self.d, b * self.l_sel)
            hi = torch.minimum(j * self.d + self.l, (b + 1) * self.l_sel)
            self._overlaps[key] = (hi - lo).clamp(min=0).to(torch.float32) / self.d
        return self._overlaps[key]

    @torch.no_grad()
    def select(self, q, k_cmp, lse_cmp, scale: float) -> torch.Tensor:
        """int32 [B, Hkv, N, n]: per token and KV head, the forced blocks (the first init_blocks, the
        local_blocks ending at its own) and the best-scored others up to count, none after its own
        block; ascending, -1 padded. Scores in float32, ties to the lower index (a stable sort)."""
        B, Hq, N, D = q.shape
        Hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
        G, n_blocks = Hq // Hkv, -(-N // self.l_sel)
        n = min(self.count, n_blocks)
        out = torch.empty(B, Hkv, N, n, dtype=torch.int32, device=q.device)
        overlap = self._overlap(n_cmp, n_blocks, q.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * max(n_cmp, n_blocks)))
        for t0 in range(0, N, step):
            t = torch.arange(t0, min(N, t0 + step), device=q.device)
            if n_cmp:
                s = q[:, :, t0:t0 + len(t)].float().view(B, Hkv, G, len(t), D) @ \
                    k_cmp.float()[:, :, None].transpose(-1, -2) * scale
                visible = (torch.arange(n_cmp, device=q.device) * self.d + self.l - 1) <= t[:, None]
                p = torch.where(visible, torch.exp(s - lse_cmp[:, :, t0:t0 + len(t)].view(B, Hkv, G, len(t), 1)), 0.0)
                scores = p.sum(2) @ overlap  # [B, Hkv, T, n_blocks]
            else:
                scores = torch.zeros(B, Hkv, len(t), n_blocks, device=q.device)
            out[:, :, t0:t0 + len(t)] = self._top_blocks(scores, t, first=t0)
        return out

    @torch.no_grad()
    def select_fused(self, q, k_cmp, lse_cmp, scale: float, block_c: int | None = None) -> torch.Tensor:
        """(blocks, scores): select()'s blocks, the scores (float32 [B, Hkv, N, n_blocks]) from the
        `_nsa_scores` kernel, which writes no probabilities; used by attention when
        fused_selection is set (the default; docs/decisions/nsa-plan.md). With the windows' pieces
        (scores_pieces()) and local_blocks >= 1 a row's scores past the blocks before its own are
        left unset: the own block is forced and the later ones never chosen, so the selection reads
        none of them (with local_blocks 0 the own block competes, and the kernel may not store it)."""
        B, Hq, N, D = q.shape
        Hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
        G, n_blocks = Hq // Hkv, -(-N // self.l_sel)
        t = self.scores_tiling(G, D, block_c)
        scores = _scores_out((B, Hkv, N, n_blocks), q.device, zeros=not (n_cmp and t["PIECES"] and self.local >= 1))
        if n_cmp and scores.numel():
            self.scores_kernel[(-(-N // t["BLOCK_T"]), B * Hkv)](
                q, k_cmp, lse_cmp, scores, N, n_cmp, n_blocks, *q.stride(), *k_cmp.stride(), *lse_cmp.stride(), Hkv, G,
                scale * 1.4426950408889634, CMP_BLOCK=self.l, CMP_STRIDE=self.d, SEL_BLOCK=self.l_sel,
                HEAD_DIM=D, HEAD_DIM_PAD=max(16, triton.next_power_of_2(D)),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **t)
        return self._top_blocks(scores, torch.arange(N, device=q.device), first=0), scores

    def scores_tiling(self, G: int, head_dim: int, block_c: int | None = None) -> dict:
        """_nsa_scores' constexprs and launch options for groups of G: BLOCK_T tokens x the group's
        heads as rows (about 64, at least 16 tokens for the fold's dot; 128 with the pieces on 8
        warps up to head dim 128, one warpgroup's 64 each), BLOCK_C compressed tokens a
        step (block_c, else 64; 32 where the carried fold of 64 tokens' rows would spill), the
        carry's SHIFT (scores_carried()) or the windows' PIECES (scores_pieces()), 8 warps from 64 rows
        of head dim 128 or with the carry (4 spill at G 1 with the fold's product; at G 16 q alone
        holds most of 4 warps' registers: docs/decisions/nsa-plan.md, "The scores at small groups")."""
        block_g = triton.next_power_of_2(G)
        block_t = max(16, max(1, 64 // block_g) if block_g <= 64 else 1)

        def carried(c: int) -> int:
            # steps that start on a block's first key: the blocks a step touches past the next step's
            # first carried in registers (a loop of stores alone), where they are at most SHIFT
            touched = ((c - 1) * self.d + self.l - 1) // self.l_sel + 1
            shift = c * self.d // self.l_sel if (c * self.d) % self.l_sel == 0 else 0
            return shift if self.scores_carried(head_dim) and 0 <= touched - shift <= shift else 0

        pieces = self.scores_pieces(block_c or 64)
        if block_c is None:
            block_c = 64
            if not pieces and block_t >= 64 and carried(64) > 32 and carried(32):  # two [64, 64] folds spill
                block_c = 32
        shift = 0 if pieces else carried(block_c)
        warps = 8 if shift or block_t * block_g * max(16, triton.next_power_of_2(head_dim)) >= 64 * 128 else 4
        if pieces and warps == 8 and block_t * block_g == 64 and head_dim <= 128:
            block_t *= 2  # 8 warps over 64 rows issue the QK product on both warpgroups (nsa-plan.md)
        return dict(BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_C=block_c,
                    BLOCK_NB=max(16, triton.next_power_of_2((block_c * self.d + self.l) // self.l_sel + 2)),
                    SHIFT=shift, SHIFT_PAD=max(16, triton.next_power_of_2(shift)), PIECES=pieces, num_warps=warps,
                    num_stages=2 if head_dim > 128 else 3)  # (past d128 three stages of keys overflow shared memory)

    def scores_pieces(self, block_c: int) -> int:
        """_nsa_scores' PIECES, l' / d, where a step's block sums need no fold product: l and l'
        multiples of the stride d, l' / d a power of two dividing block_c, a window within two
        blocks (l <= l' + d), and where it spills into the next block at least 16 blocks a step (the
        shift's product); 0 otherwise, or with the knob scores_fold False."""
        if self.scores_fold is False or self.l % self.d or self.l_sel % self.d:
            return 0
        k = self.l_sel // self.d
        ok = k & (k - 1) == 0 and block_c % k == 0 and self.l <= self.l_sel + self.d
        return k if ok and (self.l == self.d or block_c // k >= 16) else 0

    def scores_carried(self, head_dim: int) -> bool:
        """Whether _nsa_scores carries a step's shared blocks in registers: the knob scores_carry, else
        past head dim 128 only (measured: docs/decisions/nsa-plan.md)."""
        return head_dim > 128 if self.scores_carry is None else bool(self.scores_carry)

    def top_apart(self, rows: int, sms: int) -> bool:
        """Whether fused_decode takes the top blocks by _nsa_top_blocks after the selection kernel:
        the knob decode_top_kernel, else while the rows (B Hkv Nq) are at most half the SMs, where
        the selection kernel's one program per row leaves the GPU idle (timed at 4, 32 and 128 rows:
        docs/decisions/nsa-plan.md)."""
        return 2 * rows <= sms if self.decode_top_kernel is None else bool(self.decode_top_kernel)

    def _top_blocks(self, scores, t, first: int | None = None):
        """int32 [..., n]: per row (at position t, broadcast against scores' [..., rows, n_blocks]) the
        forced blocks and the best-scored others up to count, none after its own block; ascending,
        -1 padded; ties to the lower index (a stable sort). first: t is first + the rows' index
        (the rows ascending from it), so that the kernel reads only the blocks up to each run of
        rows' last own block (top_buckets())."""
        n_blocks = scores.shape[-1]
        n = min(self.count, n_blocks)
        nb_pad = triton.next_power_of_2(max(n_blocks, 1))
        # under torch.compile the sort below, which Inductor traces (the kernel's launch is not an op)
        if self.top_blocks_kernel and nb_pad <= self.top_blocks_max and scores.numel() and not torch.compiler.is_compiling():
            rows = scores.shape[:-1]
            scores = scores.float().reshape(-1, n_blocks).contiguous()
            pos = torch.as_tensor(t, device=scores.device).expand(rows).reshape(-1).to(torch.int32).contiguous()
            out = torch.empty(scores.shape[0], n, dtype=torch.int32, device=scores.device)
            L = rows[-1] if rows else 1  # the tokens' axis: runs of it by their last own block
            runs = [(0, L, nb_pad)] if first is None else top_buckets(first, L, n_blocks, self.l_sel)
            for c0, c1, width in runs:
                R = scores.shape[0] // max(L, 1) * (c1 - c0)
                block_r, warps = top_blocks_launch(width)
                self.top_kernel[(-(-R // block_r),)](
                    scores[c0:], pos[c0:], out[c0:], R, n_blocks, 0, 1, c1 - c0, L, SEL_BLOCK=self.l_sel,
                    INIT=self.init, LOCAL=self.local, COUNT=n, COUNT_PAD=max(2, triton.next_power_of_2(n)),
                    BLOCK_R=block_r, NB_PAD=width, DECODE=False, ONE_WARP=warps == 1, num_warps=warps)
            return out.view(*rows, n)
        beta = torch.arange(n_blocks, device=scores.device)
        own = (t // self.l_sel)[..., None]
        forced = (beta < self.init) | ((beta > own - self.local) & (beta <= own))
        rank = torch.where(forced, float("inf"), scores)
        rank = torch.where(beta > own, float("-inf"), rank)
        order = torch.sort(-rank, dim=-1, stable=True).indices[..., :n]
        chosen = torch.where(torch.gather(rank, -1, order) > float("-inf"), order, n_blocks)
        chosen = torch.sort(chosen, dim=-1).values
        return torch.where(chosen == n_blocks, -1, chosen).to(torch.int32)

    def _launch_args(self, q, hkv: int):
        G = q.shape[1] // hkv
        return dict(HEAD_DIM=self.head_dim, HEAD_DIM_V=self.head_dim_v,
                    HEAD_DIM_PAD=max(16, triton.next_power_of_2(self.head_dim)),
                    HEAD_DIM_V_PAD=max(16, triton.next_power_of_2(self.head_dim_v)),
                    BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_S=self.l_sel,
                    DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

    def selected_tokens(self, G: int, N: int, tensor_cores: bool = True) -> int:
        """BLOCK_T, the selected forward's tokens per program: the knob tokens_per_program, else
        enough tokens that tokens x G is about 64 rows (a group of 16 alone fills a quarter of the
        MMA), at most N's power of two (decoding one token: 1); one token for groups over 64, head
        dims over 128, past 32k tokens, or no tensor cores (fp32 on the GPU: more rows only add registers):
        tokens_per_program(). The interpreter (CPU) takes the tensor-core choice in every dtype, so
        that the fp32 tests check the tiling bf16 runs on the GPU."""
        if self.tokens_per_program is not None:
            t = self.tokens_per_program
            if not isinstance(t, int) or t < 1 or t & (t - 1):
                raise ValueError(f"tokens_per_program must be None or a power of two >= 1; got {t!r}")
            return t
        return tokens_per_program(G, N, max(self.head_dim, self.head_dim_v), tensor_cores)

    def selected_order(self, G: int, N: int, dq: bool = False) -> str:
        """The selected branch's loop order over N tokens, the forward's (dq: the backward's dQ): the
        knob loop_order for both, else loop_order()'s. Training only: decoding has few tokens and
        stays query-major."""
        if self.loop_order is not None:
            if self.loop_order not in ("query", "key"):
                raise ValueError(f"loop_order must be None, 'query' or 'key'; got {self.loop_order!r}")
            return self.loop_order
        return loop_order(G, N, max(self.head_dim, self.head_dim_v), dq)

    def selected_forward(self, q, k, v, indices, scale: float, first=None, block_table=None):
        """o, lse of the selected branch; `first` int32 [B] (decoding): q's row t is at position
        first[b] + t of its sequence, whose keys k, v hold: a contiguous cache [B, Hkv, S, *], or
        with block_table [B, pages] a paged one [pages, page_size, Hkv, *]. BLOCK_T tokens per
        program (selected_tokens()), over the union of their blocks (union_lists())."""
        B, Hq, N, _ = q.shape
        paged = block_table is not None
        Hkv, capacity = (k.shape[2], block_table.shape[1] * k.shape[1]) if paged else (k.shape[1], k.shape[2])
        G = Hq // Hkv
        o = torch.empty(B, Hq, N, self.head_dim_v, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
        if not o.numel():
            return o, lse
        if first is None and not paged and self.selected_order(G, N) == "key":
            return self._selected_forward_keys(q, k, v, indices, scale, o, lse)
        fp32_gpu = q.is_cuda and q.dtype == torch.float32
        block_t = self.selected_tokens(G, N, tensor_cores=not fp32_gpu)
        union, count = union_lists(indices, block_t, -(-capacity // self.l_sel))
        args = self._launch_args(q, Hkv)
        # the tl.dot wants 16 rows: a few tokens of a small group pad the group
        args["BLOCK_G"] = max(triton.next_power_of_2(G), -(-16 // block_t))
        rows = block_t * args["BLOCK_G"]
        # d 256 (192 padded) at 64+ rows: the accumulator and q over 8 warps, as fa2's d192 tiles
        warps = 8 if rows * max(args["HEAD_DIM_PAD"], args["HEAD_DIM_V_PAD"]) >= 64 * 256 else 4
        # fp32's buffers are twice as big: 3 stages of d192's blocks would take 217 KB of shared memory
        stages = 2 if q.dtype == torch.float32 else 3
        ks, vs = cache_strides(k, paged), cache_strides(v, paged)
        pages = block_table if paged else indices
        self.fwd_kernel[(union.shape[2], B * Hkv)](
            q, k, v, indices, union, count, o, lse, indices if first is None else first, pages, *q.stride(), *ks,
            *vs, *indices.stride(), *union.stride(), *o.stride(), *lse.stride(), pages.stride(0), N, Hkv, G,
            indices.shape[-1], scale * 1.4426950408889634, BLOCK_T=block_t,
            SELECT_PAD=max(2, triton.next_power_of_2(indices.shape[-1])), DECODE=first is not None,
            PAGE_SIZE=k.shape[1] if paged else 0, num_warps=warps, num_stages=stages, **args)
        return o, lse

    def _token_chunks(self, B: int, Hq: int, N: int, n: int, width: int, itemsize: int = 4) -> list[tuple[int, int]]:
        """Key-major's chunks of tokens, (t0, t1): partial rows (of itemsize bytes an element) of at
        most partial_bytes each (at least one selection block of tokens); a static count (shapes only:
        no host read)."""
        if not isinstance(self.partial_bytes, int) or self.partial_bytes < 1:
            raise ValueError(f"partial_bytes must be an int >= 1; got {self.partial_bytes!r}")
        per_token = B * Hq * n * width * itemsize
        size = max(self.l_sel, self.partial_bytes // max(per_token, 1) // self.l_sel * self.l_sel)
        return [(t0, min(N, t0 + size)) for t0 in range(0, N, size)]

    def _selected_forward_keys(self, q, k, v, indices, scale: float, o, lse):
        """The key-major forward: every (token, choice) attends its block alone, in programs of
        consecutive choices sorted by block (entry_lists()); the choices' partial rows are merged
        by their LSE (the split-KV merge of decoding). Tokens in chunks (_token_chunks())."""
        B, Hq, N, _ = q.shape
        Hkv, n = k.shape[1], indices.shape[-1]
        n_blocks = -(-N // self.l_sel)
        args = self._launch_args(q, Hkv)
        args["BLOCK_G"] = triton.next_power_of_2(Hq // Hkv)  # the group unpadded: the choices fill the rows
        block_e = max(1, 64 // args["BLOCK_G"])  # 64 rows: choices x the group's heads
        # d 256 (192 padded): the accumulator and q over 8 warps, as the query-major forward's
        warps = 8 if max(args["HEAD_DIM_PAD"], args["HEAD_DIM_V_PAD"]) > 128 else 4
        if not isinstance(self.partials_half, bool):
            raise ValueError(f"partials_half must be True or False; got {self.partials_half!r}")
        half = self.partials_half and q.dtype in (torch.bfloat16, torch.float16)
        part_dtype = q.dtype if half else torch.float32
        chunks = self._token_chunks(B, Hq, N, n, self.head_dim_v, 2 if half else 4)
        for t0, t1 in chunks:
            C = t1 - t0
            entries, blocks, _ = entry_lists(indices[:, :, t0:t1], n_blocks)
            o_part = torch.empty(B, Hq, C, n, self.head_dim_v, dtype=part_dtype, device=q.device)
            lse_part = torch.empty(B, Hq, C, n, dtype=torch.float32, device=q.device)
            self.fwd_keys_kernel[(-(-C * n // block_e), B * Hkv)](
                q[:, :, t0:t1], k, v, entries, blocks, o_part, lse_part, *q.stride(), *k.stride(), *v.stride(), C, t0,
                N, Hkv, Hq // Hkv, n, n_blocks, scale * 1.4426950408889634, BLOCK_E=block_e, num_warps=warps,
                num_stages=1, **args)
            # the merge writes rows in (batch, head, token) order: the chunk's own, then into o and lse
            o_c, lse_c = (o, lse) if len(chunks) == 1 else (torch.empty(B, Hq, C, self.head_dim_v, dtype=o.dtype,
                                                                       device=q.device),
                                                           torch.empty(B, Hq, C, dtype=lse.dtype, device=q.device))
            _combine_splits[(B * Hq * C,)](o_part, lse_part, o_c, lse_c, n, DV=self.head_dim_v,
                                           DV_PAD=args["HEAD_DIM_V_PAD"], SPLITS_PAD=max(2, triton.next_power_of_2(n)),
                                           PDL=False, num_warps=4)
            if len(chunks) > 1:
                o[:, :, t0:t1], lse[:, :, t0:t1] = o_c, lse_c
        return o, lse

    def selected_backward(self, q, k, v, indices, o, lse, do, scale: float):
        """dq, dk, dv: dK and dV key-major over the lists of each block's choices (entry_lists()), in
        work items of at most backward_steps steps of a block's tokens whose partial sums a second
        kernel adds in order (deterministic, no atomics); dQ query-major, or with loop_order = "key"
        (selected_order(dq=True)) from the same work items, a partial row per choice that a last kernel
        adds, the tokens in chunks (_token_chunks(); dK and dV then add up in float32 over them)."""
        steps = 64 if self.backward_steps is None else self.backward_steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"backward_steps must be None or an int >= 1; got {self.backward_steps!r}")
        B, Hq, N, _ = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        do = do.contiguous() if do.stride() != o.stride() else do  # the kernels read dO with o's strides
        lse = lse.contiguous()  # the kernels read delta (made contiguous) with lse's strides
        delta = (do.float() * o.float()).sum(-1)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if not q.numel():
            return dq, dk, dv
        args = self._launch_args(q, Hkv)
        n = indices.shape[-1]
        key_major = self.selected_order(G, N, dq=True) == "key"
        if not key_major:
            self.bwd_dq_kernel[(N, B * Hkv)](q, k, v, indices, do, lse, delta, dq, *q.stride(), *k.stride(),
                                             *v.stride(), *indices.stride(), *o.stride(), *lse.stride(), Hkv, G, n,
                                             scale * 1.4426950408889634, scale, **args)
        n_blocks = -(-N // self.l_sel)
        rows = max(64, triton.next_power_of_2(G))  # tokens x query heads per step
        args.update(BLOCK_G=triton.next_power_of_2(G), BLOCK_T=rows // triton.next_power_of_2(G))
        segment = args["BLOCK_T"] * steps
        # dK and dV's accumulators (and dQ's rows): 8 warps above head dim 128 or with dQ (4 spill, offline sm90)
        warps = 8 if key_major or max(args["HEAD_DIM_PAD"], args["HEAD_DIM_V_PAD"]) > 128 else 4
        chunks = self._token_chunks(B, Hq, N, n, self.head_dim) if key_major else [(0, N)]
        most = max(t1 - t0 for t0, t1 in chunks)
        if B * Hkv * most * n >= 2 ** 31:  # the work items' int32 offsets into a chunk's lists of choices
            raise ValueError(f"NSA's selected backward indexes fewer than 2**31 choices at a time; got batch x KV "
                             f"heads x tokens x choices = {B} x {Hkv} x {most} x {n}")
        acc = len(chunks) > 1  # dK, dV added up over the chunks in float32
        dk_to, dv_to = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (dk, dv)) if acc \
            else (dk, dv)
        for t0, t1 in chunks:
            C = t1 - t0
            idx = indices[:, :, t0:t1]
            entries, _, starts = entry_lists(idx, n_blocks)
            items, spans = work_items(starts, segment, C * n)
            n_items = items.shape[1]
            dk_part = torch.empty(B * Hkv * n_items, self.l_sel, args["HEAD_DIM_PAD"], dtype=torch.float32,
                                  device=q.device)
            dv_part = torch.empty(B * Hkv * n_items, self.l_sel, args["HEAD_DIM_V_PAD"], dtype=torch.float32,
                                  device=q.device)
            # key-major dQ: a float32 row per (token, head, choice)
            dq_part = torch.empty(B, Hq, C, n, self.head_dim, dtype=torch.float32, device=q.device) if key_major \
                else dk_part
            self.bwd_dkdv_kernel[(n_items, B * Hkv)](
                q[:, :, t0:t1], k, v, entries, items, do[:, :, t0:t1], lse[:, :, t0:t1], delta[:, :, t0:t1], dk_part,
                dv_part, dq_part, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(), N, C, t0, Hkv, G,
                n, scale * 1.4426950408889634, DQ_PARTS=key_major, CHUNKED=t0 > 0, num_warps=warps, **args)
            self.bwd_dkdv_sum_kernel[(n_blocks, B * Hkv)](
                dk_part, dv_part, spans, dk_to, dv_to, *dk_to.stride(), *dv_to.stride(), N, Hkv, n_items, scale,
                HEAD_DIM=self.head_dim, HEAD_DIM_V=self.head_dim_v, HEAD_DIM_PAD=args["HEAD_DIM_PAD"],
                HEAD_DIM_V_PAD=args["HEAD_DIM_V_PAD"], BLOCK_S=self.l_sel, ACCUMULATE=acc, num_warps=warps)
            if key_major:
                dq_c = dq[:, :, t0:t1]
                self.bwd_dq_sum_kernel[(B * Hq * C,)](dq_part, idx, dq_c, *idx.stride(), *dq_c.stride(), C, Hkv, G, n,
                                                      scale, HEAD_DIM=self.head_dim, HEAD_DIM_PAD=args["HEAD_DIM_PAD"],
                                                      SELECT_PAD=max(2, triton.next_power_of_2(n)))
        if acc:
            dk.copy_(dk_to)
            dv.copy_(dv_to)
        return dq, dk, dv



def loop_order(G: int, N: int, head_dim: int, dq: bool = False) -> str:
    """The selected branch's default loop order for groups of G query heads over N tokens
    (head_dim: the larger of q's and v's; dq: the backward's dQ, else the forward), measured
    (docs/decisions/nsa-plan.md, "Key-major for small groups" and "The dQ's loop order"):
    - the forward: key-major below G 4 from 16k tokens (timed at 4k-64k); at G 4 past 32k tokens,
      where query-major takes one token a program (its 16 rows a quarter full; timed at 32k and
      64k); and up to G 4 past head dim 128, where query-major takes one token a program too
      (timed at 16k only; shorter lengths follow from that reason, untimed); else query-major;
    - dQ: key-major up to G 4 at any length, where the query-major kernel's one token a program
      pads the group to 16 rows (timed at G 1, 2, 4 from 8k to 64k); else query-major (timed at G 8
      and 16).
    Key-major attends each chosen block once per choice where a small group's rows fill a
    query-major tile only with many tokens, whose union of blocks grows with them (FSA, arXiv
    2508.18224), at the cost of writing and reading float32 partial rows of every choice (B Hq N n
    Dv or D; made a chunk of tokens at a time, at most NSAModule.partial_bytes each)."""
    if dq:
        return "key" if G <= 4 else "query"
    if G < 4 and N >= 16384:
        return "key"
    return "key" if G <= 4 and (N > 32768 or head_dim > 128) else "query"


def _scores_out(shape, device, zeros: bool) -> torch.Tensor:
    """The selection scores' float32 buffer: zeros where the scores kernel adds to it, does not run
    or leaves a block the selection reads unset, else uninitialized (its stores by the windows'
    pieces cover every block before each row's own; no zero-fill: nsa-plan.md, "No zero-fill")."""
    return (torch.zeros if zeros else torch.empty)(shape, dtype=torch.float32, device=device)


def top_buckets(first: int, L: int, n_blocks: int, block: int, narrowest: int = 64) -> list[tuple[int, int, int]]:
    """(c0, c1, width): runs of L rows at positions first .. first + L - 1, the last first, each
    with the power of two of blocks (at most n_blocks') that holds its last row's own block (blocks
    of `block` tokens), halving from run to run down to `narrowest`: the top blocks then read and
    rank about two thirds of the scores at N = 64 * 1024 (the scores past a row's own block count
    for nothing)."""
    runs, c1 = [], L
    while c1 > 0:
        width = triton.next_power_of_2(max(1, min(n_blocks, (first + c1 - 1) // block + 1)))
        c0 = 0 if width <= narrowest else max(0, min(c1 - 1, block * (width // 2) - first))
        runs.append((c0, c1, width))
        c1 = c0
    return runs


def tokens_per_program(G: int, N: int, head_dim: int, tensor_cores: bool = True) -> int:
    """The query-major forward's tokens per program: tokens x G about 64 rows, at most N's power of
    two; one token for groups over 64, head dims (the larger of q's and v's) over 128, past 32k
    tokens (where a few tokens' union of blocks grows toward theirs summed), or without tensor
    cores. The measurements: docs/decisions/nsa-plan.md."""
    block_g = triton.next_power_of_2(G)
    if not tensor_cores or block_g > 64 or head_dim > 128 or N > 32768:
        return 1
    return min(max(1, 64 // block_g), triton.next_power_of_2(max(N, 1)))


def describe_selected(G: int, N: int, head_dim: int) -> str:
    """`attngen show --emit tiling`'s line for the selected branch at a group size and length."""
    t = tokens_per_program(G, N, head_dim)
    fwd = "forward key-major, each block once for its choices, 64 (choice, head) rows per program" \
        if loop_order(G, N, head_dim) == "key" else \
        f"forward query-major, {t} token{'s' if t > 1 else ''} x {G} heads per program over the union of their blocks"
    dq = "key-major from the work items, a partial row per choice" if loop_order(G, N, head_dim, dq=True) == "key" \
        else "query-major (one token per program)"
    return (f"{fwd}; backward dK/dV key-major in work items, dQ {dq}; "
            "loop_order='query' or 'key' sets the forward's and dQ's")


def union_lists(indices: torch.Tensor, block_t: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(union int32 [B, Hkv, tiles, U], count int32 [B, Hkv, tiles]): per tile of block_t
    consecutive tokens (tiles = ceil(N / block_t)), the blocks any of its tokens chose, ascending
    and distinct, the first count entries of union (-1 after; U = min(block_t * n, n_blocks)). On the
    device, without a host read: a sort of the tile's choices, duplicates and -1 made a sentinel
    that a second sort moves to the end. block_t 1: the indices themselves (ascending, -1 padded)."""
    B, Hkv, N, n = indices.shape
    if block_t == 1:
        return indices, (indices >= 0).sum(-1, dtype=torch.int32)
    tiles = -(-N // block_t)
    idx = indices
    if tiles * block_t != N:
        idx = torch.nn.functional.pad(idx, (0, 0, 0, tiles * block_t - N), value=-1)
    big = torch.iinfo(torch.int32).max
    u = idx.reshape(B, Hkv, tiles, block_t * n)
    u = torch.sort(torch.where(u < 0, big, u), dim=-1).values
    repeat = torch.zeros_like(u, dtype=torch.bool)
    repeat[..., 1:] = u[..., 1:] == u[..., :-1]
    u = torch.sort(torch.where(repeat, big, u), dim=-1).values[..., :max(1, min(block_t * n, n_blocks))]
    count = (u != big).sum(-1, dtype=torch.int32)
    return torch.where(u == big, -1, u), count


def work_items(starts: torch.Tensor, segment: int, entries: int):
    """(items int32 [rows, n_items, 3], spans int32 [rows, n_blocks, 2]): the lists of choices per
    key block (entry_lists' starts [rows, n_blocks + 1]) cut into segments of at most `segment`
    tokens, so that the block every token chooses (the first) is many short programs rather than
    one long one. Item p of row r: (its block, its first place in the flattened entries, its length;
    0 past the row's last item); span (r, b): block b's first item and how many, consecutive.
    n_items = n_blocks + entries // segment bounds the items of any row (entries: tokens x choices),
    so the grid needs no host read."""
    rows, n_blocks = starts.shape[0], starts.shape[1] - 1
    counts = starts[:, 1:] - starts[:, :-1]
    per = -(-counts // segment)  # a block's segments; none where no token chose it
    ends = per.cumsum(-1)
    n_items = n_blocks + entries // segment
    p = torch.arange(n_items, device=starts.device).expand(rows, n_items).contiguous()
    block = torch.searchsorted(ends, p, right=True)
    b = block.clamp(max=n_blocks - 1)
    seg = (p - (ends.gather(1, b) - per.gather(1, b))) * segment
    first = starts[:, :-1].gather(1, b) + seg
    length = torch.where(block < n_blocks, (counts.gather(1, b) - seg).clamp(0, segment), 0)
    return torch.stack([b, first, length], -1).to(torch.int32), torch.stack([ends - per, per], -1).to(torch.int32)


_INT32_KEYS = 2 ** 31 - 1  # entry_lists' keys, (block, entry) as block x entries + entry, in int32 up to this


def entry_lists(indices: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entries int32 [rows, N n], blocks int32 [rows, N n], starts int64 [rows, n_blocks + 1]),
    rows = B * Hkv: each (batch, KV head)'s choices sorted by block, then token. Entry t * n + slot
    chose block blocks[...]; the slots that chose none (-1) come last, their block n_blocks. Block
    b's choices of row r are the flattened entries[starts[r, b] : starts[r, b + 1]] (starts count
    from the first row's first entry). Both loop orders walk them: key-major's forward in programs
    of consecutive entries, the backward in work items per block (work_items()). On the device,
    without a host read: one sort of (block, entry) keys per row, int32 keys where they fit (a
    radix sort's passes: half of int64's)."""
    B, Hkv, N, n = indices.shape
    rows, E = B * Hkv, N * n
    dtype = torch.int32 if (n_blocks + 1) * E <= _INT32_KEYS else torch.int64
    idx = indices.reshape(rows, E).to(dtype)
    key = torch.where(idx >= 0, idx, n_blocks) * E + torch.arange(E, device=idx.device, dtype=dtype)
    key = torch.sort(key, dim=-1).values
    blocks = key // E
    bounds = torch.arange(n_blocks + 1, device=idx.device, dtype=dtype).expand(rows, n_blocks + 1).contiguous()
    starts = torch.searchsorted(blocks, bounds) + torch.arange(rows, device=idx.device)[:, None] * E
    return (key % E).to(torch.int32), blocks.to(torch.int32), starts


