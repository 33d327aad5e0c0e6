import os

# Under pytest-xdist (the README's `-n 2`) each worker keeps to one thread: two workers on two cores
# run the interpreter's kernels faster than one process with two threads (docs/architecture.md).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")

import pytest  # noqa: E402

# Kernels run through Triton's interpreter on CPU tensors when there is no GPU; this must be set
# before a generated module's @triton.jit runs.
try:
    import torch

    HAS_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_GPU = False
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/ from the current output")


# Every test is in exactly one tier (pyproject.toml registers the markers): `compiler` runs no
# kernel, `interp` runs kernels (on Triton's interpreter without a GPU), `gpu` needs a CUDA GPU.
# Select one with -m, e.g. `pytest -m compiler` for the fast tier.
TIERS = ("compiler", "interp", "gpu")


def pytest_collection_modifyitems(config, items):
    tiers = {item: sorted({m.name for m in item.iter_markers() if m.name in TIERS}) for item in items}
    wrong = [f"{item.nodeid}: {', '.join(names) or 'none'}" for item, names in tiers.items() if len(names) != 1]
    if wrong:
        raise pytest.UsageError(f"tests must carry exactly one tier marker of {', '.join(TIERS)}:\n  "
                                + "\n  ".join(wrong))
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")


@pytest.fixture(scope="session")
def device():
    return "cuda" if HAS_GPU else "cpu"


@pytest.fixture
def capture():
    """capture(step) -> (graph, out): step run once (compiling its kernels) and once on a side
    stream, then captured in a CUDA graph whose replays rewrite out."""
    def run(step):
        step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        return graph, out
    return run
