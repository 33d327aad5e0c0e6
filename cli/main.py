"""The attngen command line: generate, verify, show, list, the GPU benchmarks and tools (bench,
bench-merge, autotune, calibrate, inspect, profile). The tools' code lives in attngen/tools/."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from attngen.resources import generated_dir, resolve_spec, shipped_specs

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="attngen: a compiler for attention variants (YAML spec -> verified Triton kernels).")


def _interpret_without_gpu() -> str:
    """Runs kernels through Triton's interpreter on CPU tensors when there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        return "cpu (Triton interpreter)"
    return torch.cuda.get_device_name()


def _fail(err: Exception) -> None:
    typer.secho(str(err), fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _compile(spec: Path, target: str, stop: str = "triton", standalone: bool = False):
    from attngen.errors import AttngenError, TilingError
    from attngen.passes import PassOptions
    from attngen.pipeline import compile_spec

    try:
        return compile_spec(spec, options=PassOptions(target=target), stop=stop, standalone=standalone)
    except TilingError as e:  # a spec error found past parsing: name the file and its fields
        _fail(AttngenError(f"{spec}: head_dim / dtypes: {e}"))
    except AttngenError as e:
        _fail(e)


@app.command()
def generate(specs: List[Path] = typer.Argument(..., help="spec files, or shipped specs' names"),
             out: Path = typer.Option(generated_dir(), "-o", "--out", help="output directory"),
             target: str = typer.Option("sm90", help="GPU target the tiling is chosen for: sm90 or sm80"),
             standalone: bool = typer.Option(False, "--standalone", help="inline attngen's runtime: a single file "
                                             "that imports only torch and triton, for vendoring")):
    """Writes OUT/<spec name>.py for each spec and prints the chosen tiling."""
    from attngen.loader import write_if_different

    for spec in specs:
        c = _compile(resolve_spec(spec), target, standalone=standalone)
        path = out / f"{c.spec.name}.py"
        written = write_if_different(path, c.source)
        typer.echo(f"{path}: {'written' if written else 'unchanged'}")
        for role in c.stages:
            for dtype, cfg in c.kernel(role).attr("tiling").by_dtype:
                typer.echo(f"  {role:<8} {dtype}: {cfg.describe()}")


def _show_tiles(spec: Path, target: str, shape: str, block: str, plot: Optional[Path]) -> None:
    from attngen.errors import AttngenError
    from attngen.mask_analysis import forward_tiles
    from attngen.passes import PassOptions
    from attngen.pipeline import compile_spec
    from attngen.tools import tile_map

    try:
        Nq, Nk = (int(x) for x in shape.split(","))
        assert Nq > 0 and Nk > 0
    except (ValueError, AssertionError):
        _fail(ValueError(f"--shape: expected Nq,Nk (positive integers), got {shape!r}"))
    try:
        fwd = compile_spec(spec, options=PassOptions(target=target), stop="tiling").kernel("fwd")
    except AttngenError as e:
        _fail(e)
    tilings = dict(fwd.attr("tiling").by_dtype)
    cfg = tilings.get("bf16") or next(iter(tilings.values()))
    bm, bn = cfg.block_m, cfg.block_n
    if block:
        try:
            bm, bn = (int(x) for x in block.lower().split("x"))
            assert bm > 0 and bn > 0
        except (ValueError, AssertionError):
            _fail(ValueError(f"--block: expected BLOCK_MxBLOCK_N, got {block!r}"))
    plan = fwd.attr("mask_plan")
    tiles = forward_tiles(plan, Nq, Nk, bm, bn)
    title = f"{spec.stem}: forward tiles at Nq={Nq} Nk={Nk}, {bm} x {bn} ({plan.describe()})"
    note = "; documents and the call's layout cut more at run time" if plan.document or plan.sparsity else ""
    typer.echo(f"// {title}{note}\n{tile_map.as_text(tiles)}{tile_map.summary(tiles)}")
    if plot:
        try:
            tile_map.plot(tiles, plot, title)
        except ImportError as e:
            _fail(e)
        typer.echo(f"wrote {plot}")


@app.command()
def verify(specs: List[Path] = typer.Argument(..., help="spec files, or shipped specs' names"),
           dtype: Optional[List[str]] = typer.Option(None, "--dtype", help="dtypes to test (default: the spec's; "
                                                     "bf16 is skipped on the interpreter, whose bf16 dot is wrong)"),
           backward: bool = typer.Option(False, "--backward", help="also check dQ, dK, dV against the reference"),
           markdown: Optional[Path] = typer.Option(None, help="also write the table here"),
           jobs: int = typer.Option(1, "--jobs", min=1, help="verify the specs in N worker processes at once; "
                                    "the results still print in spec order"),
           varlen: bool = typer.Option(False, "--varlen", help="instead: attention_varlen on packed sequences, "
                                       "against the reference run on each sequence"),
           decode: bool = typer.Option(False, "--decode", help="instead: attention_with_kvcache on contiguous and "
                                       "paged caches, against the float64 reference of decoding"),
           option: Optional[List[str]] = typer.Option(None, "--option", help="compile with this lowering option on "
                                                      "(a PassOptions flag, e.g. split_loops), or NAME=false: off "
                                                      "(e.g. chunked_head_dims=false); repeatable")):
    """Runs the kernels against the float64 reference on a matrix of shapes; exit code 1 on any mismatch."""
    device = _interpret_without_gpu()
    from contextlib import closing

    from attngen.tools.jobs import verify_all
    from attngen.tools.progress import progress
    from attngen.verify import format_table

    if decode and (varlen or backward):
        _fail(ValueError("--decode cannot go with --varlen or --backward (decoding has no backward)"))
    try:
        options = _lowering_options(option)
    except ValueError as e:
        _fail(e)
    dtypes = dtype or None
    if device.startswith("cpu") and not dtype:
        dtypes = ["fp32", "fp16"]
    typer.echo(f"device: {device}")
    results = []
    paths = [resolve_spec(spec) for spec in specs]
    with closing(verify_all(paths, dtypes, backward, jobs, varlen, decode, options)) as per_spec, \
            progress(len(paths), "verify") as advance:
        for i, (path, (rows, error)) in enumerate(zip(paths, per_spec)):
            advance(label=paths[i + 1].stem if i + 1 < len(paths) else None)
            if error is not None:
                _fail(RuntimeError(error))
            if not rows:
                print(f"{path}: no cases (decoding does not take document ids or block layouts yet)", flush=True)
                continue
            results += rows  # print(), not typer.echo: rich moves stdout's lines above the progress bar
            print(format_table(rows).split("\n", 2)[2] if len(results) > len(rows) else format_table(rows), end="",
                  flush=True)
    table = format_table(results)
    if markdown:
        markdown.write_text(table)
    failed = [r for r in results if not r.ok]
    typer.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    raise typer.Exit(1 if failed else 0)


@app.command()
def show(spec: Path = typer.Argument(..., help="spec file, or a shipped spec's name"),
         emit: str = typer.Option("triton", help="stage to print: spec, ir, tiling or triton"),
         target: str = typer.Option("sm90", help="sm90 or sm80"),
         decode: str = typer.Option("1x32/8x1x32768", help="with --emit tiling, the decode plan of this "
                                    "BATCHxHQ/HKVxNQxCONTEXT call of attention_with_kvcache"),
         shape: str = typer.Option("1024,1024", help="with --emit tiles: Nq,Nk"),
         block: str = typer.Option("", help="with --emit tiles: BLOCK_MxBLOCK_N (default: the forward's bf16 tiling, "
                                   "else its first dtype's)"),
         plot: Optional[Path] = typer.Option(None, help="with --emit tiles: also draw the tiles to this PNG "
                                             "(matplotlib)")):
    """Prints one stage of the compiler (or, with --emit tiles, the forward kernel's tiles at a shape)."""
    from attngen.errors import AttngenError
    from attngen.passes import PassOptions
    from attngen.pipeline import STAGES, emit as emit_stage

    if emit == "tiles":
        return _show_tiles(resolve_spec(spec), target, shape, block, plot)
    if emit not in STAGES:
        _fail(ValueError(f"--emit: expected one of {', '.join(STAGES)} or tiles, got {emit!r}"))
    try:
        typer.echo(emit_stage(resolve_spec(spec), emit, PassOptions(target=target)), nl=False)
        if emit == "tiling":
            import attngen
            from attngen import runtime
            from attngen.cost_model import TARGETS
            from attngen.spec import load_spec

            batch, hq, hkv, n_q, context = _decode_shape(decode)
            path = resolve_spec(spec)
            spec_, module = load_spec(path), attngen.load(path)
            # an NSA spec's window branch's decode (fused_decode=False; the fused step is NSA's own kernels)
            rt = runtime.of(module.RUNTIME.branches()["swa"] if spec_.nsa is not None else module)
            layout = spec_.sparsity is not None
            plan = rt.decode_plan(batch, hq, hkv, n_q, context, TARGETS[target].sms)
            typer.echo(f"// decode{' (the window branch: its kernel with fused_decode=False; the default fused step runs NSA kernels of its own)' if spec_.nsa is not None else ''}, B={batch} Hq={hq} "
                       f"Hkv={hkv} Nq={n_q} context={context} on {target} ({TARGETS[target].sms} SMs)\n"
                       f"{plan.describe(layout, spec_.mask.document)}")
            if spec_.nsa is not None:
                from attngen.runtime.nsa import describe_selected

                typer.echo(f"// nsa selected branch, Hq={hq} Hkv={hkv} N={context} (training)\n"
                           f"{describe_selected(hq // hkv, int(context), max(spec_.head_dim, spec_.head_dim_v))}")
    except AttngenError as e:
        _fail(e)


def _decode_shape(text: str) -> tuple[int, int, int, int, int]:
    """--decode's BxHQ/HKVxNQxCONTEXT as (B, Hq, Hkv, Nq, context), or a ValueError saying the form."""
    try:
        batch, heads, n_q, context = text.split("x")
        hq, hkv = (int(h) for h in heads.split("/"))
        shape = int(batch), hq, hkv, int(n_q), int(context)
    except ValueError:
        shape = None
    if shape is None or min(shape) < 1 or shape[1] % shape[2]:
        raise typer.BadParameter(f"expected BxHQ/HKVxNQxCONTEXT, positive, HQ a multiple of HKV (e.g. "
                                 f"1x32/8x1x131072); got {text!r}", param_hint="--decode")
    return shape


def _lowering_options(names: Optional[List[str]]) -> tuple[str, ...]:
    """--option's PassOptions flags (NAME, or NAME=false for one on by default), each checked (a
    ValueError names the flag and what is allowed)."""
    from attngen.tools.ab import flag_values

    flag_values(names or ())
    return tuple(names or ())


def _exhaustive_top(value: str) -> int | None:
    """--exhaustive's value: a count of the best-ranked tilings (0: no search), or None for `all`."""
    if value.strip().lower() == "all":
        return None
    try:
        top = int(value)
    except ValueError:
        raise typer.BadParameter(f"--exhaustive takes a count or `all`; got {value!r}") from None
    if top < 0:
        raise typer.BadParameter(f"--exhaustive takes a count >= 0 or `all`; got {top}")
    return top


@app.command()
def bench(specs: List[Path] = typer.Argument(..., help="spec files"),
          shapes: Optional[str] = typer.Option(None, help="batch x heads x seq, comma separated, e.g. 4x16x4096,1x16x16384"),
          backward: bool = typer.Option(False, "--backward", help="time forward+backward instead of forward"),
          json_out: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON"),
          markdown: Optional[Path] = typer.Option(None, help="write the markdown table"),
          exhaustive: str = typer.Option("0", help="instead: time the N best-ranked tilings of each kernel "
                                                   "(fwd, bwd_dkdv, bwd_dq), or `all`: every legal one, and "
                                                   "compare the cost model's pick"),
          head_dim: Optional[int] = typer.Option(None, help="bench a copy of each spec with this head dim "
                                                           "(named <spec>_d<N>)"),
          ab: Optional[str] = typer.Option(None, "--ab", metavar="OPTION",
                                           help="instead: A/B of this lowering option (a PassOptions flag: "
                                                "longest_first, split_loops, nested_runs, ...), the module compiled "
                                                "with it on against off; fwd and bwd as CUDA graphs, fwd+bwd through "
                                                "autograd (default shape 4x16x4096; specs may be name:head_dim)"),
          baseline: Optional[Path] = typer.Option(None, help="a directory of modules an earlier attngen generated "
                                                  "(<spec name>.py), timed as the peer `before` (a redesign's A/B)"),
          plot: Optional[Path] = typer.Option(None, help="also draw the ratios against the peers to this PNG "
                                                         "(matplotlib: the `plot` extra)"),
          warm: int = typer.Option(0, help="with --exhaustive: first compile the candidates in this many "
                                           "processes at once (untimed), then time them one by one"),
          part: Optional[str] = typer.Option(None, hidden=True, help="i/n: a --warm worker's share")):
    """Times the generated kernels beside SDPA (flash, cuDNN, efficient) and FlexAttention on a GPU."""
    import torch

    top = _exhaustive_top(exhaustive)
    if warm and top == 0:
        _fail(ValueError("--warm compiles --exhaustive's candidates first: give --exhaustive N or all"))
    if ab is not None:
        from attngen.tools.ab import check_option

        try:
            check_option(ab)
            if top != 0 or markdown:
                raise ValueError("--ab cannot go with --exhaustive or --markdown")
        except ValueError as e:
            _fail(e)
    if not torch.cuda.is_available():
        _fail(RuntimeError("attngen bench needs a CUDA GPU"))
    if plot:
        try:
            import matplotlib  # noqa: F401  (before the run, not after it)
        except ImportError as e:
            _fail(ImportError(f"--plot draws with matplotlib: pip install 'attngen[plot]' ({e})"))
    from attngen.bench import DEFAULT_SHAPES, BenchShape, bench_spec, parse_shapes, save, with_head_dim
    from attngen.tools.progress import progress

    shape_list = parse_shapes(shapes) if shapes else (BenchShape(4, 16, 4096),) if ab else DEFAULT_SHAPES
    if head_dim is not None:
        try:
            specs = [with_head_dim(spec, head_dim) for spec in specs]
        except (ValueError, OSError) as e:
            _fail(e)
    if ab is not None:
        import json

        from attngen.bench import environment
        from attngen.tools.ab import option_ab

        rows = option_ab(specs, ab, shape_list, log=typer.echo)
        if json_out:
            json_out.write_text(json.dumps({"environment": environment(), "ab_rows": rows}, indent=1))
        return
    if top != 0:
        import json

        from attngen.bench import environment
        from attngen.exhaustive import format_markdown, median_ms, search, summary, trial_rows, warm as warm_up

        roles = ("fwd", "bwd_dkdv", "bwd_dq", "bwd_single")
        if part:  # a --warm worker: its share of every kernel's candidates, at the first shape
            i, n = (int(x) for x in part.split("/"))
            for spec in specs:
                for role in roles:
                    search(spec, shape_list[0], role, median_ms, top=top, part=(i, n))
            return
        if warm > 0:
            args = [str(s) for s in specs] + ["--shapes", f"{shape_list[0].batch}x{shape_list[0].heads}x{shape_list[0].seq}",
                                              "--exhaustive", exhaustive]
            typer.echo(f"bench --exhaustive: compiling the candidates in {warm} processes")
            warm_up(args, warm)
        results, rows = [], []
        kernels = [(spec, shape, role) for spec in specs for shape in shape_list for role in roles]
        with progress(len(kernels), "bench --exhaustive") as advance:
            for spec, shape, role in kernels:
                trials = search(spec, shape, role, median_ms, top=top)
                advance(label=f"{spec.stem} {role}")
                if not trials:  # bwd_single of a spec whose backward is always the two kernels
                    continue
                rows += trial_rows(spec, shape, role, "bf16", trials)
                results.append((spec.stem, shape, role, summary(trials)))
                print(format_markdown(results[-1:]).splitlines()[-1], flush=True)  # above the progress bar
                if json_out:  # after every kernel: a run cut short keeps what it measured
                    json_out.write_text(json.dumps({"environment": environment(), "trials": rows}, indent=1))
        table = format_markdown(results)
        if markdown:
            markdown.write_text(table)
        typer.echo(table)
        return
    rows = []
    with progress(len(specs), "bench") as advance:
        for spec in specs:
            rows += bench_spec(spec, shape_list, backward, baseline=baseline)
            advance()
    typer.echo(save(rows, json_out, markdown))
    if plot:
        import dataclasses

        from attngen.bench import environment
        from attngen.tools.bench_plot import plot as draw, title_of

        draw([dataclasses.asdict(r) for r in rows], plot, title_of(environment()))


@app.command("bench-sparsity")
def bench_sparsity(spec: Path = typer.Argument(..., help="a spec file (block-sparse for --what block or build)"),
                   what: str = typer.Option("block", help="block: beside Flex with the same blocks and at full "
                                            "density; build: the layout build; varlen: packed sequences beside "
                                            "FlashAttention-2's varlen and Flex"),
                   seqs: str = typer.Option("16384,65536", help="sequence lengths (block, build) or totals (varlen)"),
                   backward: bool = typer.Option(False, help="time forward+backward"),
                   json_out: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON")):
    """Times issue 15's sparsity on a GPU (attngen/bench_sparsity.py)."""
    import json

    import torch

    if not torch.cuda.is_available():
        _fail(RuntimeError("attngen bench-sparsity needs a CUDA GPU"))
    from attngen import bench_sparsity as bs
    from attngen.bench import BenchShape, environment

    ns = [int(x) for x in seqs.split(",")]
    if what == "block":
        rows = bs.block_sparse(spec, [BenchShape(1, 16, n) for n in ns], backward, log=typer.echo)
    elif what == "build":
        rows = bs.layout_build(spec, ns, log=typer.echo)
    elif what == "varlen":
        rows = bs.varlen(spec, ns, backward=backward, log=typer.echo)
    else:
        _fail(ValueError(f"--what must be block, build or varlen; got {what!r}"))
    if json_out:
        json_out.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))


@app.command("bench-decode")
def bench_decode(spec: Path = typer.Argument(..., help="a spec file"),
                 cases: str = typer.Option("", help="BATCHxCONTEXT[xNQ][pPAGE],... (default: the issue's matrix, "
                                                    "speculative decoding, chunked prefill, paged caches)"),
                 heads: str = typer.Option("32/8", help="query heads / KV heads"),
                 flex: str = typer.Option("", help="the cases Flex also runs at: a compile each"),
                 variants: str = typer.Option("", help="plans beside ours, NAME:block_n=128:stages=2;..."),
                 json_out: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON")):
    """Times attention_with_kvcache beside SDPA and Flex on a GPU (attngen/bench_decode.py)."""
    import json

    import torch

    if not torch.cuda.is_available():
        _fail(RuntimeError("attngen bench-decode needs a CUDA GPU"))
    from attngen import bench_decode as bd
    from attngen.bench import environment

    plans = []
    for item in filter(None, variants.split(";")):
        name, *fields = item.split(":")
        plans.append((name, {f.split("=")[0]: int(f.split("=")[1]) for f in fields}))
    hq, hkv = (int(x) for x in heads.split("/"))
    rows = bd.bench(spec, cases or bd.DEFAULT, hq, hkv, [c for c in flex.split(",") if c], plans, log=typer.echo)
    if json_out:
        json_out.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))


@app.command()
def autotune(specs: List[Path] = typer.Argument(..., help="spec files"),
             shapes: str = typer.Option("4x16x4096", help="batch x heads x seq, comma separated"),
             top: int = typer.Option(8, help="how many of the cost model's best candidates to time per kernel")):
    """Times the cost model's top tilings on this GPU and caches the winners per shape bucket;
    attngen.load(spec, autotune=True) then uses them."""
    import torch

    if not torch.cuda.is_available():
        _fail(RuntimeError("attngen autotune needs a CUDA GPU"))
    from attngen.autotune import CACHE_FILE, tune
    from attngen.bench import parse_shapes
    from attngen.exhaustive import median_ms

    from attngen.tools.progress import progress

    with progress(len(specs), "autotune") as advance:
        for spec in specs:
            winners = tune(spec, parse_shapes(shapes), median_ms, torch.cuda.get_device_name(), top=top)
            advance()
            for key, entry in winners.items():
                what = f"the {entry['form']}" if "form" in entry else (
                    f"BLOCK_M={entry['BLOCK_M']} BLOCK_N={entry['BLOCK_N']} warps={entry['num_warps']} "
                    f"stages={entry['num_stages']}")
                rank = f", cost-model rank {entry['rank']}" if "rank" in entry else ""
                print(f"{spec.stem} {key.split('|', 2)[2]}: {what} ({entry['measured_ms']:.3f} ms{rank})",
                      flush=True)  # above the progress bar
    typer.echo(f"cached in {CACHE_FILE}")


@app.command()
def calibrate(measurements: List[Path] = typer.Argument(..., help="JSON files from `attngen bench --exhaustive N --json F`"),
              write: bool = typer.Option(False, "--write", help="store the fitted constants in data/cost_constants.json"),
              fit_constants: bool = typer.Option(True, "--fit/--no-fit", help="--no-fit: report on the stored constants"),
              buckets: bool = typer.Option(True, "--buckets/--no-buckets", help="judge the picks per sequence-length bucket, as "
                                                                  "modules make them (--no-buckets: the nominal pick)"),
              objective: str = typer.Option("times", help="what the fit minimizes: `times` (the predictions' proportions "
                                                          "within each kernel and shape) or `picks` (the mean and worst "
                                                          "regret of the module's picks: needs every tiling timed)")):
    """Fits the cost model's constants to measured timings; prints predicted against measured and,
    per kernel and shape, the module's pick against the fastest measured tiling."""
    from attngen.calibrate import fit, load_rows, loss, pick_loss, report, write as write_constants
    from attngen.cost_model import CONSTANTS

    if objective not in ("times", "picks"):
        _fail(ValueError(f"--objective: expected times or picks, got {objective!r}"))
    if write and not fit_constants:
        _fail(ValueError("--write stores fitted constants: it cannot go with --no-fit"))
    rows = load_rows(measurements)
    if not fit_constants:
        typer.echo(f"{len(rows)} measurements; stored constants: {CONSTANTS}; mean squared log error {loss(rows, CONSTANTS):.4f}")
        typer.echo(report(rows, CONSTANTS, buckets))
        return
    from attngen.calibrate import STARTS
    from attngen.tools.progress import progress

    with progress(len(STARTS), "calibrate") as advance:
        picks = lambda rows, k: pick_loss(rows, k, buckets=buckets)  # noqa: E731 (judged as the report judges them)
        fitted = fit(rows, CONSTANTS, advance=advance, objective=picks if objective == "picks" else loss)
    typer.echo(f"{len(rows)} measurements; mean squared log error {loss(rows, CONSTANTS):.4f} -> {loss(rows, fitted):.4f}")
    typer.echo(f"fitted: {fitted}")
    typer.echo(report(rows, fitted, buckets))
    if write:
        write_constants(fitted)
        typer.echo("wrote data/cost_constants.json: regenerate (attngen generate specs/*.yaml) and re-verify on the GPU")


@app.command("bench-merge")
def bench_merge(files: List[Path] = typer.Argument(..., help="JSON files from `attngen bench --json F`"),
                json_out: Optional[Path] = typer.Option(None, "--json", help="write the merged rows as JSON"),
                markdown: Optional[Path] = typer.Option(None, help="write the merged markdown table"),
                plot: Optional[Path] = typer.Option(None, help="also draw the ratios against the peers to this PNG "
                                                               "(matplotlib: the `plot` extra)")):
    """Merges `attngen bench --json` files (say one per spec, so that a run cut short keeps the rest)
    into one JSON file and one markdown table, which it prints (and draws, with --plot)."""
    import dataclasses

    from attngen.tools.bench_plot import plot as draw, title_of
    from attngen.tools.merge import load_rows, merge

    try:
        typer.echo(merge(files, json_out, markdown), nl=False)
        if plot:
            env, rows = load_rows(files)
            draw([dataclasses.asdict(r) for r in rows], plot, title_of(env))
    except (ValueError, ImportError) as e:
        _fail(e)


@app.command("inspect")
def inspect_kernels(spec: Path = typer.Argument(..., help="spec file, or a shipped spec's name"),
                    shape: str = typer.Option("4x16x4096", help="batch x heads x seq of the launch"),
                    offline: bool = typer.Option(False, "--offline", help="no GPU needed: compile each kernel for "
                                                 "sm90 with the installed Triton instead of running it"),
                    role: Optional[List[str]] = typer.Option(None, "--role", help="only these kernels: fwd, bwd_dkdv, "
                                                             "bwd_dq (default: these three), bwd_single (the single-pass "
                                                             "backward: bwd_dkdv's kernel with dQ added)"),
                    dtype: str = typer.Option("bf16", help="the dtype whose tiling is inspected"),
                    out: Optional[Path] = typer.Option(None, help="also write each kernel's SASS into this directory"),
                    option: Optional[List[str]] = typer.Option(None, "--option", help="compile with this lowering "
                                                               "option on (a PassOptions flag), or NAME=false: "
                                                               "off; repeatable")):
    """Prints registers, spills, shared memory and the SASS instruction mix (HGMMA, TMA loads, local
    memory, barriers) of each kernel at the cost model's tiling, with pointer and with TMA loads."""
    from attngen.errors import AttngenError
    from attngen.tools.inspect_kernels import InspectError, inspect_spec

    try:
        inspect_spec(resolve_spec(spec), shape, offline=offline, out=out, roles=role, dtype=dtype,
                     options=_lowering_options(option), log=typer.echo)
    except (AttngenError, InspectError, ValueError) as e:
        _fail(e)


@app.command("profile")
def profile_step(cases: List[str] = typer.Argument(..., help="spec:head_dim:BxHxN, e.g. sliding_window:128:4x16x4096 "
                                                  "(a shipped spec at that head dim and shape)"),
                 fwd: bool = typer.Option(False, "--fwd", help="the forward only")):
    """Splits a forward+backward step's time into kernels (GPU ms each, torch.profiler) and host issue
    time, ours against FlexAttention, beside the do_bench median; GPU only."""
    import torch

    if not torch.cuda.is_available():
        _fail(RuntimeError("attngen profile needs a CUDA GPU"))
    from attngen.tools.profile_step import profile_cases

    try:
        profile_cases(cases, forward_only=fwd, log=typer.echo)
    except (ValueError, OSError) as e:
        _fail(e)


@app.command("list")
def list_specs():
    """Lists the shipped specs with their descriptions."""
    from attngen.spec import load_spec

    for path in shipped_specs():
        spec = load_spec(path)
        typer.echo(f"{spec.name:<22} {spec.description}")


def main() -> None:
    app(prog_name="attngen")


if __name__ == "__main__":
    sys.exit(main())
