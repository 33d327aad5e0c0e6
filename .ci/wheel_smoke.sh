#!/usr/bin/env bash
# Wheel smoke test: builds the wheel, installs it with its dependencies into a fresh virtual
# environment and, from a directory outside the repository, lists the shipped specs, generates a
# spec's kernel module and runs it on Triton's interpreter against PyTorch's SDPA.
# Exit status 0 only if every step passed; prints how long it took.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
fail() { echo "wheel smoke: FAILED: $*" >&2; exit 1; }

# Build from a copy of the working tree (tracked files and untracked ones git does not ignore), so a
# stale build/ or egg-info in the repository cannot leak into the wheel.
mkdir "$WORK/src" "$WORK/dist" "$WORK/run"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && tar --null -T - --ignore-failed-read -cf -) | tar -xf - -C "$WORK/src"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/attngen-*.whl)"
echo "wheel smoke: built $(basename "$WHEEL") ($((SECONDS - START)) s)"

"$PYTHON" -m venv "$WORK/venv"
VENV_PY="$WORK/venv/bin/python"
"$VENV_PY" -m pip install -q torch==2.13.0 "$WHEEL"
echo "wheel smoke: installed into a fresh venv ($((SECONDS - START)) s)"

cd "$WORK/run"
unset PYTHONPATH
export ATTNGEN_CACHE="$WORK/cache" TRITON_INTERPRET=1

"$VENV_PY" - <<'EOF' || fail "attngen is not imported from the venv's site-packages"
import sysconfig
from pathlib import Path

import attngen, cli
from attngen import resources

site = Path(sysconfig.get_paths()["purelib"]).resolve()
for what, path in [("attngen", attngen.__file__), ("cli", cli.__file__), ("templates", resources.templates_dir()),
                   ("specs", resources.specs_dir()), ("cost constants", resources.cost_constants_path())]:
    assert Path(path).resolve().is_relative_to(site), f"{what} comes from {path}, not {site}"
assert resources.cost_constants_path().is_file() and resources.shipped_specs()
print(f"wheel smoke: attngen imported from {Path(attngen.__file__).parent}")
EOF

"$WORK/venv/bin/attngen" list > list.txt || fail "attngen list"
for spec in "$WORK"/src/specs/*.yaml; do  # the specs the wheel was built from
    name="$(basename "$spec" .yaml)"
    grep -q "^$name " list.txt || fail "attngen list does not show the shipped spec $name"
done
echo "wheel smoke: attngen list shows the $(wc -l < list.txt) shipped specs"
"$WORK/venv/bin/attngen" show causal --emit spec > show.txt && grep -q "^name: causal$" show.txt \
    || fail "attngen show causal (a shipped spec named bare)"

cat > smoke.yaml <<'EOF'
name: smoke_causal
description: Causal attention for the wheel smoke test
head_dim: 32
dtypes: [fp32]
mask:
  causal: true
EOF
"$WORK/venv/bin/attngen" generate smoke.yaml -o out || fail "attngen generate smoke.yaml"
[ -f out/smoke_causal.py ] || fail "attngen generate wrote no out/smoke_causal.py"

"$VENV_PY" - <<'EOF' || fail "the generated kernel"
import importlib.util
import sys

import torch

import attngen


def from_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 37, 32) for _ in range(3))
# Nq == Nk: the spec's causal mask (bottom-right aligned by default) is SDPA's is_causal.
ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
ok = True
for how, module in [("generated file", from_file("out/smoke_causal.py", "smoke_causal")),
                    ("attngen.load", attngen.load("smoke.yaml"))]:
    err = (module.attention(q, k, v) - ref).abs().max().item()
    ok &= err < 1e-4
    print(f"wheel smoke: {how}: max abs error against SDPA {err:.1e} ({'ok' if err < 1e-4 else 'too large'})")
sys.exit(0 if ok else 1)
EOF

echo "wheel smoke: passed in $((SECONDS - START)) s"
