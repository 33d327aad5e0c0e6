"""attngen kernels as an attention implementation of Hugging Face transformers (5.x).

    from attngen.integrations.transformers import register
    name = register("gqa")                         # a spec's path, a shipped spec's name, or a loaded module
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    name = register({"full_attention": "gemma_full.yaml", "sliding_attention": "gemma_window.yaml"})

`register` puts two functions in transformers' registries under one name: `mask_plan` in
`AttentionMaskInterface`, which the model calls once per forward and layer type instead of building
a 4-D mask, and an attention function in `AttentionInterface`, which every attention layer calls
with its queries, the cache's keys and values, and that plan. The plan holds the 2-D padding mask's
per-sequence view (never an N x N mask), the queries' and keys' offsets in the cache, and what the
model's mask function gives the last query, which is checked against the spec. docs/integration.md
has the mapping in full: padding (document ids or attention_varlen), the KV cache
(attention_with_kvcache), GQA, scaling, dropout, sliding windows and softcap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

from ..loader import load
from ..resources import resolve_spec
from ..runtime import Documents, KernelModule, of

BUILT_IN = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4",
            "paged|eager")
_UNSET = object()  # a keyword the model did not pass (None is a value: "no window", "no softcap")


# ---------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class SpecFit:
    """What a spec computes, in the terms transformers' layers ask for it."""
    rt: KernelModule
    name: str
    window: int | None  # transformers' sliding_window: keys q-w+1..q, i.e. mask.window.left + 1; None: no window
    softcap: float | None
    scale: float | None  # an explicit score.scale (then the model's scaling must equal it), else None
    dropout: float
    document: bool  # mask.document: padding travels as document ids, without copies
    bottom_right: bool  # every alignment bottom-right: right for queries after a cache's keys

    def describe(self) -> str:
        parts = ["causal" if self.bottom_right else "causal aligned top_left"]
        if self.window is not None:
            parts.append(f"mask.window.left {self.window - 1}, i.e. sliding_window {self.window}")
        parts.append(f"softcap {self.softcap}" if self.softcap is not None else "no softcap")
        return ", ".join(parts)


def spec_fit(spec) -> SpecFit:
    """The SpecFit of a spec's path, a shipped spec's name, a module from attngen.load or its
    KernelModule; raises for spec fields no transformers attention layer has."""
    rt = _kernel_module(spec)
    s, name = rt.spec, rt.name
    mask, score = s.get("mask") or {}, s.get("score") or {}
    extra = [f"mask.{k}" for k in ("prefix", "expr") if mask.get(k) is not None]
    extra += ["sparsity"] if s.get("sparsity") else []
    extra += [f"score.{k}" for k in ("alibi", "temperature") if score.get(k)]
    if extra:
        raise ValueError(f"spec {name!r}: {', '.join(extra)} has no counterpart in transformers' attention layers; "
                         f"the integration takes causal specs with an optional mask.window (right 0), score.softcap, "
                         f"score.scale, dropout and mask.document")
    causal, window = mask.get("causal"), mask.get("window")
    if not (causal or (window and window.get("right") == 0)):
        raise ValueError(f"spec {name!r} is not causal: transformers' decoder layers are; add mask.causal, or give "
                         f"mask.window right: 0")
    left = window.get("left") if window else None
    return SpecFit(rt=rt, name=name, window=None if left is None else left + 1, softcap=score.get("softcap"),
                   scale=score.get("scale"), dropout=float(rt.dropout_p), document=bool(mask.get("document")),
                   bottom_right=all(part.get("align", "bottom_right") == "bottom_right" for part in (causal, window)
                                    if part))


def _kernel_module(spec) -> KernelModule:
    if isinstance(spec, KernelModule):
        return spec
    if isinstance(spec, ModuleType):
        return of(spec)
    if isinstance(spec, (str, Path)):
        return of(load(resolve_spec(spec)))
    raise TypeError(f"spec: expected a spec file's path, a shipped spec's name or a module from attngen.load; got "
                    f"{type(spec).__name__}")


def _spec_table(spec) -> dict:
    """{layer type: SpecFit}, the key None for a spec that serves every layer."""
    if not isinstance(spec, Mapping):
        return {None: spec_fit(spec)}
    if not spec:
        raise ValueError("spec: the mapping of layer types to specs is empty")
    for kind in spec:
        if not isinstance(kind, str):
            raise TypeError(f"spec: mapping keys must be layer types such as 'full_attention' or 'sliding_attention' "
                            f"(the model's config.layer_types); got {kind!r}")
    return {kind: spec_fit(s) for kind, s in spec.items()}


# ---------------------------------------------------------------------------------------------- registration


def register(spec, name: str | None = None) -> str:
    """Registers the spec's kernels with transformers' AttentionInterface and AttentionMaskInterface
    under `name` (default: attngen_<spec name>) and returns the name, for
    `from_config(cfg, attn_implementation=name)` or `model.set_attn_implementation(name)`.
    `spec`: a spec's path, a shipped spec's name, a module from attngen.load; or a mapping from the
    model's layer types (config.layer_types: 'full_attention', 'sliding_attention') to those, for
    models whose layers differ (Gemma-2). Every call checks that the spec computes what the layer
    asks (causal, sliding window, softcap, scaling, dropout) and raises naming the layer otherwise."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    table = _spec_table(spec)
    name = name if name is not None else "attngen_" + "_".join(dict.fromkeys(fit.name for fit in table.values()))
    _check_name(name, AttentionInterface())
    AttentionInterface.register(name, _attention_function(table))
    AttentionMaskInterface.register(name, mask_plan)
    return name


def _check_name(name, registered) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty string; got {name!r}")
    if "flash" in name or "/" in name or name.startswith("paged|"):
        # transformers reads these as flash-attention variants, hub kernels or the paged cache
        raise ValueError(f"name {name!r}: must not contain 'flash' or '/' nor start with 'paged|' (transformers gives "
                         f"those names other meanings)")
    if name in BUILT_IN or (name in registered and not getattr(registered[name], "attngen", False)):
        raise ValueError(f"name {name!r} is transformers' own or another library's attention implementation; pick "
                         f"another name")


# ---------------------------------------------------------------------------------------------- the mask plan


class Packed(NamedTuple):
    """A padded batch's real tokens as packed sequences (attention_varlen's layout): one sequence
    per batch row, or per segment of it when packed sequences share a row."""
    q_rows: tuple  # (batch row, query index) of each real query, in packed order
    k_rows: tuple  # (batch row, key index) of each real key
    k_rank: torch.Tensor  # each real key's place in its sequence
    cu_q: torch.Tensor  # int32 [n + 1]
    cu_k: torch.Tensor
    lengths: list  # [Nq_i, Nk_i] per sequence, on the host
    rows: list  # the batch row of each sequence
    contiguous: bool  # each sequence's keys are one run of positions (no padding between them)

    @property
    def max_q(self) -> int:
        return max((n for n, _ in self.lengths), default=0)

    @property
    def max_k(self) -> int:
        return max((n for _, n in self.lengths), default=0)


class MaskPlan:
    """What one forward's layers of one type get instead of a 4-D mask. The keys a layer receives
    are the cache's window [kv_offset, kv_offset + kv_length) of absolute positions; the queries
    are q_length positions from q_offset. Objects made from the plan (document ids, packed
    indices, lengths) are made once and shared by the layers."""

    ndim = 4  # transformers' helpers test `mask.ndim == 2` for a 2-D padding mask: a plan is not one

    def __init__(self, batch: int, q_length: int, kv_length: int, q_offset: int, kv_offset: int, ids, last_rows,
                 segment_lo, device):
        self.batch, self.q_length, self.kv_length = batch, q_length, kv_length
        self.q_offset, self.kv_offset = q_offset, kv_offset
        # keys [0, end): the last query's and those before it (a static cache holds empty slots past them)
        self.end = q_offset - kv_offset + q_length
        self.ids = ids  # int64 [B, end]: -1 for padding, else the key's segment; None: no padding, one segment a row
        self.last_rows = last_rows  # per batch row, (lo, hi, whole): the keys the model's mask gives the last query
        self.segment_lo = segment_lo  # per batch row, the first position of the last query's segment
        self.device = device
        self._made: dict = {}
        self._checked: set = set()  # the specs whose rows were checked: once per plan

    def made(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def check_rows(self, fit: SpecFit, where: str) -> None:
        """Raises unless the model's mask gives each row's last query the keys the spec gives it:
        catches chunked, bidirectional or windowed masks that the layer's arguments do not show."""
        if id(fit) in self._checked or self.q_length == 0:
            return
        last = self.q_offset + self.q_length - 1
        for b, (lo, hi, whole) in enumerate(self.last_rows):
            want_lo = max(self.kv_offset, self.segment_lo[b], last - fit.window + 1 if fit.window else self.kv_offset)
            if (lo, hi, whole) != (want_lo, last, True):
                seen = "no key" if lo is None else f"keys {lo}..{hi}" + ("" if whole else " with gaps")
                raise ValueError(f"{where}: the model's mask gives the last query (position {last}) of batch row {b} "
                                 f"{seen}; spec {fit.name!r} ({fit.describe()}) would give it keys {want_lo}..{last}. "
                                 f"The model's mask is not one the spec computes (chunked, bidirectional, or a window "
                                 f"the layer does not pass as sliding_window)")
        self._checked.add(id(fit))

    def full_lengths(self) -> torch.Tensor:
        """cache_seqlens when every key is real: end for every row."""
        return self.made("lengths", lambda: torch.full((self.batch,), self.end, dtype=torch.int32, device=self.device))

    def documents(self, q_length: int) -> Documents:
        """Document ids of the queries and keys: -1 for padding (padding sees only padding), else the segment."""
        def make():
            ids = self.ids if self.ids is not None else torch.zeros(self.batch, self.end, dtype=torch.int64,
                                                                   device=self.device)
            return Documents(ids[:, self.end - q_length:], ids)
        return self.made(("documents", q_length), make)

    def packed(self, q_length: int) -> Packed:
        return self.made(("packed", q_length), lambda: pack(self.ids, q_length, self.end))


def mask_plan(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
              attention_mask=None, use_vmap: bool = False, device="cpu", **kwargs) -> MaskPlan:
    """The AttentionMaskInterface entry: called like transformers' sdpa_mask (offsets of the
    queries and keys in the cache, the layer type's mask function, the 2-D padding mask [B, seen +
    q_length]), it returns a MaskPlan. Reads the device once or twice (padding, the mask's rows)."""
    if isinstance(attention_mask, MaskPlan):  # generate() made it before the forward (compileable caches)
        return attention_mask
    if use_vmap:  # set when the model adds or_mask_function / and_mask_function
        raise ValueError("the model adds its own mask functions (or_mask_function / and_mask_function: e.g. "
                         "bidirectional image tokens), which attngen's transformers integration does not compute; it "
                         "takes causal and sliding-window masks with padding and packed sequences")
    mask_function = mask_function or (lambda b, h, q, kv: kv <= q)
    q_offset, kv_offset = int(q_offset), int(kv_offset)  # a static cache's offset is a tensor
    end = q_offset - kv_offset + q_length
    if not 0 <= end <= kv_length:
        raise ValueError(f"mask_plan: queries at {q_offset}..{q_offset + q_length - 1} and keys at {kv_offset}.."
                         f"{kv_offset + kv_length - 1}: the last query must lie among the keys")
    valid = _valid(attention_mask, kv_offset, end)
    # packed sequences show as queries that do not see the key before them; only without a cache
    starts = _starts(mask_function, batch_size, end, kv_offset, device) if q_length == end > 1 else None
    ids = None
    if valid is not None or starts is not None:
        segment = starts.long().cumsum(1) - 1 if starts is not None else torch.zeros(
            batch_size, end, dtype=torch.int64, device=device)
        ids = segment if valid is None else torch.where(valid.to(device), segment, -1)
    rows, segment_lo = _last_rows(mask_function, batch_size, q_offset + q_length - 1, kv_offset, kv_length, starts,
                                  device)
    return MaskPlan(batch_size, q_length, kv_length, q_offset, kv_offset, ids, rows, segment_lo, device)


def _valid(attention_mask, kv_offset: int, end: int):
    """bool [B, end]: which of the layer's keys are real tokens; None when all are."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise TypeError(f"attention_mask: expected the 2-D padding mask [batch, tokens]; got "
                        f"{type(attention_mask).__name__}")
    valid = attention_mask[:, kv_offset:kv_offset + end].bool()
    if valid.shape[1] < end:  # a static cache's slots past the mask: not yet tokens (as prepare_padding_mask)
        valid = torch.nn.functional.pad(valid, (0, end - valid.shape[1]), value=False)
    return None if bool(valid.all()) else valid


def _indices(batch: int, device):
    """Batch and head indices shaped as transformers' mask functions take them."""
    return (torch.arange(batch, device=device)[:, None, None, None],
            torch.zeros(1, dtype=torch.int64, device=device)[None, :, None, None])


def _starts(mask_function, batch: int, end: int, kv_offset: int, device):
    """bool [B, end]: keys that start a segment (their query does not see the key before); None
    when each row is one segment. O(B x N) evaluations of the mask function."""
    t = torch.arange(1, end, device=device) + kv_offset
    b, h = _indices(batch, device)
    sees = torch.as_tensor(mask_function(b, h, t[None, None, :, None], (t - 1)[None, None, :, None]), device=device)
    sees = sees.bool().expand(batch, 1, end - 1, 1).reshape(batch, end - 1)
    if bool(sees.all()):
        return None
    return torch.nn.functional.pad(~sees, (1, 0), value=True)


def _last_rows(mask_function, batch: int, last: int, kv_offset: int, kv_length: int, starts, device):
    """Per batch row, (lo, hi, whole) of the keys the model's mask gives the query at `last`
    (absolute positions; whole: no gap between), and the first position of that query's segment."""
    b, h = _indices(batch, device)
    kv = torch.arange(kv_length, device=device) + kv_offset
    seen = torch.as_tensor(mask_function(b, h, torch.tensor([last], device=device)[None, None, :, None],
                                         kv[None, None, None, :]), device=device)
    seen = seen.bool().expand(batch, 1, 1, kv_length).reshape(batch, kv_length)
    count = seen.sum(1)
    lo = seen.int().argmax(1)
    hi = kv_length - 1 - seen.flip(1).int().argmax(1)
    if starts is None:
        seg = torch.zeros(batch, dtype=torch.int64, device=device)
    else:  # the last key's segment begins at the last start
        seg = torch.where(starts, torch.arange(starts.shape[1], device=device), -1).amax(1)
    host = torch.stack([count, lo, hi, seg]).tolist()  # one read
    rows = [(kv_offset + l, kv_offset + r, n == r - l + 1) if n else (None, None, False)
            for n, l, r in zip(*host[:3])]
    return rows, [kv_offset + s for s in host[3]]


def pack(ids: torch.Tensor, q_length: int, end: int) -> Packed:
    """The real tokens of ids [B, end] (-1: padding) as packed sequences: one per (batch row,
    segment), its keys the real keys of that segment and its queries those among the last
    q_length positions. One host read."""
    real = ids >= 0
    kb, kt = real.nonzero(as_tuple=True)  # row-major: a row's segments in order (their ids increase)
    key = kb * (end + 1) + ids[kb, kt]
    new = torch.ones_like(key, dtype=torch.bool)
    new[1:] = key[1:] != key[:-1]
    seq = new.long().cumsum(0) - 1  # each real key's sequence
    lens_k = torch.bincount(seq, minlength=0)
    is_q = kt >= end - q_length
    lens_q = torch.bincount(seq[is_q], minlength=lens_k.numel())
    starts = torch.nn.functional.pad(lens_k.cumsum(0), (1, 0))
    rank = torch.arange(kt.numel(), device=ids.device) - starts[seq]
    first, last = kt[new], kt[starts[1:] - 1]
    host = torch.stack([lens_q, lens_k, kb[new], last - first + 1]).tolist()  # one read
    lengths = [list(pair) for pair in zip(host[0], host[1])]
    cu = lambda lens: torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)  # noqa: E731
    return Packed(q_rows=(kb[is_q], kt[is_q] - (end - q_length)), k_rows=(kb, kt), k_rank=rank, cu_q=cu(lens_q),
                  cu_k=cu(lens_k), lengths=lengths, rows=host[2], contiguous=host[3] == host[1])


# ---------------------------------------------------------------------------------------------- the layer


@dataclass(frozen=True)
class LayerAsks:
    """What a transformers attention layer asks for."""
    where: str  # "layer 3 (sliding_attention)", for errors
    kind: str | None  # its layer type
    window: int | None
    softcap: float | None
    causal: bool


def layer_asks(module, sliding_window=_UNSET, softcap=_UNSET, is_causal=_UNSET) -> LayerAsks:
    """The layer's type, sliding window and softcap: from the call's keywords, else the module's
    attributes, else its config (layer_types, sliding_window, attn_logit_softcapping)."""
    config = getattr(module, "config", None)
    index = getattr(module, "layer_idx", None)
    types = getattr(config, "layer_types", None)
    kind = getattr(module, "layer_type", None)
    if kind is None and types and isinstance(index, int) and index < len(types):
        kind = types[index]
    if sliding_window is _UNSET:
        sliding_window = getattr(module, "sliding_window", _UNSET)
    if sliding_window is _UNSET:
        sliding_window = getattr(config, "sliding_window", None) if kind == "sliding_attention" else None
    if softcap is _UNSET:
        softcap = getattr(module, "attn_logit_softcapping", getattr(config, "attn_logit_softcapping", None))
    if is_causal is _UNSET or is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if kind is None:
        kind = "sliding_attention" if sliding_window is not None else "full_attention"
    return LayerAsks(where=f"layer {index} ({kind})", kind=kind, window=sliding_window, softcap=softcap,
                     causal=bool(is_causal))


def check_layer(fit: SpecFit, layer: LayerAsks, module, query, value, scaling, dropout) -> tuple:
    """(scale, training) for the kernels, after checking that the spec computes what the layer asks."""
    where, spec = layer.where, f"spec {fit.name!r}"
    if not layer.causal:
        raise ValueError(f"{where}: the layer is not causal (is_causal=False); {spec} is")
    if layer.window != fit.window:
        raise ValueError(f"{where}: the model's sliding_window is {layer.window}; {spec} has "
                         + (f"mask.window.left {fit.window - 1}, i.e. sliding_window {fit.window}" if fit.window
                            else "no window") + " (transformers' sliding_window w is mask.window.left w - 1: the query "
                         "sees itself and w - 1 keys before it)")
    if (layer.softcap is None) != (fit.softcap is None) or (
            layer.softcap is not None and not math.isclose(layer.softcap, fit.softcap, rel_tol=1e-6)):
        raise ValueError(f"{where}: the model's attention softcap is {layer.softcap}; {spec} has score.softcap "
                         f"{fit.softcap}")
    if scaling is not None and fit.scale is not None and not math.isclose(scaling, fit.scale, rel_tol=1e-6):
        raise ValueError(f"{where}: the model's scaling is {scaling}; {spec} fixes score.scale {fit.scale} (leave "
                         f"score.scale out to take the model's)")
    if query.shape[-1] != fit.rt.head_dim or value.shape[-1] != fit.rt.head_dim_v:
        raise ValueError(f"{where}: the model's head_dim is {query.shape[-1]} (values {value.shape[-1]}); {spec} has "
                         f"head_dim {fit.rt.head_dim}, head_dim_v {fit.rt.head_dim_v}")
    return scaling, _dropout(fit, where, bool(getattr(module, "training", False)), dropout)


def _dropout(fit: SpecFit, where: str, training: bool, p) -> bool:
    """Whether to run the spec's dropout: the layer's p (transformers passes 0 outside training)
    must be the spec's in training, and 0 outside it."""
    p = float(p or 0.0)
    if not training and p == 0.0:
        return False
    if training and math.isclose(p, fit.dropout, rel_tol=1e-6, abs_tol=1e-12):
        return p > 0
    raise ValueError(f"{where}: the model's attention dropout is {p} ({'training' if training else 'eval'} mode); "
                     f"spec {fit.name!r} has dropout.p {fit.dropout} (its kernels drop with the spec's p in training)")


# ---------------------------------------------------------------------------------------------- the call


def _attention_function(table: dict):
    def attngen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          sliding_window=_UNSET, softcap=_UNSET, is_causal=_UNSET, **kwargs):
        plan = _as_plan(attention_mask, module)
        layer = layer_asks(module, sliding_window, softcap, is_causal)
        fit = _spec_for(table, layer)
        scale, training = check_layer(fit, layer, module, query, value, scaling, dropout)
        if key.shape[2] != plan.kv_length:
            raise ValueError(f"{layer.where}: got {key.shape[2]} keys; its mask plan was made for {plan.kv_length}")
        plan.check_rows(fit, layer.where)
        return attend(fit, plan, query, key, value, scale, training, layer.where), None

    attngen_attention.attngen = True  # register() may replace entries it made, not others
    return attngen_attention


def _as_plan(attention_mask, module) -> MaskPlan:
    if isinstance(attention_mask, MaskPlan):
        return attention_mask
    where = f"layer {getattr(module, 'layer_idx', None)}"
    if attention_mask is None:
        raise ValueError(f"{where}: got no mask plan (attention_mask is None): the model made no mask through "
                         f"AttentionMaskInterface (continuous batching's paged cache, or a model that builds none), "
                         f"which attngen's transformers integration needs for the cache's offsets and the padding")
    raise TypeError(f"{where}: got a {type(attention_mask).__name__} mask (a 4-D mask passed to the model?); "
                    f"attngen's transformers integration takes a 2-D padding mask [batch, tokens]")


def _spec_for(table: dict, layer: LayerAsks) -> SpecFit:
    if None in table:
        return table[None]
    if layer.kind not in table:
        raise ValueError(f"{layer.where}: no spec registered for layer type {layer.kind!r}; registered: "
                         f"{', '.join(map(repr, table))}")
    return table[layer.kind]


def attend(fit: SpecFit, plan: MaskPlan, query, key, value, scale, training: bool, where: str) -> torch.Tensor:
    """o [B, Nq, Hq, Dv] (transformers' layout) from q [B, Hq, Nq, D] and the cache's k, v [B, Hkv,
    kv_length, *], GQA as it is. Chooses the entry point:
      document spec          padding as its own document (any pattern, no copy): attention(documents=), or
                             attention_with_kvcache(documents=) after a cache (inference)
      no padding, no cache   attention()
      no padding, a cache    attention_with_kvcache() over the cache's keys (inference), else attention()
      padding, inference, a cache: attention_with_kvcache() over each row's real keys, gathered
      padding otherwise      attention_varlen() over the real tokens, gathered, o scattered back."""
    rt, Nq, end = fit.rt, query.shape[2], plan.end
    k, v = key[:, :, :end], value[:, :, :end]  # a static cache's slots past the last query hold no token yet
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or k.requires_grad or v.requires_grad)
    inference = not needs_grad and not training
    if fit.document:
        docs = plan.documents(Nq)
        if Nq < end and inference:
            return rt.attention_with_kvcache(query, k, v, cache_seqlens=plan.full_lengths(), documents=docs,
                                             scale=scale).transpose(1, 2)
        _need_alignment(fit, where, Nq == end or fit.bottom_right)
        return rt.attention(query, k, v, documents=docs, scale=scale, training=training).transpose(1, 2)
    if plan.ids is None:
        if Nq == end:
            return rt.attention(query, k, v, scale=scale, training=training).transpose(1, 2)
        if inference:
            o = rt.attention_with_kvcache(query, k, v, cache_seqlens=plan.full_lengths(), scale=scale)
            return o.transpose(1, 2)
        _need_alignment(fit, where, fit.bottom_right)
        return rt.attention(query, k, v, scale=scale, training=training).transpose(1, 2)
    packed = plan.packed(Nq)
    if fit.window is not None and not packed.contiguous:
        raise ValueError(f"{where}: a batch row has padding between its tokens (a right-padded prompt that goes on "
                         f"generating?); spec {fit.name!r} has a window, which transformers counts over positions "
                         f"padding included, so its packed sequences would see other keys. Pad on the left "
                         f"(tokenizer.padding_side = 'left'), or use a spec with mask.document: true")
    if Nq < end and inference and packed.rows == list(range(plan.batch)) and all(n == Nq for n, _ in packed.lengths):
        return _decode_padded(rt, plan, packed, query, k, v, scale)
    _need_alignment(fit, where, fit.bottom_right or all(q in (0, n) for q, n in packed.lengths))
    return _varlen(rt, packed, query, k, v, scale, training)


def _need_alignment(fit: SpecFit, where: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{where}: spec {fit.name!r} aligns its mask top_left (query 0 sees key 0), but these queries "
                         f"come after cached keys and need gradients or dropout, which only attention() and "
                         f"attention_varlen() compute; register a spec aligned bottom_right (mask.causal: {{align: "
                         f"bottom_right}})")


def _varlen(rt, packed: Packed, query, k, v, scale, training: bool) -> torch.Tensor:
    """The real tokens gathered into attention_varlen's layout; padding rows of o are zeros."""
    B, Hq, Nq, _ = query.shape
    out = query.new_zeros(B, Nq, Hq, v.shape[-1])
    if not packed.lengths or packed.cu_k[-1] == 0:
        return out
    (qb, qt), (kb, kt) = packed.q_rows, packed.k_rows
    o = rt.attention_varlen(query.transpose(1, 2)[qb, qt], k.transpose(1, 2)[kb, kt], v.transpose(1, 2)[kb, kt],
                            packed.cu_q, packed.cu_k, packed.max_q, packed.max_k, scale=scale, training=training)
    return out.index_put((qb, qt), o)


def _decode_padded(rt, plan: MaskPlan, packed: Packed, query, k, v, scale) -> torch.Tensor:
    """Each row's real keys moved to the front of a [B, Hkv, longest, D] cache (a gather: the
    decode kernel reads a row's keys from slot 0), then attention_with_kvcache."""
    def gathered():
        kb, kt = packed.k_rows
        slots = torch.full((plan.batch, packed.max_k), plan.end - 1, dtype=torch.int64, device=k.device)
        slots[kb, packed.k_rank] = kt
        return slots, packed.cu_k.diff().to(torch.int32)
    slots, lengths = plan.made(("slots", query.shape[2]), gathered)
    rows = torch.arange(plan.batch, device=k.device)[:, None]
    k_front, v_front = k[rows, :, slots].transpose(1, 2), v[rows, :, slots].transpose(1, 2)  # [B, Hkv, longest, D]
    return rt.attention_with_kvcache(query, k_front, v_front, cache_seqlens=lengths, scale=scale).transpose(1, 2)
