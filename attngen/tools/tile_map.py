"""Pictures of the mask analysis: which tiles a kernel skips (EMPTY), walks without mask code
(FULL) and masks (PARTIAL), at one shape and tiling, as the generated kernel's loops decide them
(mask_analysis.forward_tiles: closed-form bounds or the static tile table). `attngen show SPEC --emit tiles --shape Nq,Nk`
prints it as text; `--plot F.png` draws it (matplotlib, the `plot` extra). The same picture as
attention-gym's block-mask visualizer, from the symbolic analysis rather than a mask function."""

from __future__ import annotations

import torch

SKIPPED, MASKED, UNMASKED = 0, 1, 2  # mask_analysis.forward_tiles' codes
CHARS = {SKIPPED: ".", MASKED: "+", UNMASKED: "#"}


def as_text(tiles: torch.Tensor, width: int = 128) -> str:
    """One character per tile ('#' unmasked, '+' masked, '.' skipped); past `width` columns, tiles
    merge into cells of f x f ('+' where they differ)."""
    n_m, n_n = tiles.shape
    f = -(-n_n // width)
    if f > 1:
        pad, shape = (0, -n_n % f, 0, -n_m % f), (-(-n_m // f), f, -(-n_n // f), f)
        lo = torch.nn.functional.pad(tiles, pad, value=UNMASKED).reshape(shape).amin(dim=(1, 3))  # padding counts
        hi = torch.nn.functional.pad(tiles, pad, value=SKIPPED).reshape(shape).amax(dim=(1, 3))  # for neither
        tiles = torch.where(lo == hi, lo, torch.full_like(lo, MASKED))
    return "\n".join("".join(CHARS[int(c)] for c in row) for row in tiles) + "\n"


def summary(tiles: torch.Tensor) -> str:
    n = tiles.numel()
    counts = {k: int((tiles == k).sum()) for k in CHARS}
    return (f"{n} tiles: {counts[UNMASKED]} unmasked ('#'), {counts[MASKED]} masked ('+'), {counts[SKIPPED]} "
            f"skipped ('.'); {100 * (counts[UNMASKED] + counts[MASKED]) / max(n, 1):.1f}% visited")


def plot(tiles: torch.Tensor, path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError as e:
        raise ImportError("--plot draws with matplotlib: pip install 'attngen[plot]' (or matplotlib)") from e
    fig, ax = plt.subplots(figsize=(6, 6 * tiles.shape[0] / max(tiles.shape[1], 1) + 0.8))
    ax.imshow(tiles.numpy(), cmap=ListedColormap(["#f4f4f4", "#e8a33d", "#2b6cb0"]), vmin=0, vmax=2,
              interpolation="nearest", aspect="equal")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key tile")
    ax.set_ylabel("query tile")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#2b6cb0", "#e8a33d", "#f4f4f4")]
    ax.legend(handles, ["FULL: no mask code", "PARTIAL: masked", "EMPTY: skipped"], loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
