"""The exhaustive tiling search: candidates in the cost model's order, each actually run with its
tiling swapped in, the module restored afterwards, failures recorded."""

from pathlib import Path

import attngen
from attngen.bench import BenchShape
from attngen.exhaustive import format_markdown, search, summary

ROOT = Path(__file__).resolve().parent.parent


def test_search_runs_each_candidate_with_its_tiling(device):
    path = ROOT / "specs" / "causal.yaml"
    module = attngen.load(path)
    before = {role: dict(by_dtype) for role, by_dtype in module.TILINGS.items()}
    seen = []

    def timer(run):  # a fake clock: the kernel really runs; "time" favours the 3rd candidate
        run()
        cfg = module.TILINGS["bwd_dq"]["fp16"]
        seen.append((cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]))
        if len(seen) == 2:
            raise RuntimeError("out of resource: shared memory")
        return 1.0 if len(seen) != 3 else 0.5

    trials = search(path, BenchShape(1, 2, 40), "bwd_dq", timer, dtype="fp16", device=device, top=4)
    assert [t.rank for t in trials] == [1, 2, 3, 4]
    assert seen == [(t.config.block_m, t.config.block_n, t.config.num_warps, t.config.num_stages) for t in trials]
    assert trials[1].measured_ms is None and "out of resource" in trials[1].error
    assert module.TILINGS == before  # restored
    s = summary(trials)
    assert s["best"].rank == 3 and s["pick_over_best_throughput"] == 0.5 and s["timed"] == 3
    table = format_markdown([("causal", BenchShape(1, 2, 40), "bwd_dq", s)])
    assert "| 0.50 | 3 of 4 |" in table
