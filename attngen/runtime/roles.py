"""Kernel roles: one descriptor per kind of kernel a family launches, the single source of the
facts that the compiler (tiling legality, cost model, lowering) and the runtime (grids, operands)
both need. A role says what one program owns, what its loop streams, and its matrix products."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelRole:
    name: str
    kernel: str  # the generated module's @triton.jit entry point
    owns: str  # what one program's block holds: "queries" (BLOCK_M rows) or "keys" (BLOCK_N rows)
    resident: tuple[str, ...]  # operands loaded once per program
    streamed: tuple[str, ...]  # operands loaded once per loop step
    products: tuple[int, int]  # matrix products per tile, as multiples of BM*BN*(D, Dv)
    loop: str  # the IR's name of the loop region
    accumulators: tuple[str, ...]  # fp32 tiles carried across the loop, one row per resident row
    fragments: tuple[str, ...]  # resident operands the MMAs read from registers
    score_tiles: int  # BM x BN fp32 temporaries live at once (s/p; and dp/ds in the backward)
    backward: bool
    reduced: tuple[str, ...] = ()  # fp32 tiles added into a global buffer each loop step (atomics)
    # q and k (and dQ, dK) load, accumulate and store in power-of-two column chunks, so D may pad to a
    # multiple of a chunk (192 = 3 x 64) instead of the next power of two (tiling.pad_chunked)
    chunked_d: bool = False

    @property
    def transposed(self) -> bool:
        """The loop walks queries for a block of keys: the mask plan is transposed."""
        return self.owns == "keys"

    def outer(self, block_m: int, block_n: int) -> int:
        """Rows of the resident block (the MMAs' M dimension)."""
        return block_n if self.transposed else block_m

    def inner(self, block_m: int, block_n: int) -> int:
        """Rows of each streamed tile."""
        return block_m if self.transposed else block_n

    @property
    def outer_block(self) -> str:
        return "BLOCK_N" if self.transposed else "BLOCK_M"


WIDTH = {"q": "d", "k": "d", "dq": "d", "dk": "d", "v": "dv", "do": "dv", "o": "dv", "dv": "dv"}  # head dim of each


def chunk_width(pad: int) -> int:
    """The column chunk a padded head dim is loaded in: its lowest set bit (the whole dim when a
    power of two; 64 for 192 = 3 x 64)."""
    return pad & -pad


def width(names: tuple[str, ...], d: int, dv: int) -> int:
    """The summed head dims (padded or not, as given) of these operands."""
    return sum(d if WIDTH[n] == "d" else dv for n in names)


# Products: fwd QK^T and PV; bwd_dq QK^T, dO V^T and dS K; bwd_dkdv QK^T, P^T dO, dO V^T and dS^T Q.
FWD = KernelRole("fwd", "_attn_fwd", "queries", ("q",), ("k", "v"), (1, 1), "kv_loop",
                 accumulators=("o",), fragments=("q",), score_tiles=1, backward=False, chunked_d=True)
BWD_DQ = KernelRole("bwd_dq", "_attn_bwd_dq", "queries", ("q", "do"), ("k", "v"), (2, 1), "kv_loop",
                    accumulators=("dq",), fragments=("q", "do"), score_tiles=2, backward=True, chunked_d=True)
BWD_DKDV = KernelRole("bwd_dkdv", "_attn_bwd_dkdv", "keys", ("k", "v"), ("q", "do"), (2, 2), "q_loop",
                      accumulators=("dk", "dv"), fragments=(), score_tiles=2, backward=True, chunked_d=True)
ROLES = {r.name: r for r in (FWD, BWD_DKDV, BWD_DQ)}  # the FlashAttention-2 family, in lowering order
# The single-pass backward: bwd_dkdv's kernel compiled with ATOMIC_DQ, which also computes dS K per
# query tile (a fifth product) and adds it into an fp32 dQ buffer. Launched through bwd_dkdv's
# kernel, but tiled and costed as a role of its own (docs/decisions/single-pass-backward.md).
BWD_SINGLE = KernelRole("bwd_single", "_attn_bwd_dkdv", "keys", ("k", "v"), ("q", "do"), (3, 2), "q_loop",
                        accumulators=("dk", "dv"), fragments=(), score_tiles=2, backward=True, reduced=("dq",),
                        chunked_d=True)
VARIANTS = {"bwd_single": (BWD_SINGLE, "bwd_dkdv")}  # variant -> (its role, the role whose kernel it runs)
COSTED = {**ROLES, **{name: role for name, (role, _) in VARIANTS.items()}}  # every role the tiling pass ranks
