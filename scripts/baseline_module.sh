#!/bin/bash
# A spec's standalone module as an earlier commit generated it (its own runtime inlined), for the
# A/B scripts' --baseline: scripts/baseline_module.sh REV SPEC -> out/baselines/SPEC_REV.py
# (out/ is ignored: name out/baselines in the device run's carry).
set -euo pipefail
rev=$1 spec=$2
root=$(git rev-parse --show-toplevel)
tree=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tree"' EXIT
git -C "$root" worktree add -q --detach "$tree" "$rev"
mkdir -p "$root/out/baselines"
(cd "$tree" && PYTHONPATH="$tree" python -m cli.main generate "specs/$spec.yaml" --standalone -o "$tree/out" > /dev/null)
cp "$tree/out/$spec.py" "$root/out/baselines/${spec}_$rev.py"
echo "out/baselines/${spec}_$rev.py"
