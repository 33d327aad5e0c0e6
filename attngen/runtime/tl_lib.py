"""Triton helpers that every family's kernels call; the generated modules import them.

They hold no spec-dependent code (that is rendered into each module: the score modifiers, the
mask, the loop bounds), so one copy serves every module.
"""

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without the NVIDIA backend: programmatic dependent launch is never on
    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass


@triton.jit
def _packed_rows(HKV, GROUP, n_q, BLOCK_M: tl.constexpr):
    # A decode program's rows (grid axis 1: batch x KV head; axis 2: tiles of BLOCK_M packed rows,
    # each a (query head in the group, query) pair): (off_b, off_hk, row_ok, t the query, off_h).
    off_b = tl.program_id(1) // HKV
    off_hk = tl.program_id(1) % HKV
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * n_q
    return off_b, off_hk, row_ok, rows % n_q, tl.where(row_ok, off_hk * GROUP + rows // n_q, 0)


@triton.jit
def _listed_tile(row_blocks, j, LAYOUT_BK: tl.constexpr, BLOCK_N: tl.constexpr):
    # The first key of the j-th tile of a row of decode_gate.visible_blocks' (after its count; a
    # block holds LAYOUT_BK // BLOCK_N tiles). j may be one past the last tile: the padding, past
    # every key.
    return tl.load(row_blocks + 1 + j // (LAYOUT_BK // BLOCK_N)) * LAYOUT_BK + j % (LAYOUT_BK // BLOCK_N) * BLOCK_N


@triton.jit
def _listed_at(row_blocks, n, block):
    # The index of the first of a decode_gate.visible_blocks row's n blocks (ascending) that is at
    # least `block` (n where none is), by binary search.
    lo = n * 0
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(row_blocks + 1 + mid) < block
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _mod(a, c):
    # Python modulo for a positive constant c, whatever the sign of a (Triton's % is C's).
    return ((a % c) + c) % c


@triton.jit
def _floordiv(a, c):
    # Python floor division for a positive constant c (Triton's // truncates toward zero).
    return (a - _mod(a, c)) // c


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:  # the GPU's tanh instruction (max. relative error 2^-10.7), for 16-bit inputs
        y = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        # tanh from exp alone (the interpreter has no libdevice), accurate to fp32 rounding:
        # (1 - e) / (1 + e) with e = exp(-2|x|) cancels for small |x|, where the odd series is used.
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        big = (1.0 - e) / (1.0 + e)
        x2 = a * a
        small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
        t = tl.where(a < 0.15, small, big)
        y = tl.where(x < 0, -t, t)
    return y


@triton.jit
def _keep(seed, bh, q_idx, kv_idx, p_drop):
    # Dropout's keep-mask: Philox keyed by the seed and each element's (kv, q, batch*head), so the
    # backward regenerates exactly the forward's mask.
    kk = kv_idx + q_idx * 0
    r, _, _, _ = tl.philox(seed, kk.to(tl.int32), (q_idx + kv_idx * 0).to(tl.int32), (kk * 0 + bh).to(tl.int32),
                           (kk * 0).to(tl.int32))
    return tl.uint_to_uniform_float(r) >= p_drop


@triton.jit
def _wide(idx, WIDE: tl.constexpr):
    # Indices for address arithmetic: int64 where row x stride can reach 2^31 elements (WIDE: the
    # host saw such a tensor), else int32 as they are.
    if WIDE:
        idx = idx.to(tl.int64)
    return idx


@triton.jit
def _tile(X, b, h, first, n_rows, stride_r, stride_c, ROWS: tl.constexpr, COLS: tl.constexpr,
          COLS_PAD: tl.constexpr, MASK_ROWS: tl.constexpr, TMA: tl.constexpr, WIDE: tl.constexpr):
    # Rows [first, first + ROWS) x COLS_PAD columns of one (batch b, head h): from a TMA descriptor
    # (out-of-bounds rows and padded columns arrive as zeros), or from a pointer already offset to
    # (b, h), where padded columns always load as zero and rows are bounds-checked where MASK_ROWS.
    return _tile_at(X, b, h, first, 0, n_rows, stride_r, stride_c, ROWS, COLS, COLS_PAD, MASK_ROWS, TMA, WIDE)


@triton.jit
def _tile_at(X, b, h, first, col, n_rows, stride_r, stride_c, ROWS: tl.constexpr, COLS: tl.constexpr,
             COLS_PAD: tl.constexpr, MASK_ROWS: tl.constexpr, TMA: tl.constexpr, WIDE: tl.constexpr):
    # _tile's columns [col, col + COLS_PAD), of which the first COLS (or all, when COLS >= COLS_PAD)
    # hold data: one chunk of a head dim loaded in chunks (a TMA descriptor's box is COLS_PAD wide).
    # (One return at the end: Triton compiles the statements after a return in a constexpr branch.)
    if TMA:
        x = X.load([b, h, first, col]).reshape(ROWS, COLS_PAD)
    else:
        offs_r = first + tl.arange(0, ROWS)
        offs_c = tl.arange(0, COLS_PAD)
        ptrs = X + _wide(offs_r, WIDE)[:, None] * stride_r + _wide(col + offs_c, WIDE)[None, :] * stride_c
        if COLS < COLS_PAD:
            if MASK_ROWS:
                x = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < COLS), other=0.0)
            else:
                x = tl.load(ptrs, mask=offs_c[None, :] < COLS, other=0.0)
        else:
            if MASK_ROWS:
                x = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
            else:
                x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(X, offs_r, n_rows, stride_r, stride_c, x, COLS: tl.constexpr, COLS_PAD: tl.constexpr,
                WIDE: tl.constexpr):
    # Stores rows offs_r x COLS of x (COLS_PAD wide) through a pointer already offset to its (b, h).
    offs_c = tl.arange(0, COLS_PAD)
    tl.store(X + _wide(offs_r, WIDE)[:, None] * stride_r + _wide(offs_c, WIDE)[None, :] * stride_c,
             x.to(X.dtype.element_ty), mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < COLS))


@triton.jit
def _sequence(CU_Q, CU_K, off_b, Nq, Nk, VARLEN: tl.constexpr):
    """(first query row, first key row, Nq, Nk) of batch entry off_b: with VARLEN, of packed sequence
    off_b (cumulative lengths CU_Q, CU_K); else a whole batch entry, from row 0."""
    q_start = off_b * 0
    k_start = off_b * 0
    if VARLEN:
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        Nq = tl.load(CU_Q + off_b + 1) - q_start
        Nk = tl.load(CU_K + off_b + 1) - k_start
    return q_start, k_start, Nq, Nk


@triton.jit
def _lse2(LSE, offs_m, Nq):
    # The saved LSE in log2 units; +inf for rows with nothing visible, so their P is exactly 0.
    lse = tl.load(LSE + offs_m, mask=offs_m < Nq, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _same_document(doc_res, DOC_WALK, offs_walk, n_walk):
    # The document mask of a tile: do the resident rows' documents (ids doc_res) match those of
    # the walked indices (read from DOC_WALK, this batch's ids)?
    doc_walk = tl.load(DOC_WALK + offs_walk, mask=offs_walk < n_walk, other=-1)
    return doc_res[:, None] == doc_walk[None, :]


@triton.jit
def _launch_dependents(PDL: tl.constexpr):
    # Programmatic dependent launch (sm90+): lets the next kernel in the stream start its programs,
    # which wait (_wait_prior) for this kernel's end and its writes.
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _wait_prior(PDL: tl.constexpr):
    # A kernel launched with launch_pdl: wait for the previous kernel in the stream and its writes.
    if PDL:
        gdc_wait()


@triton.jit
def _page_numbers(PAGES, off_b, start_n, lo, end, stride_pb, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    # The page numbers of the key tile at start_n: one when the tile lies in one page, else one per
    # key (keys outside [lo, end) read none).
    if PAGE_SIZE % BLOCK_N == 0:
        return tl.load(PAGES + off_b.to(tl.int64) * stride_pb + start_n // PAGE_SIZE, mask=start_n < end, other=0)
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        return tl.load(PAGES + off_b.to(tl.int64) * stride_pb + offs_n // PAGE_SIZE,
                       mask=(offs_n >= lo) & (offs_n < end), other=0)


@triton.jit
def _tile_pages(PAGES, off_b, start_n, lo, end, stride_pb, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                PAGES_AHEAD: tl.constexpr):
    # PAGES_AHEAD: the tile's page numbers, loaded a step ahead of the K/V loads whose addresses they
    # feed (loaded in the same step, they cost the loop a pipeline stage: docs/decisions/decode-plan.md).
    # Otherwise nothing (the decode tile loads them in its step).
    if PAGE_SIZE == 0 or not PAGES_AHEAD:
        return 0
    else:
        return _page_numbers(PAGES, off_b, start_n, lo, end, stride_pb, BLOCK_N, PAGE_SIZE)


@triton.jit
def _merge_splits(O_PART, LSE_PART, O, LSE, LOCK, n_splits, rows_o, rows_lse, out_o, out_lse, row_ok,
                  stride_os, stride_ls, stride_od, stride_fd, HEAD_DIM_V: tl.constexpr,
                  HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    # Decoding's split merge, fused into the splits (docs/decisions/decode-plan.md): each split of
    # these rows has stored its normalized rows and LSE; the last to count itself in at LOCK merges
    # them by LSE into O, LSE and resets LOCK for the next call. The barrier orders every thread's
    # stores before the count (a release); the partials are read past L1 (.cg).
    tl.debug_barrier()
    if tl.atomic_add(LOCK, 1) == n_splits - 1:
        tl.store(LOCK, 0)
        offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
        dv_ok = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PAD], dtype=tl.float32)
        for s in range(0, n_splits):
            lse = tl.load(LSE_PART + rows_lse + s * stride_ls, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(O_PART + rows_o[:, None] + s * stride_os + offs_dv[None, :] * stride_od, mask=dv_ok, other=0.0,
                        cache_modifier=".cg")
            m_new = tl.maximum(m, lse)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_use)
            w = tl.exp(lse - m_use)
            total = total * alpha + w
            acc = acc * alpha[:, None] + o * w[:, None]
            m = m_new
        m_use = tl.where(m == float("-inf"), 0.0, m)
        total_use = tl.where(total == 0.0, 1.0, total)  # a row no split saw: zeros, LSE -inf
        tl.store(O + out_o[:, None] + offs_dv[None, :] * stride_fd, acc / total_use[:, None], mask=dv_ok)
        tl.store(LSE + out_lse, tl.where(total == 0.0, float("-inf"), m_use + tl.log(total_use)), mask=row_ok)


@triton.jit
def _keep_mask_kernel(KEEP, H, Nq, Nk, seed, p_drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Writes the keep-mask the kernels use (for tests: see dropout_keep_mask).
    off_hz = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, off_hz, offs_m[:, None], offs_n[None, :], p_drop)
    tl.store(KEEP + off_hz.to(tl.int64) * Nq * Nk + offs_m[:, None] * Nk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk))


@triton.jit
def _bwd_delta(O, DO, DELTA, H, N, stride_ob, stride_oh, stride_on, stride_od, stride_db, stride_dh, stride_dn,
               stride_dd, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, BLOCK: tl.constexpr):
    # The softmax backward's row term D = rowsum(dO * O) in fp32, into DELTA [B, H, N] (contiguous),
    # before the single-pass backward's one kernel (the two-kernel backward's dQ kernel writes it).
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM_V_PAD)
    ok = (rows[:, None] < N) & (d[None, :] < HEAD_DIM_V)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_on + d[None, :] * stride_od,
                mask=ok, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows.to(tl.int64)[:, None] * stride_dn + d[None, :] * stride_dd,
                 mask=ok, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < N)
