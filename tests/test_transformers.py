"""attngen.integrations.transformers: transformers models (Llama-, Qwen2-, Mistral- and Gemma-2-shaped,
random weights, built offline from configs) against their own eager attention in fp32: logits of real
tokens with and without padding, greedy generate() (left-padded batches, a static cache), a step after
a right-padded prompt, a training step's gradients, packed sequences, document, top-left and dropout
specs; and the refusals (a window, softcap, scaling, dropout or head dim the spec does not compute)
naming the layer. The gpu test repeats the comparisons at head_dim 64 in fp32 and bf16."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (AutoModelForCausalLM, DynamicCache, Gemma2Config, LlamaConfig, MistralConfig,  # noqa: E402
                          Qwen2Config)
from transformers.masking_utils import sliding_window_causal_mask_function  # noqa: E402

from attngen.integrations.transformers import mask_plan, register, spec_fit  # noqa: E402

SPECS = {  # head_dim 16, fp32: the interpreter's shapes
    "t_causal": "mask:\n  causal: {align: bottom_right}\n",
    "t_top_left": "mask:\n  causal: {align: top_left}\n",
    "t_window": "mask:\n  causal: {}\n  window: {left: 5, right: 0}\n",  # transformers' sliding_window 6
    "t_gemma_full": "mask:\n  causal: {}\nscore:\n  softcap: 5.0\n",
    "t_gemma_window": "mask:\n  window: {left: 5, right: 0}\nscore:\n  softcap: 5.0\n",
    "t_document": "mask:\n  causal: {}\n  document: true\n",
    "t_dropout": "mask:\n  causal: {}\ndropout: {p: 0.1}\n",
    "t_scale": "mask:\n  causal: {}\nscore:\n  scale: 0.5\n",
    "t_alibi": "mask:\n  causal: {}\nscore:\n  alibi: true\n",
    "t_dense": "",
}
COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16)  # GQA 2:1; few heads, as the interpreter runs programs one by one
GEMMA = dict(sliding_window=6, attn_logit_softcapping=5.0, query_pre_attn_scalar=24, final_logit_softcapping=None)
FAMILIES = {  # config class, its fields, the specs it is registered with
    "llama": (LlamaConfig, {}, "t_causal"),
    "qwen2": (Qwen2Config, {}, "t_causal"),
    "mistral": (MistralConfig, {"sliding_window": 6}, "t_window"),
    "gemma2": (Gemma2Config, GEMMA, {"full_attention": "t_gemma_full", "sliding_attention": "t_gemma_window"}),
}
N, NEW = 12, 5  # prompt tokens, generated tokens
TOL = dict(atol=2e-5, rtol=2e-5)  # fp32: observed within 3e-6 of eager


def _spec_text(name: str, body: str, head_dim: int = 16, dtypes: str = "[fp32]") -> str:
    return f"name: {name}\ndescription: test\nhead_dim: {head_dim}\ndtypes: {dtypes}\n{body}"


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("specs")
    paths = {}
    for name, body in SPECS.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(_spec_text(name, body))
    return paths


def _register(specs, which):
    if isinstance(which, dict):
        return register({kind: specs[name] for kind, name in which.items()})
    return register(specs[which])


def _model(family: str, **fields):
    cls, own, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**{**COMMON, **own, **fields}), attn_implementation="eager")
    for p in model.parameters():  # logits spread wide enough that greedy picks are not near-ties
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return model.eval()


def _batch(padding: str | None, batch: int = 2, n: int = N):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, COMMON["vocab_size"], (batch, n), generator=g)
    if padding is None:
        return ids, None
    mask = torch.ones(batch, n, dtype=torch.long)
    if padding in ("left", "both"):
        mask[0, :8] = 0  # more than a window (6): sliding layers see padding while decoding
    if padding in ("right", "both"):
        mask[1, n - 4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _logits(model, impl, ids, mask, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kw).logits


def _generate(model, impl, ids, mask, **kw):
    model.set_attn_implementation(impl)
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


def _labels(ids, mask):
    """No loss on padding, nor on tokens predicted from a padding position (padding rows differ from eager's)."""
    if mask is None:
        return ids
    after_pad = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
    return ids.masked_fill((mask == 0) | after_pad, -100)


def _grads(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    model.zero_grad()
    loss = model(ids, attention_mask=mask, labels=_labels(ids, mask), use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------- against eager


@pytest.mark.interp
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager(family, specs):
    name = _register(specs, FAMILIES[family][2])
    model = _model(family)
    for padding in (None, "both"):  # "both": a left-padded row and a right-padded one
        ids, mask = _batch(padding)
        real = slice(None) if mask is None else mask.bool()  # padding rows' outputs are the model's to ignore
        torch.testing.assert_close(_logits(model, name, ids, mask)[real], _logits(model, "eager", ids, mask)[real],
                                   **TOL, msg=f"{family}, padding {padding}")


@pytest.mark.interp
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_eager(family, specs):
    """Prefill then decode against transformers' DynamicCache (sliding layers keep only their
    window), unpadded and with a left-padded row."""
    name = _register(specs, FAMILIES[family][2])
    model = _model(family)
    for padding in (None, "left"):
        ids, mask = _batch(padding)
        ours = _generate(model, name, ids, mask)
        assert ours.shape == (2, N + NEW)
        assert torch.equal(ours, _generate(model, "eager", ids, mask)), f"{family}, padding {padding}"


@pytest.mark.interp
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_match_eager(family, specs):
    name = _register(specs, FAMILIES[family][2])
    model = _model(family).train()
    for padding in (None, "both") if family in ("llama", "gemma2") else ("both",):  # "both" runs attention_varlen
        ids, mask = _batch(padding)
        loss, grads = _grads(model, name, ids, mask)
        want_loss, want = _grads(model, "eager", ids, mask)
        torch.testing.assert_close(loss, want_loss, **TOL)
        assert grads.keys() == want.keys() and len(grads) > 10
        for n, g in want.items():
            torch.testing.assert_close(grads[n], g, atol=2e-5 * float(g.abs().max()), rtol=1e-4,
                                       msg=f"{family}, padding {padding}: {n}")


@pytest.mark.interp
def test_packed_sequences_match_eager(specs):
    """Sequences packed in one row (position_ids restart, no mask, no cache): transformers' mask
    keeps them apart, and so does attngen's varlen path."""
    name = _register(specs, "t_causal")
    model = _model("llama")
    ids = _batch(None, batch=1)[0]
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    ours = _logits(model, name, ids, None, position_ids=pos, use_cache=False)
    want = _logits(model, "eager", ids, None, position_ids=pos, use_cache=False)
    torch.testing.assert_close(ours, want, **TOL)
    assert (want - _logits(model, "eager", ids, None, use_cache=False)).abs().max() > 0.1  # packing matters here


@pytest.mark.interp
def test_static_cache_generate_matches_eager(specs):
    """A StaticCache hands every layer its whole buffer: the plan cuts it at the last query."""
    name = _register(specs, FAMILIES["gemma2"][2])
    model = _model("gemma2")
    ids, mask = _batch("left")
    ours = _generate(model, name, ids, mask, cache_implementation="static")
    assert torch.equal(ours, _generate(model, "eager", ids, mask, cache_implementation="static"))


def _step_after(model, impl, ids, mask):
    """Logits of one more token after the prompt, through a DynamicCache (as generate() does)."""
    model.set_attn_implementation(impl)
    # the cache's keyword: `cache` from transformers 5.2x, `past_key_values` before
    cache = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values":
             DynamicCache(config=model.config)}
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache)
        nxt = torch.full((ids.shape[0], 1), 7)
        return model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), **cache).logits


@pytest.mark.interp
def test_padding_between_tokens(specs):
    """A token after a right-padded prompt leaves padding between a row's tokens: exact for a causal
    spec without a window (its real keys gathered) and for a document spec (the padding is its own
    document); refused for a window spec, as transformers' window counts the padding's positions."""
    ids, mask = _batch("right")
    model = _model("llama")
    want = _step_after(model, "eager", ids, mask)
    for spec in ("t_causal", "t_document"):
        torch.testing.assert_close(_step_after(model, _register(specs, spec), ids, mask), want, **TOL, msg=spec)
    with pytest.raises(ValueError, match="padding between its tokens"):
        _step_after(_model("mistral"), _register(specs, "t_window"), ids, mask)


@pytest.mark.interp
def test_document_spec_and_top_left_spec_match_eager(specs):
    """A document spec takes padding as document ids (prefill, decode); a top-left causal spec
    decodes through attention_with_kvcache, which places queries at absolute positions."""
    model = _model("llama")
    ids, mask = _batch("left")
    want_logits = _logits(model, "eager", ids, mask)[mask.bool()]
    want = _generate(model, "eager", ids, mask)
    for spec in ("t_document", "t_top_left"):
        name = _register(specs, spec)
        torch.testing.assert_close(_logits(model, name, ids, mask)[mask.bool()], want_logits, **TOL)
        assert torch.equal(_generate(model, name, ids, mask), want), spec


@pytest.mark.interp
def test_dropout_follows_the_layer(specs):
    """attention_dropout = the spec's p: in eval no dropout (logits as eager's), in training the
    spec's dropout, drawn from torch's generator, with gradients."""
    name = _register(specs, "t_dropout")
    model = _model("llama", attention_dropout=0.1)
    ids, mask = _batch("left")
    real = mask.bool()
    torch.testing.assert_close(_logits(model, name, ids, mask)[real], _logits(model, "eager", ids, mask)[real], **TOL)
    model.train()
    torch.manual_seed(0)
    loss, grads = _grads(model, name, ids, mask)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    torch.manual_seed(1)
    with torch.no_grad():
        other = model(ids, attention_mask=mask, labels=_labels(ids, mask), use_cache=False).loss
    assert other != loss  # another seed drops other probabilities


@pytest.mark.interp
def test_hf_models_example():
    """examples/hf_models.py --check: specs written from a Gemma-2 config (a window spec and a full
    one), logits, gradients and greedy tokens as eager's."""
    path = Path(__file__).resolve().parent.parent / "examples" / "hf_models.py"
    spec = importlib.util.spec_from_file_location("hf_models_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--family", "gemma2", "--heads", "2", "--kv-heads", "1", "--prompt", "10", "--new", "3",
                            "--check"])
    assert results["gemma2"]["same_tokens"] and results["gemma2"]["max_logit_diff"] < 1e-4


# ------------------------------------------------------------------------------------- refusals (no kernel runs)


@pytest.mark.compiler
def test_register_names(specs):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = register(specs["t_causal"])
    assert name == "attngen_t_causal" and register(specs["t_causal"]) == name  # registering again replaces ours
    assert name in AttentionInterface() and name in AttentionMaskInterface()
    assert register(specs["t_causal"], "my_attention") == "my_attention"
    for bad in ("sdpa", "eager", "flash_mine", "org/kernel", "paged|mine"):
        with pytest.raises(ValueError, match="name"):
            register(specs["t_causal"], bad)
    with pytest.raises(TypeError, match="name: expected"):
        register(specs["t_causal"], "")
    with pytest.raises(TypeError, match="spec: expected"):
        register(3.5)
    with pytest.raises(ValueError, match="empty"):
        register({})
    with pytest.raises(TypeError, match="layer types"):
        register({0: specs["t_causal"]})


@pytest.mark.compiler
def test_register_refuses_specs_transformers_has_no_layer_for(specs):
    with pytest.raises(ValueError, match=r"score\.alibi has no counterpart"):
        register(specs["t_alibi"])
    with pytest.raises(ValueError, match="not causal"):
        register(specs["t_dense"])


@pytest.mark.compiler
def test_window_mismatch_names_the_layer(specs):
    model = _model("mistral", sliding_window=8)
    with pytest.raises(ValueError, match=r"layer 0 \(sliding_attention\): the model's sliding_window is 8; spec "
                                         r"'t_window' has mask.window.left 5, i.e. sliding_window 6"):
        _logits(model, _register(specs, "t_window"), *_batch(None))


@pytest.mark.compiler
def test_gemma2_layers_each_need_their_spec(specs):
    model = _model("gemma2")
    batch = _batch(None)
    with pytest.raises(ValueError, match=r"layer 0 \(sliding_attention\): the model's sliding_window is 6; spec "
                                         r"'t_gemma_full' has no window"):
        _logits(model, _register(specs, "t_gemma_full"), *batch)
    with pytest.raises(ValueError, match=r"layer 0 \(sliding_attention\): the model's attention softcap is 5.0; "
                                         r"spec 't_window' has score.softcap None"):
        _logits(model, register({"sliding_attention": specs["t_window"], "full_attention": specs["t_gemma_full"]}),
                *batch)
    with pytest.raises(ValueError, match="no spec registered for layer type 'sliding_attention'"):
        _logits(model, register({"full_attention": specs["t_gemma_full"]}), *batch)


@pytest.mark.compiler
def test_scaling_dropout_and_head_dim_mismatches(specs):
    batch = _batch(None)
    with pytest.raises(ValueError, match=r"layer 0 \(full_attention\): the model's scaling is 0.25; spec 't_scale' "
                                         r"fixes score.scale 0.5"):
        _logits(_model("llama"), _register(specs, "t_scale"), *batch)
    with pytest.raises(ValueError, match=r"layer 0 \(full_attention\): the model's attention dropout is 0.1 "
                                         r"\(training mode\); spec 't_causal' has dropout.p 0.0"):
        _grads(_model("llama", attention_dropout=0.1).train(), _register(specs, "t_causal"), *batch)
    with pytest.raises(ValueError, match=r"layer 0 \(full_attention\): the model's head_dim is 32"):
        _logits(_model("llama", head_dim=32), _register(specs, "t_causal"), *batch)


@pytest.mark.compiler
def test_four_d_masks_are_refused(specs):
    ids = _batch(None)[0]
    mask = torch.zeros(2, 1, N, N)
    with pytest.raises(TypeError, match="2-D padding mask"):
        _logits(_model("llama"), _register(specs, "t_causal"), ids, mask)


@pytest.mark.compiler
def test_mask_plan_is_per_sequence(specs):
    """The plan keeps the padding as ids [B, N] (never an N x N mask), packs the real tokens per row,
    and refuses a model mask the spec does not compute (a window the layer did not report)."""
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, N - 4:] = False
    plan = mask_plan(batch_size=2, q_length=N, kv_length=N, attention_mask=mask)
    assert plan.end == N and plan.ids.shape == (2, N)
    assert plan.ids[0, :3].eq(-1).all() and plan.ids[1, N - 4:].eq(-1).all() and plan.ids[mask].eq(0).all()
    packed = plan.packed(N)
    assert packed.cu_q.tolist() == packed.cu_k.tolist() == [0, N - 3, 2 * N - 7] and packed.contiguous
    decode = mask_plan(batch_size=2, q_length=1, kv_length=N + 1, q_offset=N,
                       attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1))
    assert decode.end == N + 1 and not decode.packed(1).contiguous  # row 1: padding, then the new token
    fit = spec_fit(specs["t_causal"])
    plan.check_rows(fit, "layer 0")
    windowed = mask_plan(batch_size=2, q_length=N, kv_length=N, mask_function=sliding_window_causal_mask_function(4))
    with pytest.raises(ValueError, match=r"layer 0: the model's mask gives the last query \(position 11\) of batch "
                                         r"row 0 keys 8..11; spec 't_causal' .* would give it keys 0..11"):
        windowed.check_rows(fit, "layer 0")


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_models_match_eager(family, tmp_path):
    """On CUDA, head_dim 64, 4 layers, 96 tokens (windows of 32): fp32 logits and gradients as
    eager's and identical greedy tokens with a left-padded row; bf16 logits no further from fp32
    eager's than eager's own bf16 logits are (with a margin)."""
    paths = {}
    for name, body in SPECS.items():
        paths[name] = tmp_path / f"{name}.yaml"
        body = body.replace("left: 5", "left: 31")  # sliding_window 32
        paths[name].write_text(_spec_text(name, body, head_dim=64, dtypes="[bf16, fp32]"))
    name = _register(paths, FAMILIES[family][2])
    cls, own, _ = FAMILIES[family]
    fields = {**COMMON, **own, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 256}
    if "sliding_window" in fields:
        fields["sliding_window"] = 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**fields), attn_implementation="eager").cuda()
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    model.eval()
    ids = torch.randint(1, 256, (3, 96), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :17] = 0
    ids = ids.masked_fill(mask == 0, 0)
    real = mask.bool()
    want = _logits(model, "eager", ids, mask)
    torch.testing.assert_close(_logits(model, name, ids, mask)[real], want[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(_generate(model, name, ids, mask), _generate(model, "eager", ids, mask))
    model.train()
    _, grads = _grads(model, name, ids, mask)
    _, want_grads = _grads(model, "eager", ids, mask)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-4 * float(g.abs().max()), rtol=1e-3, msg=n)
    model.eval().to(torch.bfloat16)
    ours, eager = (_logits(model, impl, ids, mask)[real].float() for impl in (name, "eager"))
    assert (ours - want[real]).abs().max() <= 2 * (eager - want[real]).abs().max() + 0.05
