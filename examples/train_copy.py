"""Train a tiny causal transformer on a copy task with a generated attention kernel and with
torch's scaled_dot_product_attention, from the same seed, with and without dropout.

    python examples/train_copy.py --steps 400 --json docs/training.json     # on a GPU
    python examples/train_copy.py --plot docs/training.json --png docs/training.png

Task: a sequence of 32 random tokens, a separator, then the same 32 tokens; the loss is the
cross-entropy on the copy. Solving it needs attention (an induction head), so the loss only falls
when the kernel's forward and backward are right.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
VOCAB, SEP, HALF = 16, 16, 32
ATTN_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Block(nn.Module):
    def __init__(self, d: int, heads: int, attend, dtype: torch.dtype):
        super().__init__()
        self.heads, self.attend, self.dtype = heads, attend, dtype
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = self.attend(q.to(self.dtype), k.to(self.dtype), v.to(self.dtype), self.training).float()
        x = x + self.proj(o.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, attend, dtype, d: int = 256, heads: int = 4, layers: int = 2, n: int = 2 * HALF + 1):
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB + 1, d), nn.Parameter(torch.randn(n, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, attend, dtype) for _ in range(layers))
        self.out = nn.Linear(d, VOCAB)

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos[: tokens.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def batch(gen: torch.Generator, size: int, device):
    x = torch.randint(0, VOCAB, (size, HALF), generator=gen, device=device)
    seq = torch.cat([x, torch.full((size, 1), SEP, device=device), x], dim=1)
    return seq[:, :-1], seq[:, 1:]


def train(attend, steps: int, device, dtype, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = TinyLM(attend, dtype).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator(device=device).manual_seed(seed)
    losses = []
    for step in range(steps):
        inp, tgt = batch(gen, 64, device)
        logits = model(inp)
        loss = F.cross_entropy(logits[:, HALF:].reshape(-1, VOCAB), tgt[:, HALF:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def attend_generated(module, dropout: bool):
    return lambda q, k, v, training: module.attention(q, k, v, training=training and dropout)


def attend_sdpa(p: float):
    return lambda q, k, v, training: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                    dropout_p=p if training else 0.0)


def run(steps: int, out: Path, device: str = "cuda", dtype: str = "bf16") -> None:
    """Six runs from one seed: ours and SDPA in fp32 and in `dtype` without dropout, and in `dtype`
    with the spec's dropout."""
    import attngen

    module = attngen.load(ROOT / "specs" / "causal_dropout.yaml")  # head_dim 64, causal, dropout 0.1
    p = module.DROPOUT_P
    runs = {("attngen", "fp32"): attend_generated(module, False), ("sdpa", "fp32"): attend_sdpa(0.0),
            ("attngen", dtype): attend_generated(module, False), ("sdpa", dtype): attend_sdpa(0.0),
            (f"attngen, dropout {p}", dtype): attend_generated(module, True),
            (f"sdpa, dropout {p}", dtype): attend_sdpa(p)}
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "steps": steps, "losses": {}}
    for (name, dt), attend in runs.items():
        start = time.time()
        key = f"{name} ({dt})"
        result["losses"][key] = train(attend, steps, device, ATTN_DTYPE[dt])
        tail = result["losses"][key][-20:]
        print(f"{key:<30} final loss {sum(tail) / len(tail):.4f}  ({time.time() - start:.1f} s)")
    for dt in ("fp32", dtype):
        a, b = result["losses"][f"attngen ({dt})"], result["losses"][f"sdpa ({dt})"]
        diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if abs(x - y) > 0.01 * max(abs(y), 1e-3)), None)
        result[f"first_step_differing_by_1pct_{dt}"] = diverge
        result[f"max_abs_diff_{dt}"] = max(abs(x - y) for x, y in zip(a, b))
        print(f"{dt}: max |loss difference| {result[f'max_abs_diff_{dt}']:.4f}; first step off by >1%: {diverge}")
    out.write_text(json.dumps(result, indent=1))


def plot(json_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(json_path.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {"fp32": "C0", "bf16": "C2", "fp16": "C2"}
    for name, losses in r["losses"].items():
        ax = axes[1 if "dropout" in name else 0]
        dt = name.rsplit("(", 1)[1].rstrip(")")
        smooth = [sum(losses[max(0, i - 9): i + 1]) / len(losses[max(0, i - 9): i + 1]) for i in range(len(losses))]
        ax.plot(smooth, color=colors[dt] if "dropout" not in name else ("C0" if name.startswith("attngen") else "C1"),
                linestyle="-" if name.startswith("attngen") else "--", label=name)
    for ax, title in zip(axes, ("without dropout", "with dropout")):
        ax.axhline(math.log(VOCAB), color="grey", linewidth=0.5)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    axes[0].set_ylabel("copy loss (10-step mean)")
    fig.suptitle(f"Tiny causal transformer on a copy task: {r['device']}, torch {r['torch']}, Triton {r['triton']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "training.json")
    parser.add_argument("--plot", type=Path, help="plot this JSON instead of training")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "training.png")
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs through Triton's interpreter (slow)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="half dtype of the attention (fp16 on cpu)")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.png)
    else:
        run(args.steps, args.json, args.device, args.dtype)
