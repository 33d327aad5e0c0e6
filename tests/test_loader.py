"""attngen.load's disk cache: a new process reads the module an earlier one compiled, keyed by the
spec's text, the options and the compiler's own digest; a damaged file is compiled again."""

import subprocess
import sys
from pathlib import Path

import pytest

import attngen.loader as loader

ROOT = Path(__file__).resolve().parent.parent
SPEC = "name: tiny_causal\nhead_dim: 32\nmask:\n  causal: true\n"


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache, and this process's memory of loaded modules forgotten."""
    monkeypatch.setattr(loader, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(loader, "_LOADED", {})
    spec = tmp_path / "tiny_causal.yaml"
    spec.write_text(SPEC)
    return spec


def _forget(monkeypatch, module):
    monkeypatch.setattr(loader, "_LOADED", {})
    monkeypatch.delitem(sys.modules, module.__name__)


def _no_compile(monkeypatch):
    import attngen.pipeline

    def refuse(*a, **k):
        raise AssertionError("compiled again")
    monkeypatch.setattr(attngen.pipeline, "compile_spec", refuse)


@pytest.mark.compiler
def test_a_second_load_reads_the_cached_module_without_compiling(fresh, monkeypatch):
    first = loader.load(fresh)
    _forget(monkeypatch, first)
    _no_compile(monkeypatch)
    second = loader.load(fresh)
    assert second.__name__ == first.__name__ and second is not first
    assert second.__attngen_digest__ == first.__attngen_digest__


@pytest.mark.compiler
def test_a_changed_spec_options_or_compiler_miss_the_cache(fresh, monkeypatch):
    first = loader.load(fresh)
    fresh.write_text(SPEC.replace("head_dim: 32", "head_dim: 64"))
    assert loader.load(fresh).__name__ != first.__name__
    fresh.write_text(SPEC)
    assert loader.load(fresh, target="sm80") is not first
    _forget(monkeypatch, first)
    monkeypatch.setattr(loader, "_COMPILER", ["another compiler"])
    n_index = len(list((loader.CACHE / "index").iterdir()))
    loader.load(fresh)  # same source, so the same module file, but found by compiling: a new index entry
    assert len(list((loader.CACHE / "index").iterdir())) == n_index + 1


@pytest.mark.compiler
def test_a_damaged_module_file_is_compiled_again(fresh, monkeypatch):
    first = loader.load(fresh)
    path = loader.CACHE / f"{first.__name__}.py"
    path.write_text(path.read_text() + "\nraise RuntimeError('damaged')\n")
    _forget(monkeypatch, first)
    again = loader.load(fresh)
    assert again.__name__ == first.__name__ and "damaged" not in path.read_text()


@pytest.mark.compiler
def test_cache_false_compiles_and_writes_no_index(fresh):
    loader.load(fresh, cache=False)
    assert not (loader.CACHE / "index").exists()


@pytest.mark.compiler
def test_a_new_process_loads_from_the_cache(fresh):
    code = ("import sys, attngen.loader as L, attngen.pipeline as P; L.CACHE = __import__('pathlib').Path(sys.argv[2]); "
            "P.compile_spec = None if sys.argv[3] == 'cached' else P.compile_spec; print(L.load(sys.argv[1]).__name__)")
    run = lambda mode: subprocess.run([sys.executable, "-c", code, str(fresh), str(loader.CACHE), mode],  # noqa: E731
                                      capture_output=True, text=True, cwd=ROOT)
    first = run("first")
    assert first.returncode == 0, first.stderr
    second = run("cached")  # compile_spec is gone: only the cache can answer
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


@pytest.mark.compiler
def test_processes_loading_one_spec_at_once_all_succeed(fresh):
    """As torchrun's ranks do: four processes compile and write the same module and index at once."""
    code = ("import sys, pathlib, attngen.loader as L; L.CACHE = pathlib.Path(sys.argv[2]); "
            "print(L.load(sys.argv[1]).__name__)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(fresh), str(loader.CACHE)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out for out, _ in outs}) == 1
    assert not list(loader.CACHE.rglob("*.tmp"))
