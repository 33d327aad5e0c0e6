"""transformers models on attngen: Llama-, Qwen2-, Mistral- and Gemma-2-shaped models (random weights,
built offline from their configs) run with attn_implementation set to attngen's registration
(attngen.integrations.transformers.register), beside the same model's eager attention: logits of a
padded batch, greedy generate() from a left-padded batch, a training step's gradients. Each model's
specs are written from its config (head_dim, sliding window, softcap), one per layer type.

    python examples/hf_models.py --check                      # CPU: Triton's interpreter, fp32, tiny models
    python examples/hf_models.py --device cuda --dtype bf16 --head-dim 128 --layers 8 --prompt 1024 --new 64 \\
        --window 256                                          # the same on a GPU, with generate() timings
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAMILIES = ("llama", "qwen2", "mistral", "gemma2")


def config(family: str, args):
    """A small config of the family, built offline (no weights are downloaded)."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=args.vocab, hidden_size=args.heads * args.head_dim, intermediate_size=4 * args.heads *
                  args.head_dim, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, head_dim=args.head_dim)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":  # attention biases, GQA; layer_types all full_attention
        return Qwen2Config(**common)
    if family == "mistral":  # every layer windowed
        return MistralConfig(**common, sliding_window=args.window)
    return Gemma2Config(**common, sliding_window=args.window, attn_logit_softcapping=args.softcap,  # alternating
                        query_pre_attn_scalar=args.head_dim + 8, final_logit_softcapping=None)


def spec_text(name: str, head_dim: int, window: int | None, softcap: float | None, dtypes: list[str]) -> str:
    """A spec computing a transformers layer: causal, its sliding window w (mask.window.left w - 1:
    transformers counts the query itself) and its attention softcap."""
    lines = [f"name: {name}", f"description: {name} (examples/hf_models.py)", f"head_dim: {head_dim}",
             f"dtypes: [{', '.join(dtypes)}]", "mask:", "  causal: {align: bottom_right}"]
    if window is not None:
        lines.append(f"  window: {{left: {window - 1}, right: 0}}")
    if softcap is not None:
        lines += ["score:", f"  softcap: {softcap}"]
    return "\n".join(lines) + "\n"


def specs_for(family: str, cfg, folder: Path, dtypes: list[str]):
    """The spec (a path) for a model whose layers are all alike, or {layer type: path} when they differ."""
    softcap, window = getattr(cfg, "attn_logit_softcapping", None), getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["sliding_attention" if window else "full_attention"]
    table = {}
    for kind in dict.fromkeys(types):
        name = f"hf_{family}_{kind.split('_')[0]}_d{cfg.head_dim}"
        path = folder / f"{name}.yaml"
        path.write_text(spec_text(name, cfg.head_dim, window if kind == "sliding_attention" else None, softcap, dtypes))
        table[kind] = path
    return next(iter(table.values())) if len(table) == 1 else table


def build(family: str, args):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(family, args), attn_implementation="eager")
    for p in model.parameters():  # logits spread wide enough that greedy picks are not near-ties
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return model.to(args.device, DTYPES[args.dtype]).eval()


def batch(args):
    """Random tokens [B, prompt], the first row left-padded by a quarter of the prompt."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :args.prompt // 4] = 0
    return ids.masked_fill(mask == 0, 0).to(args.device), mask.to(args.device)


def labels(ids, mask):
    """Labels without padding, nor the tokens predicted from a padding position (a left-padded row's
    first token): padding rows' outputs are the model's to ignore, and attngen's differ from eager's."""
    after_pad = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
    return ids.masked_fill((mask == 0) | after_pad, -100)


def run(model, impl: str, ids, mask, new: int) -> dict:
    """Logits of the real tokens, greedy tokens (and their time), a training step's loss and gradients."""
    model.set_attn_implementation(impl)
    model.eval()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[mask.bool()].float()
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    times = []
    for _ in range(2 if ids.is_cuda else 1):  # on a GPU the second is timed: compiled kernels, warm caches
        sync()
        t0 = time.perf_counter()
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()
        times.append(time.perf_counter() - t0)
    model.train()
    model.zero_grad()
    loss = model(ids, attention_mask=mask, labels=labels(ids, mask), use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    return {"logits": logits, "tokens": tokens[:, ids.shape[1]:], "generate_s": times[-1], "loss": loss.item(),
            "grads": grads}


def compare(ours: dict, eager: dict) -> dict:
    worst = max(float((ours["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                for n, g in eager["grads"].items())
    return {"max_logit_diff": float((ours["logits"] - eager["logits"]).abs().max()),
            "same_tokens": torch.equal(ours["tokens"], eager["tokens"]), "loss_diff": abs(ours["loss"] - eager["loss"]),
            "max_grad_rel_diff": worst, "generate_s": {"attngen": ours["generate_s"], "eager": eager["generate_s"]}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=FAMILIES, action="append", help="default: all four")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=12)
    ap.add_argument("--new", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--window", type=int, default=6, help="Mistral's and Gemma-2's sliding_window")
    ap.add_argument("--softcap", type=float, default=5.0, help="Gemma-2's attn_logit_softcapping")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--check", action="store_true", help="fail unless fp32 logits, gradients and tokens match eager's")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # Triton's interpreter runs the kernels on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from attngen.integrations.transformers import register

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for family in args.family or FAMILIES:
            model = build(family, args)
            name = register(specs_for(family, model.config, Path(folder), [args.dtype]))
            ids, mask = batch(args)
            results[family] = compare(run(model, name, ids, mask, args.new), run(model, "eager", ids, mask, args.new))
            r = results[family]
            print(f"{family:8} {name:40} logits {r['max_logit_diff']:.1e}  grads {r['max_grad_rel_diff']:.1e}  tokens "
                  f"{'identical' if r['same_tokens'] else 'DIFFER'}  generate {r['generate_s']['attngen']:.2f} s "
                  f"(eager {r['generate_s']['eager']:.2f} s)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))
    if args.check:
        bad = [f for f, r in results.items() if not (r["same_tokens"] and r["max_logit_diff"] < 1e-4
                                                     and r["max_grad_rel_diff"] < 1e-4)]
        if args.dtype != "fp32":
            raise SystemExit("--check compares fp32 runs: pass --dtype fp32")
        if bad:
            raise SystemExit(f"attngen differs from eager on {', '.join(bad)}")
    return results


if __name__ == "__main__":
    main()
