"""Ran on: Triton 3.9.0, torch 2.13.0+cpu (the CPU machine, 2026-12-07: out/baselines/causal_53b5bfd.py; no GPU needed).

A spec's standalone module as an earlier commit generated it (its runtime inlined), for the A/B
scripts' --baseline (experiments/decode_ab_gpu.py); made here, where git is, before a device run:

    python experiments/baseline_module.py 53b5bfd causal    # -> out/baselines/causal_53b5bfd.py

out/ is ignored by git: name out/baselines in the device run's carry. A commit's own standalone
inliner is used, bugs included: 53b5bfd's leaves out the `decode` namespace, so its module loads but
its attention_with_kvcache raises NameError (docs/verification.md, the thirteenth session).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rev")
    ap.add_argument("spec")
    args = ap.parse_args()
    out = ROOT / "out" / "baselines" / f"{args.spec}_{args.rev}.py"
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), args.rev], check=True)
        try:
            subprocess.run([sys.executable, "-m", "cli.main", "generate", f"specs/{args.spec}.yaml", "--standalone",
                            "-o", str(tree / "out")], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                           check=True, stdout=subprocess.DEVNULL)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tree / "out" / f"{args.spec}.py", out)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    print(out.relative_to(ROOT))


if __name__ == "__main__":
    main()
