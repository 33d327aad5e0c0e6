"""Greedy generation with a KV cache from a Llama-shaped model (random weights built from a config,
offline; plain torch, LlamaConfig's field names). attngen does prefill and decode with one call,
`attention_with_kvcache`: the prompt is appended to an empty cache and attended (chunked prefill),
then each new token is. The same model on torch SDPA (enable_gqa, a bottom-right causal mask for the
prompt) is the reference.

    python examples/generate.py --check                      # fp32: identical greedy tokens (CPU: interpreter)
    python examples/generate.py --device cuda --dtype bf16 --batch 8 --prompt 1024 --new 128 --layers 8
                                                             # tokens per second beside SDPA (eager), and
                                                             # attngen's decode steps as CUDA-graph replays
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Config:  # transformers' LlamaConfig field names
    vocab_size: int = 512
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

    def forward(self, x):
        return self.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope(x, pos, theta: float):
    """Rotary embedding (Llama's half-split form) at positions pos [B, N] of x [B, H, N, D]."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos[:, None, :, None].float() * freq  # [B, 1, N, D/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x.float().chunk(2, -1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class Layer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        h, d = c.hidden_size, c.head_dim
        self.q_proj = nn.Linear(h, c.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, c.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, c.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * d, h, bias=False)
        self.gate_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, h, bias=False)
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, c.rms_norm_eps)

    def forward(self, x, pos, cache, attend):
        B, N, _ = x.shape
        c = self.c
        y = self.input_layernorm(x)
        q = rope(self.q_proj(y).view(B, N, -1, c.head_dim).transpose(1, 2), pos, c.rope_theta)
        k = rope(self.k_proj(y).view(B, N, -1, c.head_dim).transpose(1, 2), pos, c.rope_theta)
        v = self.v_proj(y).view(B, N, -1, c.head_dim).transpose(1, 2)
        o = attend(q, k, v, cache)  # appends k, v to the layer's cache and attends
        x = x + self.o_proj(o.transpose(1, 2).reshape(B, N, -1))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class Model(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        for p in self.parameters():  # a spread of logits wide enough that greedy picks are not ties
            if p.dim() == 2:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))

    def forward(self, tokens, lengths, caches, attend):
        pos = lengths.long()[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_tokens(tokens)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, pos, cache, attend)
        return self.lm_head(self.norm(x[:, -1]))


def attngen_attend(module, lengths):
    def attend(q, k, v, cache):
        return module.attention_with_kvcache(q, cache[0], cache[1], cache_seqlens=lengths, k=k, v=v)
    return attend


def sdpa_attend(lengths_host):
    """Every sequence has the same length here (lengths_host, a Python int in a list), as SDPA takes
    no per-sequence lengths."""
    from torch.nn.attention.bias import causal_lower_right

    def attend(q, k, v, cache):
        n, end = q.shape[2], lengths_host[0] + q.shape[2]
        cache[0][:, :, end - n:end], cache[1][:, :, end - n:end] = k, v
        mask = causal_lower_right(n, end) if n > 1 else None
        return F.scaled_dot_product_attention(q, cache[0][:, :, :end], cache[1][:, :, :end], attn_mask=mask,
                                              enable_gqa=True)
    return attend


@torch.no_grad()
def generate(model, prompt, new: int, backend: str, module=None, capacity: int | None = None, graph: bool = False):
    """Greedy tokens [B, new], the seconds of the prefill, and the seconds and count of the decode
    steps from the fourth token on (the steady state every backend reaches). `graph`
    (attngen on a GPU): from the third token on, each decode step replays one CUDA graph of the whole
    model, as a server runs it (no host read or launch cost; lengths and caches change in place)."""
    c, (B, P) = model.c, prompt.shape
    dt, dev = next(model.parameters()).dtype, prompt.device
    capacity = capacity or P + new
    caches = [(torch.zeros(B, c.num_key_value_heads, capacity, c.head_dim, dtype=dt, device=dev),
               torch.zeros(B, c.num_key_value_heads, capacity, c.head_dim, dtype=dt, device=dev))
              for _ in model.layers]
    lengths = torch.zeros(B, dtype=torch.int32, device=dev)
    host = [0]
    attend = attngen_attend(module, lengths) if backend == "attngen" else sdpa_attend(host)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out, tokens, times, replay = [], prompt, [], None
    for step in range(new):
        sync()
        t0 = time.perf_counter()
        if graph and step == 2:  # steps 0 and 1 ran eagerly: compiled, and shapes settled
            static_tokens = tokens.clone()
            replay = torch.cuda.CUDAGraph()
            with torch.cuda.graph(replay):
                static_logits = model(static_tokens, lengths, caches, attend)
        if replay is not None:
            static_tokens.copy_(tokens)
            replay.replay()
            nxt = static_logits.argmax(-1)
        else:
            nxt = model(tokens, lengths, caches, attend).argmax(-1)
        sync()
        times.append(time.perf_counter() - t0)
        lengths += tokens.shape[1]
        host[0] += tokens.shape[1]
        out.append(nxt)
        tokens = nxt[:, None]
    steady = times[3:] if len(times) > 3 else times[1:]  # steps 1 and 2 run eagerly or capture the graph
    return torch.stack(out, 1), times[0], sum(steady), len(steady)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "specs" / "causal.yaml"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=12)
    ap.add_argument("--new", type=int, default=6)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="fail unless both backends pick the same tokens")
    ap.add_argument("--json", type=Path, help="write the timings here")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # Triton's interpreter runs the kernels on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import attngen

    module = attngen.load(args.spec)
    torch.manual_seed(0)
    cfg = Config(num_hidden_layers=args.layers)
    model = Model(cfg).to(args.device, DTYPES[args.dtype]).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=args.device)
    results = {}
    runs = [("sdpa", False), ("attngen", False)] + ([("attngen_graph", True)] if args.device == "cuda" else [])
    for name, graph in runs * 2:  # the second round is timed (compiled, warm)
        tokens, prefill_s, decode_s, steps = generate(model, prompt, args.new, name.split("_")[0], module, graph=graph)
        results[name] = {"tokens": tokens.tolist(), "prefill_ms": prefill_s * 1e3,
                            "decode_tokens_per_s": args.batch * steps / decode_s if steps else None}
    same = all(r["tokens"] == results["sdpa"]["tokens"] for r in results.values())
    for b, r in results.items():
        rate = r["decode_tokens_per_s"]
        print(f"{b:13} prefill {r['prefill_ms']:.1f} ms, decode {rate:.0f} tokens/s" if rate else f"{b:13} prefill "
              f"{r['prefill_ms']:.1f} ms")
    print("greedy tokens identical" if same else "greedy tokens DIFFER")
    if args.json:
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
        args.json.write_text(json.dumps({"config": asdict(cfg), "args": {k: str(v) for k, v in vars(args).items()},
                                         "environment": env, "same_tokens": same, "results": results}, indent=1))
    if args.check and not same:
        raise SystemExit("greedy tokens differ between attngen and SDPA")
    return results


if __name__ == "__main__":
    main()
