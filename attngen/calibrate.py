"""Fitting the cost model's constants to measured timings, and reporting predicted against measured.

    attngen bench specs/causal.yaml --exhaustive 40 --json data/exhaustive_h100.json   # on the GPU
    attngen calibrate data/exhaustive_*.json [--write]                                  # anywhere

Each measured row is one (spec, shape, kernel role, dtype, tiling) with its median time. The fit
minimizes the mean squared log ratio of predicted to measured time over the free `Constants`,
by coordinate search (a handful of smooth constants: no optimizer library needed); the overall
`scale` has a closed form. `--write` stores the result in data/cost_constants.json, which the cost
model reads at import: the tilings it picks change, so regenerate and re-verify after writing.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, replace
from pathlib import Path

from .cost_model import FITTED, TARGETS, Constants, Workload, predict
from .ir import OpKind
from .lower import lower, lower_backward
from .passes import PassOptions, mask_plan
from .spec import load_spec
from .tiling import TileConfig

FREE = ("rows_exponent", "streamed_exponent", "one_stage", "two_stages", "overlap", "mask_ops", "alu_ops", "hiding",
        "occupancy_gain", "occupancy_gain_cap", "tma_gain", "ws_gain")
BOUNDS = {"rows_exponent": (0.0, 2.0), "streamed_exponent": (0.0, 2.0), "one_stage": (0.1, 1.0),
          "two_stages": (0.1, 1.0), "overlap": (0.0, 1.0), "mask_ops": (0.0, 64.0), "alu_ops": (0.0, 32.0),
          "hiding": (0.0, 2.0), "occupancy_gain": (0.0, 1.0), "occupancy_gain_cap": (1.0, 2.0),
          "tma_gain": (0.5, 2.0), "ws_gain": (0.5, 2.0)}


@functools.lru_cache(maxsize=None)
def _plan(spec_path: str, role: str):
    """The kernel's mask plan, and its special-function ops per score."""
    path = Path(spec_path)
    if not path.exists():  # measured elsewhere: a shipped spec, or a --head-dim copy of one (same mask plan)
        path = Path(__file__).resolve().parent.parent / "specs" / (re.sub(r"_d\d+$", "", path.stem) + ".yaml")
    spec = load_spec(path)
    kernel = {k.attr("role"): k for k in (lower(spec), *lower_backward(spec))}[role]
    return mask_plan(kernel, PassOptions()).attr("mask_plan"), 1 + kernel.has(OpKind.SOFTCAP)


def predicted_ms(row: dict, k: Constants, target: str = "sm90") -> float | None:
    b, h, n = row["shape"]
    cfg = TileConfig(**row["config"])
    plan, sfu = _plan(row["spec_path"], row["role"])
    p = predict(cfg, plan, TARGETS[target], Workload(b, h, n, n, row["dtype"], sfu), row["role"], k)
    return None if p.time_s is None else p.time_s * 1e3


def _log_ratios(rows: list[dict], k: Constants) -> list[float]:
    out = []
    for r in rows:
        pred = predicted_ms(r, k)
        if pred is not None and r["measured_ms"]:
            out.append(math.log(pred / r["measured_ms"]))
    return out


def loss(rows: list[dict], k: Constants) -> float:
    """Mean squared log error after the best overall scale (which only shifts every log ratio)."""
    ratios = _log_ratios(rows, k)
    if not ratios:
        return float("inf")
    mean = sum(ratios) / len(ratios)
    return sum((x - mean) ** 2 for x in ratios) / len(ratios)


def fit(rows: list[dict], start: Constants = Constants(), rounds: int = 4) -> Constants:
    k, best = start, loss(rows, start)
    for step in (0.5, 0.25, 0.1, 0.05)[:rounds]:
        improved = True
        while improved:
            improved = False
            for name in FREE:
                lo, hi = BOUNDS[name]
                value = getattr(k, name)
                for candidate in (value * (1 + step), value * (1 - step), value + step, value - step):
                    candidate = min(hi, max(lo, candidate))
                    trial = replace(k, **{name: candidate})
                    trial_loss = loss(rows, trial)
                    if trial_loss < best - 1e-12:
                        k, best, improved = trial, trial_loss, True
    ratios = _log_ratios(rows, replace(k, scale=1.0))
    return replace(k, scale=math.exp(-sum(ratios) / len(ratios))) if ratios else k


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows += json.loads(Path(path).read_text())["trials"]
    return rows


def report(rows: list[dict], k: Constants) -> str:
    """Predicted against measured per row, and, per kernel and shape, where the pick ranks."""
    lines = ["| spec | shape | kernel | tiling | predicted ms | measured ms | measured / predicted |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        pred, meas, c = predicted_ms(r, k), r["measured_ms"], r["config"]
        cells = [r["spec"], "x".join(map(str, r["shape"])), r["role"],
                 TileConfig(**c).short(),
                 "rejected" if pred is None else f"{pred:.3f}", "failed" if meas is None else f"{meas:.3f}",
                 f"{meas / pred:.2f}" if pred and meas else "–"]
        lines.append("| " + " | ".join(cells) + " |")
        if pred and meas:
            groups.setdefault((r["spec"], tuple(r["shape"]), r["role"], r["dtype"]), []).append((pred, meas))
    lines += ["", "| spec | shape | kernel | model's pick reaches (of the measured best) |", "|---|---|---|---|"]
    for (spec, shape, role, _), pairs in groups.items():
        pick = min(pairs)[1]  # measured time of the candidate with the lowest prediction
        best = min(m for _, m in pairs)
        lines.append(f"| {spec} | {'x'.join(map(str, shape))} | {role} | {best / pick:.2f} |")
    return "\n".join(lines) + "\n"


def write(k: Constants, path: Path = FITTED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(k), indent=1) + "\n")

