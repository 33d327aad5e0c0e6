"""Benchmark harness: generated kernels against the peers that can express the same variant, in one
process, on the same inputs.

Peers: SDPA with the flash, cuDNN and memory-efficient backends (dense and causal only: they take no
other mask), and FlexAttention compiled with a block mask and, where needed, a score_mod built from
the spec (every variant but dropout). A `document` spec runs on packed sequences of four documents of
random lengths per batch row (bench_documents); ours gets a Documents and Flex its block mask, both
made before timing, as a model would make them once per batch for every layer. Each peer's output is checked against ours before it is timed.
Times are medians of triton.testing.do_bench; TFLOP/s count only visible (unmasked) score entries:
forward 2 * visible * (D + Dv), forward+backward 3.5x that (FlashAttention's convention).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .loader import load
from .mask import mask_condition
from .reference import dense_mask, document_mask, documents_at_cuts
from .resources import specs_dir
from .spec import Spec, load_spec
from .symbolic import to_callable


@dataclass(frozen=True)
class BenchShape:
    batch: int
    heads: int
    seq: int

    def __str__(self) -> str:
        return f"B{self.batch} H{self.heads} N{self.seq}"


DEFAULT_SHAPES = (BenchShape(16, 16, 1024), BenchShape(4, 16, 4096), BenchShape(1, 16, 16384))


@dataclass
class Row:
    spec: str
    shape: str
    mode: str  # "fwd" or "fwd+bwd"
    tflops: dict = field(default_factory=dict)  # implementation -> TFLOP/s (absent when it failed or disagreed)
    ms: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


def _sdpa_ok(spec: Spec) -> bool:
    m, s = spec.mask, spec.score
    plain = (m.window is None and m.prefix is None and m.expr is None and not m.document
             and s.softcap is None and not s.alibi and not s.temperature)
    return plain and not spec.dropout  # a backend that lacks head_dim_v != head_dim reports it


def bench_documents(shape: BenchShape, generator: torch.Generator, docs: int = 4) -> torch.Tensor:
    """Document ids [batch, seq] on the generator's device: per row, `docs` runs of random lengths
    (cut at random positions)."""
    return documents_at_cuts(shape.batch, shape.seq, docs - 1, generator, low=1)


def bench_layout(spec: Spec, shape: BenchShape, device, density: float = 0.1) -> torch.Tensor:
    """A block layout [1, 1, n_qb, n_kb] of about `density` of the blocks: a band about the diagonal
    plus the first key block (the shape of the issue's Longformer-like benchmark)."""
    bq, bk = spec.sparsity.block
    n_qb, n_kb = -(-shape.seq // bq), -(-shape.seq // bk)
    width = max(0, round((density * n_kb - 2) / 2))  # 2 * width + 1 diagonal blocks and the global one
    qb, kb = torch.arange(n_qb, device=device)[:, None], torch.arange(n_kb, device=device)[None, :]
    return (((qb - kb).abs() <= width) | (kb == 0))[None, None]


def _peers(spec: Spec, shape: BenchShape, module, doc_ids=None):
    """name -> callable(q, k, v) for every peer that can express the spec."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    peers = {}
    if _sdpa_ok(spec):
        causal = spec.mask.causal is not None  # Nq == Nk here, so both aligns are the same mask
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def run(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=spec.scale)
            peers[name] = run
    if not spec.dropout:
        peers["flex"] = _flex(spec, shape, module, doc_ids)
    return peers


def flex_mask_mod(spec: Spec, n: int, doc_ids=None):
    """FlexAttention's mask_mod for the spec's element mask at Nq = Nk = n (and documents), or None
    where every pair is visible."""
    cond = mask_condition(spec.mask, spec.source)
    if cond is None and doc_ids is None:
        return None
    visible = to_callable(cond) if cond is not None else None  # closures over torch ops: torch.compile traces no sympy

    def mask_mod(b, h, q_idx, kv_idx):
        vis = visible({"q_idx": q_idx, "kv_idx": kv_idx, "Nq": n, "Nk": n}) if visible else None
        if doc_ids is not None:
            same = doc_ids[b, q_idx] == doc_ids[b, kv_idx]
            vis = same if vis is None else vis & same
        return vis
    return mask_mod


def _flex(spec: Spec, shape: BenchShape, module, doc_ids=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = shape.seq
    block_mask = None
    mask_mod = flex_mask_mod(spec, n, doc_ids)
    if mask_mod is not None:
        batch = shape.batch if doc_ids is not None else None
        block_mask = create_block_mask(mask_mod, batch, None, n, n, device="cuda")
    cap = spec.score.softcap
    slopes = module.default_alibi_slopes(shape.heads, "cuda") if spec.score.alibi else None
    temperature = torch.ones(shape.heads, device="cuda") if spec.score.temperature else None  # ours' default

    def modified(score, b, h, q_idx, kv_idx):
        if temperature is not None:
            score = score * temperature[h]
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            score = score - slopes[h] * (q_idx - kv_idx).abs()
        return score
    score_mod = modified if cap is not None or slopes is not None or temperature is not None else None
    torch._dynamo.reset()  # each spec's mask and score functions recompile flex_attention: start afresh
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)  # a graph break is an error, not an eager fallback
    return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=spec.scale)


def _time(fn, backward: bool, inputs, do) -> float:
    import triton

    if not backward:
        return triton.testing.do_bench(lambda: fn(*inputs), warmup=25, rep=100, return_mode="median")

    def step():
        fn(*inputs).backward(do)
    return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=list(inputs), return_mode="median")


def _before(spec: Spec, baseline: Path | None):
    """The module of the same spec generated by an earlier attngen (a file BASELINE/<name>.py), or None."""
    path = None if baseline is None else Path(baseline) / f"{spec.name}.py"
    if path is None or not path.exists():
        return None
    from .loader import import_file

    return import_file(path, f"attngen_before_{spec.name}")


def bench_spec(path: str | Path, shapes=DEFAULT_SHAPES, backward: bool = False, log=print,
               baseline: Path | None = None) -> list[Row]:
    """Times ours against the peers at each shape. With `baseline`, a directory of modules that an
    earlier attngen generated (say `git show REV:generated/causal.py`), their kernels run as the peer
    "before" in the same process: a redesign's A/B."""
    spec = load_spec(path)
    module = load(path)
    before = _before(spec, baseline)
    rows = []
    for shape in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda d: torch.randn(shape.batch, shape.heads, shape.seq, d, generator=g, device="cuda",  # noqa: E731
                                   dtype=torch.bfloat16).requires_grad_(backward)
        q, k, v = mk(spec.head_dim), mk(spec.head_dim), mk(spec.head_dim_v)
        do = torch.randn(shape.batch, shape.heads, shape.seq, spec.head_dim_v, generator=g, device="cuda",
                         dtype=torch.bfloat16)
        vis = dense_mask(spec, shape.seq, shape.seq, "cuda")
        extra, doc_ids = {}, None
        if spec.mask.document:
            doc_ids = bench_documents(shape, g)
            vis = vis[None] & document_mask(doc_ids, doc_ids)
            extra["documents"] = module.Documents(doc_ids)
        visible = int(vis.sum()) * shape.heads * (1 if spec.mask.document else shape.batch)
        flops = 2 * visible * (spec.head_dim + spec.head_dim_v) * (3.5 if backward else 1.0)
        ours = lambda q, k, v: module.attention(q, k, v, training=False, **extra)  # noqa: E731
        with torch.no_grad():
            expected = ours(q, k, v).float()
        row = Row(spec.name, str(shape), "fwd+bwd" if backward else "fwd")
        peers = _peers(spec, shape, module, doc_ids)
        if before is not None:
            peers["before"] = lambda q, k, v: before.attention(q, k, v, training=False, **extra)  # noqa: E731
        for name, fn in {"attngen": ours, **peers}.items():
            try:
                with torch.no_grad():
                    got = fn(q, k, v).float()
                err = (got - expected).abs().max().item()
                if not err < 2e-2 * max(1.0, expected.abs().max().item()):
                    row.notes[name] = f"output differs from ours by {err:.3g}: not timed"
                    continue
                ms = _time(fn, backward, (q, k, v), do)
            except Exception as e:  # a peer that cannot run this case is reported, not fatal
                row.notes[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                continue
            row.ms[name] = ms
            row.tflops[name] = flops / ms / 1e9
        log(f"{spec.name:<20} {str(shape):<16} {row.mode:<8} " +
            "  ".join(f"{n} {t:6.1f}" for n, t in row.tflops.items()) +
            ("  [" + "; ".join(f"{n}: {m}" for n, m in row.notes.items()) + "]" if row.notes else ""))
        rows.append(row)
    return rows


PEERS = ("attngen", "before", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex")


def environment() -> dict:
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda}


def format_markdown(rows: list[Row], env: dict) -> str:
    lines = [f"Device: {env['device']}; torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}; bf16; "
             "TFLOP/s over visible score entries; median of do_bench.", "",
             "| spec | shape | mode | " + " | ".join(PEERS) + " | ours / flex | ours / cuDNN | ours / before |",
             "|---|---|---|" + "---|" * len(PEERS) + "---|---|---|"]
    for r in rows:
        cells = [f"{r.tflops[p]:.0f}" if p in r.tflops else ("✗" if p in r.notes else "–") for p in PEERS]
        ratio = lambda p: f"{r.tflops['attngen'] / r.tflops[p]:.2f}" if p in r.tflops and "attngen" in r.tflops else "–"  # noqa: E731
        lines.append(f"| {r.spec} | {r.shape} | {r.mode} | " + " | ".join(cells) + f" | {ratio('flex')} | {ratio('sdpa_cudnn')} | {ratio('before')} |")
    notes = [f"- {r.spec} {r.shape} {r.mode}, {n}: {m}" for r in rows for n, m in r.notes.items()]
    if notes:
        lines += ["", "✗: the peer failed or disagreed with our output (not timed); –: cannot express the variant.", *notes]
    return "\n".join(lines) + "\n"


def save(rows: list[Row], json_path: Path | None, md_path: Path | None, env: dict | None = None) -> str:
    """Writes the rows as JSON and as markdown where asked (with this machine's environment unless
    `env` is given); returns the markdown table."""
    env = env or environment()
    md = format_markdown(rows, env)
    if json_path:
        json_path.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=1))
    if md_path:
        md_path.write_text(md)
    return md


def with_head_dim(path: str | Path, head_dim: int) -> Path:
    """A copy of the spec with another head dim (named <name>_d<head_dim>), written next to the
    kernel cache, so the harness can cover d64 and d128 from the same shipped specs."""
    from dataclasses import replace

    from .loader import CACHE, write_if_different

    spec = load_spec(path)
    if spec.head_dim_v != spec.head_dim:
        raise ValueError(f"{path}: head_dim_v {spec.head_dim_v} differs from head_dim {spec.head_dim}; "
                         "cannot override both with one --head-dim")
    if spec.head_dim == head_dim:
        return Path(path)
    derived = replace(spec, name=f"{spec.name}_d{head_dim}", head_dim=head_dim, head_dim_v=head_dim)
    out = CACHE / "specs" / f"{derived.name}.yaml"
    write_if_different(out, derived.to_yaml())
    return out


def parse_case(text: str) -> tuple[Path, BenchShape | None]:
    """For the GPU-session scripts: 'sliding_window:128:4x16x4096' -> (the shipped spec at that
    head dim, the shape); the shape may be left out ('softcap:64'), and a spec file path passes
    through as it is."""
    name, *rest = text.split(":")
    if not rest:
        return Path(name), None
    path = with_head_dim(specs_dir() / f"{name}.yaml", int(rest[0]))
    return path, (parse_shapes(rest[1])[0] if len(rest) > 1 else None)


def parse_shapes(text: str) -> tuple[BenchShape, ...]:
    """'4x16x4096,1x16x16384' -> batch x heads x seq."""
    out = []
    for part in text.split(","):
        b, h, n = (int(x) for x in part.lower().split("x"))
        out.append(BenchShape(b, h, n))
    return tuple(out)

