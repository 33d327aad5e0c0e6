"""The YAML spec: parsed and validated into frozen dataclasses.

A spec file looks like::

    name: sliding_window
    description: Mistral-style sliding window, 256 keys back
    head_dim: 128            # 16..256; non powers of two are padded internally
    head_dim_v: 128          # defaults to head_dim
    dtypes: [fp16, bf16, fp32]
    mask:
      causal: {align: bottom_right}          # or `causal: true`
      window: {left: 256, right: 0}          # null side = unbounded
      prefix: 64                             # prefix-LM: kv_idx < 64 or causal
      expr: "kv_idx // CHUNK == q_idx // CHUNK"
      constants: {CHUNK: 128}
      document: true                         # only keys of the query's document (ids per call)
    score: {scale: null, softcap: 30.0, alibi: true, temperature: true}
    dropout: {p: 0.1}        # on the normalized probabilities, training only
    sparsity:                # block-sparse: which (query block, key block) pairs are computed
      block: [128, 128]      # query x key block size; powers of two >= 64 (the kernel tiles lie inside them)
      local: 2               # key blocks each side of the diagonal qb == kb, or {left: 2, right: 0}
      global: 1              # the first 1 key blocks to every query; the first 1 query blocks see all
      stride: 8              # key block kb is visible when kb % 8 == 7
      random: {blocks: 3, seed: 0}   # BigBird: 3 random key blocks per head and query block
      layout: runtime        # and a bool block layout [B or 1, H or 1, n_qb, n_kb] per call
    nsa:                     # Native Sparse Attention (no mask, score, dropout or sparsity beside it)
      compress: {block: 32, stride: 16, kind: mean}   # windows of 32 keys every 16; mean | linear
      select: {block: 64, count: 16, init_blocks: 1, local_blocks: 2}
      window: 512            # the sliding-window branch's keys

Every mask part present is combined with `and`; the sparsity terms present are combined with `or`
(at least one is needed), and the result with the mask by `and`. Every error names the file, the
field and what is allowed; unknown fields are errors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import SpecError

ALIGNS = ("top_left", "bottom_right")
DTYPES = ("fp16", "bf16", "fp32")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
CONST_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED = {"q_idx", "kv_idx", "Nq", "Nk", "abs", "min", "max", "and", "or", "not", "True", "False"}


@dataclass(frozen=True)
class Causal:
    align: str = "bottom_right"


@dataclass(frozen=True)
class Window:
    left: int | None = None  # None: unbounded
    right: int | None = None
    align: str = "bottom_right"


@dataclass(frozen=True)
class MaskSpec:
    causal: Causal | None = None
    window: Window | None = None
    prefix: int | None = None
    expr: str | None = None
    constants: tuple[tuple[str, int], ...] = ()
    document: bool = False  # runtime sparsity: each call passes per-batch document ids

    @property
    def is_dense(self) -> bool:
        return (self.causal is None and self.window is None and self.prefix is None and self.expr is None
                and not self.document)


@dataclass(frozen=True)
class ScoreSpec:
    scale: float | None = None  # None: 1/sqrt(head_dim)
    softcap: float | None = None
    alibi: bool = False
    temperature: bool = False  # a learned per-head factor on the scores, passed at call time


@dataclass(frozen=True)
class Sparsity:
    """A block-sparse layout over (query block, key block) pairs: the union of the terms present.
    Block coordinates are top-left aligned (the diagonal is qb == kb)."""
    block: tuple[int, int]  # (query block, key block) sizes
    local_left: int | None  # both None: no local term; one None: that side unbounded
    local_right: int | None
    global_blocks: int = 0
    stride: int | None = None
    random_blocks: int = 0
    random_seed: int = 0
    runtime: bool = False  # a layout passed at call time

    @property
    def has_local(self) -> bool:
        return self.local_left is not None or self.local_right is not None

    @property
    def is_static(self) -> bool:
        """Whether any term is known at compile time (all but `layout: runtime`)."""
        return self.has_local or bool(self.global_blocks) or self.stride is not None or bool(self.random_blocks)

    def describe(self) -> str:
        """e.g. `blocks 128x128: local [-2, +2] | global 1 | random 3 (seed 0) | runtime`"""
        terms = []
        if self.has_local:
            side = lambda v, sign: "oo" if v is None else f"{sign}{v}"  # noqa: E731
            terms.append(f"local [{side(self.local_left, '-')}, {side(self.local_right, '+')}]")
        if self.global_blocks:
            terms.append(f"global {self.global_blocks}")
        if self.stride is not None:
            terms.append(f"stride {self.stride}")
        if self.random_blocks:
            terms.append(f"random {self.random_blocks} (seed {self.random_seed})")
        if self.runtime:
            terms.append("runtime")
        return f"blocks {self.block[0]}x{self.block[1]}: " + " | ".join(terms)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"block": list(self.block)}
        if self.has_local:
            out["local"] = {"left": self.local_left, "right": self.local_right}
        if self.global_blocks:
            out["global"] = self.global_blocks
        if self.stride is not None:
            out["stride"] = self.stride
        if self.random_blocks:
            out["random"] = {"blocks": self.random_blocks, "seed": self.random_seed}
        if self.runtime:
            out["layout"] = "runtime"
        return out


@dataclass(frozen=True)
class NSA:
    """Native Sparse Attention's three branches (arXiv 2502.11089; the math: attngen/reference_nsa.py):
    compressed windows of `compress_block` keys every `compress_stride` (mean or a learned linear
    map), the `select_count` blocks of `select_block` keys chosen per query from the compressed
    branch's probabilities (the first `init_blocks` and the `local_blocks` ending at the query's own
    block always among them), and a causal window of `window` keys, mixed by gates per call."""
    compress_block: int = 32
    compress_stride: int = 16
    compress_kind: str = "mean"
    select_block: int = 64
    select_count: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 512

    def to_dict(self) -> dict[str, Any]:
        return {"compress": {"block": self.compress_block, "stride": self.compress_stride, "kind": self.compress_kind},
                "select": {"block": self.select_block, "count": self.select_count, "init_blocks": self.init_blocks,
                           "local_blocks": self.local_blocks},
                "window": self.window}


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    head_dim: int
    head_dim_v: int
    dtypes: tuple[str, ...]
    mask: MaskSpec = field(default_factory=MaskSpec)
    score: ScoreSpec = field(default_factory=ScoreSpec)
    dropout: float = 0.0
    source: str = "<spec>"
    sparsity: Sparsity | None = None
    nsa: NSA | None = None

    @property
    def scale(self) -> float:
        return self.score.scale if self.score.scale is not None else 1.0 / math.sqrt(self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        """The canonical YAML-able form (defaults filled in); round-trips through parse_spec."""
        m = self.mask
        mask: dict[str, Any] = {}
        if m.causal:
            mask["causal"] = {"align": m.causal.align}
        if m.window:
            mask["window"] = {"left": m.window.left, "right": m.window.right, "align": m.window.align}
        if m.prefix is not None:
            mask["prefix"] = m.prefix
        if m.expr is not None:
            mask["expr"] = m.expr
        if m.constants:
            mask["constants"] = dict(m.constants)
        if m.document:
            mask["document"] = True
        score = {"scale": self.score.scale, "softcap": self.score.softcap, "alibi": self.score.alibi,
                 "temperature": self.score.temperature}
        out = {
            "name": self.name,
            "description": self.description,
            "head_dim": self.head_dim,
            "head_dim_v": self.head_dim_v,
            "dtypes": list(self.dtypes),
            "mask": mask,
            "score": score,
        }
        if self.dropout:
            out["dropout"] = {"p": self.dropout}
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity.to_dict()
        if self.nsa is not None:  # its own masks: no mask or score section beside it
            del out["mask"], out["score"]
            out["nsa"] = self.nsa.to_dict()
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------- parsing

class _Fields:
    """Reads one mapping of the spec, remembering where it is for error messages."""

    def __init__(self, source: str, path: str, data: Any, allowed: tuple[str, ...]):
        self.source, self.path = source, path
        if not isinstance(data, Mapping):
            raise SpecError(source, path or "<top level>", f"expected a mapping, got {_show(data)}")
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise SpecError(source, self.field(str(unknown[0])),
                            f"unknown field; allowed here: {', '.join(allowed)}")
        self.data = data

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> SpecError:
        return SpecError(self.source, self.field(key), message)

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def int(self, key: str, *, low: int | None = None, high: int | None = None,
            default: Any = None, required: bool = False) -> Any:
        if not self.has(key):
            if required:
                raise self.error(key, "required field is missing")
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(key, f"expected an integer, got {_show(v)}")
        if low is not None and v < low or high is not None and v > high:
            allowed = ("a non-negative integer" if low == 0 and high is None
                       else f"an integer from {low} to {high}" if high is not None
                       else f"an integer >= {low}")
            raise self.error(key, f"expected {allowed}, got {v}")
        return v

    def float(self, key: str, *, positive: bool = True) -> float | None:
        if not self.has(key):
            return None
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(key, f"expected a number, got {_show(v)}")
        if positive and v <= 0:
            raise self.error(key, f"expected a positive number, got {v}")
        return float(v)

    def str(self, key: str, *, required: bool = False, default: str | None = None) -> str | None:
        if not self.has(key):
            if required:
                raise self.error(key, "required field is missing")
            return default
        v = self.data[key]
        if not isinstance(v, str):
            raise self.error(key, f"expected a string, got {_show(v)}")
        return v

    def bool(self, key: str, default: bool = False) -> bool:
        if not self.has(key):
            return default
        v = self.data[key]
        if not isinstance(v, bool):
            raise self.error(key, f"expected true or false, got {_show(v)}")
        return v

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        v = self.str(key, default=default)
        if v not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {v!r}")
        return v


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_causal(source: str, data: Any) -> Causal | None:
    if data is None or data is False:
        return None
    if data is True:
        return Causal()
    f = _Fields(source, "mask.causal", data, ("align",))
    return Causal(align=f.choice("align", ALIGNS, "bottom_right"))


def _parse_window(source: str, data: Any) -> Window | None:
    if data is None:
        return None
    f = _Fields(source, "mask.window", data, ("left", "right", "align"))
    left, right = f.int("left", low=0), f.int("right", low=0)
    if left is None and right is None:
        raise SpecError(source, "mask.window", "a window needs `left` or `right` (or both); "
                        "with both unbounded, leave the window out")
    return Window(left=left, right=right, align=f.choice("align", ALIGNS, "bottom_right"))


def _parse_mask(source: str, data: Any) -> MaskSpec:
    if data is None:
        return MaskSpec()
    f = _Fields(source, "mask", data, ("causal", "window", "prefix", "expr", "constants", "document"))
    constants: dict[str, int] = {}
    if f.has("constants"):
        if not isinstance(data["constants"], Mapping):
            raise f.error("constants", f"expected a mapping of names to integers, got {_show(data['constants'])}")
        c = _Fields(source, "mask.constants", data["constants"], tuple(data["constants"]))
        for name in c.data:
            if not isinstance(name, str) or not CONST_RE.match(name) or name in RESERVED:
                raise c.error(str(name), "constant names are identifiers other than "
                              + ", ".join(sorted(RESERVED)))
            constants[name] = c.int(name, required=True)
    expr = f.str("expr")
    if expr is not None:
        from .mask_expr import parse_mask_expr  # validates now, so errors point at the spec
        parse_mask_expr(expr, constants, source=source, field="mask.expr")
    elif constants:
        raise f.error("constants", "constants are only used by `expr`, which is missing")
    return MaskSpec(
        causal=_parse_causal(source, data.get("causal")),
        window=_parse_window(source, data.get("window")),
        prefix=f.int("prefix", low=0),
        expr=expr,
        constants=tuple(sorted(constants.items())),
        document=f.bool("document"),
    )


def _parse_score(source: str, data: Any) -> ScoreSpec:
    if data is None:
        return ScoreSpec()
    f = _Fields(source, "score", data, ("scale", "softcap", "alibi", "temperature"))
    return ScoreSpec(scale=f.float("scale"), softcap=f.float("softcap"), alibi=f.bool("alibi"),
                     temperature=f.bool("temperature"))


def _parse_dropout(source: str, data: Any) -> float:
    if data is None:
        return 0.0
    f = _Fields(source, "dropout", data, ("p",))
    p = f.float("p", positive=False)
    if p is None or not 0.0 <= p < 1.0:
        raise f.error("p", f"expected a probability in [0, 1), got {_show(data.get('p'))}")
    return p


SPARSITY_TERMS = ("local", "global", "stride", "random", "layout")
MAX_SEED = 2 ** 63 - 1


def _parse_sparsity(source: str, data: Any) -> Sparsity | None:
    if data is None:
        return None
    f = _Fields(source, "sparsity", data, ("block",) + SPARSITY_TERMS)
    if not f.has("block"):
        raise f.error("block", "required field is missing; give [query block, key block], "
                      "each a power of two >= 64")
    block = data["block"]
    if (not isinstance(block, list) or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 64 or b & (b - 1) for b in block)):
        raise f.error("block", f"expected [query block, key block], each a power of two >= 64, got {_show(block)}")
    left = right = None
    if f.has("local"):
        local = data["local"]
        if isinstance(local, Mapping):
            w = _Fields(source, "sparsity.local", local, ("left", "right"))
            left, right = w.int("left", low=0), w.int("right", low=0)
            if left is None and right is None:
                raise f.error("local", "a local term needs `left` or `right` (or both); "
                              "with both unbounded every block is visible: leave `local` out")
        else:
            if isinstance(local, bool) or not isinstance(local, int) or local < 0:
                raise f.error("local", "expected a non-negative integer (blocks each side of the diagonal) "
                              f"or a mapping {{left, right}}, got {_show(local)}")
            left = right = local
    random_blocks, random_seed = 0, 0
    if f.has("random"):
        r = _Fields(source, "sparsity.random", data["random"], ("blocks", "seed"))
        random_blocks = r.int("blocks", low=1, required=True)
        random_seed = r.int("seed", low=0, high=MAX_SEED, default=0)
    layout = f.str("layout")
    if layout is not None and layout != "runtime":
        raise f.error("layout", f"expected `runtime` (a block layout passed at call time), got {layout!r}")
    sparsity = Sparsity(
        block=(block[0], block[1]),
        local_left=left,
        local_right=right,
        global_blocks=f.int("global", low=1, default=0),
        stride=f.int("stride", low=2),  # 1 would make every block visible
        random_blocks=random_blocks,
        random_seed=random_seed,
        runtime=layout is not None,
    )
    if not sparsity.is_static and not sparsity.runtime:
        raise SpecError(source, "sparsity", f"needs at least one of {', '.join(SPARSITY_TERMS)}; "
                        "without any, leave the section out")
    return sparsity


def _parse_nsa(source: str, data: Any, f: "_Fields") -> NSA | None:
    if data is None:
        return None
    for other in ("mask", "score", "dropout", "sparsity"):
        if f.has(other):
            raise f.error(other, "a spec with an `nsa:` section takes no other attention section: its branches' "
                          "masks come from `nsa:` (causal throughout)")
    n = _Fields(source, "nsa", data, ("compress", "select", "window"))
    c = _Fields(source, "nsa.compress", data.get("compress", {}), ("block", "stride", "kind"))
    s = _Fields(source, "nsa.select", data.get("select", {}), ("block", "count", "init_blocks", "local_blocks"))
    nsa = NSA(compress_block=c.int("block", low=1, default=32), compress_stride=c.int("stride", low=1, default=16),
              compress_kind=c.choice("kind", ("mean", "linear"), "mean"),
              select_block=s.int("block", low=16, high=256, default=64), select_count=s.int("count", low=1, default=16),
              init_blocks=s.int("init_blocks", low=0, default=1), local_blocks=s.int("local_blocks", low=0, default=2),
              window=n.int("window", low=1, default=512))
    if nsa.compress_stride > nsa.compress_block:
        raise c.error("stride", f"must be at most the block ({nsa.compress_block}): windows may not leave keys out; "
                      f"got {nsa.compress_stride}")
    if nsa.select_block & (nsa.select_block - 1):
        raise s.error("block", f"expected a power of two from 16 to 256 (a kernel tile), got {nsa.select_block}")
    if nsa.init_blocks + nsa.local_blocks > nsa.select_count:
        raise s.error("count", f"must cover the forced blocks: init_blocks + local_blocks = "
                      f"{nsa.init_blocks + nsa.local_blocks}; got {nsa.select_count}")
    return nsa


def parse_spec(data: Any, source: str = "<spec>") -> Spec:
    """Validates a decoded YAML document into a Spec."""
    f = _Fields(source, "", data, ("name", "description", "head_dim", "head_dim_v", "dtypes", "mask", "score",
                                   "dropout", "sparsity", "nsa"))
    name = f.str("name", required=True)
    if not NAME_RE.match(name):
        raise f.error("name", f"expected lower-case letters, digits and _, starting with a letter, got {name!r}")
    head_dim = f.int("head_dim", low=16, high=256, required=True)
    head_dim_v = f.int("head_dim_v", low=16, high=256, default=head_dim)
    dtypes = data.get("dtypes", list(DTYPES))
    if isinstance(dtypes, str):
        dtypes = [dtypes]
    if not isinstance(dtypes, list) or not dtypes or any(d not in DTYPES for d in dtypes):
        raise f.error("dtypes", f"expected a non-empty list drawn from {', '.join(DTYPES)}, got {_show(dtypes)}")
    return Spec(
        name=name,
        description=f.str("description", default="") or "",
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        dtypes=tuple(dict.fromkeys(dtypes)),
        mask=_parse_mask(source, data.get("mask")),
        score=_parse_score(source, data.get("score")),
        dropout=_parse_dropout(source, data.get("dropout")),
        source=source,
        sparsity=_parse_sparsity(source, data.get("sparsity")),
        nsa=_parse_nsa(source, data.get("nsa"), f),
    )


def load_spec(path: str | Path) -> Spec:
    """Reads and validates a YAML spec file."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(source, "", f"cannot read the file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(source, "", f"not UTF-8 text (byte {e.start}); save the spec as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(source, "", f"not valid YAML: {where}{getattr(e, 'problem', e)}") from None
    return parse_spec(data, source)
