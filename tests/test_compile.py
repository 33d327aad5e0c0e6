"""torch.compile(fullgraph=True) over the generated kernels: each module's entry points are
torch.library custom ops (attngen/runtime/module.py), so a model that calls attention compiles with
no graph break, forward and backward, and gives what eager gives. On the CPU through Triton's
interpreter with the aot_eager backend; on a GPU with inductor, and with CUDA graphs."""

from pathlib import Path

import pytest
import torch

import attngen
from attngen import runtime
from attngen.verify import Shape, random_documents

ROOT = Path(__file__).resolve().parent.parent
CASES = ["temperature", "document", "causal_dropout", "alibi"]


def _inputs(mod, name, device, dtype=torch.float32, n=40):
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda h: torch.randn(2, h, n, mod.HEAD_DIM, generator=g, device=device).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(2), mk(1), mk(1)
    kw = {}
    if name == "document":  # a Documents made outside the compiled function, as a model passes it to layers
        kw["documents"] = mod.Documents(random_documents(Shape(2, 2, 1, n, n), device, g)[0])
    if name == "causal_dropout":
        kw["dropout_seed"] = 7
    if name == "temperature":
        kw["temperature"] = (torch.rand(2, generator=g, device=device) + 0.5).requires_grad_()
    return (q, k, v), kw


def _step(mod, kw):
    def f(q, k, v):
        return (mod.attention(q, k, v, **kw).float() ** 2).sum()
    return f


def _grads(f, leaves, extra):
    for t in (*leaves, *extra):
        t.grad = None
    out = f(*leaves)
    out.backward()
    return out.detach(), [t.grad.clone() for t in (*leaves, *extra)]


@pytest.mark.interp
@pytest.mark.parametrize("name", CASES)
def test_fullgraph_compile_matches_eager(name, device):
    if device == "cuda":
        pytest.skip("the GPU tier runs inductor (test_inductor_and_cuda_graphs)")
    mod = attngen.load(ROOT / "specs" / f"{name}.yaml")
    leaves, kw = _inputs(mod, name, device)
    extra = [kw["temperature"]] if "temperature" in kw else []
    torch._dynamo.reset()
    compiled = torch.compile(_step(mod, kw), fullgraph=True, backend="aot_eager")  # a graph break raises
    out_c, grads_c = _grads(compiled, leaves, extra)
    out_e, grads_e = _grads(_step(mod, kw), leaves, extra)
    assert torch.equal(out_c, out_e)
    assert all(torch.equal(a, b) for a, b in zip(grads_c, grads_e))


@pytest.mark.interp
def test_dropout_under_compile_needs_a_seed(device):
    mod = attngen.load(ROOT / "specs" / "causal_dropout.yaml")
    (q, k, v), _ = _inputs(mod, "causal_dropout", device)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: mod.attention(q, k, v), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="dropout_seed"):
        f(q, k, v)
    torch._dynamo.reset()
    g = torch.compile(lambda q, k, v: mod.attention(q, k, v, training=False), fullgraph=True, backend="aot_eager")
    assert torch.equal(g(q, k, v), mod.attention(q, k, v, training=False))


@pytest.mark.interp
def test_opcheck(device):
    """torch.library.opcheck: schema, fake tensor, autograd registration and dispatch of both ops."""
    mod = attngen.load(ROOT / "specs" / "temperature.yaml")
    rt = runtime.of(mod)
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, 2, 24, 128, generator=g, device=device) for _ in range(3))
    hp = torch.rand(1, 2, generator=g, device=device) + 0.5
    seed = 0
    torch.library.opcheck(rt.ops.forward, (q, k, v, hp, None, None, None, None, None, 0, 0, 0.1, seed, 0.0, True))
    o, lse = rt.ops.forward(q, k, v, hp, None, None, None, None, None, 0, 0, 0.1, seed, 0.0, True)
    # temperature's learnable parameter keeps the two kernels whatever deterministic says; causal's
    # backward runs the two kernels (True), the single pass (False) and the cost model's choice (None)
    torch.library.opcheck(rt.ops.backward, (torch.randn_like(o), q, k, v, o, lse, hp, None, None, None, None, None, 0,
                                            0, 0.1, seed, 0.0, False))
    causal = runtime.of(attngen.load(ROOT / "specs" / "causal.yaml"))
    hp = torch.empty(0, 2, device=device)
    o, lse = causal.ops.forward(q, k, v, hp, None, None, None, None, None, 0, 0, 0.1, seed, 0.0, None)
    ran = []
    for deterministic in (True, False, None):
        torch.library.opcheck(causal.ops.backward, (torch.randn_like(o), q, k, v, o, lse, hp, None, None, None, None,
                                                    None, 0, 0, 0.1, seed, 0.0, deterministic))
        ran.append(causal.last_backward)
    assert ran == ["two kernels", "single pass", "two kernels"]  # None: the module's default (True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_inductor_and_cuda_graphs(name):
    mod = attngen.load(ROOT / "specs" / f"{name}.yaml")
    leaves, kw = _inputs(mod, name, "cuda", torch.bfloat16, n=300)
    extra = [kw["temperature"]] if "temperature" in kw else []
    out_e, grads_e = _grads(_step(mod, kw), leaves, extra)
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        compiled = torch.compile(_step(mod, kw), fullgraph=True, mode=mode)
        for _ in range(3):  # reduce-overhead records a CUDA graph on a later call and replays it
            out_c, grads_c = _grads(compiled, leaves, extra)
        # the same kernels run; only inductor's own sum may reduce in another order
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=0, msg=f"mode {mode}")
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=f"mode {mode}")


def _packed(device, n_heads=2):
    g = torch.Generator(device=device).manual_seed(3)
    lengths = [40, 0, 1, 75]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(116, n_heads, 128, generator=g, device=device).requires_grad_() for _ in range(3))
    return (q, k, v), cu, max(lengths)


@pytest.mark.interp
@pytest.mark.parametrize("name", ["causal", "document"])
def test_fullgraph_compile_of_attention_varlen_matches_eager(name, device):
    """attention_varlen under torch.compile(fullgraph=True): the lengths are read inside the op at
    run time, so tracing reads nothing; values and gradients equal eager's."""
    if device == "cuda":
        pytest.skip("the GPU tier runs inductor")
    mod = attngen.load(ROOT / "specs" / f"{name}.yaml")
    leaves, cu, longest = _packed(device)
    kw = {"documents": (torch.arange(116, device=device) // 30).int()} if name == "document" else {}

    def step(q, k, v):
        return (mod.attention_varlen(q, k, v, cu, cu, longest, longest, **kw).float() ** 2).sum()
    torch._dynamo.reset()
    out_c, grads_c = _grads(torch.compile(step, fullgraph=True, backend="aot_eager"), leaves, [])
    out_e, grads_e = _grads(step, leaves, [])
    assert torch.equal(out_c, out_e)
    assert all(torch.equal(a, b) for a, b in zip(grads_c, grads_e))


@pytest.mark.interp
def test_opcheck_packed(device):
    mod = attngen.load(ROOT / "specs" / "causal.yaml")
    rt = runtime.of(mod)
    (q, k, v), cu, longest = _packed(device)
    q4, k4, v4 = (t.detach().unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    hp = rt.head_param_rows(q4, {})
    args = (q4, k4, v4, hp, None, None, None, cu, cu, longest, longest, 0.1, 0, 0.0, True)
    torch.library.opcheck(rt.ops.forward, args)
    o, lse = rt.ops.forward(*args)
    torch.library.opcheck(rt.ops.backward, (torch.randn_like(o), q4, k4, v4, o, lse, hp, None, None, None, cu, cu,
                                            longest, longest, 0.1, 0, 0.0, False))


@pytest.mark.gpu
def test_inductor_attention_varlen():
    """Inductor (not CUDA graphs: the op reads the lengths on the host, which a capture forbids)."""
    mod = attngen.load(ROOT / "specs" / "causal.yaml")
    (q, k, v), cu, longest = _packed("cuda")
    leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]

    def step(q, k, v):
        return (mod.attention_varlen(q, k, v, cu, cu, longest, longest).float() ** 2).sum()
    out_e, grads_e = _grads(step, leaves, [])
    torch._dynamo.reset()
    out_c, grads_c = _grads(torch.compile(step, fullgraph=True), leaves, [])
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=0)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
