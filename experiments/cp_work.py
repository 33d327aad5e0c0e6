"""Ran on: Triton 3.9.0, torch 2.13.0+cpu (the 2-core CPU machine; no kernel runs: the causal mask's
visible pairs are counted on the host).

The load balance of context parallelism's layouts for causal attention: per rank, its queries'
visible (query, key) pairs (FLOPs = 4 x D x pairs), as the largest and smallest rank's share of an
even split; and, for the ring, the sum over its steps of the busiest rank's pairs in that step
(the ranks wait for each other at every step), in the same unit: 1.0 is perfect balance.

    python experiments/cp_work.py --seq 8192
"""

from __future__ import annotations

import argparse

import torch

from attngen import distributed as cp


def pairs(q_piece, kv_piece) -> int:
    (qs, qn), (ks, kn) = q_piece, kv_piece
    return int((torch.arange(ks, ks + kn)[None, :] <= torch.arange(qs, qs + qn)[:, None]).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    N = ap.parse_args().seq
    even = N * (N + 1) // 2
    print("| ranks | layout | busiest rank | idlest rank | ring: sum of per-step busiest |")
    print("|---|---|---|---|---|")
    for world in (2, 4, 8):
        for layout in cp.LAYOUTS[::-1]:
            mine = lambda r: cp.chunks(N, world, r, layout)  # noqa: E731
            per_rank = cp.work(lambda q, kv, Nq, Nk: kv <= q, N, world, layout)
            steps = [max(sum(pairs(p, s) for p in mine(r) for s in mine((r - step) % world)) for r in range(world))
                     for step in range(world)]
            share = even / world
            print(f"| {world} | {layout} | {max(per_rank) / share:.3f} | {min(per_rank) / share:.3f} | "
                  f"{sum(steps) / share:.3f} |")


if __name__ == "__main__":
    main()
