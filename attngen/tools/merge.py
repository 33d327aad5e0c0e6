"""Merges `attngen bench --json` files (one per spec, so that a run cut short keeps the rest) into
one JSON file and one markdown table: `attngen bench-merge out/fwd_*.json --json F --markdown F`."""

from __future__ import annotations

import json
from pathlib import Path

from attngen.bench import Row, save


def load_rows(files: list[Path]) -> tuple[dict, list[Row]]:
    """The first file's environment and every file's rows, the files in sorted order."""
    if not files:
        raise ValueError("no input files")
    env, rows = None, []
    for path in sorted(Path(f) for f in files):
        try:
            data = json.loads(path.read_text())
            env = env or data["environment"]
            rows += [Row(**r) for r in data["rows"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not an `attngen bench --json` file ({type(e).__name__}: {e})") from e
    return env, rows


def merge(files: list[Path], json_out: Path | None = None, markdown: Path | None = None) -> str:
    """Writes the merged rows as JSON and as markdown where asked; returns the markdown table."""
    env, rows = load_rows(files)
    return save(rows, json_out, markdown, env)
