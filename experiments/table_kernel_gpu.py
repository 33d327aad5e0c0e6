"""Ran on: Triton 3.6.0, torch 2.11.0+cu130, NVIDIA H100 80GB HBM3, 2026-12-06; raw: data/table_kernel_2026-12-06_h100.txt.

The Triton table builder on a GPU against the torch tables (tiles.tile_lists on the CPU), entry
by entry where the kernels read: random classes and layouts, both orientations and encodings,
rows past one chunk. Prints one line per case and a summary. Run: PYTHONPATH=. python3 experiments/table_kernel_gpu.py"""

import torch

from attngen.runtime.table_kernel import build_lists
from attngen.runtime.tiles import EMPTY, layout_tiles, tile_lists


def used(count, index, nested):
    """Per row: the counts and the entries the attention kernels read."""
    c, ix = count.reshape(-1, 2).tolist(), index.reshape(-1, 2, index.shape[-1])
    return [(p, f, ix[r, 0, :p].tolist(), ix[r, 1, :(2 * f if nested else 2 + f)].tolist())
            for r, (p, f) in enumerate(c)]


def main():
    g = torch.Generator().manual_seed(0)
    bad = 0
    cases = [(2, 3, 5, 7, (64, 64), (128, 128)), (1, 4, 33, 40, (128, 64), (128, 128)),
             (2, 2, 16, 1100, (64, 128), (128, 128)), (1, 2, 9, 2500, (32, 32), (64, 64))]
    for B, H, n_qb, n_kb, tile, block in cases:
        n_m = n_qb * block[0] // tile[0] - 1 if block[0] > tile[0] else n_qb
        n_n = n_kb * block[1] // tile[1] - 1 if block[1] > tile[1] else n_kb
        classes = torch.multinomial(torch.tensor([0.3, 0.2, 0.5]), B * n_m * n_n, replacement=True,
                                    generator=g).reshape(B, 1, n_m, n_n).to(torch.int8)
        layout = torch.rand(1, H, n_qb, n_kb, generator=g) < 0.6
        inside = layout_tiles(layout, n_m, n_n, *tile, *block)
        want = torch.where(inside, classes, EMPTY).to(torch.int8)
        for transposed in (False, True):
            for nested in (False, True):
                c1, i1 = build_lists(classes.cuda(), transposed, nested, layout.cuda(), tile, block)
                c2, i2 = tile_lists(want.transpose(-1, -2) if transposed else want, nested)
                ok = used(c1.cpu(), i1.cpu(), nested) == used(c2.contiguous(), i2.contiguous(), nested)
                bad += not ok
                print(f"B{B} H{H} blocks {n_qb}x{n_kb} tile {tile} transposed={transposed} nested={nested}: "
                      f"{'same' if ok else 'DIFFERENT'}")
    print(f"table kernel on {torch.cuda.get_device_name()}: {'all same' if not bad else f'{bad} different'}")


if __name__ == "__main__":
    main()
