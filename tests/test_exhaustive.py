"""The exhaustive tiling search: candidates in the cost model's order, each actually run with its
tiling swapped in, the module restored afterwards, failures recorded."""

from pathlib import Path

import pytest

import attngen
from attngen import runtime
from attngen.bench import BenchShape
from attngen.exhaustive import format_markdown, search, summary

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.interp
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


@pytest.mark.interp
def test_a_warm_up_worker_runs_its_share_of_the_candidates_untimed(device, monkeypatch):
    """`bench --exhaustive --warm N`: worker i of n runs candidates i, i + n, ... once each (to fill
    Triton's compile cache), times none, and leaves the module as it was."""
    from attngen import exhaustive

    path = ROOT / "specs" / "causal.yaml"
    module = attngen.load(path)
    before = {role: dict(by_dtype) for role, by_dtype in module.TILINGS.items()}
    ran = []
    real = exhaustive.workload

    def recording(*args, **kwargs):
        run = real(*args, **kwargs)
        return lambda: ran.append(dict(module.TILINGS["bwd_dq"]["fp16"])) or run()
    monkeypatch.setattr(exhaustive, "workload", recording)

    def timer(run):
        raise AssertionError("a warm-up worker times nothing")

    trials = search(path, BenchShape(1, 2, 40), "bwd_dq", timer, dtype="fp16", device=device, top=5, part=(1, 2))
    assert trials == []
    options = exhaustive.bucket_options(40)
    ranked = exhaustive.compile_spec(path, options=options, stop="tiling").rankings["bwd_dq"]["fp16"].ranked[:5]
    assert ran == [exhaustive.as_launch(ranked[1].config), exhaustive.as_launch(ranked[3].config)]
    assert module.TILINGS == before


@pytest.mark.compiler
@pytest.mark.parametrize("seq", [40, 1024, 3000, 4096, 16384, 100000])
@pytest.mark.parametrize("name, role", [("causal", "fwd"), ("causal", "bwd_dkdv"), ("dense", "bwd_dq"),
                                        ("sliding_window", "fwd")])
def test_the_searchs_first_candidate_is_the_modules_tiling_at_that_shape(seq, name, role):
    """`bench --exhaustive` reports its first candidate as the cost model's pick: it must be the
    tiling the module runs at that sequence length (its bucket's), not the nominal shape's."""
    from attngen import exhaustive

    path = ROOT / "specs" / f"{name}.yaml"
    rt = runtime.of(attngen.load(path))
    ranked = exhaustive.compile_spec(path, options=exhaustive.bucket_options(seq), stop="tiling").rankings[role]
    for dtype in ("fp16", "bf16"):
        assert exhaustive.as_launch(ranked[dtype].ranked[0].config) == rt.config(role, dtype, seq, seq), dtype


@pytest.mark.compiler
def test_shape_buckets_pick_per_sequence_length_and_yield_to_candidates():
    """With PassOptions.shape_buckets the module carries the cost model's picks per
    sequence-length bucket; a call takes the nearest bucket (log scale), an autotuned tiling
    overrides it, and an exhaustive candidate overrides both while it is timed."""
    from attngen.exhaustive import tiling_of
    from attngen.passes import BUCKETS, PassOptions, bucket_workload
    from attngen.pipeline import compile_spec
    from attngen.tiling import TileConfig

    path = ROOT / "specs" / "causal.yaml"
    module = attngen.load(path, shape_buckets=True)
    rt = runtime.of(module)
    kernel = compile_spec(path, stop="tiling").kernel("fwd")
    by_seq = dict(kernel.attr("bucket_tilings").by_seq)
    assert tuple(by_seq) == BUCKETS and module.BUCKET_SEQS == (4096, *BUCKETS)
    assert rt.bucket_tilings is module.BUCKET_TILINGS and rt.tilings is module.TILINGS
    as_cfg = lambda c: dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages,  # noqa: E731
                            HEAD_DIM_PAD=c.head_dim_pad, HEAD_DIM_V_PAD=c.head_dim_v_pad, TMA=c.tma)
    assert rt.config("fwd", "bf16", 1000, 1500) == as_cfg(by_seq[1024]["bf16"])
    assert rt.config("fwd", "bf16", 3000, 4096) == module.TILINGS["fwd"]["bf16"]
    assert rt.config("fwd", "bf16", 20000, 9000) == as_cfg(by_seq[16384]["bf16"])
    assert bucket_workload(PassOptions().workload, 1024).batch == 8  # as many tokens as the nominal shape
    tuned = dict(module.TILINGS["fwd"]["bf16"], num_stages=1)
    module.TUNED[("fwd", "bf16", 1024, 1024)] = tuned
    try:
        assert rt.config("fwd", "bf16", 1000, 1000) == tuned
        candidate = TileConfig(32, 32, 4, 2, 128, 128)
        with tiling_of(module, "fwd", "bf16", candidate):
            assert rt.config("fwd", "bf16", 1000, 1000)["BLOCK_M"] == 32
            assert rt.config("bwd_dq", "bf16", 1000, 1000) == module.BUCKET_TILINGS[("bwd_dq", "bf16", 1024)]
            assert rt.config("fwd", "fp16", 1000, 1000) == module.BUCKET_TILINGS[("fwd", "fp16", 1024)]
        assert rt.config("fwd", "bf16", 1000, 1000) == tuned and module.BUCKET_TILINGS  # restored
    finally:
        module.TUNED.clear()
    assert attngen.load(path) is module  # on by default
    without = attngen.load(path, shape_buckets=False)
    assert without.BUCKET_SEQS == () and without.BUCKET_TILINGS == {}
    assert runtime.of(without).config("fwd", "bf16", 1000, 1000) == without.TILINGS["fwd"]["bf16"]


@pytest.mark.interp
def test_search_runs_a_document_spec_on_the_benchmarks_documents(device):
    """The exhaustive search's (and autotune's) workload passes documents to a document spec's kernels."""
    path = ROOT / "specs" / "document.yaml"
    runs = []
    trials = search(path, BenchShape(2, 1, 70), "bwd_dkdv", lambda run: runs.append(run()) or 1.0,
                    dtype="fp16", device=device, top=2)
    assert [t.measured_ms for t in trials] == [1.0, 1.0] and len(runs) == 2


@pytest.mark.compiler
def test_exhaustive_all_means_every_legal_tiling(monkeypatch):
    """`bench --exhaustive all` searches every legal candidate (top=None), not the model's top N; a
    bad value is refused naming the option."""
    from typer.testing import CliRunner

    import cli.main as cli_main
    from attngen.pipeline import compile_spec

    path = ROOT / "specs" / "causal.yaml"
    legal = len(compile_spec(path, stop="tiling").rankings["fwd"]["bf16"].ranked)
    tops = []

    def fake_search(spec, shape, role, timer, dtype="bf16", device="cuda", top=None):  # no GPU here
        tops.append(top)
        from attngen.exhaustive import Trial
        ranked = compile_spec(spec, stop="tiling").rankings[role][dtype].ranked[:top]
        return [Trial(i, p.config, p.time_s * 1e3, 1.0) for i, p in enumerate(ranked, start=1)]

    monkeypatch.setattr("attngen.exhaustive.search", fake_search)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the search is faked: nothing runs
    runner = CliRunner()
    r = runner.invoke(cli_main.app, ["bench", str(path), "--shapes", "1x2x256", "--exhaustive", "all"])
    assert r.exit_code == 0, r.output
    assert tops == [None] * 4 and f"1 of {legal}" in r.output  # fwd, bwd_dkdv, bwd_dq and bwd_single
    r = runner.invoke(cli_main.app, ["bench", str(path), "--exhaustive", "most"])
    assert r.exit_code != 0 and "--exhaustive takes a count or `all`" in r.output
