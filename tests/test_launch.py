"""The generated host code's launch plans: one per call signature, reused while the signature
holds, a new one whenever something Triton specializes on changes; and the direct launch of the
compiled kernel (NVIDIA GPUs only), emulated here so the arguments it passes are checked against
the reference on the interpreter too."""

from pathlib import Path

import pytest
import torch

import attngen
from attngen import runtime
from attngen.runtime import module as runtime_module
from attngen.spec import load_spec
from attngen.verify import CPU_SHAPES, check, format_table

pytestmark = pytest.mark.interp

ROOT = Path(__file__).resolve().parent.parent


def _qkv(spec, n=40, heads=2, dtype=torch.float32, device="cpu", offset=0):
    g = torch.Generator().manual_seed(5)
    mk = lambda d: torch.randn(1, heads, n, d + offset, generator=g).to(device, dtype)[..., offset:]  # noqa: E731
    return mk(spec.head_dim), mk(spec.head_dim), mk(spec.head_dim_v)


def _misaligned(t):
    """A copy of t with the same shape and strides whose base is one element off 16 bytes."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.stride() == t.stride() and view.data_ptr() % 16
    return view


def test_plans_are_reused_per_signature_and_renewed_when_it_changes(device, monkeypatch):
    path = ROOT / "specs" / "sliding_window.yaml"
    spec, module = load_spec(path), attngen.load(path)
    rt = runtime.of(module)
    monkeypatch.setattr(rt, "plans", {})
    q, k, v = _qkv(spec, device=device)
    first = module.attention(q, k, v)
    assert [key[0] for key in rt.plans] == ["fwd"]
    plan = next(iter(rt.plans.values()))
    q2, k2, v2 = (t + 1 for t in (q, k, v))  # new tensors, same signature
    assert torch.equal(module.attention(q, k, v), first)
    module.attention(q2, k2, v2)
    assert list(rt.plans.values()) == [plan]
    module.attention(q[:, :, :39], k, v)  # another length
    module.attention(_misaligned(q), k, v)  # the same strides, another alignment
    module.attention(q, k, v, return_lse=True)  # another flag
    with module_tiling(module, "fwd", "fp32", BLOCK_N=16):  # another tiling (as exhaustive search swaps them)
        module.attention(q, k, v)
    assert len(rt.plans) == 5
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    module.attention(qg, kg, vg).sum().backward()
    assert sorted(key[0] for key in rt.plans) == ["bwd_dkdv", "bwd_dq"] + ["fwd"] * 5


class module_tiling:
    """Temporarily overrides some fields of a role's tiling in the module's tilings (and buckets)."""

    def __init__(self, module, role, dtype, **fields):
        self.rt, self.role, self.dtype, self.fields = runtime.of(module), role, dtype, fields

    def __enter__(self):
        self.saved = self.rt.tilings[self.role][self.dtype]
        self.buckets = dict(self.rt.bucket_tilings)
        self.rt.tilings[self.role][self.dtype] = dict(self.saved, **self.fields)
        for key in list(self.buckets):
            if key[:2] == (self.role, self.dtype):
                self.rt.bucket_tilings[key] = dict(self.buckets[key], **self.fields)

    def __exit__(self, *exc):
        self.rt.tilings[self.role][self.dtype] = self.saved
        self.rt.bucket_tilings.clear()
        self.rt.bucket_tilings.update(self.buckets)


def test_the_plans_cache_is_bounded(monkeypatch):
    path = ROOT / "specs" / "dense.yaml"
    spec, module = load_spec(path), attngen.load(path)
    rt = runtime.of(module)
    monkeypatch.setattr(rt, "plans", {("old", i): None for i in range(1024)})
    module.attention(*_qkv(spec, n=8))
    assert len(rt.plans) == 1


class _Compiled:
    """Stands in for Triton's CompiledKernel: its launcher gets every kernel parameter in order
    (constexprs included), as the real one does, and runs the interpreted kernel with them;
    `perturb` names a tensor parameter to nudge afterwards (a planted fault)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            assert len(args) == len(self.kernel.arg_names) and stream == 0
            self.kernel.launched.append(self.kernel.__name__)
            self.kernel.fn[grid](*args)
            if self.kernel.perturb:
                args[self.kernel.arg_names.index(self.kernel.perturb)].add_(1e-3)
        return runner


class _Kernel:
    """Stands in for a JITFunction: launches through Triton (the interpreter) and returns a
    _Compiled, as JITFunction.run returns the CompiledKernel it launched."""

    def __init__(self, fn, launched, perturb=None):
        self.fn, self.launched, self.perturb, self.arg_names = fn, launched, perturb, fn.arg_names
        self.__name__ = fn.fn.__name__

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.fn[grid](*args, **kwargs)
            return _Compiled(self)
        return launch


def _emulate_direct_launches(module, monkeypatch, perturb=None):
    """The module as on an NVIDIA GPU: a signature's first launch through Triton, later ones
    through the compiled kernel's launcher (emulated). Returns the list the launchers log to."""
    launched = []
    rt = runtime.of(module)
    monkeypatch.setattr(rt, "plans", {})
    monkeypatch.setattr(rt, "direct", True)  # Plans copy it when made: none is made before
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0 if index == 0 else None, raising=False)
    for role in ("fwd", "bwd_dq", "bwd_dkdv"):
        monkeypatch.setitem(rt.kernels, role, _Kernel(rt.kernels[role], launched, perturb if role == "fwd" else None))
    return launched


@pytest.mark.parametrize("name", ["causal_dropout", "gqa", "dilated", "alibi", "document"])
def test_direct_launches_pass_the_arguments_triton_would(name, device, monkeypatch):
    """With the direct path on (as on an NVIDIA GPU), a signature's second call goes to the compiled
    kernel's launcher: `check` repeats each call and requires the same results bit for bit, and the
    first call's against the reference. (For the document spec `check` passes documents= with ids
    from attngen.verify.random_documents: the tables and ids are per-call tensor arguments.)"""
    if device == "cuda":
        pytest.skip("the GPU takes the real direct path (tests/test_gpu.py)")
    path = ROOT / "specs" / f"{name}.yaml"
    spec, module = load_spec(path), attngen.load(path)
    launched = _emulate_direct_launches(module, monkeypatch)
    result = check(spec, module, CPU_SHAPES[0], "fp16", device, backward=True)  # fp16: TMA descriptors too
    assert result.ok, format_table([result])
    assert any(d is not None for plan in runtime.of(module).plans.values() for d in plan.descs)
    assert sorted(launched) == ["_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd"]  # the repeats were direct


def test_check_fails_when_a_direct_launch_differs(device, monkeypatch):
    if device == "cuda":
        pytest.skip("emulates the GPU's direct path on the interpreter")
    path = ROOT / "specs" / "causal.yaml"
    spec, module = load_spec(path), attngen.load(path)
    _emulate_direct_launches(module, monkeypatch, perturb="O")
    result = check(spec, module, CPU_SHAPES[0], "fp32", device)
    assert not result.ok and "repeated call" in result.why


def test_plans_keep_no_tensor_of_their_calls_alive(device, monkeypatch):
    """A plan outlives its first call: its TMA descriptor templates must not hold that call's q, k,
    v (or dO) alive."""
    import gc
    import weakref

    path = ROOT / "specs" / "softcap.yaml"
    spec, module = load_spec(path), attngen.load(path)
    rt = runtime.of(module)
    monkeypatch.setattr(rt, "plans", {})
    q, k, v = (t.requires_grad_() for t in _qkv(spec, dtype=torch.float16, device=device))
    module.attention(q, k, v).sum().backward()
    assert any(d is not None for plan in rt.plans.values() for d in plan.descs)  # TMA was taken
    refs = [weakref.ref(t) for t in (q, k, v)]
    del q, k, v
    gc.collect()
    assert all(r() is None for r in refs)


def test_equal_signatures_give_equal_triton_specializations(device, monkeypatch):
    """Every launch's arguments as Triton's binder specializes them (its own native function) must
    be the same for any two calls whose plan signature is the same: else a direct launch would run
    a kernel compiled for other arguments. Calls vary seeds (1, 16, 2^31 + 1), lengths (1 among
    them: Triton makes an int argument of 1 a constant), alignment, strides, out=, flags."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    from triton.backends.compiler import BaseBackend

    path = ROOT / "specs" / "causal_dropout.yaml"
    spec, module = load_spec(path), attngen.load(path)
    rt = runtime.of(module)
    monkeypatch.setattr(rt, "plans", {})
    monkeypatch.setattr(rt, "direct", False)  # every launch through kernel[grid], where it is recorded
    launches, current = [], {}
    real_signature = runtime_module.signature

    def signature(*args):
        current["key"] = real_signature(*args)
        return current["key"]
    monkeypatch.setattr(runtime_module, "signature", signature)

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                unspecialized = getattr(self.fn, "do_not_specialize", None) or self.fn.kwargs["do_not_specialize"]
                spec_of = [("constexpr", kwargs[n]) if n in kwargs else
                           libtriton.native_specialize_impl(BaseBackend, a, False, n not in unspecialized, True)
                           for n, a in zip(self.fn.arg_names, list(args) + [None] * len(kwargs))]
                launches.append((current["key"], tuple(spec_of), kwargs["num_warps"], kwargs["num_stages"]))
                return self.fn[grid](*args, **kwargs)
            return launch
    for role in ("fwd", "bwd_dq", "bwd_dkdv"):
        monkeypatch.setitem(rt.kernels, role, Recorder(rt.kernels[role]))
    dtype = torch.float16
    q, k, v = _qkv(spec, dtype=dtype, device=device)
    q2, k2, v2 = (t * 0.5 for t in (q, k, v))
    calls = [((q, k, v), {}), ((q2, k2, v2), {}), ((q, k, v), {"dropout_seed": 1}), ((q, k, v), {"dropout_seed": 16}),
             ((q, k, v), {"dropout_seed": 17}), ((q, k, v), {"dropout_seed": 2**31 + 1}),
             ((q[:, :, :1], k, v), {}), ((q[:, :, :17], k, v), {}), ((_misaligned(q), k, v), {}),
             ((q.transpose(1, 2).contiguous().transpose(1, 2), k, v), {}), ((q, k, v), {"return_lse": True}),
             ((q, k, v), {"out": torch.empty(1, 40, 2, spec.head_dim_v, dtype=dtype, device=device).transpose(1, 2)}),
             ((q, k, v), {"training": False})]
    for (a, b, c), kwargs in calls:
        module.attention(a, b, c, **{"dropout_seed": 5, **kwargs})
    for seed in (3, 4):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        module.attention(*leaves, dropout_seed=seed).sum().backward()
    by_key = {}
    for key, *specialization in launches:
        by_key.setdefault(key, set()).add(tuple(specialization))
    assert all(len(specs) == 1 for specs in by_key.values())
    assert len(by_key) >= 10 and len(launches) >= len(by_key) + 6  # distinct signatures, and repeats of some
