"""Merges `attngen bench --json` files (one per spec, so that a run cut short keeps the rest) into
one JSON file and one markdown table.

    python scripts/merge_bench.py out/fwd_*.json --json data/bench.json --markdown bench.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attngen.bench import Row, format_markdown


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    env, rows = None, []
    for path in sorted(args.files):
        data = json.loads(path.read_text())
        env = env or data["environment"]
        rows += [Row(**r) for r in data["rows"]]
    if env is None:
        raise SystemExit("no input files")
    md = format_markdown(rows, env)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": [r.__dict__ for r in rows]}, indent=1))
    if args.markdown:
        args.markdown.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
