"""Decoding of Native Sparse Attention modules (the nsa family; docs/decisions/nsa-plan.md):
attention_with_kvcache and the compressed cache it keeps, either as torch ops or as the module's
decode kernels (templates/nsa/decode.jinja; `fused_decode`). NSAModule (attngen/runtime/nsa.py)
takes these methods; they use its spec fields, kernels, selection and branches."""

from __future__ import annotations

import torch
import triton

from .decode import cache_strides, sms
from .nsa_mix import _mix


def _rows(cache, block_table, positions) -> torch.Tensor:
    """[B, H, L, E]: a cache's rows at positions [B, L]: contiguous [B, H, S, E], or paged [pages,
    page_size, H, E] through block_table [B, pages per sequence]."""
    if block_table is None:
        B, H, _, E = cache.shape
        return torch.gather(cache, 2, positions[:, None, :, None].expand(B, H, positions.shape[1], E))
    page_size = cache.shape[1]
    pages = torch.gather(block_table.long(), 1, positions // page_size)
    # contiguous: the mean and the einsum then read the rows in the contiguous cache's layout and
    # order, so a paged run gives the contiguous run's bits
    return cache[pages, positions % page_size].transpose(1, 2).contiguous()


def top_blocks_launch(nb_pad: int) -> tuple[int, int]:
    """(rows, warps) of an _nsa_top_blocks program over rows of nb_pad scores: a row to one warp up
    to 2048 blocks (below 1024 up to 16 rows a warp), a warp per 1024 blocks past that. Triton lays a
    row across every warp of a program, so more warps cost each of the count rounds a reduction
    through shared memory and barriers (offline sm90: docs/decisions/nsa-plan.md, "The top blocks a
    row to a warp")."""
    return max(1, min(16, 1024 // nb_pad)), 1 if nb_pad <= 2048 else min(16, nb_pad // 1024)


class NSADecoding:
    """NSAModule's decoding: a mixin on NSAModule, which holds the state it reads."""

    def compressed_cache(self, k_cache, v_cache, cache_seqlens, compress_weights=None, block_table=None):
        """(k_cmp [B, Hkv, S_cmp, D], v_cmp [B, Hkv, S_cmp, Dv]): the compressed tokens of contiguous
        caches [B, Hkv, S, *], or of paged ones [pages, page_size, Hkv, *] with block_table int32 [B,
        pages per sequence] (S = its pages x page_size); S_cmp = (S - l) // d + 1. For
        attention_with_kvcache to keep up to date; tokens past a sequence's length hold windows of
        whatever the cache holds there (never read)."""
        if k_cache.dim() != 4 or v_cache.dim() != 4 or k_cache.shape[:3] != v_cache.shape[:3] \
                or k_cache.device != v_cache.device:
            raise ValueError(f"compressed_cache: k_cache and v_cache must be caches [B, Hkv, S, *] (or paged [pages, "
                             f"page_size, Hkv, *] with block_table) on one device; got {list(k_cache.shape)}, "
                             f"{list(v_cache.shape)}")
        if block_table is not None:  # the sequences' rows in order: [B, Hkv, S, *]
            B, S = block_table.shape[0], block_table.shape[1] * k_cache.shape[1]
            positions = torch.arange(S, device=k_cache.device).expand(B, S)
            k_cache, v_cache = (_rows(c, block_table, positions) for c in (k_cache, v_cache))
        self._check_weights(k_cache, compress_weights)
        w_k, w_v = compress_weights if compress_weights is not None else (None, None)
        return self.compress(k_cache, w_k).contiguous(), self.compress(v_cache, w_v).contiguous()

    @torch.no_grad()
    def attention_with_kvcache(self, q, k_cache, v_cache, *, cache_seqlens, gates, cmp_cache, k=None, v=None,
                               compress_weights=None, return_indices=False, scale=None, block_table=None):
        """Decoding: q [B, Hq, Nq, D] are the queries at each sequence's last Nq positions, against
        contiguous caches k_cache [B, Hkv, S, D], v_cache [B, Hkv, S, Dv], or paged ones [pages,
        page_size, Hkv, *] with block_table int32 [B, pages per sequence] (page_size a multiple of
        16; S = pages per sequence x page_size), holding cache_seqlens (int32 [B]) tokens; k, v [B,
        Hkv, Nq, *], when given, are first written into the cache there, in place. cmp_cache =
        (k_cmp, v_cmp) from compressed_cache(): the windows that end at the Nq newest positions
        are compressed into it, in place, before attending. gates [B, Hq, Nq, 3]. Each row is the
        NSA output of its position in its sequence: o [B, Hq, Nq, Dv] (and the selected blocks [B,
        Hkv, Nq, n] with return_indices). No backward."""
        from . import decode as dec

        B, Hq, Nq, D = q.shape
        paged = block_table is not None
        if k_cache.dim() != 4 or v_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3] \
                or (not paged and k_cache.shape[0] != B) or (paged and (block_table.dim() != 2 or block_table.shape[0] != B)):
            raise ValueError(f"attention_with_kvcache: NSA decodes caches [B={B}, Hkv, S, *], or paged [pages, "
                             f"page_size, Hkv, *] with block_table [B={B}, pages per sequence]; got k_cache "
                             f"{list(k_cache.shape)}, v_cache {list(v_cache.shape)}"
                             + (f", block_table {list(block_table.shape)}" if paged else ""))
        Hkv, S = (k_cache.shape[2], block_table.shape[1] * k_cache.shape[1]) if paged else k_cache.shape[1:3]
        if paged and not k_cache.shape[0]:
            raise ValueError("attention_with_kvcache: the paged caches hold no page (k_cache.shape[0] == 0)")
        if S < Nq:
            raise ValueError(f"attention_with_kvcache: the cache holds {S} positions, fewer than the {Nq} queries")
        # (a paged cache's rows, as [B, Hkv, Nq, *] views, for the checks of dtypes, heads and dims)
        rows = (lambda c: c[0, :1].transpose(0, 1)[None].expand(B, Hkv, Nq, c.shape[3])) if paged else \
            (lambda c: c[:, :, :Nq])
        self.check(q, rows(k_cache), rows(v_cache), gates, compress_weights)
        n_cmp = 0 if S < self.l else (S - self.l) // self.d + 1
        if not isinstance(cmp_cache, (tuple, list)) or len(cmp_cache) != 2 \
                or tuple(cmp_cache[0].shape) != (B, Hkv, n_cmp, D) or tuple(cmp_cache[1].shape) != (B, Hkv, n_cmp, self.head_dim_v) \
                or cmp_cache[0].dtype != q.dtype or cmp_cache[1].dtype != q.dtype \
                or cmp_cache[0].device != q.device or cmp_cache[1].device != q.device:
            raise ValueError(f"attention_with_kvcache: cmp_cache must be (k_cmp [{B}, {Hkv}, {n_cmp}, {D}], v_cmp [{B}, "
                             f"{Hkv}, {n_cmp}, {self.head_dim_v}]) in {q.dtype} on {q.device}, as compressed_cache() "
                             f"makes them")
        dec.check(self.name, [q.dtype], (self.head_dim, self.head_dim_v), q, k_cache, v_cache, cache_seqlens,
                  block_table, k, v)
        if k is not None:
            dec.append(k_cache, v_cache, block_table, cache_seqlens, k, v)
        lengths = cache_seqlens + Nq if k is not None else cache_seqlens
        scale = self.scale if scale is None else float(scale)
        if not B:  # no sequence: nothing to update, select or attend
            o = q.new_zeros((0, Hq, Nq, self.head_dim_v))
            indices = torch.zeros(0, Hkv, Nq, min(self.count, -(-S // self.l_sel)), dtype=torch.int32, device=q.device)
            return (o, indices) if return_indices else o
        if self.fused_decode:
            o, indices = self._decode_fused(q, k_cache, v_cache, cmp_cache, lengths.to(torch.int32), scale, S, gates,
                                            compress_weights, block_table)
            return (o, indices) if return_indices else o
        lengths = lengths.long()
        pos = lengths[:, None] - Nq + torch.arange(Nq, device=q.device)  # [B, Nq] the rows' positions
        self._update_compressed(k_cache, v_cache, cmp_cache, pos, compress_weights, block_table)
        o_cmp, indices = self._decode_compressed(q, cmp_cache, pos, scale, S)
        first = (lengths - Nq).to(torch.int32)
        if torch.compiler.is_compiling():  # an op: opaque to the tracer, as in attention
            o_slc = self.ops.selected_decode(q, k_cache, v_cache, indices, first, scale, block_table)
        else:
            o_slc = self.selected_forward(q, k_cache, v_cache, indices, scale, first, block_table)[0]
        o_swa = self.branches()["swa"].attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths.int(),
                                                              block_table=block_table, scale=scale)
        o = _mix(gates, o_cmp, o_slc, o_swa, q.dtype, self)
        return (o, indices) if return_indices else o

    def _decode_fused(self, q, k_cache, v_cache, cmp_cache, lengths, scale: float, S: int, gates, compress_weights,
                      block_table):
        """(o, blocks) of a decode step in kernels (fused_decode): the compressed cache's update, the
        compressed branch with the selection, the selected and window branches with the gates' mix;
        under torch.compile each an op. The selection's torch path where no compressed token exists
        yet or a row of scores is too wide for the registers."""
        Nq = q.shape[2]
        compiling = torch.compiler.is_compiling()
        if compiling:  # an op that writes the compressed cache in place: opaque to the tracer
            self.ops.compress_update(k_cache, v_cache, *cmp_cache, lengths, Nq, block_table,
                                     *(compress_weights or (None, None)))
        else:
            self._update_compressed_kernel(k_cache, v_cache, cmp_cache, lengths, Nq, compress_weights, block_table)
        if not cmp_cache[0].shape[2] or triton.next_power_of_2(-(-S // self.l_sel)) > self.top_blocks_max:  # (torch)
            pos = lengths.long()[:, None] - Nq + torch.arange(Nq, device=q.device)
            o_cmp, indices = self._decode_compressed(q, cmp_cache, pos, scale, S)
        elif compiling:
            o_cmp, indices = self.ops.compressed_decode(q, *cmp_cache, lengths, scale, S)
        else:
            o_cmp, indices, _ = self._decode_compressed_fused(q, cmp_cache, lengths, scale, S)
        if compiling:
            return self.ops.attend_decode(q, k_cache, v_cache, indices, lengths, scale, block_table, o_cmp, gates), \
                indices
        return self._decode_attend_fused(q, k_cache, v_cache, indices, lengths, scale, block_table, o_cmp, gates), \
            indices

    def _update_compressed_kernel(self, k_cache, v_cache, cmp_cache, lengths, Nq: int, compress_weights,
                                  block_table=None, splits: int | None = None) -> None:
        """_update_compressed by the _nsa_compress_update kernel, the keys and the values in one launch
        (fused_decode): each program a (sequence, KV head)'s windows that end at its last Nq positions
        (lengths: the sequences' lengths, the appended rows included), for a block of the output's
        columns. Linear: two launches, the flattened window's rows split over programs (a static
        count from the shapes, or `splits` at most) into float32 partial sums, then their sum in a
        fixed order."""
        paged = block_table is not None
        seqlens = lengths.to(torch.int32).contiguous()
        w_k, w_v = compress_weights if compress_weights is not None else (None, None)
        linear = w_k is not None
        B, Hkv, n_cmp = cmp_cache[0].shape[:3]
        caches = ((k_cache, cmp_cache[0], w_k), (v_cache, cmp_cache[1], w_v))
        meta = dict(CMP_BLOCK=self.l, CMP_STRIDE=self.d, BLOCK_L=triton.next_power_of_2(self.l),
                    PAGE_SIZE=k_cache.shape[1] if paged else 0, LINEAR=linear)
        plans = []  # per cache: (BLOCK_EO, column blocks, splits, flattened rows a split, partial sums)
        eo_blocks = sum(-(-c.shape[3] // min(64, max(16, triton.next_power_of_2(c.shape[3])))) for c in cmp_cache)
        for name, (cache, cmp, weight) in zip("KV", caches):
            E, EO = cache.shape[3], cmp.shape[3]
            meta[f"E_{name}"], meta[f"EO_{name}"] = E, EO
            if not linear:
                block_eo = max(16, triton.next_power_of_2(EO))
                plans.append((block_eo, 1, 1, 0, cmp))
                continue
            # W's rows over programs too, about four an SM (K's and V's together), so that reading W
            # is not a few programs' serial walk
            block_eo, block_f = min(64, max(16, triton.next_power_of_2(EO))), 128
            n_eo, tiles = -(-EO // block_eo), -(-(self.l * E) // block_f)
            fill = -(-4 * sms(cache.device) // max(1, B * Hkv * eo_blocks))
            n_splits = max(1, min(tiles, splits or fill))
            per = -(-tiles // n_splits)  # BLOCK_F tiles a split
            n_splits = -(-tiles // per)
            part = torch.empty(B, Hkv, Nq // self.d + 1, n_splits, EO, dtype=torch.float32, device=cache.device)
            plans.append((block_eo, n_eo, n_splits, per * block_f, part))
        (eo_k, n_eo_k, s_k, rows_k, part_k), (eo_v, n_eo_v, s_v, rows_v, part_v) = plans
        args = (k_cache, v_cache, block_table if paged else seqlens, *cmp_cache,
                w_k if linear else cmp_cache[0], w_v if linear else cmp_cache[1], part_k, part_v, seqlens,
                *cache_strides(k_cache, paged), *cache_strides(v_cache, paged), block_table.stride(0) if paged else 0,
                *cmp_cache[0].stride(), *cmp_cache[1].stride(), *(w_k.stride() if linear else (0, 0, 0)),
                *(w_v.stride() if linear else (0, 0, 0)), Nq, n_cmp, Hkv, s_k, rows_k, s_v, rows_v)
        meta.update(BLOCK_EO_K=eo_k, BLOCK_EO_V=eo_v)
        if linear:  # the partial sums over splits of W's rows, then their sum
            self.compress_update_kernel[(B * Hkv, n_eo_k + n_eo_v, max(s_k, s_v))](*args, BLOCK_F=128, PARTIAL=True,
                                                                                 **meta)
        self.compress_update_kernel[(B * Hkv, n_eo_k + n_eo_v, 1)](*args, BLOCK_F=32 if linear else 16, PARTIAL=False,
                                                                   **meta)

    def _update_compressed(self, k_cache, v_cache, cmp_cache, pos, compress_weights, block_table=None) -> None:
        """Writes the compressed tokens whose windows end at these positions (j d + l - 1 = p), one
        window end per sequence at a time (ends are d apart), so that no two rows of one sequence
        write in the same scatter."""
        B, Nq = pos.shape
        n_cmp = cmp_cache[0].shape[2]
        if not n_cmp:  # a cache shorter than one window: no window ends in it
            return
        lo = torch.clamp(pos[:, 0], min=self.l - 1)  # the first position that may end a window
        first_end = lo + (-(lo - (self.l - 1))) % self.d  # [B]
        w = compress_weights if compress_weights is not None else (None, None)
        for step in range(Nq // self.d + 1):
            end = first_end + step * self.d  # [B] a window's last position
            j = (end - (self.l - 1)) // self.d
            ok = (end <= pos[:, -1]) & (j < n_cmp)
            j = torch.where(ok, j, 0)
            window = (j * self.d)[:, None] + torch.arange(self.l, device=pos.device)  # [B, l]
            for cache, cmp, weight in ((k_cache, cmp_cache[0], w[0]), (v_cache, cmp_cache[1], w[1])):
                rows = _rows(cache, block_table, window)  # [B, H, l, E]
                H, E = rows.shape[1], rows.shape[3]
                if weight is None:
                    new = rows.mean(2)
                else:
                    new = torch.einsum("bhf,hfe->bhe", rows.reshape(B, H, self.l * E), weight)
                at = j[:, None, None, None].expand(B, H, 1, cmp.shape[-1])
                old = torch.gather(cmp, 2, at)
                cmp.scatter_(2, at, torch.where(ok[:, None, None, None], new[:, :, None].to(cmp.dtype), old))

    def _decode_compressed(self, q, cmp_cache, pos, scale: float, S: int):
        """o_cmp (float32 [B, Hq, Nq, Dv]) and the selected blocks [B, Hkv, Nq, n] of the rows at
        positions pos [B, Nq], from the compressed cache (torch: it is 1/d of the raw cache). A
        cache shorter than one window has no compressed token: o_cmp 0, the forced blocks alone."""
        B, Hq, Nq, D = q.shape
        k_cmp, v_cmp = cmp_cache
        Hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
        G = Hq // Hkv
        if not n_cmp:
            scores = torch.zeros(B, Hkv, Nq, -(-S // self.l_sel), device=q.device)
            return q.new_zeros((B, Hq, Nq, v_cmp.shape[3]), dtype=torch.float32), self._top_blocks(scores, pos[:, None, :])
        s = (q.float().view(B, Hkv, G, Nq, D) @ k_cmp.float()[:, :, None].transpose(-1, -2)) * scale
        visible = (torch.arange(n_cmp, device=q.device) * self.d + self.l - 1) <= pos[:, None, None, :, None]
        s = s.masked_fill(~visible, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        z = e.sum(-1, keepdim=True)
        p = e / torch.where(z > 0, z, torch.ones_like(z))  # [B, Hkv, G, Nq, n_cmp]; 0 where nothing is visible
        o_cmp = (p @ v_cmp.float()[:, :, None]).reshape(B, Hq, Nq, -1)
        n_blocks = -(-S // self.l_sel)
        scores = p.sum(2) @ self._overlap(n_cmp, n_blocks, q.device)  # [B, Hkv, Nq, n_blocks]
        return o_cmp, self._top_blocks(scores, pos[:, None, :])

    def _decode_compressed_fused(self, q, cmp_cache, lengths, scale: float, S: int, block_c: int | None = None,
                                 splits: int | None = None):
        """_decode_compressed's o_cmp and blocks, and the block scores (float32 [B, Hkv, Nq,
        n_blocks]), from two kernels (templates/nsa/decode.jinja): the compressed cache in splits
        for the packed rows of each KV head (the online softmax and the split's unnormalized block
        sums), then per query the splits merged (o_cmp over programs of the group's heads; each block's
        score gathered from the splits that touch it) and the top blocks taken in registers. The splits
        are a static count (shapes only: no host read) unless given; block_c compressed tokens a
        step (64; 32 above head dim 128 or from 32 packed rows). With the top blocks apart
        (top_apart()) the second kernel's row is gathered by several programs and the top blocks
        taken by a third, _nsa_top_blocks, a row to a warp."""
        B, Hq, Nq, D = q.shape
        k_cmp, v_cmp = cmp_cache
        Hkv, n_cmp, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
        G = Hq // Hkv
        n_blocks = -(-S // self.l_sel)
        n = min(self.count, n_blocks)
        rows = G * Nq
        block_m = max(16, min(64, triton.next_power_of_2(rows)))
        row_tiles = -(-rows // block_m)
        wide = max(D, Dv) > 128  # d192 (padded to 256): a smaller step over 8 warps (offline sm90: spills else)
        # a smaller step from 32 packed rows too (offline sm90: spills else, and one program an SM at 64
        # rows for its shared memory; docs/decisions/nsa-plan.md, "The compressed branch's step")
        narrow = wide or block_m >= 32
        # about two programs an SM, each at least a step of compressed tokens, and at most 64 blocks'
        # sums a row (the blocks a split's windows touch, from its first token's block to its last's
        # end: ((length - 1) d + l + l' - 2) // l' + 1; 192 tokens at d 16, l' 64): they stay in
        # registers; a smaller step where a step's tokens would touch more (l' at most d or so)
        bound = (62 * self.l_sel - self.l + 2) // self.d + 1
        block_c = block_c or max(16, min(32 if narrow else 64, 1 << max(0, bound.bit_length() - 1)))
        most = max(block_c, bound // block_c * block_c)
        n_sms = sms(q.device)
        fill = -(-2 * n_sms // (B * Hkv * row_tiles))
        splits = splits or max(-(-n_cmp // most), min(-(-n_cmp // block_c), fill))
        split_len = -(-(-(-n_cmp // splits)) // block_c) * block_c
        splits = -(-n_cmp // split_len)
        nb_split = ((split_len - 1) * self.d + self.l + self.l_sel - 2) // self.l_sel + 1
        nb_split = max(16, triton.next_power_of_2(nb_split))
        f32 = dict(dtype=torch.float32, device=q.device)
        o_part = torch.empty(B, Hq, Nq, splits, Dv, **f32)
        m_part, l_part = torch.empty(B, Hq, Nq, splits, **f32), torch.empty(B, Hq, Nq, splits, **f32)
        sb_part = torch.empty(B, Hq, Nq, splits, nb_split, **f32)
        seqlens = lengths.to(torch.int32).contiguous()
        pads = dict(HEAD_DIM_PAD=max(16, triton.next_power_of_2(D)), HEAD_DIM_V_PAD=max(16, triton.next_power_of_2(Dv)))
        self.decode_cmp_kernel[(splits, B * Hkv, row_tiles)](
            q, k_cmp, v_cmp, seqlens, o_part, m_part, l_part, sb_part, *q.stride(), *k_cmp.stride(), *v_cmp.stride(),
            n_cmp, Nq, split_len, Hkv, G, scale * 1.4426950408889634, CMP_BLOCK=self.l, CMP_STRIDE=self.d,
            SEL_BLOCK=self.l_sel, HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_M=block_m, BLOCK_C=block_c, NB_SPLIT=nb_split,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=8 if wide else 4, **pads)
        scores = torch.empty(B, Hkv, Nq, n_blocks, **f32)
        o_cmp = torch.empty(B, Hq, Nq, Dv, **f32)
        indices = torch.empty(B, Hkv, Nq, n, dtype=torch.int32, device=q.device)
        nb_pad = triton.next_power_of_2(n_blocks)
        block_g, dv_pad = max(2, triton.next_power_of_2(G)), pads["HEAD_DIM_V_PAD"]
        apart = self.top_apart(B * Hkv * Nq, n_sms)  # the top blocks by _nsa_top_blocks after
        warps = max(8, min(16, nb_pad // 1024))  # 16 for the widest rows' top blocks (either way: the same sums)
        nb_chunk = min(nb_pad, max(16, 256 * warps // block_g))  # the scores' gathered tiles: a few values a thread
        score_parts = -(-n_blocks // nb_chunk) if apart else 0  # programs gathering the row, a chunk each
        # the splits whose windows can touch one block: split s's cover tokens [s P, (s + 1) P - d + l)
        # (P = split_len d), so a block of l' meets at most ceil((l' + l - d - 1) / P) + 1 of them
        meet = min(splits, -(-(self.l_sel + self.l - self.d - 1) // (split_len * self.d)) + 1)
        o_splits = max(2, min(triton.next_power_of_2(splits), 32, 4096 // dv_pad))
        o_heads = max(2, min(block_g, 8192 // (o_splits * dv_pad)))  # o_cmp's [heads, splits, Dv] tiles
        self.decode_select_kernel[(B * Hkv, Nq, max(score_parts, 1) + -(-G // o_heads))](
            o_part, m_part, l_part, sb_part, seqlens, scores, o_cmp, indices, splits, Nq, split_len, n_blocks, Hkv, G,
            CMP_BLOCK=self.l, CMP_STRIDE=self.d, SEL_BLOCK=self.l_sel, INIT=self.init, LOCAL=self.local, COUNT=n,
            COUNT_PAD=max(2, triton.next_power_of_2(n)), HEAD_DIM_V=Dv, HEAD_DIM_V_PAD=dv_pad, BLOCK_G=block_g,
            SPLIT_CHUNK=max(2, min(32, triton.next_power_of_2(splits))), NB_SPLIT=nb_split, NB_PAD=nb_pad,
            NB_CHUNK=nb_chunk, MEET=meet, O_HEADS=o_heads, O_SPLITS=o_splits, SCORE_PARTS=score_parts,
            num_warps=warps)
        if apart:  # a warp a row up to 2048 blocks (nsa-plan.md: "top blocks apart")
            rows = B * Hkv * Nq
            block_r, warps = top_blocks_launch(nb_pad)
            self.top_kernel[(-(-rows // block_r),)](
                scores, seqlens, indices, rows, n_blocks, Nq, Hkv * Nq, rows, rows, SEL_BLOCK=self.l_sel, INIT=self.init,
                LOCAL=self.local, COUNT=n, COUNT_PAD=max(2, triton.next_power_of_2(n)), BLOCK_R=block_r,
                NB_PAD=nb_pad, DECODE=True, ONE_WARP=warps == 1, num_warps=warps)
        return o_cmp, indices, scores

    def _decode_attend_fused(self, q, k_cache, v_cache, indices, lengths, scale: float, block_table, o_cmp, gates,
                             splits: int | None = None, merge_chunk: int | None = None):
        """o [B, Hq, Nq, Dv] of decoding from o_cmp and the blocks (indices [B, Hkv, Nq, n], each
        query's ascending, -1 after, as the selection makes them): the selected and window branches
        as one list of work items per (sequence, KV head) shared among splits (_nsa_decode_attend:
        the union of its queries' blocks, _nsa_decode_union's, each read once, then its window's
        tiles), then the splits merged per branch and mixed by the gates (_nsa_decode_merge: both
        branches in one online pass, merge_chunk splits a round of loads, by default all of them up
        to 32). The splits are a static count (shapes only) unless given."""
        B, Hq, Nq, D = q.shape
        paged = block_table is not None
        Hkv = k_cache.shape[2] if paged else k_cache.shape[1]
        Dv, G, n = self.head_dim_v, Hq // Hkv, indices.shape[-1]
        o = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
        if not o.numel():
            return o
        rows = G * Nq
        block_m = max(16, min(64, triton.next_power_of_2(rows)))
        row_tiles = -(-rows // block_m)
        # the union of the queries' blocks (Nq = 1: its own list), ascending, -1 after
        if Nq == 1:
            union = indices[:, :, 0]
        else:
            union = torch.empty(B, Hkv, triton.next_power_of_2(Nq * n), dtype=torch.int32, device=q.device)
            self.decode_union_kernel[(B * Hkv,)](indices, union, *indices.stride(), Nq, n, Hkv,
                                                 CHOICES_PAD=union.shape[-1])
        # the most items of a sequence: the distinct blocks, then its window's tiles
        S = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[2]
        items = min(Nq * n, -(-S // self.l_sel)) + (self.window + Nq - 1) // self.l_sel + 2
        splits = max(1, min(items, splits or -(-2 * sms(q.device) // (B * Hkv * row_tiles))))
        f32 = dict(dtype=torch.float32, device=q.device)
        o_part = torch.empty(B, Hq, Nq, splits, 2, Dv, **f32)
        m_part, l_part = torch.empty(B, Hq, Nq, splits, 2, **f32), torch.empty(B, Hq, Nq, splits, 2, **f32)
        seqlens = lengths.to(torch.int32).contiguous()
        ks, vs = cache_strides(k_cache, paged), cache_strides(v_cache, paged)
        pads = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
        self.decode_attend_kernel[(splits, B * Hkv, row_tiles)](
            q, k_cache, v_cache, indices, union, block_table if paged else seqlens, seqlens, o_part, m_part, l_part,
            *q.stride(), *ks, *vs, *indices.stride(), *union.stride(), block_table.stride(0) if paged else 0, Nq, n,
            union.shape[-1], Hkv, G, scale * 1.4426950408889634, WINDOW=self.window, HEAD_DIM=D, HEAD_DIM_V=Dv,
            HEAD_DIM_PAD=pads[0], HEAD_DIM_V_PAD=pads[1], BLOCK_M=block_m, BLOCK_S=self.l_sel,
            SELECT_PAD=max(2, triton.next_power_of_2(n)), UNION_PAD=max(2, triton.next_power_of_2(union.shape[-1])),
            PAGE_SIZE=k_cache.shape[1] if paged else 0,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=8 if max(pads) > 128 else 4)
        self.decode_merge_kernel[(B * Hq * Nq,)](
            o_part, m_part, l_part, o_cmp.contiguous(), gates, o, splits, *gates.stride(), Hq, Nq, HEAD_DIM_V=Dv,
            HEAD_DIM_V_PAD=pads[1],
            SPLIT_CHUNK=merge_chunk or max(2, min(triton.next_power_of_2(splits), 32, 8192 // (2 * pads[1]))))
        return o
