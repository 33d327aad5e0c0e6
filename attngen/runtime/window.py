"""A call that computes a window of a larger attention problem (context parallelism's ring steps:
one shard's queries against another's keys; docs/distributed.md)."""

from __future__ import annotations

from typing import NamedTuple


class Window(NamedTuple):
    """Query row i of the call is position q_pos + i, key row j position kv_pos + j, of an Nq_all x
    Nk_all attention: the spec's mask, score modifiers and dropout are evaluated at those positions,
    and the tile classes from them (a window's invisible tiles are skipped, its fully visible ones
    run no mask code)."""
    q_pos: int
    kv_pos: int
    Nq_all: int
    Nk_all: int

    @staticmethod
    def whole(Nq: int, Nk: int) -> "Window":
        return Window(0, 0, Nq, Nk)

    def check(self, Nq: int, Nk: int) -> None:
        if not (0 <= self.q_pos and self.q_pos + Nq <= self.Nq_all and 0 <= self.kv_pos
                and self.kv_pos + Nk <= self.Nk_all < 2**31 and self.Nq_all < 2**31):
            raise ValueError(f"window {tuple(self)}: rows [{self.q_pos}, {self.q_pos + Nq}) and keys "
                             f"[{self.kv_pos}, {self.kv_pos + Nk}) must lie inside the {self.Nq_all} x {self.Nk_all} "
                             f"problem (each below 2^31)")

    def host_mask(self, visible):
        """The spec's host mask `visible(q_idx, kv_idx, Nq, Nk)` over the call's rows and keys."""
        if visible is None:
            return None
        q0, k0, nq, nk = self
        return lambda q_idx, kv_idx, Nq, Nk: visible(q_idx + q0, kv_idx + k0, nq, nk)
